"""Faithfulness benchmark of the relevance maps (tools/explain.py's methods) of trained models.

    python tools/faithfulness.py --config_file configs/Synthetic/svpr_reid.yml configs/Synthetic/vit.yml
    python tools/faithfulness.py --weights outputs/x/model_final.pth --method relevance --images 32 --pairs
    python tools/faithfulness.py --config_file configs/Synthetic/*.yml --json faithfulness.json

Each ``--config_file`` names a trained run (its OUTPUT_DIR/model_final.pth, configured by the checkpoint's stored
config); ``--weights`` names checkpoints directly. For every model and ``--method`` (default: all of them) it
explains ``--images`` evaluation images of the first test protocol (evenly spread over its query and gallery
lists) and prints, per null map, how far the maps beat it on the deletion and insertion curves over the
model's patch cells (area between the curves, as a fraction of the range from the mean image's to the clean
image's cosine similarity, with a 95% paired bootstrap interval over images), and, on SynthAG, the energy-based
pointing game against the person masks the generator draws; evaluation/faithfulness.py defines them all.
``--pairs`` explains each image's similarity to another image of its identity seen from the other view instead
of its own feature. A Markdown summary follows (one row per model and method); ``--json`` writes every figure.
Exit code 1 with ``--strict`` when a method ``tools/explain.py`` offers for a model is not found faithful.
"""
import argparse
import json
import os
import time

import torch

from configs import read_config
from datasets import ImageDataset, build_test_transform, collate, image_reader
from datasets.loader import load_dataset
from datasets.synthetic import SETTINGS_FILE, person_mask
from evaluation.comparison import MIN_RESAMPLES
from evaluation.faithfulness import NULLS, POINTING_RATIO, REQUIRED_NULLS, STEPS, FaithfulnessBenchmark
from evaluation.relevance import METHODS, Explainer, unfaithful_reason
from processor.inference import FeatureExtractor
from processor.launch import check_registered_names
from utils.entrypoint import run_main
from utils.errors import DataError, UserError
from utils.io import atomic_write


def checkpoints(args):
    """``[(label, weights path)]`` of the command line."""
    if args.weights:
        missing = [path for path in args.weights if not os.path.isfile(path)]
        if missing:
            raise DataError(f"checkpoint '{missing[0]}' not found")
        return [(path, path) for path in args.weights]
    found = []
    for config_file in args.config_file:
        cfg, _ = read_config(config_file, list(args.opts))
        path = os.path.join(cfg.OUTPUT_DIR, "model_final.pth")
        if not os.path.isfile(path):
            raise DataError(f"{config_file}: no trained model at '{path}' (OUTPUT_DIR); train it first: python "
                            f"train_svpr.py --config_file {config_file}")
        found.append((config_file, path))
    return found


def evaluation_images(cfg, count):
    """``(samples, dataset)``: ``count`` images evenly spread over the query + gallery lists of the first test
    protocol, and that ImageDataset (the evaluation's pre-processing and captions)."""
    dataset = load_dataset(cfg, cfg.DATASETS.TESTS[0], load_train=False)
    samples = dataset.query + dataset.gallery
    chosen = sorted({round(i * (len(samples) - 1) / (count - 1)) for i in range(count)}) if count < len(samples) \
        else list(range(len(samples)))
    data = ImageDataset(samples, build_test_transform(cfg), text_len=cfg.MODEL.TEXT_LEN, reader=image_reader(cfg))
    return chosen, data


def partners(data, chosen):
    """``{index: partner index}``: for each chosen image, the first other image of its identity from another view
    (else from the same view)."""
    found = {}
    for index in chosen:
        sample = data.samples[index]
        same = [other for other, s in enumerate(data.samples) if s.pid == sample.pid and other != index]
        other_view = [other for other in same if data.samples[other].viewid != sample.viewid]
        if other_view or same:
            found[index] = (other_view or same)[0]
    return found


def masks_of(data, chosen, size):
    """(B, H, W) person masks of the chosen SynthAG images at the model's input ``size``, or None when the
    images are not SynthAG's (no generator settings next to them)."""
    masks = []
    for index in chosen:
        path = data.samples[index].path
        folder = os.path.dirname(os.path.dirname(path))
        if not os.path.isfile(os.path.join(folder, SETTINGS_FILE)):
            return None
        mask = torch.from_numpy(person_mask(folder, os.path.basename(path)))
        if tuple(mask.shape) != tuple(size):  # nearest: a mask stays a mask
            mask = torch.nn.functional.interpolate(mask[None, None].float(), size=tuple(size))[0, 0] > 0.5
        masks.append(mask)
    return torch.stack(masks)


def _interval(gain):
    return f"{gain.mean:+.3f} [{gain.interval[0]:+.3f}, {gain.interval[1]:+.3f}]"


def report(result):
    """The lines printed for one model and method."""
    low, high = result.score_range
    lines = [f"{result.images} images, {result.cells[0]}x{result.cells[1]} cells, {result.steps} steps; cosine "
             f"similarity mean image {low:.4f} -> clean {high:.4f} (areas and gains: fractions of that range)",
             *([] if high > low else ["warning: the clean images score no higher than the mean image, so removing "
                                      "cells cannot lower the score: the curves below measure nothing"]),
             "| null | deletion area map / null | deletion gain [95% CI] | insertion area map / null | "
             "insertion gain [95% CI] | beaten |", "|---|---|---|---|---|---|"]
    for null in result.deletion_gain:
        deletion, insertion = result.deletion_gain[null], result.insertion_gain[null]
        beaten = "yes" if result.beaten(null) else "NO" if null in REQUIRED_NULLS else "no (not required)"
        lines.append(f"| {null} | {deletion.map_area:.3f} / {deletion.null_area:.3f} | {_interval(deletion)} | "
                     f"{insertion.map_area:.3f} / {insertion.null_area:.3f} | {_interval(insertion)} | {beaten} |")
    pointing = result.pointing
    if pointing is None:
        lines.append("pointing game: no person masks (not SynthAG images)")
    else:
        lines.append(f"pointing game: {100 * pointing.share:.1f}% of the map inside the person, whose mask covers "
                     f"{100 * pointing.mask_share:.1f}% of the image ({pointing.ratio:.2f}x; difference 95% CI "
                     f"[{100 * pointing.interval[0]:+.1f}, {100 * pointing.interval[1]:+.1f}] points"
                     f"{f'; {pointing.empty_maps} empty maps' if pointing.empty_maps else ''}): "
                     f"{'passed' if pointing.passed else f'FAILED (needs the interval above 0 and {POINTING_RATIO}x)'}")
    lines.append(f"verdict: {'faithful' if result.faithful else 'NOT faithful'}")
    return lines


def summary_row(arch, method, result):
    """One Markdown row: the weakest gain over the required nulls on each curve, the gains over the flipped map,
    the pointing game and the verdict."""
    cells = []
    for gains in (result.deletion_gain, result.insertion_gain):
        null, gain = min(((null, gains[null]) for null in REQUIRED_NULLS if null in gains),
                         key=lambda item: item[1].interval[0])
        cells.append(f"{_interval(gain)} ({null})")
    flipped = "-" if "flipped" not in result.deletion_gain else \
        f"{result.deletion_gain['flipped'].mean:+.3f} / {result.insertion_gain['flipped'].mean:+.3f}" + \
        ("" if result.beaten("flipped") else " (not beaten)")
    pointing = "-" if result.pointing is None else \
        f"{100 * result.pointing.share:.0f}% / {100 * result.pointing.mask_share:.0f}% = {result.pointing.ratio:.2f}x"
    return (f"| {arch} | `{method}` | {cells[0]} | {cells[1]} | {flipped} | {pointing} | "
            f"{'yes' if result.faithful else 'no'} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sources = parser.add_mutually_exclusive_group(required=True)
    sources.add_argument("--config_file", "--config-file", nargs="+", metavar="YML",
                         help="training configs whose OUTPUT_DIR holds the trained model_final.pth")
    sources.add_argument("--weights", nargs="+", metavar="PTH", help="checkpoints (their stored config is used)")
    parser.add_argument("--method", nargs="+", choices=METHODS, default=list(METHODS), help="map methods")
    parser.add_argument("--images", type=int, default=64, help="evaluation images explained per model")
    parser.add_argument("--steps", type=int, default=STEPS, help="points of the deletion / insertion curves")
    parser.add_argument("--draws", type=int, default=2, help="draws of each random null per image")
    parser.add_argument("--pairs", action="store_true",
                        help="explain each image's similarity to an image of its identity from another view")
    parser.add_argument("--resamples", type=int, default=MIN_RESAMPLES, help="bootstrap resamples")
    parser.add_argument("--seed", type=int, default=0, help="seed of the nulls, tie-breaking and bootstrap")
    parser.add_argument("--json", metavar="OUT.json", help="also write every figure as a JSON document")
    parser.add_argument("--strict", action="store_true",
                        help="exit code 1 when a method tools/explain.py offers for a model is not faithful")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides as KEY VALUE pairs")
    args = parser.parse_args(argv)
    if args.images < 2 or args.steps < 2 or args.draws < 1 or args.resamples < 1:
        raise UserError(f"--images {args.images} / --steps {args.steps} / --draws {args.draws} / --resamples "
                        f"{args.resamples}: expected at least 2 / 2 / 1 / 1")

    document, rows, failures = {}, [], []
    for label, weights in checkpoints(args):
        extractor = FeatureExtractor.from_checkpoint(weights, opts=list(args.opts))
        cfg, model = extractor.cfg, extractor.model
        check_registered_names(cfg)
        chosen, data = evaluation_images(cfg, args.images)
        directions = None
        if args.pairs:
            matched = partners(data, chosen)
            chosen = [index for index in chosen if index in matched]
            others = collate([data[matched[index]] for index in chosen])
            others = {key: value.to(extractor.device) if torch.is_tensor(value) else value
                      for key, value in others.items()}
        batch = collate([data[index] for index in chosen])
        batch = {key: value.to(extractor.device) if torch.is_tensor(value) else value for key, value in batch.items()}
        inputs = model.forward_inputs(batch)
        masks = masks_of(data, chosen, batch["images"].shape[-2:])
        arch = cfg.MODEL.ARCH_NAME
        document[label] = {"weights": weights, "arch": arch, "pairs": args.pairs, "methods": {}}
        for method in args.method:
            start = time.time()
            explainer = Explainer(model, method, refuse_unfaithful=False)
            if args.pairs:
                directions = explainer.features(others["images"], model.forward_inputs(others))
            benchmark = FaithfulnessBenchmark(explainer, steps=args.steps, draws=args.draws,
                                              resamples=args.resamples, seed=args.seed)
            result = benchmark(batch["images"], inputs, directions, masks)
            print(f"\n== {label}: {arch}, method {method} ({time.time() - start:.0f} s)")
            print("\n".join(report(result)))
            rows.append(summary_row(arch, method, result))
            document[label]["methods"][method] = result.as_dict()
            if not result.faithful and unfaithful_reason(model, method) is None:
                failures.append(f"{arch} {method}")

    target = "each image's similarity to its match" if args.pairs else "each image's own feature"
    print(f"\nSummary ({target}): gain [95% CI] over the weakest required null on each curve and over the flipped map "
          f"(deletion / insertion), as fractions of the mean-image-to-clean range; pointing game: the map's share "
          f"inside the person / the person's share of the image")
    print("| model | method | deletion gain (weakest null) | insertion gain (weakest null) | flipped | pointing game | "
          "faithful |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    reported = [null for null in NULLS if null not in REQUIRED_NULLS]
    print(f"required nulls: {', '.join(REQUIRED_NULLS)}; reported only: {', '.join(reported)}")
    if failures:
        print(f"not faithful although tools/explain.py offers them: {', '.join(failures)}")
    if args.json:
        atomic_write(args.json, json.dumps(document, indent=1) + "\n")
        print(f"wrote {args.json}")
    if failures and args.strict:
        raise SystemExit(1)


if __name__ == "__main__":
    run_main(main)

"""Relevance maps of a trained model: which pixels its test feature, or a match, rests on.

    python tools/explain.py --weights outputs/x/model_final.pth --images a.jpg b.jpg --viewids 1 0 --out maps/
    python tools/explain.py --weights W --pair query.jpg gallery.jpg --viewids 1 0 --out maps/
    python tools/explain.py --weights W --images a.jpg --method integrated_gradients --out maps/ MODEL.DEVICE cpu

Writes per image ``<out>/<stem>.npy`` (float32 (h, w) map at the image's own size, larger = more relevant)
and ``<out>/<stem>.png`` (the map over the image). ``--pair QUERY GALLERY`` explains their similarity: each
map shows what in that image makes it resemble the other, and ``<out>/pair_<query>_<gallery>.png`` shows
both images and their maps with their cosine similarity. Methods (``--method``, evaluation/relevance.py):
``relevance`` (default, conservative propagation after Ali et al. 2022), ``gradcam`` (pytorch-grad-cam),
``integrated_gradients`` (captum). A method whose maps of the checkpoint's model failed the faithfulness
benchmark (tools/faithfulness.py, docs/explain.md) is refused with one line naming the faithful ones, and no
map is written. The config stored in the checkpoint is used unless ``--config_file`` is given; ``KEY VALUE``
overrides apply either way. ``--viewids``: one per image or one for all (0 ground, 1 aerial; AG-ReID.v2:
0 CCTV, 1 wearable, 2 UAV); models told the platform (SVPR-ReID, SIE) need it.
"""
import argparse
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from configs import config_from_checkpoint
from evaluation.relevance import METHODS, Explainer, overlay, resize_map
from processor.inference import FeatureExtractor
from processor.launch import check_registered_names
from utils.entrypoint import run_main
from utils.errors import DataError, UserError
from utils.io import atomic_write

TITLE_HEIGHT = 18


def _save_png(path, image):
    atomic_write(path, lambda handle: image.save(handle, format="PNG"))


def _side_by_side(pictures, title):
    """The pictures next to each other under a one-line ``title``."""
    font = ImageFont.load_default()
    width = max(sum(picture.width for picture in pictures) + 4 * (len(pictures) - 1),
                int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=font)) + 4)
    canvas = Image.new("RGB", (width, TITLE_HEIGHT + max(picture.height for picture in pictures)), "white")
    ImageDraw.Draw(canvas).text((2, 2), title, fill="black", font=font)
    left = 0
    for picture in pictures:
        canvas.paste(picture, (left, TITLE_HEIGHT))
        left += picture.width + 4
    return canvas


def _outputs(out, images, pair, overwrite):
    """``[(image, stem)]`` and the files to write; ``UserError`` on shared stems or existing files."""
    stems = [os.path.splitext(os.path.basename(path))[0] for path in images]
    if len(set(stems)) != len(stems):
        shared = sorted({stem for stem in stems if stems.count(stem) > 1})
        raise UserError(f"images share the file name {shared[0]!r}: their maps would overwrite each other; explain "
                        f"them in separate --out folders")
    files = [os.path.join(out, f"{stem}{suffix}") for stem in stems for suffix in (".npy", ".png")]
    if pair:
        files.append(os.path.join(out, f"pair_{stems[0]}_{stems[1]}.png"))
    existing = [path for path in files if os.path.exists(path)]
    if existing and not overwrite:
        raise UserError(f"{existing[0]} exists: pass --overwrite to replace it, or choose another --out")
    return stems, files


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--weights", required=True, help="checkpoint (model_final.pth, .safetensors, ...)")
    images = parser.add_mutually_exclusive_group(required=True)
    images.add_argument("--images", nargs="+", metavar="IMG", help="images whose own feature is explained")
    images.add_argument("--pair", nargs=2, metavar=("QUERY", "GALLERY"), help="explain the match of two images")
    parser.add_argument("--viewids", nargs="+", type=int, metavar="V", help="view id per image, or one for all")
    parser.add_argument("--out", required=True, help="folder of the maps")
    parser.add_argument("--method", default="relevance", choices=METHODS, help="relevance method")
    parser.add_argument("--overwrite", action="store_true", help="replace maps already in --out")
    parser.add_argument("--config_file", "--config-file", default=None,
                        help="training config (default: the one stored in the checkpoint)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides as KEY VALUE pairs")
    args = parser.parse_args(argv)
    paths = list(args.pair or args.images)
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise DataError(f"image '{missing[0]}' not found")
    viewids = args.viewids or [0]
    if len(viewids) not in (1, len(paths)):
        raise UserError(f"--viewids has {len(viewids)} values for {len(paths)} images: give one per image or one "
                        f"for all")
    viewids = viewids * len(paths) if len(viewids) == 1 else viewids
    stems, _ = _outputs(args.out, paths, bool(args.pair), args.overwrite)

    cfg, _ = config_from_checkpoint(args.weights, args.config_file, list(args.opts))
    check_registered_names(cfg)
    extractor = FeatureExtractor(cfg, args.weights)
    model = extractor.model
    if "viewids" in model.batch_inputs and not args.viewids:
        print(f"note: no --viewids: every image is embedded as view 0, which {cfg.MODEL.ARCH_NAME} is told")
    explainer = Explainer(model, args.method)
    (batch,) = extractor.batches(paths, viewids, batch_size=len(paths))
    inputs = model.forward_inputs(batch)
    directions = None
    if args.pair:  # each image explained towards the other's feature
        directions = explainer.features(batch["images"], inputs).flip(0)
    maps, features = explainer(batch["images"], inputs, directions)

    os.makedirs(args.out, exist_ok=True)
    pictures = []  # each image, then its map over it
    for path, stem, relevance in zip(paths, stems, maps):
        with Image.open(path) as image:
            image = image.convert("RGB")
        relevance = resize_map(relevance, (image.height, image.width))
        atomic_write(os.path.join(args.out, f"{stem}.npy"), lambda handle, values=relevance: np.save(handle, values))
        pictures += [image, overlay(image, relevance)]
        _save_png(os.path.join(args.out, f"{stem}.png"), pictures[-1])
        print(f"wrote {os.path.join(args.out, stem)}.npy and .png")
    if args.pair:
        similarity = float(np.dot(*(feature / np.linalg.norm(feature) for feature in features.numpy())))
        path = os.path.join(args.out, f"pair_{stems[0]}_{stems[1]}.png")
        _save_png(path, _side_by_side(pictures, f"cosine similarity {similarity:.3f} ({args.method})"))
        print(f"wrote {path} (cosine similarity {similarity:.4f})")


if __name__ == "__main__":
    run_main(main)

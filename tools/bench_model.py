"""Training and inference throughput of the models: images/s, peak memory, achieved TFLOP/s and its share of
the device's peak, per precision (fp32, or fp16 / bf16 autocast).

    python tools/bench_model.py --all configs/CP2108 --random-weights --threads 1     # every model, our side
    python tools/bench_model.py --all --device cuda --amp fp16 bf16                    # on a GPU
    python tools/bench_model.py --config_file configs/CP2108/svpr_reid.yml --random-weights [--batch 16]

``--all [FOLDER]`` times the seven models of a config folder (default configs/CP2108: ViT-B/16 at 256x128).
With ``--config_file`` the config's model is timed next to the CLIP baseline on the same backbone (built from
``--baseline_config`` if given), and further models with ``--also CONFIG ...``.

A training step is forward + criterion + backward + optimiser step on a synthetic P x K batch (one caption
and one attribute vector per identity, alternating views), as the trainer runs it; inference is the test
forward in eval mode without gradients. The models' timed steps alternate, so a change in machine load
affects them alike. FLOPs are those ``torch.utils.flop_counter`` counts in one step (matrix products,
convolutions, attention); the peak they are compared with is ``--peak-tflops`` or, by default, a dense
matrix product of the same precision measured on the device before and after the models' steps (the faster
of the two, best of five each). Each precision runs as training and evaluation
run it (``utils.amp``): fp16 autocast with the gradient scaler, bf16 autocast, or fp32; inference steps run
inside one autocast region, as an evaluation's batches do. ``--amp`` defaults to fp16 and bf16 on CUDA, and to
fp32 plus bf16 where the CPU has native bf16 matrix units. A printed table, then one JSON object as the last
line.
"""
import argparse
import contextlib
import json
import os
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from configs import load_config
from loss import build_criterion
from model import build_model
from processor.inference import test_autocast
from processor.trainer import Trainer
from text import tokenize
from utils.allocator import retain_freed_cpu_memory
from utils.amp import native_bf16_units
from utils.entrypoint import run_main
from utils.errors import ConfigError

# A CP2108-like attribute annotation (12 attributes) for configs that use attributes.
BENCH_ATTRIBUTES = tuple((f"attribute {i}", 2 + i % 4) for i in range(12))
# The seven models, by config file name, in the order they are reported.
MODEL_CONFIGS = ("svpr_reid.yml", "clip_baseline.yml", "clipreid.yml", "vit.yml", "transreid.yml", "vdt.yml",
                 "secap.yml")
AMP_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def synthetic_batch(cfg, batch_size, num_classes, num_views, device):
    """P x K batch: images, pids, camids, viewids, one caption and one attribute vector per identity."""
    instances = max(1, min(cfg.DATALOADER.NUM_INSTANCE, batch_size))
    pids = torch.arange(batch_size) // instances % num_classes
    captions = [f"A photo of a X X X X person. Identity {int(p)} wears a coat of colour {int(p) * 7 % 13}."
                for p in pids]
    attrs = torch.stack([(pids * (a + 3)) % n for a, (_, n) in enumerate(BENCH_ATTRIBUTES)], dim=1)
    height, width = cfg.INPUT.SIZE_TRAIN
    return {
        "images": torch.randn(batch_size, 3, height, width, device=device),
        "pids": pids.to(device),
        "camids": (torch.arange(batch_size) % 2).to(device),
        "viewids": (torch.arange(batch_size) % num_views).to(device),
        "text_tokens": tokenize(captions, context_length=cfg.MODEL.TEXT_LEN, truncate=True).to(device),
        "attrs": attrs.to(device),
    }


def significant(value, digits=4):
    """``value`` rounded to ``digits`` significant digits (TFLOP/s on a CPU and on an H100 differ by 10^4)."""
    return float(f"{value:.{digits}g}")


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def precision_config(cfg, precision):
    """``cfg`` with training and test autocast set for ``precision`` ("fp32", "fp16" or "bf16") on any device
    (on the CPU fp16 runs with the gradient scaler, as on CUDA)."""
    cfg = cfg.clone()
    cfg.defrost()
    cfg.SOLVER.AMP = cfg.TEST.AMP = precision != "fp32"
    if precision != "fp32":
        cfg.SOLVER.AMP_DTYPE = cfg.SOLVER.CPU_AMP = "float16" if precision == "fp16" else "bfloat16"
    cfg.freeze()
    return cfg


def make_steps(cfg, batch, num_classes, num_views, device):
    """(model, train step, inference step) of ``cfg.MODEL.ARCH_NAME`` on ``batch``: the trainer's
    ``run_step`` (optimiser, autocast, gradient scaler and SOLVER.COMPILE as configured) and the test forward
    of evaluation (eager, as evaluation runs; inside ``test_autocast``, which the caller enters once around
    many steps, as evaluation does around its batches)."""
    attributes = BENCH_ATTRIBUTES if cfg.MODEL.USE_ATTR else ()
    model = build_model(cfg, num_classes, num_cameras=2, num_views=num_views, attributes=attributes).to(device)
    model.stand_in_for_phases(torch.Generator().manual_seed(0))  # e.g. CLIP-ReID's stage-1 text features
    criterion = build_criterion(cfg, model, num_classes).to(device)
    trainer = Trainer(cfg, model, criterion, None, None, device, {}, hooks=[])
    inputs = model.forward_inputs(batch)

    def train_step():
        trainer.run_step(batch)

    @torch.no_grad()
    def infer_step():
        model(batch["images"], **inputs)

    return model, train_step, infer_step


class _WholeStep:
    """Stands in for ``FlopCounterMode``'s module tracker: every FLOP counts for the whole step (the tracker's
    backward hooks fail on the outputs of frozen parts, e.g. SVPR-ReID's top-k scorer)."""

    parents = {"Global"}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def count_flops(model, steps):
    """FLOPs of one (train, inference) step as ``torch.utils.flop_counter`` counts them (run eagerly: compiled
    kernels do not pass through the counter)."""
    flops = []
    for train, step in zip((True, False), steps):
        model.train(train)
        counter = FlopCounterMode(display=False)
        counter.mod_tracker = _WholeStep()
        with counter, torch.compiler.set_stance("force_eager"):
            step()
        flops.append(counter.get_total_flops())
    return flops


def matmul_peak_tflops(device, dtype, repeats=5):
    """TFLOP/s of a large dense matrix product in ``dtype`` on ``device`` (the fastest of ``repeats``): the
    practical peak."""
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    torch.mm(a, b)
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best / 1e12


def measure(candidates, batch_size, device, warmup, iters, infer_context=contextlib.nullcontext):
    """Images/s and peak memory (bytes, CUDA only) of each candidate's train and inference step:
    ``{name: ([train, infer] images/s, [train, infer] peak bytes or None)}``.

    The candidates' timed steps alternate, so a change in machine load affects them alike. The inference
    steps run inside one ``infer_context()`` (the test precision's autocast: weights are cast once, as in an
    evaluation).
    """
    seconds = {name: [0.0, 0.0] for name in candidates}
    peaks = {name: [None, None] for name in candidates}
    for phase, train in ((0, True), (1, False)):
        with (infer_context() if phase else contextlib.nullcontext()):
            _measure_phase(candidates, phase, train, device, warmup, iters, seconds, peaks)
    return {name: ([iters * batch_size / s for s in spent], peaks[name]) for name, spent in seconds.items()}


def _measure_phase(candidates, phase, train, device, warmup, iters, seconds, peaks):
    """Warm up, then time ``iters`` alternating steps of ``phase`` (0 train, 1 inference) into ``seconds``/``peaks``."""
    for model, *steps in candidates.values():
        model.train(train)
        for _ in range(warmup):
            steps[phase]()
    for _ in range(iters):
        for name, (model, *steps) in candidates.items():
            model.train(train)
            _sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            steps[phase]()
            _sync(device)
            seconds[name][phase] += time.perf_counter() - start
            if device.type == "cuda":
                peaks[name][phase] = max(peaks[name][phase] or 0, torch.cuda.max_memory_allocated(device))


def config_files(args):
    """``{name: config path}`` of the models to time (``model`` first with --config_file)."""
    if args.all is not None:
        folder = args.all
        paths = {name[:-4]: os.path.join(folder, name) for name in MODEL_CONFIGS
                 if os.path.isfile(os.path.join(folder, name))}
        if not paths:
            raise ConfigError(f"--all {folder}: no model config ({', '.join(MODEL_CONFIGS)}) in that folder")
        return paths
    if not args.config_file:
        raise ConfigError("give --config_file CONFIG or --all [FOLDER]")
    return {"model": args.config_file, **{f"also{i}": path for i, path in enumerate(args.also)}}


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_file", default=None)
    parser.add_argument("--all", nargs="?", const="configs/CP2108", default=None, metavar="FOLDER",
                        help="time the seven models of FOLDER (default configs/CP2108) instead of --config_file")
    parser.add_argument("--also", nargs="+", default=[], metavar="CONFIG",
                        help="further config files whose models are timed in the same run")
    parser.add_argument("--baseline_config", default=None,
                        help="config of the CLIP baseline (default: --config_file with MODEL.ARCH_NAME CLIP_baseline)")
    parser.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    parser.add_argument("--iters", type=int, default=5, help="timed iterations per measurement (default 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random weights (MODEL.CLIP.* / MODEL.VIT.*) instead of MODEL.PRETRAIN_PATH")
    parser.add_argument("--num-classes", type=int, default=500, help="identities of the classifiers")
    parser.add_argument("--num-views", type=int, default=2, help="views of the synthetic batch")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: CUDA when available)")
    parser.add_argument("--amp", nargs="+", choices=sorted(AMP_DTYPES), default=None,
                        help="precisions to time (default: fp16 bf16 on CUDA; fp32, and bf16 where the CPU has native "
                             "bf16 matrix units, on a CPU)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="the device's peak TFLOP/s to compare with (default: a measured dense matmul)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); 1 avoids OpenMP waits on a busy machine")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides KEY VALUE (applied to every config)")
    args = parser.parse_args()
    if args.batch < 2 or args.iters < 1 or args.warmup < 0:
        raise ConfigError("--batch must be >= 2, --iters >= 1 and --warmup >= 0")
    return args


def main():
    args = parse_args()
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: CUDA is not available on this machine")
    precisions = args.amp or (["fp16", "bf16"] if device.type == "cuda" else
                              ["fp32", "bf16"] if native_bf16_units() else ["fp32"])
    opts = list(args.opts) + (["MODEL.RANDOM_INIT", "True"] if args.random_weights else [])
    paths = config_files(args)
    configs = {name: load_config(path, opts) for name, path in paths.items()}
    if args.all is None:
        baseline = load_config(args.baseline_config or args.config_file, opts + ["MODEL.ARCH_NAME", "CLIP_baseline"])
        configs = {"model": configs["model"], "baseline": baseline,
                   **{name: cfg for name, cfg in configs.items() if name != "model"}}
    first = next(iter(configs.values()))
    if first.DIST.KEEP_FREED_CPU_MEMORY:  # the process set-up of train_svpr.py / test_svpr.py
        retain_freed_cpu_memory()
    torch.manual_seed(first.SOLVER.SEED)
    batch = synthetic_batch(first, args.batch, args.num_classes, args.num_views, device)
    height, width = first.INPUT.SIZE_TRAIN
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"{device_name}, batch {args.batch}, input {height}x{width}, {torch.get_num_threads()} CPU threads, "
          f"{args.warmup} warm-up + {args.iters} timed steps")
    print(f"{'model':<16}{'precision':<10}{'train img/s':>12}{'infer img/s':>12}{'train MiB':>10}{'infer MiB':>10}"
          f"{'train TFLOP/s':>14}{'infer TFLOP/s':>14}{'of peak (train, infer)':>24}")
    results, legacy, params = [], None, {}
    for precision in precisions:
        peak_before = None if args.peak_tflops else matmul_peak_tflops(device, AMP_DTYPES[precision])
        candidates = {name: make_steps(precision_config(cfg, precision), batch, args.num_classes, args.num_views,
                                       device) for name, cfg in configs.items()}
        flops = {name: count_flops(model, steps) for name, (model, *steps) in candidates.items()}
        test_cfg = precision_config(first, precision)
        rates = measure(candidates, args.batch, device, args.warmup, args.iters,
                        infer_context=lambda: test_autocast(test_cfg, device))
        # The peak is the faster of the products timed before and after the models: a shared machine's speed
        # moves during a run, and a share of a slow moment's peak would flatter the models.
        peak = args.peak_tflops or max(peak_before, matmul_peak_tflops(device, AMP_DTYPES[precision]))
        for name, ((train, infer), (train_mem, infer_mem)) in rates.items():
            tflops = [flops[name][0] * train / args.batch / 1e12, flops[name][1] * infer / args.batch / 1e12]
            row = {"config": paths.get(name, args.baseline_config or args.config_file),
                   "arch": configs[name].MODEL.ARCH_NAME, "precision": precision,
                   "train_img_per_s": round(train, 3), "infer_img_per_s": round(infer, 3),
                   "train_step_s": round(args.batch / train, 4), "infer_step_s": round(args.batch / infer, 4),
                   "train_peak_mib": None if train_mem is None else round(train_mem / 2 ** 20, 1),
                   "infer_peak_mib": None if infer_mem is None else round(infer_mem / 2 ** 20, 1),
                   "train_gflop_per_step": round(flops[name][0] / 1e9, 3),
                   "infer_gflop_per_step": round(flops[name][1] / 1e9, 3),
                   "train_tflops": significant(tflops[0]), "infer_tflops": significant(tflops[1]),
                   "train_share_of_peak": significant(tflops[0] / peak),
                   "infer_share_of_peak": significant(tflops[1] / peak), "peak_tflops": significant(peak),
                   "peak_source": "--peak-tflops" if args.peak_tflops else "measured matmul",
                   "params_m": round(sum(p.numel() for p in candidates[name][0].parameters()) / 1e6, 3)}
            results.append(row)
            params[name] = row["params_m"]
            memory = ["-" if m is None else f"{m / 2 ** 20:.0f}" for m in (train_mem, infer_mem)]
            print(f"{row['arch']:<16}{precision:<10}{train:>12.2f}{infer:>12.2f}{memory[0]:>10}{memory[1]:>10}"
                  f"{tflops[0]:>14.3f}{tflops[1]:>14.3f}{100 * tflops[0] / peak:>16.1f}%, "
                  f"{100 * tflops[1] / peak:.1f}%")
        if legacy is None:
            legacy = rates
        del candidates
        if device.type == "cuda":
            torch.cuda.empty_cache()
    print(json.dumps({**_legacy_report(args, configs, legacy, params, precisions[0]), "device": str(device),
                      "device_name": device_name, "batch": args.batch, "input": [height, width],
                      "threads": torch.get_num_threads(), "precisions": precisions, "results": results}))


def _legacy_report(args, configs, rates, params, precision):
    """The summary keys of earlier versions (first precision): the config's model next to the CLIP baseline."""
    steps = {configs[name].MODEL.ARCH_NAME: round(args.batch / rate[0][0], 4) for name, rate in rates.items()}
    if args.all is not None:
        return {"config": args.all, "train_step_s": steps}
    (train_rate, infer_rate), _ = rates["model"]
    (base_train, base_infer), _ = rates["baseline"]
    baseline_cfg = configs["baseline"]
    return {
        "config": args.config_file, "arch": configs["model"].MODEL.ARCH_NAME,
        "amp": precision != "fp32",
        "vision_width": baseline_cfg.MODEL.CLIP.VISION_WIDTH if baseline_cfg.MODEL.RANDOM_INIT else "checkpoint",
        "train_img_per_s": round(train_rate, 3), "infer_img_per_s": round(infer_rate, 3),
        "baseline_train_img_per_s": round(base_train, 3), "baseline_infer_img_per_s": round(base_infer, 3),
        "svpr_over_baseline_train_cost": round(base_train / train_rate, 3),
        "svpr_over_baseline_infer_cost": round(base_infer / infer_rate, 3),
        "train_step_s": steps,
        "params_m": {configs[name].MODEL.ARCH_NAME: params[name] for name in configs},
        "also": [{"config": path, "arch": configs[f"also{i}"].MODEL.ARCH_NAME,
                  "train_img_per_s": round(rates[f"also{i}"][0][0], 3),
                  "infer_img_per_s": round(rates[f"also{i}"][0][1], 3),
                  "over_baseline_train_cost": round(base_train / rates[f"also{i}"][0][0], 3)}
                 for i, path in enumerate(args.also)],
    }


if __name__ == "__main__":
    run_main(main)

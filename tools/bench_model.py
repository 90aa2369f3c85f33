"""Training and inference throughput of a config's model and of the CLIP baseline on the same backbone.

    python tools/bench_model.py --config_file configs/CP2108/svpr_reid.yml --random-weights [--batch 16]

More models (e.g. the ImageNet-ViT baselines) are timed in the same run with ``--also CONFIG ...``, and the
CLIP baseline can be built from another config (``--baseline_config``, e.g. the Synthetic CLIP baseline
next to the Synthetic ViT baselines):

    python tools/bench_model.py --config_file configs/Synthetic/vit.yml --also configs/Synthetic/transreid.yml \
        configs/Synthetic/vdt.yml configs/Synthetic/secap.yml --baseline_config configs/Synthetic/clip_baseline.yml \
        --random-weights --device cpu

A training step is forward + criterion + backward + optimiser step on a synthetic P x K batch (one caption
and one attribute vector per identity, alternating views). CUDA with autocast when available, else CPU
fp32. The models' timed steps alternate. The last line printed is one JSON object.
"""
import argparse
import json
import time


import torch

from configs import load_config
from loss import build_criterion
from model import build_model
from text import tokenize
from solver import make_optimizer
from utils.entrypoint import run_main
from utils.errors import ConfigError

# A CP2108-like attribute annotation (12 attributes) for configs that use attributes.
BENCH_ATTRIBUTES = tuple((f"attribute {i}", 2 + i % 4) for i in range(12))


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


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_steps(cfg, batch, num_classes, num_views, device):
    """(model, train step, inference step) of ``cfg.MODEL.ARCH_NAME`` on ``batch``."""
    attributes = BENCH_ATTRIBUTES if cfg.MODEL.USE_ATTR else ()
    model = build_model(cfg, num_classes, num_cameras=2, num_views=num_views, attributes=attributes).to(device)
    optimizer = make_optimizer(cfg, model)
    amp = device.type == "cuda" and cfg.SOLVER.AMP
    dtype = torch.bfloat16 if cfg.SOLVER.AMP_DTYPE == "bfloat16" else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=amp and dtype == torch.float16)
    inputs = model.forward_inputs(batch)
    criterion = build_criterion(cfg, model, num_classes).to(device)

    def train_step():
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            outputs = model(batch["images"], **inputs)
            loss = sum(criterion(outputs, batch).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    @torch.no_grad()
    def infer_step():
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            model(batch["images"], **inputs)

    return model, train_step, infer_step


def measure(candidates, batch_size, device, warmup, iters):
    """Images/s of each candidate's train and inference step: {name: (train, infer)}.

    The candidates' timed steps alternate, so a change in machine load affects them alike.
    """
    seconds = {name: [0.0, 0.0] for name in candidates}
    for phase, train in ((0, True), (1, False)):
        for model, *steps in candidates.values():
            model.train(train)
            for _ in range(warmup):
                steps[phase]()
        for _ in range(iters):
            for name, (_, *steps) in candidates.items():
                _sync(device)
                start = time.perf_counter()
                steps[phase]()
                _sync(device)
                seconds[name][phase] += time.perf_counter() - start
    return {name: [iters * batch_size / s for s in spent] for name, spent in seconds.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_file", required=True)
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
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads (torch.set_num_threads); 1 avoids OpenMP waits on a busy machine")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides KEY VALUE (applied to every config)")
    args = parser.parse_args()
    if args.batch < 2 or args.iters < 1 or args.warmup < 0:
        raise ConfigError("--batch must be >= 2, --iters >= 1 and --warmup >= 0")
    if args.threads is not None:
        torch.set_num_threads(max(1, args.threads))
    opts = list(args.opts) + (["MODEL.RANDOM_INIT", "True"] if args.random_weights else [])
    cfg = load_config(args.config_file, opts)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(cfg.SOLVER.SEED)
    batch = synthetic_batch(cfg, args.batch, args.num_classes, args.num_views, device)
    baseline_cfg = load_config(args.baseline_config or args.config_file, opts + ["MODEL.ARCH_NAME", "CLIP_baseline"])
    configs = {"model": cfg, "baseline": baseline_cfg}
    configs.update({f"also{i}": load_config(path, opts) for i, path in enumerate(args.also)})
    candidates = {name: make_steps(config, batch, args.num_classes, args.num_views, device)
                  for name, config in configs.items()}
    rates = measure(candidates, args.batch, device, args.warmup, args.iters)
    (train_rate, infer_rate), (base_train, base_infer) = rates["model"], rates["baseline"]
    height, width = cfg.INPUT.SIZE_TRAIN
    print(json.dumps({
        "config": args.config_file, "arch": cfg.MODEL.ARCH_NAME, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "amp": device.type == "cuda" and cfg.SOLVER.AMP, "batch": args.batch, "input": [height, width],
        "vision_width": baseline_cfg.MODEL.CLIP.VISION_WIDTH if baseline_cfg.MODEL.RANDOM_INIT else "checkpoint",
        "threads": torch.get_num_threads(),
        "train_img_per_s": round(train_rate, 3), "infer_img_per_s": round(infer_rate, 3),
        "baseline_train_img_per_s": round(base_train, 3), "baseline_infer_img_per_s": round(base_infer, 3),
        "svpr_over_baseline_train_cost": round(base_train / train_rate, 3),
        "svpr_over_baseline_infer_cost": round(base_infer / infer_rate, 3),
        "train_step_s": {configs[name].MODEL.ARCH_NAME: round(args.batch / rates[name][0], 4) for name in configs},
        "params_m": {configs[name].MODEL.ARCH_NAME: round(sum(p.numel() for p in candidates[name][0].parameters())
                                                          / 1e6, 3) for name in configs},
        "also": [{"config": path, "arch": configs[f"also{i}"].MODEL.ARCH_NAME,
                  "train_img_per_s": round(rates[f"also{i}"][0], 3), "infer_img_per_s": round(rates[f"also{i}"][1], 3),
                  "over_baseline_train_cost": round(base_train / rates[f"also{i}"][0], 3)}
                 for i, path in enumerate(args.also)],
    }))


if __name__ == "__main__":
    run_main(main)

"""Training-pipeline throughput (decode + augment, images/s in one worker process): ours vs PIL + torchvision v1.

    python tools/bench_data.py                                  # on a temporary SynthAG benchmark
    python tools/bench_data.py --root ./data --name CP2108_ALL --num-images 2000
"""
import argparse
import tempfile
import time


import torch
import torchvision.transforms as T
from PIL import Image
from timm.data.random_erasing import RandomErasing

from configs import load_config
from datasets import SynthConfig, build_dataset, build_train_transform, generate_synthag, read_image
from utils.entrypoint import run_main


def reference_transform(cfg):
    """The reference pipeline: PIL image + torchvision v1 transforms + timm random erasing."""
    return T.Compose([
        T.Resize(list(cfg.INPUT.SIZE_TRAIN), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(p=cfg.INPUT.PROB),
        T.Pad(cfg.INPUT.PADDING),
        T.RandomCrop(list(cfg.INPUT.SIZE_TRAIN)),
        T.ToTensor(),
        T.Normalize(mean=list(cfg.INPUT.PIXEL_MEAN), std=list(cfg.INPUT.PIXEL_STD)),
        RandomErasing(probability=cfg.INPUT.RE_PROB, mode="pixel", max_count=1, device="cpu"),
    ])


def throughput(paths, load, repeats):
    """Best images/s over ``repeats`` passes of ``load`` over ``paths``."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            load(path)
        best = max(best, len(paths) / (time.perf_counter() - start))
    return best


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_file", default="", help="YAML config for INPUT.* (default: configs/defaults.py)")
    parser.add_argument("--root", default="", help="dataset root (default: generate a temporary SynthAG)")
    parser.add_argument("--name", default="SynthAG_ALL", help="dataset whose training images are read")
    parser.add_argument("--num-images", type=int, default=1000, help="images per pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes per pipeline (the best is reported)")
    args = parser.parse_args()
    cfg = load_config(args.config_file or None, [])
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if not root:
            root = scratch
            generate_synthag(root, SynthConfig(num_ids=40, images_per_id=40))
        paths = [s.path for s in build_dataset(args.name, root, verbose=False).train][: args.num_images]
        ours = build_train_transform(cfg)
        reference = reference_transform(cfg)
        for path in paths[:20]:  # warm the page cache and lazy initialisations
            ours(read_image(path))
            reference(Image.open(path).convert("RGB"))
        fast = throughput(paths, lambda p: ours(read_image(p)), args.repeats)
        slow = throughput(paths, lambda p: reference(Image.open(p).convert("RGB")), args.repeats)
    size = "x".join(str(v) for v in cfg.INPUT.SIZE_TRAIN)
    print(f"{len(paths)} training images of {args.name}, output {size}, 1 thread, best of {args.repeats}")
    print(f"ours (decode_image + transforms.v2 on uint8):  {fast:8.1f} images/s per worker")
    print(f"PIL + torchvision.transforms (v1):             {slow:8.1f} images/s per worker")
    print(f"speed-up: {fast / slow:.2f}x")


if __name__ == "__main__":
    run_main(main)

"""Training-pipeline throughput (decode + augment, images/s in one worker process) of both
INPUT.IMAGE_BACKEND values against the reference's PIL + torchvision v1 pipeline, and whether each gives the
reference's pixels (checked with the random augmentations off); then each backend reading images decoded
once (DATALOADER.CACHE_IMAGES) against decoding them on every read.

    python tools/bench_data.py                                  # on a temporary SynthAG benchmark
    python tools/bench_data.py --image-size 300 140             # images that must be shrunk to INPUT.SIZE_TRAIN
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
from datasets import SynthConfig, build_dataset, build_train_transform, generate_synthag, image_reader
from datasets.image_cache import DecodedImages
from utils.entrypoint import run_main

BACKENDS = {"pil": "Pillow decode + resize, the default", "tensor": "decode_image + uint8-tensor resize"}


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


def reference_read(path):
    return Image.open(path).convert("RGB")


def throughput(paths, load, repeats):
    """Best images/s over ``repeats`` passes of ``load`` over ``paths``."""
    best = 0.0
    for _ in range(repeats):
        start = time.perf_counter()
        for path in paths:
            load(path)
        best = max(best, len(paths) / (time.perf_counter() - start))
    return best


def with_input(cfg, **values):
    """A copy of ``cfg`` with INPUT.<key> = value for each keyword."""
    copy = cfg.clone()
    copy.defrost()
    for key, value in values.items():
        setattr(copy.INPUT, key, value)
    copy.freeze()
    return copy


def identical_count(cfg, paths, backend):
    """How many of ``paths`` give exactly the reference's tensor with flip, padding and erasing off."""
    plain = with_input(cfg, PROB=0.0, RE_PROB=0.0, PADDING=0, IMAGE_BACKEND=backend)
    ours, read, reference = build_train_transform(plain), image_reader(plain), reference_transform(plain)
    return sum(torch.equal(ours(read(p)), reference(reference_read(p))) for p in paths)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_file", default="", help="YAML config for INPUT.* (default: configs/defaults.py)")
    parser.add_argument("--root", default="", help="dataset root (default: generate a temporary SynthAG)")
    parser.add_argument("--name", default="SynthAG_ALL", help="dataset whose training images are read")
    parser.add_argument("--num-images", type=int, default=1000, help="images per pass")
    parser.add_argument("--repeats", type=int, default=3, help="passes per pipeline (the best is reported)")
    parser.add_argument("--image-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                        help="size of the generated SynthAG images (default: SynthAG's 128 x 64)")
    args = parser.parse_args()
    cfg = load_config(args.config_file or None, [])
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    with tempfile.TemporaryDirectory() as scratch:
        root = args.root
        if not root:
            root = scratch
            height, width = args.image_size or (SynthConfig.height, SynthConfig.width)
            generate_synthag(root, SynthConfig(num_ids=40, images_per_id=40, height=height, width=width))
        paths = [s.path for s in build_dataset(args.name, root, verbose=False).train][: args.num_images]
        reference = reference_transform(cfg)
        pipelines = {}
        for backend in BACKENDS:
            chosen = with_input(cfg, IMAGE_BACKEND=backend)
            pipelines[backend] = (build_train_transform(chosen), image_reader(chosen))
        for path in paths[:20]:  # warm the page cache and lazy initialisations
            reference(reference_read(path))
            for transform, read in pipelines.values():
                transform(read(path))
        speeds = {backend: throughput(paths, lambda p, t=t, r=r: t(r(p)), args.repeats)
                  for backend, (t, r) in pipelines.items()}
        cached = {}
        for backend, (transform, read) in pipelines.items():
            held = DecodedImages(read)
            held.ensure(paths)
            cached[backend] = throughput(paths, lambda p, t=transform, r=held: t(r(p)), args.repeats)
        slow = throughput(paths, lambda p: reference(reference_read(p)), args.repeats)
        exact = {backend: identical_count(cfg, paths[:200], backend) for backend in BACKENDS}
    size = "x".join(str(v) for v in cfg.INPUT.SIZE_TRAIN)
    print(f"{len(paths)} training images of {args.name}, output {size}, 1 thread, best of {args.repeats}")
    for backend, note in BACKENDS.items():
        print(f"INPUT.IMAGE_BACKEND {backend:<6} ({note}): {speeds[backend]:8.1f} images/s per worker, "
              f"{speeds[backend] / slow:.2f}x the reference; pixel-identical to it on {exact[backend]} of "
              f"{min(len(paths), 200)} images")
    print(f"reference (PIL + torchvision.transforms v1):{'':19}{slow:8.1f} images/s per worker")
    for backend in BACKENDS:
        print(f"INPUT.IMAGE_BACKEND {backend:<6} with DATALOADER.CACHE_IMAGES (decoded once): {cached[backend]:8.1f} "
              f"images/s per worker, {cached[backend] / speeds[backend]:.2f}x decoding every read")


if __name__ == "__main__":
    run_main(main)

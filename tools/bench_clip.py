"""Benchmark the CLIP ViT-B/16 image encoder at a ReID input size against OpenAI's reference code.

Both run the same random weights (OpenAI's init); OpenAI's VisionTransformer gets the same resized
positional embedding so it accepts the non-square input. Prints images/s of each, their ratio, the
achieved GFLOP/s (FLOPs counted analytically) and a measured ``torch.mm`` GFLOP/s of the encoder's largest
matmul shape as the machine's practical limit. Needs the test-only ``openai-clip`` package.

    python tools/bench_clip.py [--height 256 --width 128 --stride 16 --batch 32 --iters 2 --threads N]
"""
import argparse
import importlib.util
import os
import sys
import tempfile
import time

import torch


from model.clip import load_clip
from model.clip.model import patch_grid


def import_openai_clip_model():
    """OpenAI's ``clip/model.py`` imported by file path (its package ``__init__`` needs pkg_resources)."""
    spec = importlib.util.find_spec("clip")
    if spec is None:
        sys.exit("error: the benchmark needs the test-only package openai-clip (pip install openai-clip)")
    path = os.path.join(spec.submodule_search_locations[0], "model.py")
    module_spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def encoder_flops(tokens, width, layers, patch_size, patches, output_dim):
    """Multiply-add FLOPs (x2) of one image through the ViT image encoder (patch conv, blocks, projection)."""
    conv = 2 * patches * width * 3 * patch_size * patch_size
    linear = 2 * tokens * width * (3 * width + width + 8 * width)  # qkv, out, MLP up and down
    attention = 2 * 2 * tokens * tokens * width  # scores and weighted sum
    return conv + layers * (linear + attention) + 2 * width * output_dim


def time_call(fn, iters):
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--stride", type=int, default=16)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--iters", type=int, default=2, help="timed forward passes per implementation")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    openai_model = import_openai_clip_model()
    reference = openai_model.CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12).float().eval()
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "ViT-B-16-random.pt")
        torch.save(reference.state_dict(), path)
        ours = load_clip(path, input_size=(args.height, args.width), stride=args.stride).visual
    reference = reference.visual
    reference.positional_embedding = torch.nn.Parameter(ours.positional_embedding.detach().clone())
    reference.conv1.stride = (args.stride, args.stride)

    images = torch.randn(args.batch, 3, args.height, args.width)
    rows, cols = patch_grid((args.height, args.width), 16, args.stride)
    tokens = rows * cols + 1
    flops = encoder_flops(tokens, ours.width, len(ours.transformer.resblocks), 16, rows * cols, ours.output_dim)
    a = torch.randn(args.batch * tokens, ours.width)
    b = torch.randn(ours.width, 4 * ours.width)

    with torch.inference_mode():
        check = images[:2]  # a small batch: correctness check and warm-up
        max_diff = (ours(check) - reference(check)).abs().max().item()
        torch.mm(a, b)
        ours_times, reference_times, mm_times = [], [], []
        for _ in range(args.iters):  # interleaved so that machine-load drift hits all three alike
            ours_times += time_call(lambda: ours(images), 1)
            reference_times += time_call(lambda: reference(images), 1)
            mm_times += time_call(lambda: torch.mm(a, b), 5)
        mm_time = min(mm_times)

    # Best of the timed passes: on a shared machine the fastest pass is the one least disturbed by others.
    ours_rate = args.batch / min(ours_times)
    reference_rate = args.batch / min(reference_times)
    mm_gflops = 2 * a.shape[0] * a.shape[1] * b.shape[1] / mm_time / 1e9
    print(f"ViT-B/16 image encoder, {args.height}x{args.width}, stride {args.stride} ({rows}x{cols} patches), "
          f"batch {args.batch}, fp32, {torch.get_num_threads()} threads, {flops / 1e9:.2f} GFLOP/image, "
          f"best of {args.iters}")
    print(f"max |ours - openai| = {max_diff:.2e}")
    print(f"ours:   {ours_rate:8.2f} images/s  {ours_rate * flops / 1e9:8.1f} GFLOP/s")
    print(f"openai: {reference_rate:8.2f} images/s  {reference_rate * flops / 1e9:8.1f} GFLOP/s")
    print(f"ratio ours/openai: {ours_rate / reference_rate:.3f}")
    print(f"torch.mm ({a.shape[0]}x{a.shape[1]} @ {b.shape[0]}x{b.shape[1]}): {mm_gflops:.1f} GFLOP/s; "
          f"ours reaches {100 * ours_rate * flops / 1e9 / mm_gflops:.0f}% of it")


if __name__ == "__main__":
    main()

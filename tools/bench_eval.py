"""Benchmark ``evaluation.evaluate_rank`` against fast-reid's Cython Market-1501 evaluator.

Builds ``rank_cy.pyx`` from the installed ``fastreid`` package into a temporary folder (Cython + the C
compiler), ranks the same random distance matrix with both, checks that CMC/mAP/mINP agree and prints
both times and the speed ratio. ``--large`` instead measures the peak extra resident memory of
``evaluate_rank`` on a 10000 x 50000 matrix (VmHWM after resetting it, minus the RSS with the matrix).

    python tools/bench_eval.py [--queries 3000 --gallery 15000 --ids 1000 --cams 10 --repeats 3]
    python tools/bench_eval.py --large
"""
import argparse
import importlib.util
import os
import sys
import sysconfig
import tempfile
import time

import numpy as np
import torch


from evaluation import evaluate_rank


def build_fastreid_cython(build_dir):
    """Compile fast-reid's ``rank_cy.pyx`` into ``build_dir`` and import it."""
    import numpy
    from Cython.Build import cythonize
    from setuptools import Distribution, Extension
    from setuptools.command.build_ext import build_ext

    spec = importlib.util.find_spec("fastreid")
    if spec is None:
        raise SystemExit("error: the fastreid package is not installed (see requirements-dev.txt/setup.sh)")
    pyx = os.path.join(spec.submodule_search_locations[0], "evaluation", "rank_cylib", "rank_cy.pyx")
    extension = Extension("rank_cy", [pyx], include_dirs=[numpy.get_include()],
                          extra_compile_args=["-O3", "-Wno-cpp", "-Wno-unused-function"])
    modules = cythonize([extension], build_dir=build_dir, quiet=True, language_level=3)
    dist = Distribution({"ext_modules": modules})
    command = build_ext(dist)
    command.build_lib = build_dir
    command.build_temp = os.path.join(build_dir, "tmp")
    command.ensure_finalized()
    command.run()
    suffix = sysconfig.get_config_var("EXT_SUFFIX")
    module_spec = importlib.util.spec_from_file_location("rank_cy", os.path.join(build_dir, "rank_cy" + suffix))
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def random_case(num_query, num_gallery, num_ids, num_cams, seed=0):
    rng = np.random.default_rng(seed)
    distmat = rng.random((num_query, num_gallery), dtype=np.float32)
    q_pids = rng.integers(0, num_ids, num_query)
    g_pids = rng.integers(0, num_ids, num_gallery)
    q_camids = rng.integers(0, num_cams, num_query)
    g_camids = rng.integers(0, num_cams, num_gallery)
    return distmat, q_pids, g_pids, q_camids, g_camids


def best_time(function, repeats):
    times, result = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        times.append(time.perf_counter() - start)
    return min(times), result


def compare(args):
    case = random_case(args.queries, args.gallery, args.ids, args.cams)
    with tempfile.TemporaryDirectory() as build_dir:
        rank_cy = build_fastreid_cython(build_dir)
        cy_time, (cy_cmc, cy_ap, cy_inp) = best_time(
            lambda: rank_cy.evaluate_cy(*case, args.max_rank, False), args.repeats)
    our_time, ours = best_time(lambda: evaluate_rank(*case, max_rank=args.max_rank), args.repeats)
    cmc_diff = float(np.abs(ours["cmc"] - cy_cmc).max())
    map_diff = abs(ours["mAP"] - float(np.mean(cy_ap)))
    inp_diff = abs(ours["mINP"] - float(np.mean(cy_inp)))
    # fast-reid accumulates in float32, we in float64.
    equal = cmc_diff < 1e-5 and map_diff < 1e-5 and inp_diff < 1e-5 and ours["num_valid_queries"] == len(cy_ap)
    print(f"case: {args.queries} x {args.gallery} distances, {args.ids} ids, {args.cams} cameras, "
          f"max_rank {args.max_rank}, torch threads {torch.get_num_threads()}, best of {args.repeats}")
    print(f"fast-reid Cython evaluate_cy : {cy_time:.3f} s")
    print(f"evaluation.evaluate_rank  : {our_time:.3f} s")
    print(f"speed-up                     : {cy_time / our_time:.2f}x")
    print(f"mAP {ours['mAP']:.6f} mINP {ours['mINP']:.6f} rank1 {ours['cmc'][0]:.6f} valid queries "
          f"{ours['num_valid_queries']}; max |diff| cmc {cmc_diff:.2e} mAP {map_diff:.2e} mINP {inp_diff:.2e}")
    print("results equal (tol 1e-5):", equal)
    return 0 if equal else 1


def _rss_kib(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def large(args):
    num_query, num_gallery = 10000, 50000
    case = random_case(num_query, num_gallery, 3000, 10, seed=1)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak-RSS counter (VmHWM) to the current RSS
    base = _rss_kib("VmRSS")
    start = time.perf_counter()
    result = evaluate_rank(*case, max_rank=args.max_rank)
    elapsed = time.perf_counter() - start
    peak = _rss_kib("VmHWM")
    print(f"case: {num_query} x {num_gallery} float32 distances ({case[0].nbytes / 2**20:.0f} MiB), "
          f"3000 ids, 10 cameras, torch threads {torch.get_num_threads()}")
    print(f"evaluate_rank: {elapsed:.2f} s, mAP {result['mAP']:.6f}, valid queries {result['num_valid_queries']}")
    print(f"peak extra RSS: {(peak - base) / 1024:.1f} MiB (VmHWM {peak / 1024:.0f} MiB, "
          f"RSS before {base / 1024:.0f} MiB)")
    return 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=3000)
    parser.add_argument("--gallery", type=int, default=15000)
    parser.add_argument("--ids", type=int, default=1000)
    parser.add_argument("--cams", type=int, default=10)
    parser.add_argument("--max-rank", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--large", action="store_true", help="peak-memory run on 10000 x 50000")
    args = parser.parse_args(argv)
    return large(args) if args.large else compare(args)


if __name__ == "__main__":
    sys.exit(main())

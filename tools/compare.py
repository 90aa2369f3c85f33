"""Compare two models on the same test queries: differences of mAP and Rank-1 with confidence intervals.

    python tools/compare.py outputs/clip_baseline --vs outputs/svpr_reid
    python tools/compare.py runs/a/seed0 runs/a/seed1 runs/a/seed2 --vs runs/b/seed0 runs/b/seed1 runs/b/seed2 \\
        --json comparison.json

Each run is an evaluation's folder (or its results.json) holding the per-query results written next to
results.json (per_query_<protocol>.csv). For every protocol present in all runs it prints, as a Markdown
table, B - A in points for mAP and Rank-1 with a 95% paired bootstrap confidence interval over queries
and a paired sign-flip permutation p-value (evaluation/comparison.py says how). Several runs per side
(seeds) are averaged per query first. With two or more runs per side a second table compares the runs' own
mAP and Rank-1 (mean ± standard deviation over runs) with a t-test: paired by training seed when both sides
hold the same seeds, Welch's otherwise. The first table says how much the result depends on the queries, the
second how much on the training seed; report the second when asking whether a method trains better. Queries are paired by image (its path below the folder
holding all of the run's queries, so the data may live elsewhere in each run) and identity; runs evaluated on
different query sets are refused. ``--json`` also writes {protocol: {delta_mAP, ci95_mAP, p_mAP, delta_R1, ci95_R1, p_R1}}, with an
``over_runs`` entry ({test, mean_mAP_a, sd_mAP_a, mean_mAP_b, sd_mAP_b, delta_mAP, ci95_mAP, p_mAP}, the same
for R1) when both sides have two or more runs.
"""
import argparse
import json

from evaluation.comparison import (MIN_RESAMPLES, as_document, compare_runs, load_run, markdown_runs_table,
                                   markdown_table)
from utils.entrypoint import run_main
from utils.io import atomic_write


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("runs_a", nargs="+", metavar="RUN_A", help="run folders (or results.json) of model A")
    parser.add_argument("--vs", nargs="+", required=True, metavar="RUN_B", help="run folders of model B")
    parser.add_argument("--json", metavar="OUT.json", help="also write the differences as a JSON document")
    parser.add_argument("--resamples", type=int, default=MIN_RESAMPLES,
                        help=f"bootstrap resamples and random sign flips (at least {MIN_RESAMPLES})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the resampling")
    args = parser.parse_args(argv)
    runs_a = [load_run(path) for path in args.runs_a]
    runs_b = [load_run(path) for path in args.vs]
    comparisons = compare_runs(runs_a, runs_b, args.resamples, args.seed)
    print(f"A: {', '.join(args.runs_a)}\nB: {', '.join(args.vs)}\n")
    print(markdown_table(comparisons))
    print(f"\nPoints; 95% CI: paired bootstrap over queries ({args.resamples} resamples, seed {args.seed}); "
          f"p: paired sign-flip permutation test, two-sided; runs of a side are averaged per query first.")
    over_runs = markdown_runs_table(comparisons)
    if over_runs:
        print(f"\nOver runs (training seeds):\n\n{over_runs}\n\nEach run's mAP and Rank-1, mean ± standard deviation "
              f"over a side's runs; 95% CI and p (two-sided) of the difference of the means from the t-test named.")
    elif len(runs_a) > 1 or len(runs_b) > 1:
        print("\nNo comparison over runs: it needs two or more runs on each side.")
    if args.json:
        atomic_write(args.json, json.dumps(as_document(comparisons), indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    run_main(main)

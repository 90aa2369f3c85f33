"""Ablations and comparisons: one training run per row (and per seed), one Markdown table of mean ± std.

    python tools/ablation.py --config_file configs/Synthetic/svpr_reid.yml [--seeds 3] [--epochs N]
        rows: the baseline (all MODEL.SVPR.* components off), then VDFE, ASMOE, CVPR and LOCAL added in turn
    python tools/ablation.py --config_file configs/Synthetic/svpr_reid.yml --fixes [--seeds 3]
        rows: the reference's behaviour (MODEL.FIXES.* as shipped), each fix on top of it, all fixes
    python tools/ablation.py --configs configs/Synthetic/vit.yml configs/Synthetic/svpr_reid.yml ... [--seeds 3]
        rows: one per config (model comparison)

Each run is a ``train_svpr.py`` subprocess with ``OUTPUT_DIR <output_dir>/<row>/seed<k>`` and
``SOLVER.SEED`` = the config's seed + k; its ``results.json`` is read back. Cells are the mean ± standard
deviation (over seeds) of mAP and Rank-1 per protocol; the last column is the mean time of one run.
A second table gives each row's difference to the first row (points, seeds averaged per query) with its
95% paired bootstrap interval over queries, as tools/compare.py computes it from the runs' per-query results;
with two or more seeds a third gives the difference over seeds (each seed's own mAP and Rank-1, paired by
seed) with its t-interval and p-value, which also counts how much the training seed moves a result.
``--table-only`` rebuilds the tables from existing results. Extra ``KEY VALUE`` overrides apply to every run.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from configs import config_value, load_config
from evaluation.comparison import compare_runs, load_run
from model import MODELS
from utils.entrypoint import run_main
from utils.errors import ConfigError, DataError, UserError

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIME_FILE = "run_seconds.txt"


def component_rows(cfg):
    """(name, overrides) rows: the baseline (every component the model lists in ``components`` off), then each
    component added to the previous row; components the config switches off are left out."""
    declared = MODELS.get(cfg.MODEL.ARCH_NAME).components
    if not declared:
        raise ConfigError(f"MODEL.ARCH_NAME {cfg.MODEL.ARCH_NAME} has no components to ablate; use --fixes or "
                          "--configs")
    components = [key for key in declared if config_value(cfg, key)]
    for key in declared:
        if key not in components:
            print(f"note: {key} is False in this config; its row is left out", flush=True)
    rows = []
    for count in range(len(components) + 1):
        enabled = components[:count]
        overrides = [item for key in declared for item in (key, str(key in enabled))]
        rows.append(("baseline" if not count else f"+{components[count - 1].rsplit('.', 1)[-1]}", overrides))
    return rows


def fix_rows(cfg):
    """(name, overrides) rows: the reference's behaviour (MODEL.FIXES as shipped: fixes that change numerics
    off, crash fixes on), each of the model's fixes that is off turned on alone, then all of them on."""
    fixes = {name: cfg.MODEL.FIXES[name] for name in MODELS.get(cfg.MODEL.ARCH_NAME).fixes}
    if not fixes:
        raise ConfigError(f"MODEL.ARCH_NAME {cfg.MODEL.ARCH_NAME} has no MODEL.FIXES switches to ablate")
    rows = [("reference", [])]
    rows += [(f"+{fix}", [f"MODEL.FIXES.{fix}", "True"]) for fix in sorted(fixes) if not fixes[fix]]
    rows.append(("all fixes", [item for fix in sorted(fixes) for item in (f"MODEL.FIXES.{fix}", "True")]))
    return rows


def read_results(path):
    """The ``protocols`` mapping of a run's ``results.json``."""
    try:
        with open(path, encoding="utf-8") as handle:
            protocols = json.load(handle)["protocols"]
        for metrics in protocols.values():
            float(metrics["mAP"]), float(metrics["rank1"])
    except FileNotFoundError:
        raise DataError(f"{path}: results file not found (did the training run finish?)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: expected results.json with protocols -> {{mAP, rank1}} ({exc})") from None
    return protocols


def mean_std(values):
    """``"m"`` for one value, ``"m ± s"`` (sample standard deviation) for several."""
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def markdown_table(rows):
    """Markdown table of ``rows`` [(name, [protocols per seed] or None, [seconds per run])]."""
    protocols = []
    for _, runs, _ in rows:
        for results in runs or []:
            protocols += [name for name in results if name not in protocols]
    header = ["Variant"] + [f"{p} {metric}" for p in protocols for metric in ("mAP", "R1")] + ["time / run"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, runs, seconds in rows:
        cells = []
        for protocol in protocols:
            if not runs:
                cells += ["failed"] * 2
                continue
            for metric in ("mAP", "rank1"):
                values = [results[protocol][metric] for results in runs if protocol in results]
                cells.append(mean_std(values) if values else "-")
        cells.append(f"{statistics.mean(seconds) / 60:.1f} min" if seconds else "-")
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def difference_table(rows):
    """Markdown tables of each row's difference to the first: ``rows`` [(name, [run folders] or None)]; cells
    ``ΔmAP [95% CI]`` and ``ΔR1 [95% CI]`` per protocol (evaluation.comparison), over queries and, with two or
    more seeds per row, over seeds (paired by seed; ``Δ [95% CI] p``). A one-line note instead when a run has
    no per-query results or the rows were evaluated on different queries."""
    try:
        runs = [(name, [load_run(folder) for folder in folders] if folders else None) for name, folders in rows]
        first_name, first = runs[0]
        if first is None:
            return f"note: no differences to the first row: row {first_name} failed"
        compared = [(name, compare_runs(first, row_runs) if row_runs else None) for name, row_runs in runs[1:]]
    except DataError as exc:
        return f"note: no differences to the first row ({exc})"
    lines, seed_lines, header = [], [], None
    for name, comparisons in compared:
        if comparisons is None:
            lines.append(f"| {name} | failed |")
            continue
        if header is None:
            header = ["Variant"] + [f"{c.protocol} {metric} [95% CI]" for c in comparisons for metric in ("ΔmAP", "ΔR1")]
        cells = [f"{d.delta:+.1f} [{d.ci95[0]:+.1f}, {d.ci95[1]:+.1f}]" for c in comparisons for d in (c.mAP, c.rank1)]
        lines.append("| " + " | ".join([name] + cells) + " |")
        if all(c.mAP_runs is not None for c in comparisons):
            cells = [f"{d.delta:+.1f} [{d.ci95[0]:+.1f}, {d.ci95[1]:+.1f}] p {d.p_value:.2f}"
                     for c in comparisons for d in (c.mAP_runs, c.rank1_runs)]
            seed_lines.append("| " + " | ".join([name] + cells) + " |")
    if header is None:
        return "note: no row besides the first to compare with"
    head = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    table = [f"Difference to {first_name} (points; seeds averaged per query; 95% paired bootstrap over queries):",
             *head, *lines]
    if seed_lines:
        table += ["", f"Difference to {first_name} over seeds (points; each seed's mAP and Rank-1; 95% CI and p of a "
                  f"t-test, paired by seed where the rows hold the same seeds; evaluation.comparison):",
                  *head, *seed_lines]
    return "\n".join(table)


def run_row(config_file, extra, overrides, row_dir, seeds, base_seed, table_only):
    """Train (unless ``table_only``) one row for every seed; return ([results per seed] or None, [seconds])."""
    runs, seconds = [], []
    for k in range(seeds):
        run_dir = os.path.join(row_dir, f"seed{k}")
        if not table_only:
            # --overwrite: running the table again retrains the row in place.
            command = [sys.executable, os.path.join(REPO_ROOT, "train_svpr.py"), "--overwrite",
                       "--config_file", config_file, *extra, *overrides, "SOLVER.SEED", str(base_seed + k),
                       "OUTPUT_DIR", run_dir]
            print(f"== {' '.join(command[1:])}", flush=True)
            start = time.monotonic()
            if subprocess.run(command, cwd=REPO_ROOT).returncode != 0:
                return None, seconds
            os.makedirs(run_dir, exist_ok=True)
            with open(os.path.join(run_dir, TIME_FILE), "w", encoding="utf-8") as handle:
                handle.write(f"{time.monotonic() - start:.1f}\n")
        runs.append(read_results(os.path.join(run_dir, "results.json")))
        time_path = os.path.join(run_dir, TIME_FILE)
        if os.path.isfile(time_path):
            with open(time_path, encoding="utf-8") as handle:
                seconds.append(float(handle.read()))
    return runs, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--config_file", "--config-file", help="the config whose variants form the rows")
    parser.add_argument("--configs", nargs="+", help="compare these configs instead (one row each)")
    parser.add_argument("--fixes", action="store_true", help="rows: the reference, each MODEL.FIXES switch, all")
    parser.add_argument("--seeds", type=int, default=1, help="runs per row, SOLVER.SEED = seed, seed + 1, ...")
    parser.add_argument("--epochs", type=int, default=None, help="SOLVER.MAX_EPOCHS of every run")
    parser.add_argument("--output_dir", default=None, help="parent folder of the rows (default: OUTPUT_DIR/ablation)")
    parser.add_argument("--table-only", action="store_true", help="do not train; read the rows' results.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="extra overrides KEY VALUE for every run")
    args = parser.parse_args()
    if bool(args.config_file) == bool(args.configs):
        raise ConfigError("give either --config_file (component or --fixes rows) or --configs (one row per config)")
    if args.seeds < 1:
        raise ConfigError(f"--seeds {args.seeds}: expected a positive number of seeds")
    extra = list(args.opts) + (["SOLVER.MAX_EPOCHS", str(args.epochs)] if args.epochs is not None else [])
    if args.configs:
        plans = []
        for path in args.configs:
            cfg = load_config(path, extra)
            plans.append((os.path.splitext(os.path.basename(path))[0], path, [], cfg))
        output_dir = args.output_dir or os.path.join("outputs", "comparison")
    else:
        cfg = load_config(args.config_file, extra)
        rows = fix_rows(cfg) if args.fixes else component_rows(cfg)
        plans = [(name, args.config_file, overrides, cfg) for name, overrides in rows]
        output_dir = args.output_dir or os.path.join(cfg.OUTPUT_DIR, "fixes" if args.fixes else "ablation")
    table, folders, failed = [], [], []
    for name, config_file, overrides, cfg in plans:
        row_dir = os.path.join(output_dir, name.lstrip("+").lower().replace(" ", "_"))
        runs, seconds = run_row(config_file, extra, overrides, row_dir, args.seeds, cfg.SOLVER.SEED, args.table_only)
        if runs is None:
            failed.append(name)
        table.append((name, runs, seconds))
        seed_dirs = [os.path.join(row_dir, f"seed{k}") for k in range(args.seeds)]
        folders.append((name, None if runs is None else seed_dirs))
    print(markdown_table(table))
    if len(folders) > 1:
        print()
        print(difference_table(folders))
    if failed:
        raise UserError(f"training failed for rows: {', '.join(failed)}")


if __name__ == "__main__":
    run_main(main)

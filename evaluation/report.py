"""Result reports: per-protocol rows (with their breakdowns by query label) printed, written to
``results.json``/``results.csv`` (read back with ``read_results``) with the settings that changed the
numbers, and the per-query tables written to ``per_query_<protocol>.csv``."""
import csv
import io
import json
import os
import subprocess

import torch

from evaluation import per_query
from utils.io import atomic_write


METRIC_COLUMNS = ("mAP", "rank1", "rank5", "rank10", "mINP")
CSV_COLUMNS = ("protocol", "benchmark") + METRIC_COLUMNS + ("num_query", "num_gallery", "epoch", "checkpoint", "config")


def query_tables(result):
    """The per-query tables of an evaluator result: ``per_query`` is one table or a list (one per trial);
    empty when the result has none."""
    tables = result.get("per_query")
    if tables is None:
        return []
    return list(tables) if isinstance(tables, (list, tuple)) else [tables]


def summarize(result):
    """Row of percentages (2 decimals) + counts from an evaluator result (``cmc``, ``mAP``, ``mINP``,
    ``num_query``, ``num_gallery``; ``benchmark``, the data it was measured on, is kept when present;
    ``breakdown`` is computed from the per-query tables, all trials together, when the result has them)."""
    cmc = result["cmc"]
    if len(cmc) < 10:
        raise ValueError(f"the CMC curve has {len(cmc)} ranks; the report needs rank-10 (TEST.MAX_RANK >= 10)")
    row = {"mAP": result["mAP"], "rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "mINP": result["mINP"]}
    row = {name: round(float(value) * 100, 2) for name, value in row.items()}
    row.update(num_query=int(result["num_query"]), num_gallery=int(result["num_gallery"]))
    if "benchmark" in result:
        row["benchmark"] = str(result["benchmark"])
    tables = query_tables(result)
    if tables:
        row["breakdown"] = per_query.breakdown(per_query.concatenate(tables))
    return row


def format_table(protocols):
    """Fixed-width text table of ``{protocol: result}`` (with the benchmark each was measured on)."""
    rows = {name: summarize(result) for name, result in protocols.items()}
    width = max([len("protocol")] + [len(name) for name in rows])
    data_width = max([len("data")] + [len(row.get("benchmark", "")) for row in rows.values()])
    header = (f"{'protocol':<{width}}  {'data':<{data_width}}" + "".join(f"{c:>9}" for c in METRIC_COLUMNS)
              + f"{'#query':>9}{'#gallery':>10}")
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        lines.append(f"{name:<{width}}  {row.get('benchmark', ''):<{data_width}}"
                     + "".join(f"{row[c]:>9.2f}" for c in METRIC_COLUMNS)
                     + f"{row['num_query']:>9d}{row['num_gallery']:>10d}")
    for name, row in rows.items():
        lines += format_breakdown(name, row.get("breakdown") or {})
    return "\n".join(lines)


def format_breakdown(protocol, breakdown):
    """Text lines of one protocol's breakdown: per label, ``value: mAP / R1 (#queries)`` of each value."""
    lines = []
    for label, groups in breakdown.items():
        cells = [f"{value}: {group['mAP']:.2f} / {group['rank1']:.2f} ({group['num_query']})"
                 for value, group in groups.items()]
        lines.append(f"  {protocol} mAP / R1 by {label}: " + ", ".join(cells))
    return lines


def _git_commit():
    """The framework's git commit (with "+dirty" for local changes), or None outside a git checkout."""
    folder = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True,
                                timeout=10)
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if commit.returncode:
        return None
    return commit.stdout.strip() + ("+dirty" if status.stdout.strip() else "")


def evaluation_settings(cfg, trained_on=None, initial_weights=None, precision=None):
    """Every setting besides the weights that changes the reported numbers, for ``results.json``
    (``initial_weights``: where a training run's initial weights came from, MODEL.PRETRAIN_CHOICE;
    ``precision``: ``{"training": "fp32" | "bf16" | "fp16" | None, "test_features": ...}`` as the run used
    them on its device, ``utils.amp``)."""
    test = cfg.TEST
    settings = {
        "trained_on": trained_on, "test_protocols": list(cfg.DATASETS.TESTS),
        "re_ranking": bool(test.RE_RANKING), "re_ranking_k1": int(test.RR_K1), "re_ranking_k2": int(test.RR_K2),
        "re_ranking_lambda": float(test.RR_LAMBDA), "time_mode": test.TIME_MODE, "feat_norm": test.FEAT_NORM,
        "distance": test.DIST_METRIC, "max_rank": int(test.MAX_RANK), "image_size": list(cfg.INPUT.SIZE_TEST),
        "pixel_mean": list(cfg.INPUT.PIXEL_MEAN), "pixel_std": list(cfg.INPUT.PIXEL_STD),
        "amp": bool(cfg.SOLVER.AMP) and cfg.SOLVER.AMP_DTYPE, "seed": int(cfg.SOLVER.SEED),
        "framework_commit": _git_commit(), "torch": torch.__version__,
    }
    if initial_weights is not None:
        settings["initial_weights"] = initial_weights
    if precision is not None:
        settings["precision"] = dict(precision)
    return settings


def write_results(output_dir, checkpoint, config, epoch, protocols, settings=None):
    """Write ``results.json``, ``results.csv`` and each protocol's per-query CSV file(s) (atomically) for
    ``{protocol: result}``; returns the JSON document. ``settings``: everything else that changes the
    numbers (recorded in the JSON)."""
    os.makedirs(output_dir, exist_ok=True)
    for name, result in protocols.items():
        tables = query_tables(result)
        if tables:
            per_query.write_protocol_csvs(output_dir, name, tables)
    document = {"checkpoint": checkpoint, "config": config, "epoch": None if epoch is None else int(epoch),
                "settings": dict(settings or {}),
                "protocols": {name: summarize(result) for name, result in protocols.items()}}
    atomic_write(os.path.join(output_dir, "results.json"), json.dumps(document, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for name, row in document["protocols"].items():
        writer.writerow([name, row.get("benchmark", "")]
                        + [row[c] for c in METRIC_COLUMNS + ("num_query", "num_gallery")]
                        + ["" if epoch is None else int(epoch), checkpoint, config])
    atomic_write(os.path.join(output_dir, "results.csv"), buffer.getvalue())
    return document


def read_results(output_dir):
    """The ``results.json`` document of ``output_dir``."""
    with open(os.path.join(output_dir, "results.json")) as stream:
        return json.load(stream)

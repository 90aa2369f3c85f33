"""Comparing runs: is model B better than model A on the same queries, and by how much?

Per protocol, the runs' per-query results (``per_query_<protocol>.csv``) are paired by query image (and
trial, for protocols with random galleries) and identity; several runs per side (seeds) are first averaged
per query. An image is named by its path below the folder that holds all of a run's queries, so that runs of
the same benchmark stored at different places (another checkout, another machine's data root) pair.
The difference B - A of mAP and Rank-1 (points) is the mean over queries of the per-query differences of
AP and of the Rank-1 hit (0 or 100). Its 95% confidence interval is a paired bootstrap over queries
(``scipy.stats.bootstrap``, percentile method) and its p-value a paired sign-flip permutation test
(``scipy.stats.permutation_test`` with ``permutation_type='samples'``, two-sided), both seeded.

Both measure how much the result depends on which queries the benchmark happens to hold. Seed-to-seed
variation enters only through the per-query means: with one run per side, a difference can still be a
training-seed accident, so compare several seeds per side where training is noisy.
"""
import glob
import os
import re
from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np

from evaluation.per_query import csv_name, read_csv
from evaluation.report import read_results
from utils.errors import ConfigError, DataError

#: Fewest bootstrap resamples / random sign flips accepted.
MIN_RESAMPLES = 10_000
#: Numbers per array handed to the vectorised statistic at once (bounds the memory of a resampling batch).
BATCH_ELEMENTS = 1 << 22


@dataclass
class RunQueries:
    """One run's per-query results: ``protocols`` maps a protocol to ``(keys, ap, rank1)``, the query keys
    (``path#pid`` or ``trial:path#pid``, see :func:`query_keys`) in sorted order with their AP and Rank-1 hit
    (both in percent)."""

    name: str
    protocols: Dict[str, Tuple[List[str], np.ndarray, np.ndarray]]


@dataclass
class Difference:
    """B - A of one metric (points) with its 95% confidence interval and p-value, and both sides' values."""

    value_a: float
    value_b: float
    delta: float
    ci95: Tuple[float, float]
    p_value: float


@dataclass
class ProtocolComparison:
    """The comparison of one protocol: number of paired queries, runs per side, mAP and Rank-1."""

    protocol: str
    num_query: int
    runs_a: int
    runs_b: int
    mAP: Difference
    rank1: Difference


def _trial_files(folder, protocol):
    """``[(trial or None, path)]`` of a protocol's per-query CSV files in ``folder``."""
    single = os.path.join(folder, csv_name(protocol))
    if os.path.isfile(single):
        return [(None, single)]
    pattern = re.compile(re.escape(f"per_query_{protocol}_trial") + r"(\d+)\.csv$")
    trials = []
    for path in glob.glob(os.path.join(glob.escape(folder), f"per_query_{glob.escape(protocol)}_trial*.csv")):
        match = pattern.search(os.path.basename(path))
        if match:
            trials.append((int(match.group(1)), path))
    return sorted(trials)


def query_keys(paths, pids):
    """``path#pid`` of each query, its path relative to the deepest folder that holds all of ``paths``."""
    paths = [str(path) for path in paths]
    root = os.path.commonpath([os.path.dirname(path) for path in paths]) if paths else ""
    return [f"{os.path.relpath(path, root) if root else path}#{pid}" for path, pid in zip(paths, pids)]


def load_run(path):
    """The per-query results of a run: ``path`` is its folder or its ``results.json``."""
    folder = os.path.dirname(os.path.abspath(path)) if os.path.isfile(path) else path
    if not os.path.isfile(os.path.join(folder, "results.json")):
        raise DataError(f"{path}: expected a run folder with results.json, or a results.json file")
    try:
        names = list(read_results(folder)["protocols"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"{os.path.join(folder, 'results.json')}: not a results document ({exc})") from None
    protocols = {}
    for protocol in names:
        files = _trial_files(folder, protocol)
        if not files:
            raise DataError(f"{os.path.join(folder, csv_name(protocol))}: per-query results not found (evaluations "
                            f"before per-query results existed have none: evaluate the checkpoint again with "
                            f"test_svpr.py)")
        keys, ap, rank1 = [], [], []
        tables = [(trial, read_csv(file)) for trial, file in files]
        # One folder for all trials' queries: a trial's key is then its number and the same name as in the others.
        names = query_keys([path for _, table in tables for path in table["path"]],
                           [pid for _, table in tables for pid in table["pid"]])
        for trial, table in tables:
            own, names = names[:len(table["path"])], names[len(table["path"]):]
            keys += own if trial is None else [f"{trial}:{name}" for name in own]
            ap.append(table["ap"])
            rank1.append(100.0 * (table["first_match_rank"] == 1))
        if len(set(keys)) != len(keys):
            raise DataError(f"{files[0][1]}: a query image appears twice; queries are paired by image path")
        order = np.argsort(keys, kind="stable")
        protocols[protocol] = ([keys[i] for i in order], np.concatenate(ap)[order], np.concatenate(rank1)[order])
    return RunQueries(path, protocols)


def _per_query_mean(runs, protocol, reference):
    """(ap (n,), rank1 (n,)) of ``protocol`` averaged over ``runs``; ``DataError`` unless every run holds
    the query keys of ``reference`` (a run)."""
    keys = reference.protocols[protocol][0]
    ap, rank1 = [], []
    for run in runs:
        run_keys, run_ap, run_rank1 = run.protocols[protocol]
        if run_keys != keys:
            common = len(set(run_keys) & set(keys))
            raise DataError(f"{run.name} and {reference.name} were evaluated on different {protocol} queries "
                            f"({len(run_keys)} and {len(keys)} queries, {common} in common): only runs on the "
                            f"same query set can be compared")
        ap.append(run_ap)
        rank1.append(run_rank1)
    return np.mean(ap, axis=0), np.mean(rank1, axis=0)


def _mean_difference(a, b, axis=-1):
    return np.mean(b - a, axis=axis)


def paired_difference(a, b, n_resamples=MIN_RESAMPLES, seed=0):
    """``Difference`` of the means of paired per-query values ``a`` and ``b`` (n,): B - A, its 95% paired
    bootstrap interval and its two-sided paired sign-flip permutation p-value."""
    from scipy import stats

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    delta = float(np.mean(b - a))
    batch = max(1, BATCH_ELEMENTS // a.size)
    if np.all(b - a == delta):  # every query moved alike (e.g. not at all): nothing to resample
        return Difference(float(a.mean()), float(b.mean()), delta, (delta, delta), 1.0)
    interval = stats.bootstrap((a, b), _mean_difference, n_resamples=n_resamples, batch=batch, vectorized=True,
                               paired=True, confidence_level=0.95, method="percentile",
                               rng=np.random.default_rng(seed)).confidence_interval
    test = stats.permutation_test((a, b), _mean_difference, permutation_type="samples", n_resamples=n_resamples,
                                  batch=batch, vectorized=True, alternative="two-sided",
                                  rng=np.random.default_rng(seed))
    return Difference(float(a.mean()), float(b.mean()), delta, (float(interval.low), float(interval.high)),
                      float(test.pvalue))


def compare_runs(runs_a, runs_b, n_resamples=MIN_RESAMPLES, seed=0):
    """``[ProtocolComparison]`` of every protocol present in all runs (``RunQueries``) of both sides, in the
    order of the first run of A."""
    if n_resamples < MIN_RESAMPLES:
        raise ConfigError(f"{n_resamples} resamples: expected at least {MIN_RESAMPLES}")
    runs = list(runs_a) + list(runs_b)
    protocols = [p for p in runs[0].protocols if all(p in run.protocols for run in runs)]
    if not protocols:
        raise DataError(f"{runs[0].name} and {runs[-1].name} have no test protocol in common")
    comparisons = []
    for protocol in protocols:
        ap_a, rank1_a = _per_query_mean(runs_a, protocol, runs[0])
        ap_b, rank1_b = _per_query_mean(runs_b, protocol, runs[0])
        comparisons.append(ProtocolComparison(
            protocol, int(ap_a.size), len(runs_a), len(runs_b),
            paired_difference(ap_a, ap_b, n_resamples, seed), paired_difference(rank1_a, rank1_b, n_resamples, seed)))
    return comparisons


def as_document(comparisons, digits=4):
    """``{protocol: {delta_mAP, ci95_mAP, p_mAP, delta_R1, ci95_R1, p_R1}}`` (points, ``[low, high]``)."""
    document = {}
    for row in comparisons:
        entry = {}
        for metric, difference in (("mAP", row.mAP), ("R1", row.rank1)):
            entry[f"delta_{metric}"] = round(difference.delta, digits)
            entry[f"ci95_{metric}"] = [round(bound, digits) for bound in difference.ci95]
            entry[f"p_{metric}"] = round(difference.p_value, digits)
        document[row.protocol] = {key: entry[key] for key in (
            "delta_mAP", "ci95_mAP", "p_mAP", "delta_R1", "ci95_R1", "p_R1")}
    return document


def _p(value):
    return "< 0.0001" if value < 1e-4 else f"{value:.4f}"


def markdown_table(comparisons, label_a="A", label_b="B"):
    """Markdown table of ``comparisons``: per protocol the paired queries, runs per side, both sides' mAP and
    Rank-1, and each difference with its interval and p-value."""
    header = ["protocol", "queries", f"runs {label_a}", f"runs {label_b}", f"mAP {label_a}", f"mAP {label_b}",
              f"ΔmAP ({label_b} − {label_a}) [95% CI]", "p", f"R1 {label_a}", f"R1 {label_b}",
              "ΔR1 [95% CI]", "p"]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for row in comparisons:
        cells = [row.protocol, str(row.num_query), str(row.runs_a), str(row.runs_b)]
        for difference in (row.mAP, row.rank1):
            low, high = difference.ci95
            cells += [f"{difference.value_a:.2f}", f"{difference.value_b:.2f}",
                      f"{difference.delta:+.2f} [{low:+.2f}, {high:+.2f}]", _p(difference.p_value)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)

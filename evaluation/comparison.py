"""Comparing runs: is model B better than model A on the same queries, and by how much?

Per protocol, the runs' per-query results (``per_query_<protocol>.csv``) are paired by query image (and
trial, for protocols with random galleries) and identity; several runs per side (seeds) are first averaged
per query. An image is named by its path below the folder that holds all of a run's queries, so that runs of
the same benchmark stored at different places (another checkout, another machine's data root) pair.
The difference B - A of mAP and Rank-1 (points) is the mean over queries of the per-query differences of
AP and of the Rank-1 hit (0 or 100). Its 95% confidence interval is a paired bootstrap over queries
(``scipy.stats.bootstrap``, percentile method) and its p-value a paired sign-flip permutation test
(``scipy.stats.permutation_test`` with ``permutation_type='samples'``, two-sided), both seeded.

Both measure how much the result depends on which queries the benchmark happens to hold, not on the
training seed: the seeds' average per query hides how far the seeds are apart. With at least two runs per
side the comparison is also made over runs (:func:`runs_difference`): each run's mAP and Rank-1 (the mean of
its per-query values), B - A of their means with a 95% t-interval and p-value. When both sides hold runs of
the same training seeds (``settings.seed`` of results.json, each seed once per side), the runs are paired by
seed (``scipy.stats.ttest_rel``); otherwise the sides are independent samples (Welch's
``scipy.stats.ttest_ind``). This is the interval to report when the question is whether a method trains
better, which the seed decides as much as the queries do.
"""
import glob
import os
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

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
    seed: Optional[int] = None


@dataclass
class Difference:
    """B - A of one metric (points) with its 95% confidence interval and p-value, and both sides' values."""

    value_a: float
    value_b: float
    delta: float
    ci95: Tuple[float, float]
    p_value: float


@dataclass
class RunsDifference:
    """B - A of one metric over runs (points): each side's per-run values with their mean and standard
    deviation, the difference of the means with its 95% t-interval and two-sided p-value, and the test
    (``"paired t-test over seeds"`` or ``"Welch's t-test"``)."""

    test: str
    values_a: Tuple[float, ...]
    values_b: Tuple[float, ...]
    delta: float
    ci95: Tuple[float, float]
    p_value: float

    @property
    def mean_a(self):
        return float(np.mean(self.values_a))

    @property
    def mean_b(self):
        return float(np.mean(self.values_b))

    @property
    def sd_a(self):
        return float(np.std(self.values_a, ddof=1))

    @property
    def sd_b(self):
        return float(np.std(self.values_b, ddof=1))


@dataclass
class ProtocolComparison:
    """The comparison of one protocol: number of paired queries, runs per side, mAP and Rank-1 over queries,
    and (with two or more runs per side, else None) mAP and Rank-1 over runs."""

    protocol: str
    num_query: int
    runs_a: int
    runs_b: int
    mAP: Difference
    rank1: Difference
    mAP_runs: Optional[RunsDifference] = None
    rank1_runs: Optional[RunsDifference] = None


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
        document = read_results(folder)
        names = list(document["protocols"])
        seed = document.get("settings", {}).get("seed")
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
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
    return RunQueries(path, protocols, seed if isinstance(seed, int) and not isinstance(seed, bool) else None)


def _per_query_values(runs, protocol, reference):
    """(ap (R, n), rank1 (R, n)) of ``protocol`` for each of ``runs``; ``DataError`` unless every run holds
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
    return np.stack(ap), np.stack(rank1)


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


def seed_pairing(runs_a, runs_b):
    """The order that pairs ``runs_b`` with ``runs_a`` by training seed, ``(order_a, order_b)`` (indices), or
    None when the sides cannot be paired: a seed unknown, repeated within a side, or not on both sides."""
    seeds_a, seeds_b = [run.seed for run in runs_a], [run.seed for run in runs_b]
    if None in seeds_a or None in seeds_b or len(set(seeds_a)) != len(seeds_a) or sorted(seeds_a) != sorted(seeds_b):
        return None
    return list(np.argsort(seeds_a, kind="stable")), list(np.argsort(seeds_b, kind="stable"))


def runs_difference(values_a, values_b, paired):
    """``RunsDifference`` of per-run values (at least two per side): with ``paired`` the i-th values of both
    sides belong together (same seed) and a paired t-test is used, otherwise Welch's t-test. Values that do
    not vary (the paired differences, or both sides) give the interval [delta, delta] and p = 1 if delta is 0,
    else 0."""
    from scipy import stats

    a, b = np.asarray(values_a, dtype=np.float64), np.asarray(values_b, dtype=np.float64)
    if paired:
        test, delta, constant = "paired t-test over seeds", float(np.mean(b - a)), np.ptp(b - a) == 0
    else:
        test, delta, constant = "Welch's t-test", float(b.mean() - a.mean()), np.ptp(a) == 0 and np.ptp(b) == 0
    if constant:
        interval, p_value = (delta, delta), float(delta == 0)
    else:
        with warnings.catch_warnings():
            # Runs that agree to rounding on one side (a deterministic model evaluated twice) are fine here.
            warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
            result = stats.ttest_rel(b, a) if paired else stats.ttest_ind(b, a, equal_var=False)
            bounds = result.confidence_interval(confidence_level=0.95)
        interval, p_value = (float(bounds.low), float(bounds.high)), float(result.pvalue)
    return RunsDifference(test, tuple(map(float, a)), tuple(map(float, b)), delta, interval, p_value)


def compare_runs(runs_a, runs_b, n_resamples=MIN_RESAMPLES, seed=0):
    """``[ProtocolComparison]`` of every protocol present in all runs (``RunQueries``) of both sides, in the
    order of the first run of A."""
    if n_resamples < MIN_RESAMPLES:
        raise ConfigError(f"{n_resamples} resamples: expected at least {MIN_RESAMPLES}")
    runs = list(runs_a) + list(runs_b)
    protocols = [p for p in runs[0].protocols if all(p in run.protocols for run in runs)]
    if not protocols:
        raise DataError(f"{runs[0].name} and {runs[-1].name} have no test protocol in common")
    pairing = seed_pairing(runs_a, runs_b)
    order_a, order_b = pairing or (list(range(len(runs_a))), list(range(len(runs_b))))
    comparisons = []
    for protocol in protocols:
        ap_a, rank1_a = _per_query_values(runs_a, protocol, runs[0])  # (runs, queries)
        ap_b, rank1_b = _per_query_values(runs_b, protocol, runs[0])
        row = ProtocolComparison(
            protocol, int(ap_a.shape[1]), len(runs_a), len(runs_b),
            paired_difference(ap_a.mean(0), ap_b.mean(0), n_resamples, seed),
            paired_difference(rank1_a.mean(0), rank1_b.mean(0), n_resamples, seed))
        if len(runs_a) >= 2 and len(runs_b) >= 2:
            # Each run's mAP and Rank-1: the mean over its queries.
            row.mAP_runs = runs_difference(ap_a.mean(1)[order_a], ap_b.mean(1)[order_b], pairing is not None)
            row.rank1_runs = runs_difference(rank1_a.mean(1)[order_a], rank1_b.mean(1)[order_b], pairing is not None)
        comparisons.append(row)
    return comparisons


def as_document(comparisons, digits=4):
    """``{protocol: {delta_mAP, ci95_mAP, p_mAP, delta_R1, ci95_R1, p_R1}}`` (points, ``[low, high]``), over
    queries; with two or more runs per side also ``over_runs``: ``{test, mean_mAP_a, sd_mAP_a, mean_mAP_b,
    sd_mAP_b, delta_mAP, ci95_mAP, p_mAP}`` and the same for R1."""
    document = {}
    for row in comparisons:
        entry = {}
        for metric, difference in (("mAP", row.mAP), ("R1", row.rank1)):
            entry[f"delta_{metric}"] = round(difference.delta, digits)
            entry[f"ci95_{metric}"] = [round(bound, digits) for bound in difference.ci95]
            entry[f"p_{metric}"] = round(difference.p_value, digits)
        document[row.protocol] = {key: entry[key] for key in (
            "delta_mAP", "ci95_mAP", "p_mAP", "delta_R1", "ci95_R1", "p_R1")}
        if row.mAP_runs is not None:
            over_runs = {"test": row.mAP_runs.test}
            for metric, difference in (("mAP", row.mAP_runs), ("R1", row.rank1_runs)):
                over_runs.update({
                    f"mean_{metric}_a": round(difference.mean_a, digits), f"sd_{metric}_a": round(difference.sd_a, digits),
                    f"mean_{metric}_b": round(difference.mean_b, digits), f"sd_{metric}_b": round(difference.sd_b, digits),
                    f"delta_{metric}": round(difference.delta, digits),
                    f"ci95_{metric}": [round(bound, digits) for bound in difference.ci95],
                    f"p_{metric}": round(difference.p_value, digits)})
            document[row.protocol]["over_runs"] = over_runs
    return document


def _p(value):
    return "< 0.0001" if value < 1e-4 else f"{value:.4f}"


def _markdown(header, rows):
    """A Markdown table: ``header`` cells, then one line per list of cells (numbers right-aligned)."""
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def _difference_cells(side_a, side_b, difference):
    """Cells: both sides as given, the difference with its interval, the p-value."""
    low, high = difference.ci95
    return [side_a, side_b, f"{difference.delta:+.2f} [{low:+.2f}, {high:+.2f}]", _p(difference.p_value)]


def markdown_table(comparisons, label_a="A", label_b="B"):
    """Markdown table of ``comparisons``: per protocol the paired queries, runs per side, both sides' mAP and
    Rank-1, and each difference with its interval and p-value."""
    header = ["protocol", "queries", f"runs {label_a}", f"runs {label_b}", f"mAP {label_a}", f"mAP {label_b}",
              f"ΔmAP ({label_b} − {label_a}) [95% CI]", "p", f"R1 {label_a}", f"R1 {label_b}",
              "ΔR1 [95% CI]", "p"]
    rows = []
    for row in comparisons:
        cells = [row.protocol, str(row.num_query), str(row.runs_a), str(row.runs_b)]
        for difference in (row.mAP, row.rank1):
            cells += _difference_cells(f"{difference.value_a:.2f}", f"{difference.value_b:.2f}", difference)
        rows.append(cells)
    return _markdown(header, rows)


def markdown_runs_table(comparisons, label_a="A", label_b="B"):
    """Markdown table of the comparison over runs (empty string when a side has fewer than two runs): per
    protocol the runs per side, the test, both sides' mean ± standard deviation over runs, and each
    difference with its t-interval and p-value."""
    header = ["protocol", f"runs {label_a}", f"runs {label_b}", "test", f"mAP {label_a}", f"mAP {label_b}",
              f"ΔmAP ({label_b} − {label_a}) [95% CI]", "p", f"R1 {label_a}", f"R1 {label_b}", "ΔR1 [95% CI]", "p"]
    rows = []
    for row in comparisons:
        if row.mAP_runs is None:
            continue
        cells = [row.protocol, str(row.runs_a), str(row.runs_b), row.mAP_runs.test]
        for difference in (row.mAP_runs, row.rank1_runs):
            cells += _difference_cells(f"{difference.mean_a:.2f} ± {difference.sd_a:.2f}",
                                       f"{difference.mean_b:.2f} ± {difference.sd_b:.2f}", difference)
        rows.append(cells)
    return _markdown(header, rows) if rows else ""

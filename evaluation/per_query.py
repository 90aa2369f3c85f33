"""Per-query results: one row per evaluated query (its labels, average precision and first-match rank),
their ``per_query_<protocol>.csv`` files, and the breakdowns of mAP and Rank-1 by query label.

A table is a dict of equally long columns: ``index`` (the query's position in the protocol's query list),
``path``, ``pid``, ``camid``, ``viewid``, ``timeid`` (-1: not given), ``ap`` (average precision in percent,
the unit of ``results.json``) and ``first_match_rank`` (1-based, after the protocol's removals), plus one
``attr:<name>`` column per attribute when the queries carry attribute labels. The mean of ``ap`` is the
protocol's mAP and the fraction of ``first_match_rank == 1`` its Rank-1.
"""
import csv
import io
import os

import numpy as np

from utils.errors import DataError
from utils.io import atomic_write

COLUMNS = ("index", "path", "pid", "camid", "viewid", "timeid", "ap", "first_match_rank")
INTEGER_COLUMNS = ("index", "pid", "camid", "viewid", "timeid", "first_match_rank")
#: Query labels every breakdown groups by (those not given, all -1, are left out).
BREAKDOWN_LABELS = ("timeid", "viewid", "camid")
ATTRIBUTE_PREFIX = "attr:"


def per_query_table(ranked, query_labels, paths=None, attrs=None):
    """The table of the valid queries of ``ranked`` (``evaluate_rank``'s ``query_results``: ``query`` rows,
    ``ap`` fractions, ``first_match_rank``). ``query_labels``: (Q, 4) pid, camid, viewid, timeid of every
    query; ``paths``: Q paths or None; ``attrs``: (Q, A) attribute classes or None (columns ``attr:<k>``
    until :func:`name_attributes` names them)."""
    rows = np.asarray(ranked["query"], dtype=np.int64)
    labels = np.asarray(query_labels, dtype=np.int64)[rows]
    table = {"index": rows, "path": [str(paths[i]) for i in rows] if paths is not None else [""] * rows.size}
    for column, name in enumerate(("pid", "camid", "viewid", "timeid")):
        table[name] = labels[:, column]
    table["ap"] = 100.0 * np.asarray(ranked["ap"], dtype=np.float64)
    table["first_match_rank"] = np.asarray(ranked["first_match_rank"], dtype=np.int64)
    if attrs is not None:
        attrs = np.asarray(attrs, dtype=np.int64)[rows]
        for column in range(attrs.shape[1]):
            table[f"{ATTRIBUTE_PREFIX}{column}"] = attrs[:, column]
    return table


def name_attributes(table, attributes):
    """``table`` with its ``attr:<k>`` columns renamed ``attr:<name>`` after ``attributes``, the dataset's
    ``(name, number of classes)`` pairs in label order."""
    names = {f"{ATTRIBUTE_PREFIX}{k}": f"{ATTRIBUTE_PREFIX}{name}" for k, (name, _) in enumerate(attributes)}
    return {names.get(column, column): values for column, values in table.items()}


def csv_name(protocol, trial=None):
    """``per_query_<protocol>.csv``, or ``per_query_<protocol>_trial<k>.csv`` for trial k (1-based) of a
    protocol evaluated over several random galleries."""
    return f"per_query_{protocol}.csv" if trial is None else f"per_query_{protocol}_trial{trial}.csv"


def write_csv(path, table):
    """Write ``table`` to ``path`` (atomically); floats keep every digit, so the file reproduces the metrics."""
    names = list(table)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(names)
    columns = [table[name].tolist() if isinstance(table[name], np.ndarray) else table[name] for name in names]
    writer.writerows(zip(*columns))
    atomic_write(path, buffer.getvalue())
    return path


def read_csv(path):
    """The table of a per-query CSV file; ``DataError`` naming the file when it is missing or malformed."""
    try:
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.reader(handle))
    except FileNotFoundError:
        raise DataError(f"{path}: per-query results not found (evaluations before per-query results existed "
                        f"have none: evaluate the checkpoint again with test_svpr.py)") from None
    if not rows or any(name not in rows[0] for name in COLUMNS):
        raise DataError(f"{path}: expected a per-query CSV with the columns {', '.join(COLUMNS)}")
    names, body = rows[0], rows[1:]
    if any(len(row) != len(names) for row in body):
        raise DataError(f"{path}: rows do not all have {len(names)} fields")
    table = {}
    try:
        for column, name in enumerate(names):
            values = [row[column] for row in body]
            if name == "path":
                table[name] = values
            elif name == "ap":
                table[name] = np.array(values, dtype=np.float64)
            else:
                table[name] = np.array(values, dtype=np.int64)
    except ValueError as exc:
        raise DataError(f"{path}: column {name!r} is not numeric ({exc})") from None
    return table


def concatenate(tables):
    """One table of the rows of ``tables`` (e.g. the trials of a protocol), which share their columns."""
    if len(tables) == 1:
        return tables[0]
    return {name: (sum((list(t[name]) for t in tables), []) if name == "path"
                   else np.concatenate([t[name] for t in tables])) for name in tables[0]}


def metrics_of(table, rows=None):
    """``{"mAP", "rank1", "num_query"}`` (percent, 2 decimals, as ``results.json``) of the table's rows
    ``rows`` (a boolean mask; all rows by default)."""
    ap, first = table["ap"], table["first_match_rank"]
    if rows is not None:
        ap, first = ap[rows], first[rows]
    return {"mAP": round(float(np.mean(ap)), 2), "rank1": round(100.0 * float(np.mean(first == 1)), 2),
            "num_query": int(ap.size)}


def breakdown(table):
    """``{label: {value: {"mAP", "rank1", "num_query"}}}``: the metrics of the queries of each value of
    ``timeid``, ``viewid``, ``camid`` and every attribute column (values as strings, in ascending order).
    A label no query has (all -1) is left out."""
    labels = [name for name in BREAKDOWN_LABELS if (np.asarray(table[name]) >= 0).any()]
    labels += [name for name in table if name.startswith(ATTRIBUTE_PREFIX)]
    groups = {}
    for label in labels:
        values = np.asarray(table[label])
        groups[label] = {str(int(value)): metrics_of(table, values == value) for value in np.unique(values)}
    return groups


def write_protocol_csvs(output_dir, protocol, tables):
    """Write the per-query CSV of ``protocol`` (one table) or of each of its trials (several tables);
    returns the written paths."""
    if len(tables) == 1:
        return [write_csv(os.path.join(output_dir, csv_name(protocol)), tables[0])]
    return [write_csv(os.path.join(output_dir, csv_name(protocol, trial)), table)
            for trial, table in enumerate(tables, start=1)]

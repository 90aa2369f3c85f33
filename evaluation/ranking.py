"""The ranking kernel: CMC, mAP and mINP of a query x gallery distance matrix.

Ranking rules follow the Market-1501 protocol, as the reference code applies it: for each query the
gallery is ordered by ascending distance (ties resolved by gallery index, as a stable sort does);
gallery samples with the query's identity *and* camera are ignored; the view/time filters remove further
samples; queries left without a true match are skipped.

``evaluate_rank`` never sorts a full gallery row. Every metric only needs the rank of each true match
among the kept gallery samples, i.e. how many kept non-matches come before it. Per chunk of queries the
matches' distances are sorted (a handful per query), every kept non-match is bucketed between them with
``searchsorted``, and a per-query histogram + cumsum gives the ranks: O(Q*G*log(P)) work for P matches
per query instead of the O(Q*G*log(G)) of a full argsort, and memory bounded by the chunk size.
"""
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from utils.errors import DataError

MODES = ("mix", "cross", "same")
# Distances per (queries x gallery) chunk; about 8 bytes of temporaries each (+ the input's size).
DEFAULT_CHUNK_ELEMENTS = 1 << 20


class NoValidQueryError(DataError, ValueError):
    """No query has a true match left in the gallery after the protocol's filters."""


def _check_mode(name, mode):
    if mode not in MODES:
        raise ValueError(f"{name}={mode!r} is not one of {', '.join(MODES)}")


def removal_mask(query, gallery, view_mode="mix", time_mode="mix"):
    """(matches, removed) boolean masks of shape (Q, G): true matches, and gallery samples the protocol
    ignores for each query (same identity and camera; other/same view or time per ``view_mode``/``time_mode``).

    ``query`` / ``gallery``: label arrays by name, ``pids`` and ``camids`` (and ``viewids`` / ``timeids`` where
    their mode filters); the one definition of the protocols' removals (ranking, pictures, the checks before
    training)."""
    def ids(labels, name):
        values = labels.get(name)
        return None if values is None else np.asarray(values)

    q_pids, g_pids = ids(query, "pids"), ids(gallery, "pids")
    matches = g_pids[None, :] == q_pids[:, None]
    removed = matches & (ids(gallery, "camids")[None, :] == ids(query, "camids")[:, None])
    for mode, name in ((time_mode, "timeids"), (view_mode, "viewids")):
        q_ids, g_ids = ids(query, name), ids(gallery, name)
        if mode == "cross":
            removed |= g_ids[None, :] == q_ids[:, None]
        elif mode == "same":
            removed |= g_ids[None, :] != q_ids[:, None]
    return matches, removed


def _count_below(sorted_rows, rows, values, inclusive):
    """Per value, how many entries of ``sorted_rows[row]`` are < value (<= if ``inclusive``).

    A binary search vectorised over all values (numpy has no batched row-wise searchsorted).
    """
    flat = sorted_rows.reshape(-1)
    base = rows * sorted_rows.shape[1]
    low = np.zeros(values.shape, dtype=np.int64)
    high = np.full(values.shape, sorted_rows.shape[1], dtype=np.int64)
    while True:
        active = low < high
        if not active.any():
            return low
        middle = (low + high) // 2
        probe = flat[base + np.minimum(middle, sorted_rows.shape[1] - 1)]
        go_right = active & ((probe <= values) if inclusive else (probe < values))
        low = np.where(go_right, middle + 1, low)
        high = np.where(active & ~go_right, middle, high)


def _match_ranks(dist, matches, removed):
    """1-based ranks of each query's kept true matches among its kept gallery, best first.

    ``dist``, ``matches`` and ``removed`` are (C, G) numpy arrays. Returns ``ranks`` (C, P) int64 sorted
    ascending per row (columns >= the query's match count hold padding) and ``num_matches`` (C,).
    """
    num_queries, num_gallery = dist.shape
    positives = matches & ~removed
    num_matches = np.count_nonzero(positives, axis=1)
    width = int(num_matches.max()) if num_queries else 0
    if width == 0:
        return np.zeros((num_queries, 0), dtype=np.int64), num_matches

    # Kept distances sorted per row (removed ones pushed to the end as +inf); a match's rank is then
    # 1 + the number of kept samples strictly closer, found by binary search.
    kept_sorted = dist.copy()
    np.putmask(kept_sorted, removed, np.inf)
    kept_sorted.sort(axis=1)
    if np.isnan(kept_sorted[:, -1]).any():
        raise ValueError("distmat contains NaN")
    rows, cols = np.nonzero(positives)
    slots = np.arange(rows.size) - (np.cumsum(num_matches) - num_matches)[rows]
    closer = _count_below(kept_sorted, rows, dist[rows, cols], inclusive=False)
    not_farther = _count_below(kept_sorted, rows, dist[rows, cols], inclusive=True)

    # Exact ties with other kept samples: those with a smaller gallery index come first (stable order).
    tied = np.nonzero(not_farther - closer > 1)[0]
    if tied.size:
        t_rows, t_cols = rows[tied], cols[tied]
        equal_before = ((dist[t_rows] == dist[t_rows, t_cols][:, None]) & ~removed[t_rows]
                        & (np.arange(num_gallery)[None, :] < t_cols[:, None]))
        closer[tied] += np.count_nonzero(equal_before, axis=1)

    ranks = np.full((num_queries, width), np.iinfo(np.int64).max, dtype=np.int64)
    ranks[rows, slots] = closer + 1
    ranks.sort(axis=1)
    return ranks, num_matches


def query_metrics(dist, matches, removed):
    """Per query (row) of a (C, G) distance block and its (C, G) ``matches``/``removed`` masks: the 1-based rank
    of its first kept true match (0 when none is kept), its average precision and its inverse negative
    penalty (NaN when no true match is kept). ``mAP`` and ``mINP`` are the means over the valid queries."""
    if dist.dtype not in (np.float32, np.float64):
        dist = dist.astype(np.float32)
    ranks, num_matches = _match_ranks(dist, matches, removed)
    first_hit = np.zeros(dist.shape[0], dtype=np.int64)
    average_precision = np.full(dist.shape[0], np.nan)
    inverse_negative_penalty = np.full(dist.shape[0], np.nan)
    valid = num_matches > 0
    if valid.any():
        ranks, num_matches = ranks[valid], num_matches[valid]
        hit_number = np.arange(1, ranks.shape[1] + 1, dtype=np.float64)
        precision_at_hits = np.where(hit_number[None, :] <= num_matches[:, None], hit_number / ranks, 0.0)
        last_rank = np.take_along_axis(ranks, (num_matches - 1)[:, None], axis=1)[:, 0]
        first_hit[valid] = ranks[:, 0]
        average_precision[valid] = precision_at_hits.sum(1) / num_matches
        inverse_negative_penalty[valid] = num_matches / last_rank
    return first_hit, average_precision, inverse_negative_penalty


def _label_array(values, name, length):
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    array = np.asarray(values).reshape(-1).astype(np.int64)
    if array.size != length:
        side = "row" if name.startswith("q_") else "column"
        raise ValueError(f"{name} has {array.size} entries, expected {length} (one per distance-matrix {side})")
    return array


def evaluate_rank(distmat, q_pids, g_pids, q_camids, g_camids, *, q_viewids=None, g_viewids=None,
                  q_timeids=None, g_timeids=None, view_mode="mix", time_mode="mix", max_rank=50,
                  chunk_elements=DEFAULT_CHUNK_ELEMENTS):
    """CMC curve, mAP and mINP of a (num_query, num_gallery) distance matrix (numpy or torch, any device).

    ``view_mode``/``time_mode``: "mix" keeps every gallery sample, "cross" ignores those of the query's
    view/time, "same" ignores the others. Returns ``{"cmc": np.ndarray (max_rank,), "mAP": float,
    "mINP": float, "num_valid_queries": int, "query_results": {"query", "ap", "first_match_rank"}}``; CMC entries
    past a query's kept gallery repeat its last value (1). ``query_results`` holds, for the V valid queries in
    row order, their row index, average precision and first-match rank ((V,) arrays): ``mAP`` is the mean of
    ``ap`` and the CMC at rank k the fraction of ``first_match_rank <= k``. Raises ``NoValidQueryError`` (a
    ``ValueError``) when no query keeps a true match. Rows are ranked in chunks of ``chunk_elements``
    distances with numpy on the CPU (faster there than torch's kernels; a CUDA matrix is copied over one
    chunk at a time).
    """
    _check_mode("view_mode", view_mode)
    _check_mode("time_mode", time_mode)
    if int(max_rank) < 1:
        raise ValueError(f"max_rank={max_rank} must be at least 1")
    max_rank = int(max_rank)
    if not isinstance(distmat, torch.Tensor):
        distmat = np.asarray(distmat)
    if distmat.ndim != 2:
        raise ValueError(f"distmat must be 2-D (num_query, num_gallery), got shape {tuple(distmat.shape)}")
    num_query, num_gallery = distmat.shape
    labels = {name: _label_array(values, name, num_query if name.startswith("q_") else num_gallery)
              for name, values in (("q_pids", q_pids), ("g_pids", g_pids), ("q_camids", q_camids),
                                   ("g_camids", g_camids))}
    for mode_name, mode, kind, q_ids, g_ids in (("view_mode", view_mode, "viewids", q_viewids, g_viewids),
                                                ("time_mode", time_mode, "timeids", q_timeids, g_timeids)):
        if mode == "mix":
            labels[f"q_{kind}"] = labels[f"g_{kind}"] = None
            continue
        if q_ids is None or g_ids is None:
            raise ValueError(f"{mode_name}={mode!r} needs q_{kind} and g_{kind}")
        labels[f"q_{kind}"] = _label_array(q_ids, f"q_{kind}", num_query)
        labels[f"g_{kind}"] = _label_array(g_ids, f"g_{kind}", num_gallery)

    def query_rows(name, start, stop):
        return None if labels[name] is None else labels[name][start:stop]

    def chunk_metrics(start):
        """(row index, first-hit rank, AP, INP) of the valid queries among rows start..start+rows_per_chunk-1."""
        stop = min(start + rows_per_chunk, num_query)
        dist = distmat[start:stop]
        if isinstance(dist, torch.Tensor):
            dist = dist.detach().cpu().numpy()
        names = ("pids", "camids", "viewids", "timeids")
        matches, removed = removal_mask({name: query_rows(f"q_{name}", start, stop) for name in names},
                                        {name: labels[f"g_{name}"] for name in names}, view_mode, time_mode)
        first_hit, average_precision, inverse_negative_penalty = query_metrics(dist, matches, removed)
        valid = np.flatnonzero(first_hit > 0)
        return (start + valid, first_hit[valid], average_precision[valid], inverse_negative_penalty[valid])

    rows_per_chunk = max(1, int(chunk_elements) // max(num_gallery, 1))
    # numpy's sort releases the GIL, so chunks run in parallel threads (peak memory: workers x chunk).
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with ThreadPoolExecutor(workers) as pool:
        per_chunk = list(pool.map(chunk_metrics, range(0, num_query, rows_per_chunk)))
    rows, first_hit, average_precision, inverse_negative_penalty = (np.concatenate(parts) for parts in zip(*per_chunk))

    if first_hit.size == 0:
        raise NoValidQueryError(
            f"no valid query: none of the {num_query} queries has a true match in the {num_gallery} gallery "
            f"samples after removing same-identity same-camera samples (view_mode={view_mode!r}, "
            f"time_mode={time_mode!r})")
    hits_at = np.bincount(np.minimum(first_hit, max_rank + 1) - 1, minlength=max_rank + 1)[:max_rank]
    return {
        "cmc": (np.cumsum(hits_at) / first_hit.size).astype(np.float32),
        "mAP": float(average_precision.mean()),
        "mINP": float(inverse_negative_penalty.mean()),
        "num_valid_queries": int(first_hit.size),
        "query_results": {"query": rows, "ap": average_precision, "first_match_rank": first_hit},
    }

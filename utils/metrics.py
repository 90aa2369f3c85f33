"""Retrieval metrics (CMC, mAP, mINP), distance matrices and the evaluator used by the processors.

Ranking rules follow the Market-1501 protocol of the reference (SPEC section 9): for each query the
gallery is ordered by ascending distance (ties resolved by gallery index, as a stable sort does);
gallery samples with the query's identity *and* camera are ignored; the view/time filters remove further
samples; queries left without a true match are skipped.

``evaluate_rank`` never sorts a full gallery row. Every metric only needs the rank of each true match
among the kept gallery samples, i.e. how many kept non-matches come before it. Per chunk of queries the
matches' distances are sorted (a handful per query), every kept non-match is bucketed between them with
``searchsorted``, and a per-query histogram + cumsum gives the ranks: O(Q*G*log(P)) work for P matches
per query instead of the O(Q*G*log(G)) of a full argsort, and memory bounded by the chunk size.
"""
import logging
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F

from utils import distributed
from utils.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

MODES = ("mix", "cross", "same")
METRICS = ("euclidean", "cosine")
# Distances per (queries x gallery) chunk; about 8 bytes of temporaries each (+ the input's size).
DEFAULT_CHUNK_ELEMENTS = 1 << 20


class NoValidQueryError(DataError, ValueError):
    """No query has a true match left in the gallery after the protocol's filters."""


def _as_tensor(array, device=None):
    if isinstance(array, torch.Tensor):
        return array if device is None else array.to(device)
    return torch.as_tensor(np.asarray(array), device=device)


def _check_mode(name, mode):
    if mode not in MODES:
        raise ValueError(f"{name}={mode!r} is not one of {', '.join(MODES)}")


def _removal_mask(q_pids, g_pids, q_camids, g_camids, q_viewids, g_viewids, q_timeids, g_timeids,
                  view_mode, time_mode):
    """(matches, removed) boolean masks of shape (Q, G) for a chunk of queries."""
    matches = g_pids[None, :] == q_pids[:, None]
    removed = matches & (g_camids[None, :] == q_camids[:, None])
    for mode, q_ids, g_ids in ((time_mode, q_timeids, g_timeids), (view_mode, q_viewids, g_viewids)):
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
    "mINP": float, "num_valid_queries": int}``; CMC entries past a query's kept gallery repeat its last
    value (1). Raises ``NoValidQueryError`` (a ``ValueError``) when no query keeps a true match.
    Rows are ranked in chunks of ``chunk_elements`` distances with numpy on the CPU (faster there than
    torch's kernels; a CUDA matrix is copied over one chunk at a time).
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
        """(first-hit rank, AP, INP) of the valid queries among rows start..start+rows_per_chunk-1."""
        stop = min(start + rows_per_chunk, num_query)
        dist = distmat[start:stop]
        if isinstance(dist, torch.Tensor):
            dist = dist.detach().cpu().numpy()
        if dist.dtype not in (np.float32, np.float64):
            dist = dist.astype(np.float32)
        matches, removed = _removal_mask(
            query_rows("q_pids", start, stop), labels["g_pids"], query_rows("q_camids", start, stop),
            labels["g_camids"], query_rows("q_viewids", start, stop), labels["g_viewids"],
            query_rows("q_timeids", start, stop), labels["g_timeids"], view_mode, time_mode)
        ranks, num_matches = _match_ranks(dist, matches, removed)
        valid = num_matches > 0
        if not valid.any():
            return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)
        ranks, num_matches = ranks[valid], num_matches[valid]
        hit_number = np.arange(1, ranks.shape[1] + 1, dtype=np.float64)
        precision_at_hits = np.where(hit_number[None, :] <= num_matches[:, None], hit_number / ranks, 0.0)
        last_rank = np.take_along_axis(ranks, (num_matches - 1)[:, None], axis=1)[:, 0]
        return ranks[:, 0], precision_at_hits.sum(1) / num_matches, num_matches / last_rank

    rows_per_chunk = max(1, int(chunk_elements) // max(num_gallery, 1))
    # numpy's sort releases the GIL, so chunks run in parallel threads (peak memory: workers x chunk).
    workers = max(1, min(len(os.sched_getaffinity(0)), 8))
    with ThreadPoolExecutor(workers) as pool:
        per_chunk = list(pool.map(chunk_metrics, range(0, num_query, rows_per_chunk)))
    first_hit, average_precision, inverse_negative_penalty = (np.concatenate(parts) for parts in zip(*per_chunk))

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
    }


def compute_distance(qf, gf, metric="euclidean", normalize=True, block_rows=4096):
    """(Q, G) float32 distances on the features' device, computed in blocks of query rows.

    ``euclidean``: squared Euclidean ``|q|^2 + |g|^2 - 2 q.g`` (as the reference; 2 - 2cos on normalised
    features). ``cosine``: 1 - cosine similarity. ``normalize`` L2-normalises the features first.
    """
    if metric not in METRICS:
        raise ValueError(f"metric={metric!r} is not one of {', '.join(METRICS)}")
    qf = _as_tensor(qf).float()
    gf = _as_tensor(gf, qf.device).float()
    if qf.dim() != 2 or gf.dim() != 2 or qf.shape[1] != gf.shape[1]:
        raise ValueError(f"features must be (Q, D) and (G, D), got {tuple(qf.shape)} and {tuple(gf.shape)}")
    if normalize or metric == "cosine":
        qf = F.normalize(qf, dim=1)
        gf = F.normalize(gf, dim=1)
    out = qf.new_empty((qf.shape[0], gf.shape[0]))
    g_sq = gf.pow(2).sum(1)
    for start in range(0, qf.shape[0], block_rows):
        block = qf[start:start + block_rows]
        if metric == "cosine":
            torch.mm(block, gf.t(), out=out[start:start + block_rows])
            out[start:start + block_rows].neg_().add_(1.0)
        else:
            q_sq = block.pow(2).sum(1, keepdim=True)
            torch.addmm(q_sq + g_sq[None, :], block, gf.t(), beta=1.0, alpha=-2.0,
                        out=out[start:start + block_rows])
    return out


def _parse_feat_norm(value):
    if isinstance(value, bool):
        return value
    if str(value).lower() in ("yes", "true", "1"):
        return True
    if str(value).lower() in ("no", "false", "0"):
        return False
    raise ConfigError(f"TEST.FEAT_NORM={value!r}: expected 'yes' or 'no'")


class ReIDEvaluator:
    """Accumulates retrieval features and labels batch by batch (on CPU), then ranks query vs gallery.

    The first ``num_query`` samples (by ``index`` when given, else in arrival order over ranks) are
    queries, the rest gallery. Options come from ``cfg.TEST`` when ``cfg`` is given, else from keywords.
    """

    def __init__(self, num_query, cfg=None, *, feat_norm=True, metric="euclidean", re_ranking=False,
                 rr_k1=20, rr_k2=6, rr_lambda=0.3, time_mode="mix", max_rank=50):
        if cfg is not None:
            test = cfg.TEST
            feat_norm, metric, re_ranking = test.FEAT_NORM, test.DIST_METRIC, test.RE_RANKING
            rr_k1, rr_k2, rr_lambda = test.RR_K1, test.RR_K2, test.RR_LAMBDA
            time_mode, max_rank = test.TIME_MODE, test.MAX_RANK
        if metric not in METRICS:
            raise ConfigError(f"TEST.DIST_METRIC={metric!r}: expected one of {', '.join(METRICS)}")
        if time_mode not in MODES:
            raise ConfigError(f"TEST.TIME_MODE={time_mode!r}: expected one of {', '.join(MODES)}")
        if int(max_rank) < 1:
            raise ConfigError(f"TEST.MAX_RANK={max_rank}: expected a positive integer")
        if int(rr_k1) < 1 or int(rr_k2) < 1 or not 0.0 <= float(rr_lambda) <= 1.0:
            raise ConfigError(f"TEST.RR_K1={rr_k1}, TEST.RR_K2={rr_k2}, TEST.RR_LAMBDA={rr_lambda}: expected "
                              f"k1 >= 1, k2 >= 1 and 0 <= lambda <= 1")
        self.num_query = int(num_query)
        self.feat_norm = _parse_feat_norm(feat_norm)
        self.metric = metric
        self.re_ranking = bool(re_ranking)
        self.rr_params = (int(rr_k1), int(rr_k2), float(rr_lambda))
        self.time_mode = time_mode
        self.max_rank = int(max_rank)
        self.reset()

    def reset(self):
        """Forget every accumulated batch and the last distance matrix."""
        self._feats, self._labels, self._index, self._paths = [], [], [], []
        self._has_index = None
        self._has_paths = None
        self.distmat = None
        self.paths = None
        self._last = None

    def update(self, features, pids, camids, viewids=None, timeids=None, paths=None, index=None):
        """Store one batch: features (B, E) (moved to CPU), labels (B,), optional paths and dataset index."""
        features = features.detach().float().cpu()
        batch = features.shape[0]

        def label(values, default):
            if values is None:
                return torch.full((batch,), default, dtype=torch.int64)
            return _as_tensor(values).reshape(-1).to(torch.int64).cpu()

        # -1 marks missing view/time ids; evaluate_rank is only asked to filter on them when given.
        labels = torch.stack([label(pids, 0), label(camids, 0), label(viewids, -1), label(timeids, -1),
                              torch.full((batch,), int(viewids is not None)),
                              torch.full((batch,), int(timeids is not None))], dim=1)  # (B, 6)
        has_index, has_paths = index is not None, paths is not None
        if self._has_index is None:
            self._has_index, self._has_paths = has_index, has_paths
        elif (has_index, has_paths) != (self._has_index, self._has_paths):
            raise ValueError("every ReIDEvaluator.update() call must pass index and paths alike")
        self._feats.append(features)
        self._labels.append(labels)
        if has_index:
            self._index.append(label(index, 0))
        if has_paths:
            self._paths.extend(paths)

    def _gather(self, tensor):
        if distributed.get_world_size() == 1:
            return tensor
        device = (torch.device("cuda", torch.cuda.current_device())
                  if torch.distributed.get_backend() == "nccl" else torch.device("cpu"))
        return distributed.all_gather_tensor(tensor.to(device)).cpu()

    def _collect(self):
        """Features, labels and paths of all ranks in dataset order."""
        if not self._feats:
            raise ValueError("ReIDEvaluator.compute() called before any update()")
        feats = self._gather(torch.cat(self._feats))
        labels = self._gather(torch.cat(self._labels))
        paths = None
        if self._has_paths:
            paths = [p for share in distributed.all_gather_object(self._paths) for p in share]
        if self._has_index:
            index = self._gather(torch.cat(self._index))
            # Distributed samplers may repeat samples to even out shares: keep the first copy of each.
            unique, inverse = torch.unique(index, return_inverse=True)
            first = torch.full((unique.numel(),), index.numel(), dtype=torch.int64)
            first.scatter_reduce_(0, inverse, torch.arange(index.numel()), reduce="amin")
            if not torch.equal(unique, torch.arange(unique.numel())):
                raise ValueError(f"evaluation indices do not cover 0..{unique.numel() - 1} exactly once")
            feats, labels = feats[first], labels[first]
            if paths is not None:
                paths = [paths[i] for i in first.tolist()]
        return feats, labels, paths

    def compute(self, view_mode="mix", time_mode=None):
        """Rank all queries against the gallery for one protocol; returns ``evaluate_rank``'s dict plus
        ``num_query`` and ``num_gallery``. ``time_mode`` defaults to the configured TEST.TIME_MODE."""
        time_mode = self.time_mode if time_mode is None else time_mode
        feats, labels, paths = self._collect()
        if not 0 < self.num_query < feats.shape[0]:
            raise DataError(f"evaluation set has {feats.shape[0]} samples for num_query={self.num_query}: "
                            f"expected at least one query and one gallery sample")
        for column, mode_name, mode in ((4, "view_mode", view_mode), (5, "time_mode", time_mode)):
            if mode != "mix" and not bool(labels[:, column].all()):
                raise ValueError(f"{mode_name}={mode!r} needs view/time ids in every ReIDEvaluator.update()")
        if self.feat_norm:
            feats = F.normalize(feats, dim=1)
        qf, gf = feats[: self.num_query], feats[self.num_query:]
        if self.re_ranking:
            from utils.reranking import re_ranking
            k1, k2, lam = self.rr_params
            distmat = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lam, metric=self.metric)
        else:
            distmat = compute_distance(qf, gf, metric=self.metric, normalize=False)
        q, g = labels[: self.num_query], labels[self.num_query:]
        result = evaluate_rank(distmat, q[:, 0], g[:, 0], q[:, 1], g[:, 1], q_viewids=q[:, 2],
                               g_viewids=g[:, 2], q_timeids=q[:, 3], g_timeids=g[:, 3], view_mode=view_mode,
                               time_mode=time_mode, max_rank=self.max_rank)
        result["num_query"] = int(qf.shape[0])
        result["num_gallery"] = int(gf.shape[0])
        self.distmat, self.paths = distmat, paths
        self._last = (labels, view_mode, time_mode)
        return result

    def rank_list(self, query, topk=10):
        """(query_path, gallery_paths, matches) of the ``topk`` best kept gallery samples of query number
        ``query`` in the last ``compute()`` (same filters; needs ``paths`` in ``update``)."""
        if self._last is None or self.paths is None:
            raise ValueError("rank_list() needs a compute() over batches that passed paths")
        labels, view_mode, time_mode = self._last
        q, g = labels[query: query + 1], labels[self.num_query:]
        matches, removed = _removal_mask(q[:, 0], g[:, 0], q[:, 1], g[:, 1], q[:, 2], g[:, 2], q[:, 3], g[:, 3],
                                         view_mode, time_mode)
        order = torch.sort(self.distmat[query], stable=True).indices
        order = order[~removed[0, order]][:topk]
        gallery_paths = [self.paths[self.num_query + i] for i in order.tolist()]
        return self.paths[query], gallery_paths, matches[0, order].tolist()

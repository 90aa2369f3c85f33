"""The evaluator: accumulates retrieval features and labels batch by batch (all ranks), then ranks one
protocol's queries against its gallery."""
import numpy as np
import torch
import torch.nn.functional as F

from evaluation.distance import METRICS, _as_tensor, compute_distance
from evaluation.per_query import per_query_table
from evaluation.ranking import MODES, evaluate_rank
from evaluation.reranking import re_ranking
from utils import distributed
from utils.errors import ConfigError, DataError
from utils.io import atomic_write

# Columns of the evaluator's (N, 6) label rows that name a sample (the last two flag given view/time ids).
LABEL_COLUMNS = ((0, "pids"), (1, "camids"), (2, "viewids"), (3, "timeids"))


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
        self._feats, self._labels, self._index, self._paths, self._attrs = [], [], [], [], []
        self._has_index = None
        self._has_paths = None
        self.distmat = None
        self.paths = None
        self.features = None
        self._last = None

    def update(self, features, pids, camids, viewids=None, timeids=None, paths=None, index=None, attrs=None):
        """Store one batch: features (B, E) (moved to CPU), labels (B,), optional paths, dataset index and
        attribute classes (B, A) (for the per-query table)."""
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
        if attrs is not None:
            self._attrs.append(_as_tensor(attrs).to(torch.int64).cpu().reshape(batch, -1))

    def _gather(self, tensor):
        if distributed.get_world_size() == 1:
            return tensor
        device = (torch.device("cuda", torch.cuda.current_device())
                  if torch.distributed.get_backend() == "nccl" else torch.device("cpu"))
        return distributed.all_gather_tensor(tensor.to(device)).cpu()

    def _collect(self):
        """Features, labels, paths and attributes (or None) of all ranks in dataset order."""
        if not self._feats:
            raise ValueError("ReIDEvaluator.compute() called before any update()")
        feats = self._gather(torch.cat(self._feats))
        labels = self._gather(torch.cat(self._labels))
        attrs = self._gather(torch.cat(self._attrs)) if self._attrs else None
        if attrs is not None and attrs.shape[0] != labels.shape[0]:
            raise ValueError("every ReIDEvaluator.update() call must pass attrs alike")
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
            attrs = attrs[first] if attrs is not None else None
            if paths is not None:
                paths = [paths[i] for i in first.tolist()]
        return feats, labels, paths, attrs

    def compute(self, view_mode="mix", time_mode=None):
        """Rank all queries against the gallery for one protocol; returns ``evaluate_rank``'s dict plus
        ``num_query``, ``num_gallery`` and ``per_query`` (the table of ``evaluation.per_query``, made of
        ``evaluate_rank``'s ``query_results``). ``time_mode`` defaults to the configured TEST.TIME_MODE."""
        time_mode = self.time_mode if time_mode is None else time_mode
        feats, labels, paths, attrs = self._collect()
        if not 0 < self.num_query < feats.shape[0]:
            raise DataError(f"evaluation set has {feats.shape[0]} samples for num_query={self.num_query}: "
                            f"expected at least one query and one gallery sample")
        for column, mode_name, mode in ((4, "view_mode", view_mode), (5, "time_mode", time_mode)):
            if mode != "mix" and not bool(labels[:, column].all()):
                raise ValueError(f"{mode_name}={mode!r} needs view/time ids in every ReIDEvaluator.update()")
        self.features = (feats, labels, paths)
        if self.feat_norm:
            feats = F.normalize(feats, dim=1)
        qf, gf = feats[: self.num_query], feats[self.num_query:]
        if self.re_ranking:
            k1, k2, lam = self.rr_params
            distmat = re_ranking(qf, gf, k1=k1, k2=k2, lambda_value=lam, metric=self.metric)
        else:
            distmat = compute_distance(qf, gf, metric=self.metric, normalize=False)
        q, g = labels[: self.num_query], labels[self.num_query:]
        result = evaluate_rank(distmat, q[:, 0], g[:, 0], q[:, 1], g[:, 1], q_viewids=q[:, 2],
                               g_viewids=g[:, 2], q_timeids=q[:, 3], g_timeids=g[:, 3], view_mode=view_mode,
                               time_mode=time_mode, max_rank=self.max_rank)
        result["per_query"] = per_query_table(
            result.pop("query_results"), q[:, :4], paths[: self.num_query] if paths is not None else None,
            attrs[: self.num_query] if attrs is not None else None)
        result["num_query"] = int(qf.shape[0])
        result["num_gallery"] = int(gf.shape[0])
        self.distmat, self.paths = distmat, paths
        self._last = (labels, view_mode, time_mode)
        return result

    def _sides(self, labels, paths):
        """``{"query": ..., "gallery": ...}`` label dicts (``pids``, ``camids``, ``viewids``, ``timeids`` arrays
        and ``paths``) of the (N, 6) ``labels`` rows, queries first."""
        labels = labels.numpy()
        sides = {}
        for side, rows in self._side_rows().items():
            sides[side] = {name: labels[rows, column] for column, name in LABEL_COLUMNS}
            sides[side]["paths"] = paths[rows] if paths is not None else []
        return sides

    def _side_rows(self):
        return {"query": slice(0, self.num_query), "gallery": slice(self.num_query, None)}

    def save_features(self, path):
        """Write the last ``compute()``'s features (before normalisation) and labels to an ``.npz`` file:
        ``query_features``/``gallery_features`` (Q, E)/(G, E) and ``query_``/``gallery_`` ``pids``, ``camids``,
        ``viewids``, ``timeids`` and ``paths``."""
        if self.features is None:
            raise ValueError("save_features() needs a compute() first")
        feats, labels, paths = self.features
        arrays, rows = {}, self._side_rows()
        for side, values in self._sides(labels, paths).items():
            arrays[f"{side}_features"] = feats[rows[side]].numpy()
            arrays.update({f"{side}_{name}": np.array(value, dtype=str) if name == "paths" else value
                           for name, value in values.items()})
        return atomic_write(path, lambda handle: np.savez(handle, **arrays))

    def ranking_inputs(self):
        """``(distmat (Q, G) numpy, query, gallery)`` of the last ``compute()``: label dicts with ``pids``,
        ``camids``, ``viewids``, ``timeids`` (arrays) and ``paths`` (lists), as ranked-list pictures take them."""
        if self._last is None or self.paths is None:
            raise ValueError("ranking_inputs() needs a compute() over batches that passed paths")
        sides = self._sides(self._last[0], self.paths)
        distmat = self.distmat.cpu().numpy() if isinstance(self.distmat, torch.Tensor) else np.asarray(self.distmat)
        return distmat, sides["query"], sides["gallery"]

"""Query x gallery distance matrices."""
import numpy as np
import torch
import torch.nn.functional as F

METRICS = ("euclidean", "cosine")


def _as_tensor(array, device=None):
    if isinstance(array, torch.Tensor):
        return array if device is None else array.to(device)
    return torch.as_tensor(np.asarray(array), device=device)


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

"""Triplet loss with batch-hard mining (Hermans et al., "In Defense of the Triplet Loss")."""
import torch
import torch.nn.functional as F
from torch import nn


def euclidean_dist(x, y=None):
    """Pairwise Euclidean distances ``(M, D), (N, D) -> (M, N)``, squared distances clamped at 1e-12.

    With ``y=None`` the distances are those of ``x`` to itself, with an exact zero (1e-6 after the
    clamp) on the diagonal, where the expansion below would leave rounding noise.
    """
    dtype = torch.promote_types(x.dtype, torch.float32)  # half-precision distances are too coarse
    x = x.to(dtype)
    y = x if y is None else y.to(dtype)
    squared = x.pow(2).sum(1, keepdim=True) + y.pow(2).sum(1).unsqueeze(0) - 2.0 * (x @ y.t())  # (M, N)
    if y is x:
        squared = squared.masked_fill(torch.eye(len(x), dtype=torch.bool, device=x.device), 0.0)
    return squared.clamp(min=1e-12).sqrt()


def hard_example_mining(dist, labels):
    """Hardest positive (largest same-label distance, the anchor itself included) and hardest negative
    (smallest other-label distance) of every anchor of a square distance matrix.

    Works for any number of positives per anchor. An anchor without negatives gets ``d_an = inf``.
    Returns ``(d_ap (N,), d_an (N,))``.
    """
    same = labels.unsqueeze(0) == labels.unsqueeze(1)  # (N, N)
    d_ap = dist.masked_fill(~same, float("-inf")).amax(dim=1)
    d_an = dist.masked_fill(same, float("inf")).amin(dim=1)
    return d_ap, d_an


class TripletLoss(nn.Module):
    """Batch-hard triplet loss on Euclidean distances of raw features.

    ``margin=None`` uses the soft margin ``mean(softplus(d_ap - d_an))``; a number uses
    ``mean(max(0, d_ap - d_an + margin))``. Anchors whose label fills the whole batch have no negative
    and are left out of the mean (the loss is 0 if no anchor has one).
    ``forward(features (B, D), labels (B,), return_distances=False, anchors=None) -> loss`` or
    ``(loss, d_ap (B,), d_an (B,))``; ``anchors`` (B,) bool limits the mean to those anchors (mined against
    the whole batch), e.g. this process's share of a batch gathered from all processes.
    """

    def __init__(self, margin=None):
        super().__init__()
        self.margin = margin

    def forward(self, features, labels, return_distances=False, anchors=None):
        dist = euclidean_dist(features)
        d_ap, d_an = hard_example_mining(dist, labels)
        has_negative = torch.isfinite(d_an)
        if anchors is not None:
            has_negative = has_negative & anchors
        if not has_negative.any():
            loss = dist.sum() * 0.0  # keeps the graph so backward() still works
        elif self.margin is None:
            loss = F.softplus(d_ap[has_negative] - d_an[has_negative]).mean()
        else:
            ap, an = d_ap[has_negative], d_an[has_negative]
            loss = F.margin_ranking_loss(an, ap, torch.ones_like(an), margin=self.margin)
        if return_distances:
            return loss, d_ap, d_an
        return loss

    def extra_repr(self):
        return "soft margin" if self.margin is None else f"margin={self.margin}"

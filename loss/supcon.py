"""Supervised contrastive loss between two sets of features (CLIP-ReID stage 1)."""
import torch
from torch import nn


class SupConLoss(nn.Module):
    """Supervised contrastive loss of queries against keys (Khosla et al.), as CLIP-ReID's stage 1 uses it.

    ``logits = queries @ keys.T / temperature`` (features are not normalised); for each query the
    log-softmax over all keys is averaged over the keys with the query's label, and the loss is minus
    the mean over queries. Queries with no key of their label are left out.
    ``forward(queries (N, D), keys (M, D), query_labels (N,), key_labels (M,)) -> scalar``.
    Stage 1 uses ``loss(image, text, pids, pids) + loss(text, image, pids, pids)``.
    """

    def __init__(self, temperature=1.0):
        super().__init__()
        self.temperature = temperature

    def forward(self, queries, keys, query_labels, key_labels):
        dtype = torch.promote_types(queries.dtype, torch.float32)
        logits = (queries.to(dtype) @ keys.to(dtype).t()) / self.temperature  # (N, M)
        log_prob = torch.log_softmax(logits, dim=1)
        positives = (query_labels.unsqueeze(1) == key_labels.unsqueeze(0)).to(log_prob.dtype)  # (N, M)
        num_positives = positives.sum(1)
        valid = num_positives > 0
        if not valid.any():
            raise ValueError("SupConLoss: no query has a key with the same label")
        mean_log_prob = (positives * log_prob).sum(1)[valid] / num_positives[valid]
        return -mean_log_prob.mean()

    def extra_repr(self):
        return f"temperature={self.temperature}"

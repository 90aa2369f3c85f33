"""Label-smoothed identity cross-entropy."""
import torch.nn.functional as F
from torch import nn


class CrossEntropyLabelSmooth(nn.Module):
    """Cross-entropy against ``(1 - epsilon) * onehot(y) + epsilon / K`` with K the logit width.

    Smoothing over the width of the logits it is given (not a fixed class count) keeps the target a
    distribution for every head, e.g. identity logits and the 3 view logits. ``epsilon = 0`` is plain
    cross-entropy. ``forward(logits (B, K), targets (B,)) -> scalar``.
    """

    def __init__(self, epsilon=0.1):
        super().__init__()
        if not 0.0 <= epsilon < 1.0:
            raise ValueError(f"label smoothing epsilon must be in [0, 1), got {epsilon}")
        self.epsilon = epsilon

    def forward(self, logits, targets):
        return F.cross_entropy(logits, targets, label_smoothing=self.epsilon)

    def extra_repr(self):
        return f"epsilon={self.epsilon}"

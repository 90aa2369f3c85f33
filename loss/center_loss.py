"""Center loss (Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition")."""
import torch
from torch import nn


class CenterLoss(nn.Module):
    """Mean squared Euclidean distance of each feature to its class centre, each clamped to [1e-12, 1e12].

    The centres are a learnable ``(num_classes, feat_dim)`` parameter (standard normal init) that follows
    the module across devices. ``forward(features (B, feat_dim), labels (B,)) -> scalar``.
    """

    def __init__(self, num_classes, feat_dim):
        super().__init__()
        self.num_classes = num_classes
        self.feat_dim = feat_dim
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features, labels):
        if features.dim() != 2 or features.shape[1] != self.feat_dim:
            raise ValueError(f"CenterLoss expects features of shape (B, {self.feat_dim}), "
                             f"got {tuple(features.shape)}")
        centers = self.centers[labels]  # (B, feat_dim)
        squared = (features - centers).pow(2).sum(1)
        return squared.clamp(min=1e-12, max=1e12).mean()

    def extra_repr(self):
        return f"num_classes={self.num_classes}, feat_dim={self.feat_dim}"

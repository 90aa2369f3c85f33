"""Center loss (Wen et al., "A Discriminative Feature Learning Approach for Deep Face Recognition")."""
import torch
from torch import nn

from configs import check_choice, declare_config
from loss.base import LossTerm
from loss.registry import register_loss


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


def wants_center_loss(cfg):
    """MODEL.METRIC_LOSS_TYPE "triplet_center" or MODEL.IF_WITH_CENTER "yes" add the center loss."""
    return cfg.MODEL.METRIC_LOSS_TYPE == "triplet_center" or cfg.MODEL.IF_WITH_CENTER == "yes"


def _check_center_config(cfg):
    check_choice(cfg, "MODEL.IF_WITH_CENTER", ("yes", "no"))
    check_choice(cfg, "MODEL.METRIC_LOSS_TYPE", ("triplet", "triplet_center"))


@declare_config(check=_check_center_config)
def add_center_loss_config(cfg):
    """The center loss's keys: whether it is added to a model's losses, its weight and its centres' SGD rate."""
    # Add the center loss to the metric loss: "yes" or "no" (same as "center" in METRIC_LOSS_TYPE).
    cfg.MODEL.IF_WITH_CENTER = "no"
    # Metric loss: "triplet" or "triplet_center" (adds the center loss).
    cfg.MODEL.METRIC_LOSS_TYPE = "triplet"
    # Center loss: SGD learning rate of the centres and weight of the loss.
    cfg.SOLVER.CENTER_LR = 0.5
    cfg.SOLVER.CENTER_LOSS_WEIGHT = 0.0005


@register_loss("center")
class CenterTerm(LossTerm):
    """Center loss of the first feature branch, added to any model by the config (``wants_center_loss``) with
    weight SOLVER.CENTER_LOSS_WEIGHT; its centres are trained by their own SGD optimiser at SOLVER.CENTER_LR."""

    def __init__(self, cfg, num_classes, feature_dim):
        super().__init__()
        self.center_loss = CenterLoss(num_classes, feature_dim)
        self.weight = cfg.SOLVER.CENTER_LOSS_WEIGHT

    @classmethod
    def spec_from_config(cls, cfg):
        return (cfg.SOLVER.CENTER_LOSS_WEIGHT, {}) if wants_center_loss(cfg) else None

    def make_optimizer(self, cfg):
        return torch.optim.SGD(self.center_loss.parameters(), lr=cfg.SOLVER.CENTER_LR)

    def prepare_gradients(self):
        # The loss weight scaled the centres' gradient too; undo it so that the centres move at CENTER_LR.
        for param in self.center_loss.parameters():
            if param.grad is not None:
                param.grad.mul_(1.0 / self.weight)

    def forward(self, outputs, batch):
        return self.center_loss(next(iter(outputs.features.values())), batch["pids"])

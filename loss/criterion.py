"""The training criterion: identity, triplet, view, attribute, image-to-text and center terms, weighted
by the config."""
import torch
import torch.nn.functional as F
from torch import nn

from loss.center_loss import CenterLoss
from loss.softmax_loss import CrossEntropyLabelSmooth
from loss.triplet_loss import TripletLoss

LABEL_SMOOTHING = 0.1


def sum_reduction(terms):
    """Sum of the per-branch losses."""
    return torch.stack(terms).sum()


def first_plus_mean_reduction(terms):
    """First (main) branch plus the mean of the others (SVPR's weighting of its branches)."""
    if len(terms) == 1:
        return terms[0]
    return terms[0] + torch.stack(terms[1:]).mean()


class ReIDCriterion(nn.Module):
    """Combines the losses of a ReID model's training outputs into named, already weighted terms.

    ``forward(outputs, pids, viewids=None, attrs=None) -> dict[str, Tensor]`` with the keys that apply:
    ``id`` (cross-entropy over ``outputs["id_logits"]``), ``triplet`` (batch-hard triplet over
    ``outputs["triplet_feats"]``), ``view`` (view cross-entropy plus mean |cos(inv_feat, view_feat)|),
    ``attr`` (sum of per-attribute cross-entropies), ``i2t`` (cross-entropy of ``outputs["i2t_logits"]``)
    and ``center`` (center loss on ``triplet_feats[0]``). The total loss is the sum of the values.
    Branch losses are combined with ``branch_reduction`` (a function of a list of scalars).
    """

    def __init__(self, *, label_smoothing=LABEL_SMOOTHING, triplet_margin=None, use_triplet=True,
                 branch_reduction=sum_reduction, id_weight=1.0, triplet_weight=1.0, view_weight=1.0,
                 attr_weight=1.0, i2t_weight=1.0, center_loss=None, center_weight=0.0):
        super().__init__()
        self.xent = CrossEntropyLabelSmooth(label_smoothing)
        self.triplet = TripletLoss(triplet_margin) if use_triplet else None
        self.center_loss = center_loss
        self.branch_reduction = branch_reduction
        self.id_weight = id_weight
        self.triplet_weight = triplet_weight
        self.view_weight = view_weight
        self.attr_weight = attr_weight
        self.i2t_weight = i2t_weight
        self.center_weight = center_weight

    def forward(self, outputs, pids, viewids=None, attrs=None):
        terms = {}
        id_logits = outputs["id_logits"]
        if not id_logits:
            raise ValueError("model outputs hold no id_logits")
        terms["id"] = self.id_weight * self.branch_reduction([self.xent(s, pids) for s in id_logits])

        triplet_feats = outputs.get("triplet_feats") or []
        if self.triplet is not None:
            if not triplet_feats:
                raise ValueError("model outputs hold no triplet_feats for the triplet loss")
            terms["triplet"] = self.triplet_weight * self.branch_reduction(
                [self.triplet(f, pids) for f in triplet_feats])

        if "view_logits" in outputs:
            if viewids is None:
                raise ValueError("model outputs hold view_logits but no viewids were given")
            decoupling = F.cosine_similarity(outputs["inv_feat"], outputs["view_feat"], dim=1).abs().mean()
            terms["view"] = self.view_weight * (self.xent(outputs["view_logits"], viewids) + decoupling)

        if "attr_logits" in outputs and attrs is not None:
            attr_logits = outputs["attr_logits"]
            if attrs.dim() != 2 or attrs.shape[1] != len(attr_logits):
                raise ValueError(f"attrs of shape {tuple(attrs.shape)} do not match "
                                 f"{len(attr_logits)} attribute heads")
            terms["attr"] = self.attr_weight * torch.stack(
                [F.cross_entropy(logits, attrs[:, a]) for a, logits in enumerate(attr_logits)]).sum()

        if "i2t_logits" in outputs:
            terms["i2t"] = self.i2t_weight * self.xent(outputs["i2t_logits"], pids)

        if self.center_loss is not None:
            if not triplet_feats:
                raise ValueError("model outputs hold no triplet_feats for the center loss")
            terms["center"] = self.center_weight * self.center_loss(triplet_feats[0], pids)
        return terms


def build_criterion(cfg, num_classes, feat_dim):
    """Build the ``ReIDCriterion`` described by the config for ``num_classes`` identities; ``feat_dim`` is
    the width of ``triplet_feats[0]`` (used by the optional center loss)."""
    use_center = cfg.MODEL.METRIC_LOSS_TYPE == "triplet_center" or cfg.MODEL.IF_WITH_CENTER == "yes"
    svpr = cfg.MODEL.ARCH_NAME == "CLIP_SVPR_ReID"
    return ReIDCriterion(
        label_smoothing=LABEL_SMOOTHING if cfg.MODEL.IF_LABELSMOOTH == "on" else 0.0,
        triplet_margin=None if cfg.MODEL.NO_MARGIN else cfg.SOLVER.MARGIN,
        # A "softmax" sampler gives random batches, not P x K, so batch-hard mining has no positives.
        use_triplet=cfg.DATALOADER.SAMPLER != "softmax",
        branch_reduction=first_plus_mean_reduction if svpr else sum_reduction,
        id_weight=cfg.MODEL.ID_LOSS_WEIGHT,
        triplet_weight=cfg.MODEL.TRIPLET_LOSS_WEIGHT,
        view_weight=cfg.MODEL.SVPR.VIEW_LOSS_WEIGHT,
        attr_weight=cfg.MODEL.SVPR.ATTR_LOSS_WEIGHT,
        i2t_weight=cfg.MODEL.I2T_LOSS_WEIGHT,
        center_loss=CenterLoss(num_classes, feat_dim) if use_center else None,
        center_weight=cfg.SOLVER.CENTER_LOSS_WEIGHT,
    )

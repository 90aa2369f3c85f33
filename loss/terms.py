"""The shared loss terms a model can name in its ``loss_specs`` (identity, triplet, view, attribute,
image-to-text); each reads what it needs from the model output (``loss.base.LossTerm``)."""
import torch
import torch.nn.functional as F
from torch import nn

from configs import check_choice, declare_config
from loss.base import LossTerm
from loss.registry import register_loss
from loss.softmax_loss import CrossEntropyLabelSmooth
from loss.triplet_loss import TripletLoss
from utils.distributed import all_gather_tensor, all_gather_with_grad, get_rank, get_world_size

LABEL_SMOOTHING = 0.1


def _check_loss_config(cfg):
    check_choice(cfg, "MODEL.IF_LABELSMOOTH", ("on", "off"))


@declare_config(check=_check_loss_config)
def add_loss_config(cfg):
    """The keys of the shared loss terms: identity, triplet and view."""
    # Triplet loss without margin (soft-margin form log(1 + exp(d_ap - d_an))). The reference's effective
    # default is True, so SOLVER.MARGIN only matters when this is False.
    cfg.MODEL.NO_MARGIN = True
    # Label smoothing (epsilon 0.1) in the identity and view cross-entropy losses: "on" or "off".
    cfg.MODEL.IF_LABELSMOOTH = "on"
    # Weight of the identity (classification) loss.
    cfg.MODEL.ID_LOSS_WEIGHT = 1.0
    # Weight of the triplet loss.
    cfg.MODEL.TRIPLET_LOSS_WEIGHT = 1.0
    # VDT/SeCap/SVPR-ReID: smooth the view cross-entropy over the V views (targets sum to 1) instead of the
    # authors' epsilon / number-of-identities.
    cfg.MODEL.FIXES.VIEW_LOSS_SMOOTHING = False
    # Triplet margin (only with MODEL.NO_MARGIN False).
    cfg.SOLVER.MARGIN = 0.3


def _reduce(losses, reduction):
    """Combine per-branch losses: ``sum``, or ``first_plus_mean`` (main branch + mean of the others)."""
    if reduction == "sum":
        return torch.stack(losses).sum()
    if reduction == "first_plus_mean":
        return losses[0] if len(losses) == 1 else losses[0] + torch.stack(losses[1:]).mean()
    raise ValueError(f"unknown branch reduction {reduction!r}; expected 'sum' or 'first_plus_mean'")


def label_smoothing(cfg):
    """The identity/view cross-entropy smoothing of MODEL.IF_LABELSMOOTH."""
    return LABEL_SMOOTHING if cfg.MODEL.IF_LABELSMOOTH == "on" else 0.0


def _aux(outputs, key, term):
    if key not in outputs.aux:
        raise ValueError(f"the {term} loss needs the model output aux[{key!r}]")
    return outputs.aux[key]


@register_loss("id")
class IdentityLoss(LossTerm):
    """Label-smoothed cross-entropy of every identity-logit branch, combined by ``reduction``."""

    def __init__(self, cfg, num_classes, feature_dim, reduction="sum"):
        super().__init__()
        self.xent = CrossEntropyLabelSmooth(label_smoothing(cfg))
        self.reduction = reduction

    def forward(self, outputs, batch):
        if not outputs.id_logits:
            raise ValueError("the id loss needs identity logits in the model output")
        return _reduce([self.xent(logits, batch["pids"]) for logits in outputs.id_logits.values()], self.reduction)


@register_loss("triplet")
class TripletTerm(LossTerm):
    """Batch-hard triplet loss of every feature branch (soft margin unless MODEL.NO_MARGIN is False).

    Under DDP with SOLVER.GLOBAL_TRIPLET the hardest positives and negatives are mined in the batch of all
    processes (features gathered with their gradients) and each process averages over its own anchors, so
    that DDP's gradient averaging gives the single-process loss of the whole P x K batch.
    """

    def __init__(self, cfg, num_classes, feature_dim, reduction="sum"):
        super().__init__()
        self.triplet = TripletLoss(None if cfg.MODEL.NO_MARGIN else cfg.SOLVER.MARGIN)
        self.reduction = reduction
        self.global_batch = bool(cfg.SOLVER.GLOBAL_TRIPLET)

    def _one(self, features, pids):
        if not self.global_batch or get_world_size() == 1:
            return self.triplet(features, pids)
        all_features, all_pids = all_gather_with_grad(features), all_gather_tensor(pids)  # (world * B, C)
        anchors = torch.zeros(all_pids.shape[0], dtype=torch.bool, device=pids.device)
        anchors[get_rank() * pids.shape[0]:(get_rank() + 1) * pids.shape[0]] = True
        return self.triplet(all_features, all_pids, anchors=anchors)

    def forward(self, outputs, batch):
        if not outputs.features:
            raise ValueError("the triplet loss needs features in the model output")
        return _reduce([self._one(f, batch["pids"]) for f in outputs.features.values()], self.reduction)


@register_loss("view")
class ViewLoss(LossTerm):
    """View classification (label-smoothed CE of ``aux["view_logits"]``) plus the decoupling penalty
    ``mean |cos(aux["inv_feat"], aux["view_feat"])|``."""

    def __init__(self, cfg, num_classes, feature_dim):
        super().__init__()
        self.xent = CrossEntropyLabelSmooth(label_smoothing(cfg))

    def forward(self, outputs, batch):
        decoupling = F.cosine_similarity(_aux(outputs, "inv_feat", "view"), _aux(outputs, "view_feat", "view"),
                                         dim=1).abs().mean()
        return self.xent(_aux(outputs, "view_logits", "view"), batch["viewids"]) + decoupling


class _FixedCountSmoothing(nn.Module):
    """Cross-entropy against ``(1 - epsilon) * onehot(y) + epsilon / count`` for a fixed ``count`` that need
    not be the logit width (then the target does not sum to 1)."""

    def __init__(self, epsilon, count):
        super().__init__()
        self.epsilon, self.count = epsilon, count

    def forward(self, logits, targets):
        log_probs = F.log_softmax(logits, dim=1)
        onehot = F.one_hot(targets, logits.shape[1]).to(log_probs.dtype)
        target = (1 - self.epsilon) * onehot + self.epsilon / self.count
        return -(target * log_probs).sum(dim=1).mean()


@register_loss("view_identity_smoothing")
class ViewLossIdentitySmoothing(ViewLoss):
    """The ``view`` term with the VDT/SeCap authors' smoothing: epsilon / (number of identities) on each of
    the V view logits (MODEL.FIXES.VIEW_LOSS_SMOOTHING selects the plain ``view`` term instead)."""

    def __init__(self, cfg, num_classes, feature_dim):
        super().__init__(cfg, num_classes, feature_dim)
        self.xent = _FixedCountSmoothing(label_smoothing(cfg), num_classes)


@register_loss("attr")
class AttributeLoss(LossTerm):
    """Sum over attributes of the plain cross-entropy of ``aux["attr_logits"][a]`` against ``attrs[:, a]``."""

    def __init__(self, cfg, num_classes, feature_dim):
        super().__init__()

    def forward(self, outputs, batch):
        attr_logits, attrs = _aux(outputs, "attr_logits", "attr"), batch.get("attrs")
        if attrs is None or attrs.dim() != 2 or attrs.shape[1] != len(attr_logits):
            raise ValueError(f"the attr loss needs attribute labels (B, {len(attr_logits)}) in the batch, got "
                             f"{None if attrs is None else tuple(attrs.shape)}")
        return torch.stack([F.cross_entropy(logits, attrs[:, a]) for a, logits in enumerate(attr_logits)]).sum()


@register_loss("i2t")
class ImageToTextLoss(LossTerm):
    """Label-smoothed cross-entropy of the image-to-text logits ``aux["i2t_logits"]`` (CLIP-ReID stage 2)."""

    def __init__(self, cfg, num_classes, feature_dim):
        super().__init__()
        self.xent = CrossEntropyLabelSmooth(label_smoothing(cfg))

    def forward(self, outputs, batch):
        return self.xent(_aux(outputs, "i2t_logits", "i2t"), batch["pids"])

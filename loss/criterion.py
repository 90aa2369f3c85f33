"""The training criterion: the loss terms a model names (plus the config's center loss), each weighted."""
from torch import nn

from loss.registry import LOSSES


def wants_center_loss(cfg):
    """MODEL.METRIC_LOSS_TYPE "triplet_center" or MODEL.IF_WITH_CENTER "yes" add the center loss."""
    return cfg.MODEL.METRIC_LOSS_TYPE == "triplet_center" or cfg.MODEL.IF_WITH_CENTER == "yes"


class Criterion(nn.Module):
    """Weighted loss terms: ``forward(outputs, batch) -> {name: weight * term(outputs, batch)}``.

    The total loss is the sum of the values. ``center_loss`` is the center term's module (its centres
    have their own optimiser) or None.
    """

    def __init__(self, terms, weights):
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)

    @property
    def center_loss(self):
        return self.terms["center"].center_loss if "center" in self.terms else None

    def forward(self, outputs, batch):
        return {name: self.weights[name] * term(outputs, batch) for name, term in self.terms.items()}

    def extra_repr(self):
        return ", ".join(f"{name}: {weight:g}" for name, weight in self.weights.items())


def build_criterion(cfg, model, num_classes):
    """The criterion of ``model`` (its ``loss_specs(cfg)``) for ``num_classes`` identities.

    A "softmax" sampler gives random batches rather than P x K ones, so batch-hard triplet mining would
    find no positives: the triplet term is left out then.
    """
    terms, weights = {}, {}
    for spec in model.loss_specs(cfg):
        if spec.name == "triplet" and cfg.DATALOADER.SAMPLER == "softmax":
            continue
        terms[spec.name] = LOSSES.get(spec.name)(cfg, num_classes, model.feature_dim, **spec.options)
        weights[spec.name] = spec.weight
    if wants_center_loss(cfg):
        terms["center"] = LOSSES.get("center")(cfg, num_classes, model.feature_dim)
        weights["center"] = cfg.SOLVER.CENTER_LOSS_WEIGHT
    return Criterion(terms, weights)

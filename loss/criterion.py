"""The training criterion: the loss terms a model names plus those the config adds to every model, each
weighted."""
from torch import nn

from loss.registry import LOSSES


class Criterion(nn.Module):
    """Weighted loss terms: ``forward(outputs, batch) -> {name: weight * term(outputs, batch)}``.

    The total loss is the sum of the values.
    """

    def __init__(self, terms, weights):
        super().__init__()
        self.terms = nn.ModuleDict(terms)
        self.weights = dict(weights)

    def forward(self, outputs, batch):
        return {name: self.weights[name] * term(outputs, batch) for name, term in self.terms.items()}

    def extra_repr(self):
        return ", ".join(f"{name}: {weight:g}" for name, weight in self.weights.items())


def build_criterion(cfg, model, num_classes):
    """The criterion of ``model`` for ``num_classes`` identities: the terms of its ``loss_specs(cfg)``, then every
    registered term whose ``spec_from_config(cfg)`` adds it (e.g. the center loss).

    A "softmax" sampler gives random batches rather than P x K ones, so batch-hard triplet mining would
    find no positives: the triplet term is left out then.
    """
    specs = [(spec.name, spec.weight, spec.options) for spec in model.loss_specs(cfg)]
    for name in LOSSES.names():
        extra = getattr(LOSSES.get(name), "spec_from_config", lambda cfg: None)(cfg)
        if extra is not None and name not in {spec[0] for spec in specs}:
            specs.append((name, *extra))
    terms, weights = {}, {}
    for name, weight, options in specs:
        if name == "triplet" and cfg.DATALOADER.SAMPLER == "softmax":
            continue
        terms[name] = LOSSES.get(name)(cfg, num_classes, model.feature_dim, **options)
        weights[name] = weight
    return Criterion(terms, weights)

"""The base class of loss terms: what the criterion and the trainer may ask of a term besides its value."""
from torch import nn


class LossTerm(nn.Module):
    """A registered loss term, built as ``Term(cfg, num_classes, feature_dim, **options)`` and called as
    ``term(outputs, batch) -> scalar`` (``outputs`` a ``model.ModelOutput``, ``batch`` the batch dict).

    A model names the terms it trains with in its ``loss_specs``; a term may also add itself to every model's
    criterion from the config (``spec_from_config``). A term with parameters of its own (the center loss's
    centres) trains them with its own optimiser (``make_optimizer``); the trainer calls ``prepare_gradients``
    before that optimiser steps.
    """

    @classmethod
    def spec_from_config(cls, cfg):
        """``(weight, options)`` when the config adds this term to any model's criterion, else None."""
        return None

    def make_optimizer(self, cfg):
        """An optimiser for this term's own parameters, or None (nothing to train)."""
        return None

    def prepare_gradients(self):
        """Adjust this term's parameter gradients (unscaled) right before its optimiser steps."""

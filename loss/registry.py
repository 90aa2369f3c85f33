"""Loss-term registry: the names a model's ``loss_specs`` (and ``MODEL.METRIC_LOSS_TYPE``) can use."""
from utils.registry import Registry

LOSSES = Registry("loss term", "loss term", package="loss")
register_loss = LOSSES.register

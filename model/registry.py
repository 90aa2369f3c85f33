"""Model registry: ``MODEL.ARCH_NAME`` -> model class (see ``model/contract.py``).

A new model registers itself in its own file with ``@MODELS.register("Name")``; every module of the
``model`` package is imported on the first lookup, so a file dropped into ``model/`` is found.
"""
from utils.registry import Registry

MODELS = Registry("model", "MODEL.ARCH_NAME", package="model")
register_model = MODELS.register


def build_model(cfg, num_classes, num_cameras=1, num_views=1, attributes=()):
    """Build ``cfg.MODEL.ARCH_NAME``.

    ``attributes`` is a sequence of ``(attribute_name, number_of_classes)`` pairs in label order (the
    dataset's annotation; empty for datasets without attributes).
    """
    model_class = MODELS.get(cfg.MODEL.ARCH_NAME)
    return model_class(cfg, num_classes=num_classes, num_cameras=num_cameras, num_views=num_views,
                       attributes=tuple(tuple(item) for item in attributes))

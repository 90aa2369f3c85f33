"""Model registry: every model is built by its ``MODEL.ARCH_NAME``.

Built-in models live in their own modules and are imported on first use; a new model registers itself
with ``@register_model("Name")`` in one file (import that file before calling ``build_model``).
"""
import importlib

from utils.errors import ConfigError

_MODELS = {}
# Built-in architecture -> module that registers it.
_BUILTIN_MODULES = {
    "CLIP_baseline": "model.clip_baseline",
    "CLIP_ReID": "model.clip_reid",
    "CLIP_SVPR_ReID": "model.svpr",
}


def register_model(name):
    """Class decorator adding a model class to the registry under ``name``."""

    def wrap(cls):
        _MODELS[name] = cls
        return cls

    return wrap


def available_models():
    return sorted(set(_MODELS) | set(_BUILTIN_MODULES))


def build_model(cfg, num_classes, num_cameras=1, num_views=1, attributes=()):
    """Build ``cfg.MODEL.ARCH_NAME``.

    ``attributes`` is a sequence of ``(attribute_name, number_of_classes)`` pairs in label order (the
    dataset's annotation; empty for datasets without attributes).
    """
    name = cfg.MODEL.ARCH_NAME
    if name not in _MODELS and name in _BUILTIN_MODULES:
        importlib.import_module(_BUILTIN_MODULES[name])
    if name not in _MODELS:
        raise ConfigError(f"config key MODEL.ARCH_NAME = {name!r}: expected one of {', '.join(available_models())}")
    return _MODELS[name](cfg, num_classes=num_classes, num_cameras=num_cameras, num_views=num_views,
                         attributes=tuple(attributes))

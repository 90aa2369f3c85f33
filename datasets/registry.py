"""Dataset registry: every dataset (protocol) is built by name.

A new dataset registers itself in one file with ``@register_dataset("Name")`` on a
:class:`datasets.bases.ReIDDataset` subclass; import that file before calling :func:`build_dataset`.
"""
import importlib

from utils.errors import ConfigError

_DATASETS = {}
# Modules that register the built-in benchmarks; imported on first use.
_BUILTIN_MODULES = ("datasets.cp2108", "datasets.cargo", "datasets.agreid", "datasets.synthag")


def register_dataset(name):
    """Class decorator adding a dataset class to the registry under ``name``."""

    def wrap(cls):
        if name in _DATASETS and _DATASETS[name] is not cls:
            raise ConfigError(f"dataset name {name!r} is registered twice ({_DATASETS[name].__name__}, {cls.__name__})")
        _DATASETS[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def _import_builtins():
    for module in _BUILTIN_MODULES:
        importlib.import_module(module)


def available_datasets():
    """Sorted names of every registered dataset."""
    _import_builtins()
    return sorted(_DATASETS)


def get_dataset_class(name):
    """The class registered under ``name`` (``ConfigError`` listing the known names otherwise)."""
    _import_builtins()
    if name not in _DATASETS:
        raise ConfigError(f"dataset {name!r} is not registered: expected one of {', '.join(sorted(_DATASETS))}")
    return _DATASETS[name]


def build_dataset(name, root, version=100, **options):
    """Build dataset ``name`` from the folder ``root`` that holds the benchmark folders.

    ``options``: ``use_text``, ``use_attr``, ``text_type`` ("attribute"|"captions"), ``text_prompt``,
    ``verbose``.
    """
    return get_dataset_class(name)(root, version=version, **options)

"""Dataset registry: ``DATASETS.NAMES`` / ``DATASETS.TESTS`` name -> dataset (protocol) class.

A new dataset registers itself in one file with ``@register_dataset("Name")`` on a
:class:`datasets.bases.ReIDDataset` subclass; every module of the ``datasets`` package is imported on
the first lookup, so a file dropped into ``datasets/`` is found.
"""
from utils.registry import Registry

DATASETS = Registry("dataset", "DATASETS.NAMES", package="datasets")


def register_dataset(name):
    """Class decorator adding a dataset class to the registry under ``name`` (its ``registry_name``)."""
    add = DATASETS.register(name)

    def wrap(cls):
        add(cls)
        cls.registry_name = name
        return cls

    return wrap


def build_dataset(name, root, **options):
    """Build dataset ``name`` from the folder ``root`` that holds the benchmark folders.

    ``options``: ``use_text``, ``use_attr``, ``text_prompt``, ``verbose``, ``load_train`` and a dataset's own
    ones (``options_from_config``: e.g. CP2108's ``version``, ``text_type`` and ``annotation_per_image``,
    VehicleID's ``test_size``, ``num_trials``, ``seed``).
    """
    return DATASETS.get(name)(root, **options)

"""Dataset registry: ``DATASETS.NAMES`` / ``DATASETS.TESTS`` name -> dataset (protocol) class.

A new dataset registers itself in one file with ``@register_dataset("Name")`` on a
:class:`datasets.bases.ReIDDataset` subclass; the built-in benchmark modules below are imported on the
first lookup.
"""
from utils.registry import Registry

DATASETS = Registry("dataset", "DATASETS.NAMES",
                    builtin_modules=("datasets.cp2108", "datasets.cargo", "datasets.agreid", "datasets.synthag",
                                     "datasets.market1501", "datasets.dukemtmc", "datasets.msmt17", "datasets.veri",
                                     "datasets.vehicleid"))


def register_dataset(name):
    """Class decorator adding a dataset class to the registry under ``name`` (its ``registry_name``)."""
    add = DATASETS.register(name)

    def wrap(cls):
        add(cls)
        cls.registry_name = name
        return cls

    return wrap


def build_dataset(name, root, version=100, **options):
    """Build dataset ``name`` from the folder ``root`` that holds the benchmark folders.

    ``options``: ``use_text``, ``use_attr``, ``text_type`` ("attribute"|"captions"), ``text_prompt``,
    ``verbose``, ``annotation_per_image`` and a dataset's own ones (e.g. VehicleID's ``test_size``,
    ``num_trials``, ``seed``).
    """
    return DATASETS.get(name)(root, version=version, **options)

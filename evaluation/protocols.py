"""Test protocols: the query + gallery loader of a dataset name and how its matches are filtered.

``DATASETS.TESTS`` may name protocols of other benchmarks than the training set (cross-dataset
evaluation); each is evaluated with its own view mode, and ``benchmark`` records which data it is.
"""
import os
from dataclasses import dataclass
from typing import Any

from datasets import make_dataloaders


@dataclass
class TestProtocol:
    """One protocol to evaluate: its query+gallery ``loader`` (queries first), sizes and filters."""

    name: str
    benchmark: str
    loader: Any
    num_query: int
    num_gallery: int
    view_mode: str


def test_protocol_of(data):
    """The ``TestProtocol`` of an already built ``datasets.DataBundle``."""
    dataset = data.dataset
    return TestProtocol(dataset.name, os.path.basename(dataset.dataset_dir), data.val_loader, data.num_query,
                        data.num_gallery, dataset.view_mode)


def build_test_protocol(cfg, name, train_data=None):
    """The protocol ``name``, reusing ``train_data`` (a ``DataBundle``) when it is that dataset."""
    if train_data is None or train_data.dataset.name != name:
        train_data = make_dataloaders(cfg, name)
    return test_protocol_of(train_data)

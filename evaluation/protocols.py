"""Test protocols: the query + gallery loader of a dataset name and how its matches are filtered.

``DATASETS.TESTS`` may name protocols of other benchmarks than the training set (cross-dataset
evaluation); each is evaluated with its own view mode, and ``benchmark`` records which data it is.
Protocols with random galleries (VehicleID) are evaluated over several trials and averaged.
"""
import os
from dataclasses import dataclass
from typing import Any

import numpy as np

from datasets import make_test_loader
from datasets.loader import load_dataset


@dataclass
class EvaluationProtocol:
    """One protocol to evaluate: its query+gallery ``loader`` (queries first), sizes and filters."""

    name: str
    benchmark: str
    loader: Any
    num_query: int
    num_gallery: int
    view_mode: str
    dataset: Any = None

    @property
    def num_trials(self):
        return getattr(self.dataset, "num_trials", 1)

    def trials(self, cfg):
        """``(loader, num_query)`` of each evaluation trial: this protocol's own for a fixed gallery, else a
        loader per random gallery the dataset draws (deterministic per trial)."""
        if self.num_trials <= 1:
            yield self.loader, self.num_query
            return
        for trial in range(self.num_trials):
            self.dataset.select_trial(trial)
            yield make_test_loader(cfg, self.dataset), len(self.dataset.query)
        self.dataset.select_trial(0)


def average_trials(results):
    """The mean of per-trial evaluator results (CMC, mAP, mINP; sizes of the first trial) plus ``trials``."""
    if len(results) == 1:
        return results[0]
    mean = dict(results[0])
    mean["cmc"] = np.mean([r["cmc"] for r in results], axis=0).astype(np.float32)
    for key in ("mAP", "mINP"):
        mean[key] = float(np.mean([r[key] for r in results]))
    mean["trials"] = len(results)
    return mean


def protocol_of_bundle(data):
    """The ``EvaluationProtocol`` of an already built ``datasets.DataBundle``."""
    dataset = data.dataset
    return EvaluationProtocol(dataset.name, os.path.basename(dataset.dataset_dir), data.val_loader, data.num_query,
                        data.num_gallery, dataset.view_mode, dataset)


def build_evaluation_protocol(cfg, name, dataset=None):
    """The protocol ``name`` with its query + gallery loader; ``dataset`` is that dataset already read (e.g.
    by the checks before training), otherwise only its query and gallery are read (no training split)."""
    if dataset is None:
        dataset = load_dataset(cfg, name, load_train=False)
    return EvaluationProtocol(dataset.name, os.path.basename(dataset.dataset_dir), make_test_loader(cfg, dataset),
                              len(dataset.query), len(dataset.gallery), dataset.view_mode, dataset)

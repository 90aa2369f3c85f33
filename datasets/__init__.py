"""Datasets and data pipeline: the aerial-ground benchmarks (CP2108, CARGO, AG-ReID, AG-ReID.v2) with
their evaluation protocols, the synthetic SynthAG benchmark, transforms, identity samplers and loaders.
"""
from .bases import AERIAL, GROUND, Protocol, ReIDDataset, Sample, format_statistics
from .loader import (DataBundle, ImageDataset, collate, make_dataloaders, make_loader, make_test_loader, per_rank_batch,
                     shuffled_sampler)
from .registry import DATASETS, build_dataset, register_dataset
from .samplers import ContiguousShardSampler, DistributedRandomIdentitySampler, RandomIdentitySampler
from .synthetic import SynthConfig, generate_synthag
from .transforms import build_test_transform, build_train_transform, image_reader, read_image, read_pil_image

__all__ = [
    "AERIAL", "GROUND", "Protocol", "ReIDDataset", "Sample", "format_statistics", "DataBundle", "ImageDataset",
    "collate", "make_dataloaders", "make_loader", "make_test_loader", "per_rank_batch", "shuffled_sampler",
    "DATASETS", "build_dataset", "register_dataset",
    "ContiguousShardSampler", "DistributedRandomIdentitySampler", "RandomIdentitySampler", "SynthConfig",
    "generate_synthag", "build_test_transform", "build_train_transform", "image_reader", "read_image",
    "read_pil_image",
]

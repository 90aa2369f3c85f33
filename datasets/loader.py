"""Image dataset wrapper, batch collation and the data loaders of training and evaluation."""
import os
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler

from text import tokenize
from utils import distributed
from utils.device import resolve_device
from utils.errors import ConfigError, DataError
from utils.interrupts import deferred_interrupts

from .image_cache import cached_reader
from .registry import DATASETS, build_dataset
from .samplers import ContiguousShardSampler, RandomIdentitySampler
from .transforms import build_test_transform, build_train_transform, image_reader, read_image


class ImageDataset(Dataset):
    """Decoded, transformed images of a list of :class:`~datasets.bases.Sample` with their labels.

    Each distinct text is tokenised once, here, with ``tokenizer(texts, context_length, truncate=True)``.
    ``reader`` decodes a path into what ``transform`` takes (``datasets.transforms.image_reader``).
    Items are dicts; :func:`collate` turns a list of them into a batch.
    """

    def __init__(self, samples, transform, tokenizer=tokenize, text_len=77, reader=read_image):
        self.samples = list(samples)
        self.transform = transform
        self.reader = reader
        has_text = {s.text is not None for s in self.samples}
        has_attrs = {s.attrs is not None for s in self.samples}
        if len(has_text) > 1 or len(has_attrs) > 1:
            raise DataError("a split mixes images with and without text/attribute annotations")
        self.text_tokens = None
        if has_text == {True}:
            texts = sorted({s.text for s in self.samples})
            row = {text: i for i, text in enumerate(texts)}
            self.text_tokens = tokenizer(texts, context_length=text_len, truncate=True).long()  # (T, L)
            self.text_index = torch.tensor([row[s.text] for s in self.samples])
        self.attrs = torch.tensor([s.attrs for s in self.samples], dtype=torch.int64) if has_attrs == {True} else None
        self.labels = torch.tensor([[s.pid, s.camid, s.viewid, s.timeid] for s in self.samples], dtype=torch.int64)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        sample = self.samples[index]
        return {
            "image": self.transform(self.reader(sample.path)),
            "labels": self.labels[index],
            "text_tokens": None if self.text_tokens is None else self.text_tokens[self.text_index[index]],
            "attrs": None if self.attrs is None else self.attrs[index],
            "path": sample.path,
            "index": index,
        }


def collate(items, with_paths=False):
    """Batch dict: ``images`` (B,3,H,W), ``pids``/``camids``/``viewids``/``timeids`` (B,), ``text_tokens``
    (B, L) or None, ``attrs`` (B, A) or None, ``index`` (B,) (position in the split); with ``with_paths``
    also ``paths``."""
    labels = torch.stack([item["labels"] for item in items])  # (B, 4)
    batch = {
        "images": torch.stack([item["image"] for item in items]),
        "pids": labels[:, 0],
        "camids": labels[:, 1],
        "viewids": labels[:, 2],
        "timeids": labels[:, 3],
        "text_tokens": None if items[0]["text_tokens"] is None else torch.stack([i["text_tokens"] for i in items]),
        "attrs": None if items[0]["attrs"] is None else torch.stack([item["attrs"] for item in items]),
    }
    batch["index"] = torch.tensor([item["index"] for item in items], dtype=torch.int64)
    if with_paths:
        batch["paths"] = [item["path"] for item in items]
    return batch


def seed_worker(worker_id):
    """Seed python's and numpy's RNGs of a loader worker from its torch seed (set by the loader)."""
    seed = torch.initial_seed() % 2 ** 32
    random.seed(seed)
    np.random.seed(seed)


@dataclass
class DataBundle:
    """Everything :func:`make_dataloaders` builds."""

    dataset: Any
    train_loader: DataLoader
    val_loader: DataLoader
    num_query: int
    num_gallery: int


def per_rank_batch(total, key):
    """This process's share of a batch of ``total`` images over all processes (``key`` names the config key)."""
    world_size = distributed.get_world_size()
    if total < world_size or total % world_size:
        raise ConfigError(f"{key} = {total} must be a multiple of the number of processes ({world_size})")
    return total // world_size


def _unwrap_worker_error(exc):
    """The one-line ``DataError`` raised inside a loader worker, from the message the DataLoader re-raises
    (``Caught DataError in DataLoader worker process N. Original Traceback ...``), or None."""
    lines = str(exc).strip().splitlines()
    if len(lines) < 2 or not lines[0].startswith("Caught "):
        return None
    last = lines[-1]
    marker = f"{type(exc).__name__}: "
    return type(exc)(last.split(marker, 1)[1]) if marker in last else None


class ReIDDataLoader(DataLoader):
    """A ``DataLoader`` whose workers' ``DataError`` (e.g. an unreadable image) arrives as the same one-line
    error the main process would raise, naming the file instead of the worker."""

    def __iter__(self):
        with deferred_interrupts():  # starting the workers must not be cut in the middle
            iterator = super().__iter__()
        while True:
            try:
                batch = next(iterator)
            except StopIteration:
                return
            except DataError as exc:
                unwrapped = _unwrap_worker_error(exc)
                if unwrapped is None:
                    raise
                raise unwrapped from None
            yield batch


def load_dataset(cfg, name=None, load_train=True):
    """The dataset ``name`` (default ``DATASETS.NAMES``) as the config describes it, made available first
    (e.g. SynthAG generated) by its ``prepare``; ``load_train=False`` reads only its query and gallery."""
    name = name or cfg.DATASETS.NAMES
    dataset_class = DATASETS.get(name)
    dataset_class.prepare(cfg.DATASETS.ROOT_DIR, cfg)
    return build_dataset(name, cfg.DATASETS.ROOT_DIR, use_text=cfg.MODEL.USE_TEXT, use_attr=cfg.MODEL.USE_ATTR,
                         text_prompt=cfg.MODEL.TEXT_PROMPT,
                         verbose=distributed.is_main_process(), load_train=load_train,
                         **dataset_class.options_from_config(cfg))


def check_image_files(paths, decode=False, workers=8):
    """Every file of ``paths`` exists (and, with ``decode``, decodes); else one ``DataError`` naming the first
    bad file and how many there are."""
    paths = sorted(set(paths))
    missing = [path for path in paths if not os.path.isfile(path)]
    if missing:
        raise DataError(f"image '{missing[0]}' not found ({len(missing)} of {len(paths)} images of the splits are "
                        "missing)")
    if decode:
        def readable(path):
            try:
                read_image(path, attempts=1)
                return None
            except DataError as exc:
                return str(exc)

        with ThreadPoolExecutor(max(1, workers)) as pool:
            errors = [error for error in pool.map(readable, paths) if error]
        if errors:
            raise DataError(f"{errors[0]} ({len(errors)} of {len(paths)} images cannot be decoded)")


def make_dataloaders(cfg, dataset_name=None, tokenizer=tokenize):
    """Build the dataset ``dataset_name`` (default ``DATASETS.NAMES``) and its loaders (see :class:`DataBundle`).

    Under torchrun the P x K batches and the evaluation set are shared between the processes.
    ``tokenizer`` turns texts into (N, MODEL.TEXT_LEN) token ids (default: CLIP's).
    """
    dataset = load_dataset(cfg, dataset_name)
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    seed = cfg.SOLVER.SEED

    train_batch = cfg.SOLVER.IMS_PER_BATCH
    num_train = len(dataset.train)
    if "triplet" in cfg.DATALOADER.SAMPLER:
        train_sampler = RandomIdentitySampler([s.pid for s in dataset.train], train_batch,
                                              cfg.DATALOADER.NUM_INSTANCE, seed=seed, rank=rank, world_size=world_size)
    elif cfg.DATALOADER.SAMPLER == "softmax":
        train_sampler = shuffled_sampler(num_train, seed, rank, world_size)
    else:
        raise ConfigError(f"DATALOADER.SAMPLER = {cfg.DATALOADER.SAMPLER!r}: expected 'softmax_triplet' or 'softmax'")
    train_loader = make_loader(cfg, dataset.train, build_train_transform(cfg),
                               per_rank_batch(train_batch, "SOLVER.IMS_PER_BATCH"), train_sampler, tokenizer=tokenizer,
                               offset=0,
                               # Fresh workers each epoch, seeded from the loader's generator, which the trainer
                               # re-seeds per epoch: augmentations then depend only on (seed, epoch, rank),
                               # which is what makes a resumed run identical to an uninterrupted one.
                               persistent=False)
    return DataBundle(dataset, train_loader, make_test_loader(cfg, dataset, tokenizer), len(dataset.query),
                      len(dataset.gallery))


def make_test_loader(cfg, dataset, tokenizer=tokenize):
    """The query + gallery loader of ``dataset`` (queries first, in order; shared between processes)."""
    rank, world_size = distributed.get_rank(), distributed.get_world_size()
    samples = dataset.query + dataset.gallery
    return make_loader(cfg, samples, build_test_transform(cfg), max(1, cfg.TEST.IMS_PER_BATCH // world_size),
                       ContiguousShardSampler(len(samples), rank, world_size), tokenizer=tokenizer, with_paths=True,
                       offset=2)


def make_loader(cfg, samples, transform, batch_size, sampler, tokenizer=tokenize, with_paths=False, offset=0,
                persistent=True):
    """A DataLoader over ``samples`` with the config's workers; its generator is seeded per (seed, offset, rank),
    so every loader of a run (``offset``: 0 training, 1 a model's extra phase, 2 evaluation) has its own
    stream."""
    workers = cfg.DATALOADER.NUM_WORKERS
    reader = image_reader(cfg)
    if cfg.DATALOADER.CACHE_IMAGES:
        # Decoded with this process's intra-op threads (sized with the other processes on the machine).
        reader = cached_reader(reader, [s.path for s in samples], threads=torch.get_num_threads())
    data = ImageDataset(samples, transform, tokenizer=tokenizer, text_len=cfg.MODEL.TEXT_LEN, reader=reader)
    generator = torch.Generator().manual_seed(cfg.SOLVER.SEED + 1000 * offset + distributed.get_rank())
    return ReIDDataLoader(data, batch_size=batch_size, sampler=sampler, generator=generator,
                      persistent_workers=persistent and workers > 0, collate_fn=partial(collate, with_paths=with_paths),
                      num_workers=workers, pin_memory=resolve_device(cfg.MODEL.DEVICE).type == "cuda",
                      worker_init_fn=seed_worker)


def shuffled_sampler(num_samples, seed, rank=0, world_size=1):
    """Plain shuffling (a different order each epoch); a :class:`DistributedSampler` share under DDP."""
    if world_size > 1:
        return DistributedSampler(range(num_samples), num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    return RandomSampler(range(num_samples), generator=torch.Generator().manual_seed(seed))

"""DATALOADER.CACHE_IMAGES on real JPEG files and real loaders (with and without worker processes): the same
batches as decoding every time, one decoding per image shared by the loaders of a run and never another on
reads (counted in every process), replaced files read afresh, and a clear refusal when the images would not fit
in memory."""
import logging
import os

import numpy as np
import pytest
import torch

from configs import load_config
from datasets import make_dataloaders
from datasets.image_cache import DecodedImages, clear_cached_images
from datasets.loader import make_test_loader
from datasets.synthetic import SynthConfig, generate_synthag
from datasets.transforms import read_image, read_pil_image
from tests.fixtures import BASELINE, jpeg, tiny
from utils.errors import ConfigError
import datasets.image_cache as image_cache
import datasets.loader as loader_module


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    generate_synthag(root, SynthConfig(num_ids=8, images_per_id=8, height=64, width=32, seed=3), num_workers=1)
    return root


@pytest.fixture(autouse=True)
def empty_cache():
    clear_cached_images()
    yield
    clear_cached_images()


def epochs_of_batches(cfg, epochs=2):
    """Images, pids and indices of every training batch of ``epochs`` epochs, and of the test loader once."""
    bundle = make_dataloaders(cfg)
    seen = []
    for epoch in range(1, epochs + 1):
        bundle.train_loader.generator.manual_seed(1000 + epoch)  # worker processes' augmentation
        torch.manual_seed(epoch)  # the main process's, without workers
        seen += [(batch["images"], batch["pids"], batch["index"]) for batch in bundle.train_loader]
    seen += [(batch["images"], batch["pids"], batch["index"]) for batch in bundle.val_loader]
    return seen


class DecodeLog:
    """``read_image`` that appends every path it decodes to a file: counts the decodes of any process (loader
    workers included, however they are started)."""

    def __init__(self, path):
        self.path = str(path)

    def __call__(self, image_path):
        with open(self.path, "a", encoding="utf-8") as log:
            log.write(image_path + "\n")
        return read_image(image_path)

    def decoded(self):
        """The paths decoded so far, one entry per decode."""
        if not os.path.exists(self.path):
            return []
        with open(self.path, encoding="utf-8") as log:
            return log.read().splitlines()


@pytest.mark.parametrize("workers", [0, 2])
def test_reads_from_the_filled_cache_decode_nothing(synth_root, tmp_path, monkeypatch, single_thread, workers):
    """Two epochs and the test set read every image several times: without the cache each read decodes (the
    log sees the workers' decodes too), with it each image is decoded once, when the loaders are built."""
    log = DecodeLog(tmp_path / "decodes.txt")
    monkeypatch.setattr(loader_module, "image_reader", lambda cfg: log)
    opts = tiny(synth_root, str(tmp_path / "out"), workers=workers)
    epochs_of_batches(load_config(BASELINE, opts + ["DATALOADER.CACHE_IMAGES", "False"]))
    uncached = len(log.decoded())
    os.remove(log.path)
    bundle = make_dataloaders(load_config(BASELINE, opts + ["DATALOADER.CACHE_IMAGES", "True"]))
    paths = sorted(s.path for s in bundle.dataset.train + bundle.dataset.query + bundle.dataset.gallery)
    assert sorted(log.decoded()) == paths  # filled: each image once
    epochs_of_batches(load_config(BASELINE, opts + ["DATALOADER.CACHE_IMAGES", "True"]))
    assert sorted(log.decoded()) == paths  # read: nothing decoded again
    assert uncached > len(paths)  # without the cache, images read twice are decoded twice


@pytest.mark.parametrize("backend,workers", [("tensor", 0), ("pil", 0), ("tensor", 2)])
def test_batches_equal_decoding_every_time(synth_root, tmp_path, single_thread, backend, workers):
    """Two epochs of augmented training batches and the test batches, bit for bit; with two worker
    processes too (they read the parent's decoded images)."""
    opts = tiny(synth_root, str(tmp_path / "out"), workers=workers) + ["INPUT.IMAGE_BACKEND", backend]
    plain = epochs_of_batches(load_config(BASELINE, opts + ["DATALOADER.CACHE_IMAGES", "False"]))
    assert not image_cache._CACHES
    cached = epochs_of_batches(load_config(BASELINE, opts + ["DATALOADER.CACHE_IMAGES", "True"]))
    (cache,) = image_cache._CACHES.values()
    assert len(cache) == 8 * 8  # train + query + gallery: every image once
    assert len(plain) == len(cached) > 4
    for (images, pids, index), (images_c, pids_c, index_c) in zip(plain, cached):
        assert torch.equal(pids, pids_c) and torch.equal(index, index_c)
        assert torch.equal(images, images_c)


def test_loaders_of_a_run_share_one_decoding(synth_root, tmp_path, caplog):
    cfg = load_config(BASELINE, tiny(synth_root, str(tmp_path / "out")) + ["DATALOADER.CACHE_IMAGES", "True"])
    caplog.set_level(logging.INFO, logger="datasets.image_cache")
    bundle = make_dataloaders(cfg)
    decoded = [r.getMessage() for r in caplog.records if "CACHE_IMAGES: decoded" in r.getMessage()]
    assert len(decoded) == 2  # the training images, then the (different) query and gallery images
    caplog.clear()
    # The test loader of another protocol over the same images decodes nothing.
    make_test_loader(cfg, bundle.dataset)
    assert not [r for r in caplog.records if "CACHE_IMAGES: decoded" in r.getMessage()]


@pytest.mark.parametrize("reader", [read_image, read_pil_image])
def test_a_replaced_file_is_decoded_again(tmp_path, reader):
    path = str(tmp_path / "a.jpg")
    jpeg(path, shade=10)
    cache = DecodedImages(reader)
    assert cache.ensure([path, path]) == 1
    first = np.asarray(cache(path))
    assert np.array_equal(first, np.asarray(reader(path)))
    # Replaced as datasets are regenerated (a new file renamed over the old one).
    jpeg(str(tmp_path / "new" / "a.jpg"), shade=200)
    os.replace(str(tmp_path / "new" / "a.jpg"), path)
    again = np.asarray(cache(path))
    assert np.array_equal(again, np.asarray(reader(path))) and not np.array_equal(again, first)


def test_images_spread_over_several_chunks_read_back_exactly(tmp_path, monkeypatch):
    monkeypatch.setattr(image_cache, "CHUNK_IMAGES", 3)
    paths = [str(tmp_path / f"{i}.jpg") for i in range(8)]
    for i, path in enumerate(paths):
        jpeg(path, shade=30 * i)
    decoded = []
    cache = DecodedImages(lambda path: decoded.append(path) or read_image(path), threads=2)
    assert cache.ensure(paths) == 8 and len(cache.chunks) == 3
    assert sorted(decoded) == sorted(paths)  # each once, the first too (read for the memory estimate)
    assert all(torch.equal(cache(path), read_image(path)) for path in paths)
    assert sorted(decoded) == sorted(paths)  # reads come from the chunks, not the decoder
    assert cache.nbytes == sum(read_image(path).numel() for path in paths)


def test_a_cached_image_is_a_copy(tmp_path):
    path = str(tmp_path / "a.jpg")
    jpeg(path, shade=10)
    cache = DecodedImages(read_image)
    cache.ensure([path])
    cache(path).zero_()
    assert torch.equal(cache(path), read_image(path))


def test_images_larger_than_half_the_free_memory_are_refused(tmp_path, monkeypatch):
    paths = [str(tmp_path / f"{i}.jpg") for i in range(3)]
    for path in paths:
        jpeg(path)
    size = read_image(paths[0]).numel()
    monkeypatch.setattr(image_cache, "free_memory_bytes", lambda: 5 * size)  # 3 images > half of 5
    with pytest.raises(ConfigError, match=r"DATALOADER.CACHE_IMAGES = True: decoding 3 images .*0.jpg"):
        DecodedImages(read_image).ensure(paths)
    monkeypatch.setattr(image_cache, "free_memory_bytes", lambda: 6 * size)
    assert DecodedImages(read_image).ensure(paths) == 3

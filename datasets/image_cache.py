"""DATALOADER.CACHE_IMAGES: every image decoded once per process and kept in memory.

Decoding a JPEG costs about as much as all of the training augmentation of the decoded image; a run that reads
each image every epoch (and again for every test protocol that shares it) can decode it once instead. The
decoded pixels are the decoder's output, unchanged (the transforms still run on every read), so the inputs,
and with them the run's results, are the same as without the cache.

The images of a loader's samples are decoded when the loader is built, in threads, into uint8 tensors of up
to ``CHUNK_IMAGES`` images (a later loader reuses what an earlier one decoded). Loader workers share those
tensors instead of copying them: forked workers see the parent's memory, spawned ones receive them through
shared memory.
Before decoding, the memory they will take (estimated from the first image) is checked against the memory
the machine has free: a set too large for it is one clear error, not a swapping machine.
"""
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image

from utils.errors import ConfigError

logger = logging.getLogger(__name__)

#: The cache may take at most this share of the memory free when it is filled.
MAX_SHARE_OF_FREE_MEMORY = 0.5
#: Images per uint8 chunk.
CHUNK_IMAGES = 1024


def free_memory_bytes():
    """Memory available to new allocations (Linux ``MemAvailable``), or None where it cannot be read."""
    try:
        with open("/proc/meminfo", encoding="ascii") as stream:
            for line in stream:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _as_chw_tensor(image):
    """A decoded image (PIL RGB or uint8 tensor (3, H, W)) as a uint8 tensor (3, H, W)."""
    if isinstance(image, Image.Image):
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    return image


def _version(path):
    """(inode, modification time in ns, size) of the file ``path``, or None if it cannot be read."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


class DecodedImages:
    """Path -> decoded image, held in uint8 chunks; ``reader`` decodes what is not held yet.

    ``ensure(paths)`` decodes the missing paths into new chunks; calling the object with a path returns the
    held image in the form ``reader`` returns (a uint8 tensor (3, H, W), or a PIL RGB image for the Pillow
    reader), and decodes the path with ``reader`` if it was never ensured.
    """

    def __init__(self, reader, threads=1):
        self.reader = reader
        self.threads = max(1, threads)
        self.chunks = []  # flat uint8 tensors
        self.index = {}  # path -> (chunk, offset, (3, H, W), _version of the file decoded)
        self.returns_pil = None

    def __len__(self):
        return len(self.index)

    @property
    def nbytes(self):
        """Bytes of decoded pixels held."""
        return sum(chunk.numel() for chunk in self.chunks)

    def ensure(self, paths):
        """Decode every path of ``paths`` not held yet; return how many were decoded."""
        missing = list(dict.fromkeys(p for p in paths if p not in self.index))
        if not missing:
            return 0
        first = self.reader(missing[0])
        self.returns_pil = isinstance(first, Image.Image)
        estimate = _as_chw_tensor(first).numel() * len(missing)
        free = free_memory_bytes()
        if free is not None and estimate > MAX_SHARE_OF_FREE_MEMORY * free:
            raise ConfigError(
                f"DATALOADER.CACHE_IMAGES = True: decoding {len(missing)} images ({missing[0]} and others) would "
                f"take about {estimate / 2 ** 30:.1f} GiB, more than half of the {free / 2 ** 30:.1f} GiB of free "
                f"memory; set DATALOADER.CACHE_IMAGES False")
        def read(path):  # the first image is already decoded
            return first if path == missing[0] else self.reader(path)

        with ThreadPoolExecutor(self.threads) as pool:
            # A chunk per slice of paths: the decoded images and their copy coexist for one slice only.
            for start in range(0, len(missing), CHUNK_IMAGES):
                paths_of_chunk = missing[start:start + CHUNK_IMAGES]
                images = [_as_chw_tensor(image) for image in pool.map(read, paths_of_chunk)]
                self._add_chunk(paths_of_chunk, images)
        return len(missing)

    def _add_chunk(self, paths, images):
        chunk = torch.empty(sum(image.numel() for image in images), dtype=torch.uint8)
        chunk_id, offset = len(self.chunks), 0
        for path, image in zip(paths, images):
            chunk[offset:offset + image.numel()].view(image.shape).copy_(image)
            self.index[path] = (chunk_id, offset, tuple(image.shape), _version(path))
            offset += image.numel()
        self.chunks.append(chunk)

    def __call__(self, path):
        held = self.index.get(path)
        # A file replaced since it was decoded (same path, new contents) is decoded again.
        if held is None or held[3] != _version(path):
            return self.reader(path)
        chunk, offset, shape, _ = held
        size = shape[0] * shape[1] * shape[2]
        image = self.chunks[chunk][offset:offset + size].view(shape)  # (3, H, W) in the chunk
        # Copies (a few microseconds for a ReID crop): no transform can ever write into the cache.
        if self.returns_pil:
            return Image.fromarray(image.permute(1, 2, 0).numpy())  # (H, W, 3)
        return image.clone()


_CACHES = {}


def cached_reader(reader, paths, threads=1):
    """The process's :class:`DecodedImages` of ``reader`` (one per decoder, shared by every loader of the run)
    with ``paths`` decoded; logs what it decoded."""
    cache = _CACHES.get(reader)
    if cache is None:
        cache = _CACHES[reader] = DecodedImages(reader, threads)
    start = time.time()
    decoded = cache.ensure(paths)
    if decoded:
        logger.info("DATALOADER.CACHE_IMAGES: decoded %d images in %.1f s; %d images (%.0f MiB) held in memory",
                    decoded, time.time() - start, len(cache), cache.nbytes / 2 ** 20)
    return cache


def clear_cached_images():
    """Drop every decoded image this process holds (the next loader decodes again)."""
    _CACHES.clear()

"""Atomic checkpoint writing and safe (``weights_only``) reading."""
import os
import tempfile

import torch

from utils.errors import CheckpointError


def save_checkpoint(obj, path):
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old file or the complete new one.

    The data goes to a temporary file in the same folder, is flushed and fsynced, then renamed over
    ``path`` (an atomic operation on POSIX and Windows); the folder entry is fsynced too.
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=".tmp-", suffix=".pth", dir=folder)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    if hasattr(os, "O_DIRECTORY"):
        dir_fd = os.open(folder, os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint with ``torch.load(weights_only=True)``; never unpickles arbitrary objects."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path or '(empty path)'}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"cannot read checkpoint {path}: expected a file written by torch.save "
                              f"holding only tensors and plain Python values ({reason})") from None

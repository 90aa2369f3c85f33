"""Atomic checkpoint writing and safe (``weights_only``) reading."""
import os

import torch

from utils.errors import CheckpointError
from utils.io import atomic_write


def save_checkpoint(obj, path):
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old file or the complete new one
    (``utils.io.atomic_write``: same-folder temporary file, fsync, rename, the user's umask)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


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

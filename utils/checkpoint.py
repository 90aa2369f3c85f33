"""Atomic checkpoint writing and safe reading: ``torch.load(weights_only=True)`` for ``.pth`` files, and
``.safetensors`` files as written by ``tools/export.py``."""
import json
import os

import torch

from utils.errors import CheckpointError
from utils.io import atomic_write


def save_checkpoint(obj, path):
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old file or the complete new one
    (``utils.io.atomic_write``: same-folder temporary file, fsync, rename, the user's umask)."""
    atomic_write(path, lambda handle: torch.save(obj, handle))


SAFETENSORS_SUFFIX = ".safetensors"


def _load_safetensors(path, map_location):
    """``{"model": state dict, ...}`` of a ``.safetensors`` file, plus ``config`` (YAML text),
    ``model_args`` and ``epoch`` when its metadata records them (as ``tools/export.py`` writes them)."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file, safe_open
    except ImportError:
        raise CheckpointError(f"cannot read checkpoint {path}: .safetensors files need the safetensors "
                              f"package (pip install safetensors)") from None
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
        weights = load_file(path, device="cpu")
        state = {"model": {key: value.to(map_location) for key, value in weights.items()}}
        if "config" in metadata:
            state["config"] = metadata["config"]
        if "model_args" in metadata:
            state["model_args"] = json.loads(metadata["model_args"])
        if metadata.get("epoch"):
            state["epoch"] = int(metadata["epoch"])
    except (SafetensorError, OSError, ValueError) as exc:
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"cannot read checkpoint {path}: expected a .safetensors file of tensors with "
                              f"text metadata ({reason})") from None
    return state


def load_checkpoint(path, map_location="cpu", mmap=False):
    """Read a checkpoint with ``torch.load(weights_only=True)``; never unpickles arbitrary objects.

    ``mmap`` maps the file's tensors instead of reading them (cheap when only plain values such as the stored
    config are wanted). A ``.safetensors`` file is read with the safetensors package and returned in the layout
    of a weights file: ``{"model": state dict}`` plus ``config``/``model_args``/``epoch`` from its metadata.
    """
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path or '(empty path)'}")
    if path.endswith(SAFETENSORS_SUFFIX):
        return _load_safetensors(path, map_location)
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"cannot read checkpoint {path}: expected a file written by torch.save "
                              f"holding only tensors and plain Python values ({reason})") from None

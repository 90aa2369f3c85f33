"""Checkpoint files: atomic writing with a checksum inside, safe and verified reading (``torch.load(
weights_only=True)`` for ``.pth`` files, and ``.safetensors`` files as written by ``tools/export.py``), and
the fallback from a damaged resumable checkpoint to the previous one.

A file written by :func:`save_checkpoint` holds, under :data:`CHECKSUM_KEY`, the SHA-256 of its content: every
tensor's dtype, shape and bytes and every plain value, in order (:func:`content_digest`). ``torch.load`` checks
no CRC, so without it a bit flipped inside a tensor would load silently; with it, :func:`load_checkpoint`
refuses the file. (A truncated file fails to open as a zip archive in the first place.) The entry is removed
again when the file is read, so a checkpoint reads back as exactly what was saved. Files without a checksum,
such as the authors' releases, load as before.
"""
import hashlib
import json
import logging
import os
from collections.abc import Mapping

import torch

from utils.distributed import is_main_process
from utils.errors import CheckpointError
from utils.io import atomic_write

logger = logging.getLogger(__name__)

#: Appended to the name of a damaged checkpoint that a resume passed over.
DAMAGED_SUFFIX = ".damaged"
#: The key of the checksum record in a checkpoint written by :func:`save_checkpoint`.
CHECKSUM_KEY = "_svpr_checksum"
_CHECKSUM_SCHEME = "sha256 of the values, v1"
# Files verified by this process, by (path, inode, size, mtime): a resume reads its checkpoint more than once.
_verified = set()


def _feed(digest, value):
    """Add ``value`` to the hash ``digest`` in a form that survives ``torch.save``/``torch.load`` unchanged:
    a type tag and length before each item, so that no two different structures give the same stream."""
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
        if tensor.layout != torch.strided:
            tensor = tensor.to_dense()
        digest.update(f"T{tensor.dtype}{tuple(tensor.shape)}|".encode())
        flat = tensor.reshape(-1).cpu().contiguous()  # (numel,)
        if flat.numel():
            digest.update(flat.view(torch.uint8).numpy())  # the raw bytes, whatever the dtype
    elif isinstance(value, Mapping):
        digest.update(b"D%d|" % len(value))
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(b"%s%d|" % (b"L" if isinstance(value, list) else b"U", len(value)))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (bytes, bytearray)):
        digest.update(b"B%d|" % len(value) + bytes(value))
    else:
        text = (value if isinstance(value, str) else repr(value)).encode("utf-8", "surrogatepass")
        digest.update(b"%s%d|" % (type(value).__name__.encode(), len(text)) + text)


def content_digest(state):
    """SHA-256 (hex) of a checkpoint's content ``state`` (a dict), its :data:`CHECKSUM_KEY` entry excluded.

    Every value is hashed as it is held (a tensor on a GPU is copied to the host one at a time): about 1 s
    per GB, once per checkpoint written and once per checkpoint read."""
    digest = hashlib.sha256()
    _feed(digest, {key: value for key, value in state.items() if key != CHECKSUM_KEY})
    return digest.hexdigest()


def save_checkpoint(obj, path, previous=None, checksum=True):
    """Write ``obj`` with ``torch.save`` so that ``path`` is either the old file or the complete new one
    (``utils.io.atomic_write``: uniquely named same-folder temporary file, fsync, rename, the user's umask). A
    dict gets its checksum (:data:`CHECKSUM_KEY`) unless ``checksum`` is False (a file for other code, which
    would take the entry for a weight). With ``previous``, the file ``path`` held is kept under that name
    (:func:`previous_checkpoint`)."""
    if isinstance(obj, dict) and checksum:
        record = {"scheme": _CHECKSUM_SCHEME, "sha256": content_digest(obj)}
        copy = obj.copy()  # an OrderedDict stays one; a state dict keeps its version _metadata
        if hasattr(obj, "_metadata"):
            copy._metadata = obj._metadata
        copy[CHECKSUM_KEY] = record
        obj = copy
    atomic_write(path, lambda handle: torch.save(obj, handle), previous=previous)


def previous_checkpoint(path):
    """Where the previous version of the resumable checkpoint ``path`` is kept: ``checkpoint_last.pth`` ->
    ``checkpoint_prev.pth``, ``stage1.pth`` -> ``stage1_prev.pth``."""
    stem, extension = os.path.splitext(path)
    return f"{stem[:-len('_last')] if stem.endswith('_last') else stem}_prev{extension}"


def _signature(path):
    status = os.stat(path)
    return os.path.realpath(path), status.st_ino, status.st_size, status.st_mtime_ns


def _verify(path, state):
    """Raise a ``CheckpointError`` when ``state`` (read from ``path``) does not match the checksum it stores."""
    record = state.get(CHECKSUM_KEY)
    if not isinstance(record, dict) or record.get("scheme") != _CHECKSUM_SCHEME or \
            not isinstance(record.get("sha256"), str):
        raise CheckpointError(f"checkpoint {path} is damaged or foreign: its '{CHECKSUM_KEY}' entry is not a "
                              f"{_CHECKSUM_SCHEME} record")
    if content_digest(state) != record["sha256"]:
        raise CheckpointError(f"checkpoint {path} is damaged: its content does not match the SHA-256 checksum "
                              f"stored in it (bytes changed on disk)")


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


def load_checkpoint(path, map_location="cpu", mmap=False, verify=None):
    """Read a checkpoint with ``torch.load(weights_only=True)``; never unpickles arbitrary objects.

    ``mmap`` maps the file's tensors instead of reading them (cheap when only plain values such as the stored
    config are wanted). A ``.safetensors`` file is read with the safetensors package and returned in the layout
    of a weights file: ``{"model": state dict}`` plus ``config``/``model_args``/``epoch`` from its metadata.
    ``verify`` (default: unless ``mmap``, which is meant not to read the tensors) checks the checksum of a file
    that has one; a damaged file raises a one-line ``CheckpointError`` naming it.
    """
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"checkpoint file not found: {path or '(empty path)'}")
    if path.endswith(SAFETENSORS_SUFFIX):
        return _load_safetensors(path, map_location)
    try:
        signature = _signature(path)
        state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as exc:  # torch raises many types for corrupt or foreign files
        reason = " ".join(str(exc).split())[:200]
        raise CheckpointError(f"cannot read checkpoint {path}: expected a file written by torch.save "
                              f"holding only tensors and plain Python values ({reason})") from None
    if isinstance(state, dict) and CHECKSUM_KEY in state:
        if (not mmap if verify is None else verify) and signature not in _verified:
            _verify(path, state)
            _verified.add(signature)
        del state[CHECKSUM_KEY]
    return state


def load_newest_intact(paths, map_location="cpu", log=True, set_aside=False, mmap=False):
    """``(state, path)`` of the first of ``paths`` that exists and is intact (readable, checksum verified);
    with ``log``, each damaged one and the fallback (with the epoch it holds) are logged. With ``set_aside``
    (the resume itself, not a check before it), the damaged files passed over are renamed ``<name>.damaged``
    (by rank 0): otherwise the next checkpoint written would keep a damaged file as its previous version.
    ``mmap`` maps the tensors instead of reading them into memory (a check that only needs to know which file
    is intact; verified files are remembered, so the resume's own read does not hash them again). A one-line
    ``CheckpointError`` naming every file and what is wrong with it when none is intact."""
    damaged = []
    for path in paths:
        if not os.path.isfile(path):
            continue
        try:
            state = load_checkpoint(path, map_location=map_location, mmap=mmap, verify=True)
        except CheckpointError as exc:
            if log:
                logger.warning("%s", exc)
            damaged.append((path, str(exc)))
            continue
        if damaged and log:
            epoch = state.get("epoch") if isinstance(state, dict) else None
            logger.warning("%s %s damaged: resuming from %s instead, the state after epoch %s (the epochs after "
                           "it are trained again, with the same result)", ", ".join(p for p, _ in damaged),
                           "is" if len(damaged) == 1 else "are", path, epoch)
        if set_aside and is_main_process():
            for bad, _ in damaged:
                os.replace(bad, bad + DAMAGED_SUFFIX)
                logger.warning("kept the damaged file as %s", bad + DAMAGED_SUFFIX)
        return state, path
    if not damaged:
        raise CheckpointError(f"no checkpoint to resume from: none of {', '.join(paths)} exists")
    raise CheckpointError("every checkpoint to resume from is damaged: " + "; ".join(
        f"{path}: {reason.split(': ', 1)[-1] if reason.startswith('cannot read') else reason}"
        for path, reason in damaged) + "; start a new run (--overwrite, or another OUTPUT_DIR)")

"""Read the tensors of a TorchScript archive (OpenAI's CLIP release format) without running its code.

``torch.jit.load`` compiles and runs the archive's code (``__setstate__`` methods run on load), so a
crafted file executes whatever it contains; ``torch.load(weights_only=True)`` refuses TorchScript
archives. An archive is a zip holding ``<name>/data.pkl`` (the module tree: objects of ``__torch__``
classes whose attributes are tensors, sub-modules and plain values) and ``<name>/data/<key>`` (the raw
storages). This reader unpickles ``data.pkl`` with an unpickler that knows only tensors, storages and
plain containers, turns every ``__torch__`` object into an inert attribute holder, and never looks at
the ``code/`` folder.
"""
import pickle
import zipfile

import torch

from utils.errors import CheckpointError

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}


def is_torchscript_archive(path):
    """True when ``path`` is a zip with ``<name>/data.pkl`` and ``<name>/constants.pkl`` (what
    ``torch.jit.save`` writes; ``torch.save`` writes no ``constants.pkl``)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return _data_pickle(names) is not None and any(name.count("/") == 1 and name.endswith("/constants.pkl")
                                                   for name in names)


def _data_pickle(names):
    return next((name for name in names if name.count("/") == 1 and name.endswith("/data.pkl")), None)


class _ScriptObject:
    """Stand-in for an object of a TorchScript class: keeps the attributes it is built with, nothing else."""

    def __setstate__(self, state):
        if not isinstance(state, dict):
            raise pickle.UnpicklingError(f"object state of type {type(state).__name__} (expected a dict)")
        self.attributes = state


class _StorageType:
    def __init__(self, dtype):
        self.dtype = dtype


def _rebuild_tensor(storage, offset, size, stride, *_):
    # ``storage`` is the flat (numel,) tensor read from data/<key>; the view reproduces the saved layout.
    return storage.as_strided(tuple(size), tuple(stride), offset)


class _TensorUnpickler(pickle.Unpickler):
    """Builds tensors from the archive's storages; any other global than the ones below is refused."""

    def __init__(self, handle, archive, prefix):
        super().__init__(handle)
        self.archive, self.prefix, self.storages = archive, prefix, {}

    def find_class(self, module, name):
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return dict
        if module == "__torch__" or module.startswith("__torch__."):
            return type(name, (_ScriptObject,), {})
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
        _, storage_type, key, _, _ = pid
        if key not in self.storages:
            data = bytearray(self.archive.read(f"{self.prefix}/data/{key}"))
            self.storages[key] = torch.frombuffer(data, dtype=storage_type.dtype) if data else \
                torch.empty(0, dtype=storage_type.dtype)
        return self.storages[key]


def _collect(node, prefix, out):
    """Dotted-name tensors of the module tree below ``node`` (as ``Module.state_dict`` names them)."""
    for name, value in node.attributes.items():
        if isinstance(value, torch.Tensor):
            out[prefix + name] = value
        elif isinstance(value, _ScriptObject):
            _collect(value, f"{prefix}{name}.", out)


def read_torchscript_state_dict(path):
    """``{name: tensor}`` of the module saved in the TorchScript archive ``path``, without executing it.

    Raises a one-line ``CheckpointError`` for an archive whose data needs anything but tensors and
    plain values (a crafted file) or that is not laid out as a TorchScript archive.
    """
    try:
        with zipfile.ZipFile(path) as archive:
            data_name = _data_pickle(archive.namelist())
            if data_name is None:
                raise CheckpointError(f"{path}: not a TorchScript archive (no <name>/data.pkl)")
            with archive.open(data_name) as handle:
                root = _TensorUnpickler(handle, archive, data_name.split("/")[0]).load()
    except (pickle.UnpicklingError, zipfile.BadZipFile, KeyError, EOFError, TypeError, ValueError,
            RuntimeError, AttributeError) as exc:
        raise CheckpointError(f"cannot read TorchScript archive {path}: expected only tensors and plain "
                              f"values ({' '.join(str(exc).split())[:160]})") from None
    if not isinstance(root, _ScriptObject):
        raise CheckpointError(f"{path}: the archive holds a {type(root).__name__}, expected a module")
    state_dict = {}
    _collect(root, "", state_dict)
    return state_dict

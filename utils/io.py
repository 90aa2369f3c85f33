"""Atomic file writing: a file is either its old content or the complete new one, never half written."""
import os
import tempfile

from utils.errors import ConfigError

TEMP_PREFIX = ".tmp-"


def _umask():
    """The process umask (read without changing it where /proc allows; the umask itself is per process)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path, data_or_callback):
    """Write ``path`` atomically: ``data_or_callback`` is ``bytes``, ``str`` (UTF-8, newlines kept) or a
    function that writes to the binary file handle it is given.

    The data goes to a temporary file in the same folder, is flushed and fsynced, gets the mode a plain
    ``open`` would give (0666 minus the umask), then is renamed over ``path``; the folder entry is fsynced
    too. On any failure the temporary file is removed; an ``OSError`` (folder not writable, disk full)
    becomes a one-line ``ConfigError`` naming the path and the cause.
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp_path = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix="-" + os.path.basename(path), dir=folder)
        with os.fdopen(fd, "wb") as handle:
            if callable(data_or_callback):
                data_or_callback(handle)
            else:
                data = data_or_callback
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates files readable by the owner only; checkpoints and results are shared like any file.
        os.chmod(tmp_path, 0o666 & ~_umask())
        os.replace(tmp_path, path)
        tmp_path = None
        if hasattr(os, "O_DIRECTORY"):
            dir_fd = os.open(folder, os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except OSError as exc:
        raise ConfigError(f"cannot write '{path}': {exc.strerror or exc} (is OUTPUT_DIR writable, with free "
                          "disk space?)") from None
    finally:
        if tmp_path is not None and os.path.exists(tmp_path):
            os.remove(tmp_path)
    return path

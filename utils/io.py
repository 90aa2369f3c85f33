"""Atomic file writing: a file is either its old content or the complete new one, never half written.

Every temporary file is ``<folder of the target>/.tmp-<random>-<name>`` (``tempfile.mkstemp``): unique, so
two processes writing the same name never collide, and recognisable, so that files left by a killed process
are removed by the next run in that folder (``processor.preflight.remove_stale_temporaries``).
"""
import errno
import os
import shutil
import tempfile

from utils.errors import ConfigError, UserError

TEMP_PREFIX = ".tmp-"


class DiskFullError(UserError):
    """A write failed for lack of space (ENOSPC, or EDQUOT: the user's quota); nothing was replaced."""


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


def format_bytes(count):
    """``count`` bytes in MiB or GiB, for messages (``"12.3 MiB"``)."""
    mib = count / 2 ** 20
    return f"{mib / 1024:.1f} GiB" if mib >= 1024 else f"{mib:.1f} MiB"


def free_bytes(folder):
    """Bytes that this user may still write in ``folder``'s file system (or None when it cannot be asked)."""
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def write_error(path, exc):
    """The one-line ``UserError`` for an ``OSError`` raised while writing ``path``: a ``DiskFullError`` that
    names the folder and its free space when the disk (or quota) is full, a ``ConfigError`` otherwise."""
    folder = os.path.dirname(os.path.abspath(path))
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        free = free_bytes(folder)
        left = f", {format_bytes(free)} left" if free is not None else ""
        return DiskFullError(f"disk full: no space left in '{folder}' to write {os.path.basename(path)} "
                             f"({exc.strerror}{left}); the previous {os.path.basename(path)}, if any, is intact and "
                             f"no temporary file is left: free space there, then run the same command again "
                             f"(train_svpr.py: with --resume)")
    return ConfigError(f"cannot write '{path}': {exc.strerror or exc} (is OUTPUT_DIR writable, with free disk "
                       "space?)")


class _RecordingWriter:
    """A binary file handle that remembers the ``OSError`` its ``write`` raised: writers such as ``torch.save``
    replace it by an error of their own (``RuntimeError: ... file write failed``) that no longer says why."""

    def __init__(self, handle):
        self._handle = handle
        self.error = None

    def write(self, data):
        try:
            return self._handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def __getattr__(self, name):
        return getattr(self._handle, name)


def atomic_write(path, data_or_callback, previous=None):
    """Write ``path`` atomically: ``data_or_callback`` is ``bytes``, ``str`` (UTF-8, newlines kept) or a
    function that writes to the binary file handle it is given.

    The data goes to a uniquely named temporary file in the same folder, is flushed and fsynced, gets the mode
    a plain ``open`` would give (0666 minus the umask), then is renamed over ``path``; the folder entry is
    fsynced too. With ``previous`` (a path in the same folder), an existing ``path`` is first renamed to
    ``previous``, once the new content is safely on disk: a reader finds the new file, or (in the instant
    between the two renames) the old one under ``previous``. On any failure the temporary file is removed and
    ``path`` is untouched; an ``OSError`` (folder not writable, disk full) becomes a one-line ``UserError``
    (:func:`write_error`).
    """
    folder = os.path.dirname(os.path.abspath(path))
    tmp_path = None
    writer = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp_path = tempfile.mkstemp(prefix=TEMP_PREFIX, suffix="-" + os.path.basename(path), dir=folder)
        with os.fdopen(fd, "wb") as handle:
            if callable(data_or_callback):
                writer = _RecordingWriter(handle)
                data_or_callback(writer)
            else:
                data = data_or_callback
                handle.write(data.encode("utf-8") if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        # mkstemp creates files readable by the owner only; checkpoints and results are shared like any file.
        os.chmod(tmp_path, 0o666 & ~_umask())
        if previous is not None and os.path.exists(path):
            os.replace(path, previous)
        os.replace(tmp_path, path)
        tmp_path = None
        if hasattr(os, "O_DIRECTORY"):
            dir_fd = os.open(folder, os.O_DIRECTORY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
    except BaseException as exc:
        if tmp_path is not None and os.path.exists(tmp_path):
            os.remove(tmp_path)  # first, so that the message counts the space it took as free
        if isinstance(exc, OSError):
            raise write_error(path, exc) from None
        if writer is not None and writer.error is not None:
            raise write_error(path, writer.error) from None
        raise
    return path

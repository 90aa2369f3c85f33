"""One run per output folder: an exclusive lock on ``<folder>/.lock`` that the process holds until it ends.

The lock is a POSIX record lock (``fcntl.lockf``): the kernel releases it the moment its process dies, however
it dies (SIGKILL, a crash, a power cut on the machine holding it), so a lock left by a dead run never blocks the
next one, and the file itself is never deleted (deleting a lock file races with the next locker). POSIX locks
are not inherited by forked children, so a data-loader worker that outlives a killed trainer for a moment holds
nothing. The file records the holder's pid, host, start time and command, for the message the next run gives.
"""
import datetime
import errno
import fcntl
import json
import os
import socket
import sys
import time

from utils.errors import ConfigError, UserError

LOCK_FILE = ".lock"
# Open lock files of this process, by real folder path: closing one (or any other descriptor of the same
# file) would release the lock, so they stay open until the process ends.
_held = {}


class FolderInUseError(UserError):
    """Another live process holds the folder's lock."""


def _holder(handle):
    """The holder's record (a dict, possibly empty): it writes it right after locking, so wait a moment for it."""
    for _ in range(10):
        handle.seek(0)
        try:
            record = json.loads(handle.read() or "null")
        except ValueError:
            record = None
        if isinstance(record, dict):
            return record
        time.sleep(0.1)
    return {}


def _lock(handle, folder, purpose):
    """Take the lock of the open lock file ``handle``: True, or False when the file system has no locks; a
    ``FolderInUseError`` naming the holder when another process has it."""
    try:
        fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EACCES, errno.EAGAIN):
            handle.close()
            return False
        record = _holder(handle)
        handle.close()
        who = (f"pid {record.get('pid', '?')} on host {record.get('host', '?')}, started {record.get('started', '?')}"
               if record else "a process that has not recorded itself yet")
        command = f" ({record['command'][:160]})" if record.get("command") else ""
        raise FolderInUseError(f"{purpose} '{folder}' is in use by another run: {who}{command}; wait for it to end, "
                               f"or choose another {purpose}") from None
    return True


def _record(handle):
    """Write this process's pid, host, start time and command into its lock file (for the next run's message)."""
    record = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.datetime.now().isoformat(timespec="seconds"),
              "command": " ".join([os.path.basename(sys.argv[0] or "python"), *sys.argv[1:]])}
    handle.seek(0)
    handle.truncate()
    handle.write(json.dumps(record) + "\n")
    handle.flush()


def claim_folder(folder, purpose="OUTPUT_DIR"):
    """Take the lock of ``folder`` if it has a lock file already, creating no file (a run checks its folder
    first, and a run refused by those checks must leave it as it was; only the lock file's record of its holder
    changes); a ``FolderInUseError`` when another live process holds it. :func:`lock_folder` completes it."""
    real = os.path.realpath(folder)
    if real in _held:
        return
    try:
        handle = open(os.path.join(folder, LOCK_FILE), "r+", encoding="utf-8")
    except OSError:
        return  # no lock file (or no folder) yet: nothing to claim
    if _lock(handle, folder, purpose):
        _record(handle)
        _held[real] = handle


def lock_folder(folder, purpose="OUTPUT_DIR"):
    """Create ``folder`` and its lock file if needed, take the lock for the rest of this process's life (unless
    :func:`claim_folder` took it already) and record this process in the file. A ``FolderInUseError`` (one
    line: the folder, the holder's pid, host, start time and command) when another live process holds it. On
    a file system without locks (some network mounts) the folder is used unlocked; returns False then, True
    otherwise."""
    real = os.path.realpath(folder)
    if real in _held:
        return True
    try:
        os.makedirs(folder, exist_ok=True)
        handle = open(os.path.join(folder, LOCK_FILE), "a+", encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{purpose} '{folder}' is not writable: {exc.strerror or exc}") from None
    if not _lock(handle, folder, purpose):
        return False
    _record(handle)
    _held[real] = handle
    return True

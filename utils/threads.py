"""CPU threads per process, sized so that the processes sharing a machine share its cores.

PyTorch gives every process as many intra-op threads as the machine has cores. Two such processes on one
machine (two trainings, or torchrun ranks) then run twice the threads the cores can hold, and every
parallel operation waits at its barrier for a thread that is not running: on 2 cores two trainings were
measured 15-20x slower than one. Here each process takes its share instead:

- ``DIST.CPU_THREADS`` > 0 or ``OMP_NUM_THREADS`` set by the user (torchrun's own default of 1 does not
  count) is used as given;
- otherwise the cores this process may run on are divided by the processes that currently hold a share on
  this machine (at least torchrun's ranks on it). Each process registers in a per-machine folder (one file
  per process id, removed at exit; files of processes that no longer run are ignored and removed), so
  separately started trainings see each other, and ``rebalance`` adjusts the share when one starts or ends;
- on CUDA the main process only feeds the GPU while the ``DataLoader`` workers (one thread each) do the CPU
  work, so the workers' count is taken from the share; on the CPU the main process computes and the workers
  only prefetch between steps, so it keeps the whole share.
"""
import atexit
import logging
import os
import tempfile
from typing import NamedTuple

import torch

logger = logging.getLogger(__name__)

REGISTRY_DIR = os.path.join(tempfile.gettempdir(), "svpr-reid-cpu-shares")


class ThreadPlan(NamedTuple):
    """Intra-op threads of this process and why."""

    threads: int
    reason: str


def available_cores():
    """Cores this process may run on (its CPU affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def plan_threads(cores, processes, workers, device_type, requested=0, env_threads=None):
    """The ``ThreadPlan`` of one of ``processes`` processes sharing ``cores`` cores (see the module docstring).

    ``requested`` is the config's value (0 = automatic); ``env_threads`` the user's ``OMP_NUM_THREADS``.
    """
    if requested > 0:
        return ThreadPlan(requested, "set by the config")
    if env_threads:
        return ThreadPlan(env_threads, "set by OMP_NUM_THREADS")
    processes = max(1, processes)
    share = max(1, cores // processes)
    reason = f"{cores} cores shared by {processes} process{'es' if processes > 1 else ''}"
    if device_type == "cuda" and workers:
        threads = max(1, share - workers)
        return ThreadPlan(threads, f"{reason}, {workers} data worker{'s' if workers > 1 else ''} of its share "
                                   "doing the CPU work")
    return ThreadPlan(share, reason)


def _user_omp_threads():
    """``OMP_NUM_THREADS`` as an int when the user set it; torchrun's own default of 1 does not count."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    if not value.isdigit() or int(value) < 1:
        return None
    if "TORCHELASTIC_RUN_ID" in os.environ and value == "1":
        return None  # torchrun sets 1 when the user did not: size the ranks here instead
    return int(value)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class CoreShare:
    """This process's share of the machine's cores (``start`` registers and applies it, ``rebalance``
    re-applies it when the number of registered processes changed, ``close`` unregisters)."""

    def __init__(self, requested=0, workers=0, device_type="cpu", folder=REGISTRY_DIR):
        self.requested = int(requested)
        self.workers = int(workers)
        self.device_type = device_type
        self.folder = folder
        self.path = os.path.join(folder, str(os.getpid()))
        self.plan = None

    def _processes(self):
        """Live registered processes (this one included; at least torchrun's ranks on this machine, which may
        not all have registered yet); files of ended processes are removed."""
        count = self._count_registered()
        return max(count, int(os.environ.get("LOCAL_WORLD_SIZE", 1) or 1))

    def _count_registered(self):
        count = 1
        try:
            names = os.listdir(self.folder)
        except OSError:
            return count
        for name in names:
            if not name.isdigit() or int(name) == os.getpid():
                continue
            if _alive(int(name)):
                count += 1
            else:
                try:
                    os.remove(os.path.join(self.folder, name))
                except OSError:
                    pass
        return count

    def _apply(self):
        plan = plan_threads(available_cores(), self._processes(), self.workers, self.device_type,
                            self.requested, _user_omp_threads())
        changed = self.plan is None or plan.threads != self.plan.threads
        if changed:
            torch.set_num_threads(plan.threads)
        self.plan = plan
        return changed

    def start(self):
        """Register this process, set its threads and log the choice; returns the ``ThreadPlan``."""
        if self.requested <= 0 and _user_omp_threads() is None:
            try:
                os.makedirs(self.folder, exist_ok=True)
                with open(self.path, "w", encoding="utf-8"):
                    pass
            except OSError as exc:  # a read-only temp folder: size as if alone
                logger.warning("cannot register in %s (%s): CPU threads sized for this process alone", self.folder,
                               exc)
        self._apply()
        logger.info("CPU threads: %d per process (%s); DIST.CPU_THREADS or OMP_NUM_THREADS set them",
                    torch.get_num_threads(), self.plan.reason)
        return self.plan

    def rebalance(self):
        """Re-apply the share if processes started or ended since the last call (logged when it changes)."""
        if self.plan is None or self.requested > 0 or _user_omp_threads() is not None:
            return self.plan
        if self._apply():
            logger.info("CPU threads: now %d per process (%s)", torch.get_num_threads(), self.plan.reason)
        return self.plan

    def close(self):
        """Unregister (idempotent)."""
        try:
            os.remove(self.path)
        except OSError:
            pass


_SHARE = None  # this process's CoreShare once ``start_core_share`` ran


def start_core_share(requested=0, workers=0, device_type="cpu", folder=REGISTRY_DIR):
    """Register this process, set its intra-op threads and log the choice (once per process; later calls
    re-plan with the new arguments). Returns the ``ThreadPlan``."""
    global _SHARE
    if _SHARE is not None:
        _SHARE.close()
    _SHARE = CoreShare(requested, workers, device_type, folder)
    atexit.register(_SHARE.close)
    return _SHARE.start()


def rebalance_core_share():
    """Re-apply this process's share when processes started or ended since (no-op before ``start_core_share``)."""
    return _SHARE.rebalance() if _SHARE is not None else None

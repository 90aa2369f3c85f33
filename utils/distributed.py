"""Distributed helpers: process group from the torchrun environment, rank queries, gathers.

All functions are no-ops (or return single-process answers) when not running under torchrun.
"""
import contextlib
import datetime
import logging
import os
import signal
import threading
import time

import torch
import torch.distributed as dist

from utils.errors import UserError

_TIMEOUT = datetime.timedelta(minutes=10)  # set by init_distributed from DIST.TIMEOUT_MINUTES
LAUNCHER_CHECK_SECONDS = 1.0

logger = logging.getLogger(__name__)


def launched_by_torchrun():
    """True when the torchrun environment asks for more than one process."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def restart_count():
    """How many times torchrun's elastic agent restarted the workers (``--max-restarts``); 0 otherwise."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", 0) or 0)


def init_distributed(device, timeout_minutes=10.0):
    """Start the process group (NCCL on CUDA, gloo on CPU) if torchrun launched several processes.

    Every collective (and ``barrier``) gives up after ``timeout_minutes`` with an error, so a stalled or
    dead rank stops the others instead of hanging them.
    """
    if not launched_by_torchrun() or is_initialized():
        return
    global _TIMEOUT
    _TIMEOUT = datetime.timedelta(minutes=float(timeout_minutes))
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        # Without asynchronous error handling a timed-out NCCL collective blocks forever instead of raising.
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        torch.cuda.set_device(device)
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun's launcher, this process's parent
        stop_when_launcher_dies(os.getppid())
    store, rank, world_size = next(dist.rendezvous("env://", timeout=_TIMEOUT))
    # After an elastic restart (torchrun --max-restarts) the store can still hold the previous attempt's
    # connection keys; a per-attempt prefix keeps the new process group from reading them.
    store = dist.PrefixStore(f"attempt{restart_count()}", store)
    dist.init_process_group(backend=backend, store=store, rank=rank, world_size=world_size, timeout=_TIMEOUT)


def stop_when_launcher_dies(launcher_pid, interval_s=LAUNCHER_CHECK_SECONDS):
    """Send this process SIGTERM (which ends a run as Ctrl-C does) once its parent ``launcher_pid`` is gone.

    torchrun starts every worker in a session of its own, so a launcher killed with SIGKILL (by hand, by the
    out-of-memory killer, with its node's job) leaves its workers training with nobody to report their end:
    the other nodes would finish the run without it and their launchers then wait minutes for it at exit.
    Ending with the launcher makes the other ranks' next collective fail at once, and them stop with one line.
    """
    def watch():
        while os.getppid() == launcher_pid:
            time.sleep(interval_s)
        logger.warning("rank %d: the torchrun launcher that started this process (pid %d) is gone: stopping",
                       get_rank(), launcher_pid)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="launcher-watch", daemon=True).start()


class DistributedError(UserError):
    """A collective operation failed or timed out: another rank stalled or died (not a user mistake)."""

    exit_code = 1


# Messages of gloo/NCCL/c10d failures that are raised as plain RuntimeErrors.
_COLLECTIVE_FAILURES = ("timed out", "timeout", "pair closure", "connection closed", "connection reset",
                        "broken pipe", "nccl", "gloo", "processgroup", "watchdog")


@contextlib.contextmanager
def collective_errors():
    """Turn a failed or timed-out collective under torchrun into a one-line ``DistributedError``."""
    try:
        yield
    except (RuntimeError, dist.DistError) as exc:
        text = " ".join(str(exc).split())
        if not is_initialized() or not (isinstance(exc, dist.DistError)
                                        or any(marker in text.lower() for marker in _COLLECTIVE_FAILURES)):
            raise
        # The end of a long message names the cause; cut at a word.
        reason = text if len(text) <= 160 else "..." + text[-160:].split(" ", 1)[-1]
        raise DistributedError(
            f"rank {get_rank()}: a collective operation with the other processes failed after at most "
            f"DIST.TIMEOUT_MINUTES = {_TIMEOUT.total_seconds() / 60:g} min ({reason}); another rank stalled "
            "or died (see its log); --resume continues from the last checkpoint") from None


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if is_initialized() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    """Wait for every rank; on gloo a monitored barrier whose timeout error names the missing ranks."""
    if not is_initialized():
        return
    if dist.get_backend() == "gloo":
        dist.monitored_barrier(timeout=_TIMEOUT)
    else:
        dist.barrier()


def destroy():
    if is_initialized():
        dist.destroy_process_group()


def all_gather_tensor(tensor):
    """Concatenate ``tensor`` (same trailing shape, any first dimension) from all ranks, in rank order."""
    if get_world_size() == 1:
        return tensor
    size = torch.tensor([tensor.shape[0]], device=tensor.device)
    sizes = [torch.zeros_like(size) for _ in range(get_world_size())]
    dist.all_gather(sizes, size)
    sizes = [int(s.item()) for s in sizes]
    padded = tensor.new_zeros((max(sizes),) + tuple(tensor.shape[1:]))
    padded[: tensor.shape[0]] = tensor
    gathered = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes)], dim=0)


def all_gather_object(obj):
    """List of ``obj`` from every rank (pickled by torch; use for small Python objects only)."""
    if get_world_size() == 1:
        return [obj]
    out = [None] * get_world_size()
    dist.all_gather_object(out, obj)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather of equally sized tensors whose backward sends each rank the gradient of its own slice,
    summed over the ranks' losses (an all-reduce: works on every backend, gloo included)."""

    @staticmethod
    def forward(ctx, tensor):
        ctx.rows = tensor.shape[0]
        gathered = [torch.empty_like(tensor) for _ in range(get_world_size())]
        dist.all_gather(gathered, tensor.contiguous())
        return torch.cat(gathered)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = get_rank() * ctx.rows
        return grad[start:start + ctx.rows]


class _AllReduceWithGrad(torch.autograd.Function):
    """Sum over ranks whose backward is again a sum over ranks (each rank's input feeds every rank's loss)."""

    @staticmethod
    def forward(ctx, tensor):
        tensor = tensor.clone()
        dist.all_reduce(tensor)
        return tensor

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad


def all_gather_with_grad(tensor):
    """``tensor`` (N, ...) of every rank concatenated in rank order, differentiable; N must be equal on all
    ranks. With DDP's gradient averaging, a loss over the gathered batch then trains as in one process."""
    if get_world_size() == 1:
        return tensor
    return _AllGatherWithGrad.apply(tensor)


def all_reduce_with_grad(tensor):
    """Differentiable sum of ``tensor`` over ranks (identity in a single process)."""
    if get_world_size() == 1:
        return tensor
    return _AllReduceWithGrad.apply(tensor)


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model

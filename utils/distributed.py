"""Distributed helpers: process group from the torchrun environment, rank queries, gathers.

All functions are no-ops (or return single-process answers) when not running under torchrun.
"""
import datetime
import os

import torch
import torch.distributed as dist

_TIMEOUT = datetime.timedelta(minutes=10)  # set by init_distributed from DIST.TIMEOUT_MINUTES


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
    dist.init_process_group(backend=backend, init_method="env://", timeout=_TIMEOUT)


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


def broadcast_object(obj, src=0):
    """``obj`` from rank ``src`` on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]

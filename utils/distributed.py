"""Distributed helpers: process group from the torchrun environment, rank queries, gathers.

All functions are no-ops (or return single-process answers) when not running under torchrun.
"""
import datetime
import os

import torch
import torch.distributed as dist


def launched_by_torchrun():
    """True when the torchrun environment asks for more than one process."""
    return int(os.environ.get("WORLD_SIZE", 1)) > 1


def init_distributed(device):
    """Start the process group (NCCL on CUDA, gloo on CPU) if torchrun launched several processes."""
    if not launched_by_torchrun() or is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, init_method="env://", timeout=datetime.timedelta(minutes=30))


def is_initialized():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_initialized() else 0


def get_world_size():
    return dist.get_world_size() if is_initialized() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_initialized():
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

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

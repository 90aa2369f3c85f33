"""Pieces shared by the training and inference loops: precision, batch transfer, model unwrapping."""
import contextlib
import sys

import torch


def autocast(cfg, device):
    """Autocast context for ``SOLVER.AMP``: fp16 or bf16 on CUDA; bf16 only on CPU (fp16 runs in fp32)."""
    dtype = torch.bfloat16 if cfg.SOLVER.AMP_DTYPE == "bfloat16" else torch.float16
    enabled = bool(cfg.SOLVER.AMP) and (device.type == "cuda" or dtype == torch.bfloat16)
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_grad_scaler(cfg, device):
    """Gradient scaler, active only for fp16 autocast on CUDA."""
    enabled = bool(cfg.SOLVER.AMP) and device.type == "cuda" and cfg.SOLVER.AMP_DTYPE == "float16"
    return torch.amp.GradScaler(device.type, enabled=enabled)


def unwrap(model):
    """The model inside a DistributedDataParallel wrapper (or the model itself)."""
    return model.module if hasattr(model, "module") else model


def to_device(batch, device):
    """Move every tensor of a batch dict to ``device`` (non-blocking when pinned)."""
    return {key: value.to(device, non_blocking=True) if torch.is_tensor(value) else value
            for key, value in batch.items()}


def show_progress(rank):
    """tqdm bars only on rank 0 and only when stderr is a terminal."""
    return rank == 0 and sys.stderr.isatty()

"""Mixed precision from the config: the autocast context and the gradient scaler of SOLVER.AMP."""
import contextlib

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

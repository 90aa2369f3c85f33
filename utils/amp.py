"""Mixed precision from the config: which precision a run uses on its device, its autocast context and the
gradient scaler.

On CUDA ``SOLVER.AMP`` autocasts to ``SOLVER.AMP_DTYPE`` (fp16 with a gradient scaler, the authors' setting,
or bf16). On the CPU ``SOLVER.CPU_AMP`` decides: ``float32`` (no autocast, the authors' numerics), ``auto`` (bf16 where
the CPU multiplies bf16 matrices natively, fp32 elsewhere), ``bfloat16`` or ``float16`` (forced; fp16 runs
with the gradient scaler, the CPU twin of the CUDA default). Test features use the training precision with
``TEST.AMP`` and fp32 without it.
"""
import contextlib
import functools
from dataclasses import dataclass

import torch

# /proc/cpuinfo flags of x86 matrix units that multiply bf16 natively (oneDNN uses them for bf16 GEMMs).
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Precision:
    """The precision of a run's training or test forward on its device: ``dtype`` is the autocast dtype
    (None: fp32, no autocast), ``scaler`` whether gradients are scaled (fp16), ``reason`` one sentence on why."""

    dtype: torch.dtype = None
    scaler: bool = False
    reason: str = ""

    @property
    def name(self):
        """"fp32", "bf16" or "fp16"."""
        return NAMES[self.dtype]

    def describe(self):
        """``name`` with its reason, for the log."""
        mode = "fp32" if self.dtype is None else f"{self.name} autocast" + (" with a gradient scaler" if self.scaler else "")
        return f"{mode} ({self.reason})" if self.reason else mode


@functools.cache
def native_bf16_units():
    """The CPU's native bf16 matrix units (``("amx_bf16", ...)``), empty when it has none or it cannot tell."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as stream:
            for line in stream:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return tuple(flag for flag in NATIVE_BF16_FLAGS if flag in flags)
    except OSError:
        pass
    checks = {"amx_bf16": "_is_amx_tile_supported", "avx512_bf16": "_is_avx512_bf16_supported"}
    return tuple(flag for flag, check in checks.items() if getattr(torch.cpu, check, lambda: False)())


def cpu_precision(cfg):
    """The training precision on the CPU (see the module docstring)."""
    choice = cfg.SOLVER.CPU_AMP
    if not cfg.SOLVER.AMP:
        return Precision(reason="SOLVER.AMP False")
    if choice == "bfloat16":
        return Precision(torch.bfloat16, reason="SOLVER.CPU_AMP bfloat16")
    if choice == "float16":
        return Precision(torch.float16, scaler=True, reason="SOLVER.CPU_AMP float16: the CUDA default's CPU twin")
    if choice == "auto":
        units = native_bf16_units()
        if units:
            return Precision(torch.bfloat16, reason=f"SOLVER.CPU_AMP auto: the CPU has {'/'.join(units)}")
        return Precision(reason="SOLVER.CPU_AMP auto: this CPU has no native bf16 matrix units (AMX-BF16 or "
                                "AVX512-BF16), where bf16 runs slower than fp32; SOLVER.CPU_AMP bfloat16 forces it")
    if cfg.SOLVER.AMP_DTYPE == "bfloat16":
        return Precision(torch.bfloat16, reason="SOLVER.AMP_DTYPE bfloat16 autocasts on every device")
    return Precision(reason="SOLVER.CPU_AMP float32")


def training_precision(cfg, device):
    """The :class:`Precision` of training forwards on ``device``."""
    if device.type != "cuda":
        return cpu_precision(cfg)
    if not cfg.SOLVER.AMP:
        return Precision(reason="SOLVER.AMP False")
    if cfg.SOLVER.AMP_DTYPE == "bfloat16":
        return Precision(torch.bfloat16, reason="SOLVER.AMP_DTYPE bfloat16")
    return Precision(torch.float16, scaler=True, reason="SOLVER.AMP_DTYPE float16")


def test_precision(cfg, device):
    """The :class:`Precision` of test features: the training precision with ``TEST.AMP``, fp32 without."""
    if not cfg.TEST.AMP:
        return Precision(reason="TEST.AMP False")
    precision = training_precision(cfg, device)
    return Precision(precision.dtype, reason=f"TEST.AMP True; {precision.reason}")


def precision_context(precision, device):
    """The autocast context of ``precision`` on ``device`` (a null context for fp32)."""
    if precision.dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=precision.dtype)


def autocast(cfg, device):
    """Autocast context of training forwards (``training_precision``)."""
    return precision_context(training_precision(cfg, device), device)


def fp32_loss(cfg, device):
    """Whether loss terms are computed in fp32 outside autocast: under bf16, whose 8-bit mantissa cannot hold
    log-softmax sums or squared-distance differences. fp16 autocast computes them as the authors' CUDA code
    did (CUDA's autocast already runs log-softmax in fp32 there)."""
    return training_precision(cfg, device).dtype == torch.bfloat16


def make_grad_scaler(cfg, device):
    """Gradient scaler, active for fp16 autocast (CUDA's default, or SOLVER.CPU_AMP float16 on the CPU)."""
    return torch.amp.GradScaler(device.type, init_scale=float(cfg.SOLVER.AMP_INIT_SCALE),
                                enabled=training_precision(cfg, device).scaler)


def precision_settings(cfg, device):
    """``{"training": ..., "test_features": ...}`` precision names, for results.json and the log."""
    return {"training": training_precision(cfg, device).name, "test_features": test_precision(cfg, device).name}


__all__ = ["Precision", "autocast", "cpu_precision", "fp32_loss", "make_grad_scaler", "native_bf16_units",
           "precision_context", "precision_settings", "test_precision", "training_precision"]


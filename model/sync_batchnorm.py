"""Batch normalisation over the global batch of all processes, on any device and backend.

``torch.nn.SyncBatchNorm`` synchronises only CUDA (and a few other accelerator) tensors; this module
does the same for 2-D BNNeck features on the CPU with gloo, so that a DDP run normalises like a single
process holding the whole batch. ``convert_sync_batchnorm`` picks the right one per device.
"""
import torch
from torch import nn

from utils.distributed import all_reduce_with_grad, get_world_size


class GlobalBatchNorm1d(nn.BatchNorm1d):
    """``nn.BatchNorm1d`` whose training statistics (mean, biased variance for normalising, unbiased for the
    running estimate) are those of the concatenated batch of every rank; gradients flow across ranks."""

    def forward(self, x):
        if not self.training or get_world_size() == 1:
            return super().forward(x)
        count = torch.tensor([float(x.shape[0])], device=x.device, dtype=x.dtype)
        stats = all_reduce_with_grad(torch.cat([x.sum(0), x.pow(2).sum(0), count]))  # (2C + 1,)
        channels = x.shape[1]
        total = stats[-1]
        mean = stats[:channels] / total
        var = stats[channels:2 * channels] / total - mean.pow(2)
        with torch.no_grad():
            momentum = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked + 1)
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - momentum).add_(momentum * mean.detach())
            self.running_var.mul_(1 - momentum).add_(momentum * var.detach() * total / (total - 1))
        out = (x - mean) / torch.sqrt(var + self.eps)
        return out * self.weight + self.bias if self.affine else out


def convert_sync_batchnorm(module, device):
    """Copy of ``module`` with every ``BatchNorm1d`` replaced by a cross-process one: ``nn.SyncBatchNorm`` on
    CUDA, ``GlobalBatchNorm1d`` elsewhere. Parameters, buffers and ``requires_grad`` flags are kept."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    converted = module
    if isinstance(module, nn.BatchNorm1d) and not isinstance(module, GlobalBatchNorm1d):
        converted = GlobalBatchNorm1d(module.num_features, module.eps, module.momentum, module.affine,
                                      module.track_running_stats)
        converted.load_state_dict(module.state_dict())
        if module.affine:
            converted.weight.requires_grad_(module.weight.requires_grad)
            converted.bias.requires_grad_(module.bias.requires_grad)
        converted.train(module.training)
    for name, child in module.named_children():
        converted.add_module(name, convert_sync_batchnorm(child, device))
    return converted

"""Learned per-patch weighting of the patch tokens into one local feature."""
import torch
from torch import nn


class LocalPatchWeighting(nn.Module):
    """``forward(patches (B, N, C)) -> (B, C)``: mean over patches of ``patches * tanh(weight)``.

    ``weight`` (N, C) is initialised N(0, 1); N is the backbone's real patch count.
    """

    def __init__(self, num_patches, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(num_patches, dim))

    def forward(self, patches):
        return (patches * torch.tanh(self.weight)).mean(dim=1)

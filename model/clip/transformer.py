"""Pre-norm transformer blocks of CLIP (OpenAI parameter names) on batch-first tensors with fused attention."""
from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the GELU approximation CLIP was trained with."""

    def forward(self, x):
        return x * (1.702 * x).sigmoid_()  # in place on a temporary: one large allocation fewer


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout, run by
    ``scaled_dot_product_attention``.

    ``fused_attn = False`` (timm's switch of the same name) writes the attention out instead and passes its
    probabilities (B, H, L, L) through ``attn_probs``, an identity where hooks read them and their gradients
    (relevance maps, ``evaluation.relevance``); the default fused path is untouched.
    """

    fused_attn = True

    def __init__(self, width, heads, causal=False):
        super().__init__()
        if width % heads:
            raise ValueError(f"attention width {width} is not divisible by {heads} heads")
        self.heads = heads
        self.causal = causal
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.attn_probs = nn.Identity()
        self.reset_parameters()

    def reset_parameters(self):
        """``nn.MultiheadAttention``'s default init: Xavier-uniform input projection, zero biases."""
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x):
        batch, length, width = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        qkv = qkv.view(batch, length, 3, self.heads, width // self.heads).permute(2, 0, 3, 1, 4)  # (3, B, H, L, Dh)
        if self.fused_attn:
            x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], is_causal=self.causal)  # (B, H, L, Dh)
        else:
            x = self.attn_probs(self._probabilities(qkv[0], qkv[1])) @ qkv[2]  # (B, H, L, Dh)
        x = x.transpose(1, 2).reshape(batch, length, width)  # (B, L, C)
        return self.out_proj(x)

    def _probabilities(self, q, k):
        """The softmax attention (B, H, L, L) that ``scaled_dot_product_attention`` computes fused."""
        scores = q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5
        if self.causal:
            length = scores.shape[-1]
            future = torch.ones(length, length, dtype=torch.bool, device=scores.device).triu(1)
            scores = scores.masked_fill(future, float("-inf"))
        return scores.softmax(dim=-1)


class ResidualAttentionBlock(nn.Module):
    """x + attn(ln_1(x)), then x + mlp(ln_2(x)); MLP width 4x with QuickGELU."""

    def __init__(self, width, heads, causal=False):
        super().__init__()
        self.ln_1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal=causal)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)),
            ("gelu", QuickGELU()),
            ("c_proj", nn.Linear(width * 4, width)),
        ]))

    def forward(self, x):
        # Out-of-place sums: under autocast the residual stream stays in the wider dtype.
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks on (B, L, C) tensors; ``causal`` gives text-style masking."""

    def __init__(self, width, layers, heads, causal=False):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])

    def forward(self, x, start=0, stop=None):
        """Run blocks ``start`` .. ``stop - 1`` (all by default)."""
        for block in self.resblocks[start:stop]:
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return x

"""Attention building blocks shared by the SVPR components."""
import math

import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn


def init_linear_trunc_normal(module):
    """SVPR's initialisation: Linear weights trunc-normal std 0.02 with zero bias; LayerNorm 1 / 0."""
    if isinstance(module, nn.Linear):
        trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


def _check_heads(dim, num_heads):
    if dim % num_heads:
        raise ValueError(f"attention width {dim} is not divisible by {num_heads} heads")


class CrossAttention(nn.Module):
    """Multi-head attention of queries over separate keys/values (q/k/v without bias, output with bias).

    ``forward(query (B, Nq, C), key (B, Nk, C), value=None) -> (B, Nq, C)``; ``value`` defaults to ``key``.
    """

    def __init__(self, dim, num_heads=8):
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def _split(self, x):
        batch, length, dim = x.shape
        return x.view(batch, length, self.num_heads, dim // self.num_heads).transpose(1, 2)  # (B, h, N, d)

    def forward(self, query, key, value=None):
        value = key if value is None else value
        out = F.scaled_dot_product_attention(self._split(self.q(query)), self._split(self.k(key)),
                                             self._split(self.v(value)))
        out = out.transpose(1, 2).reshape(query.shape)  # (B, Nq, C)
        return self.proj(out)


class SingleKeyAttention(nn.Module):
    """Attention whose key/value sequence has exactly one token, computed as what it is.

    With one key the softmax weight is 1 for every query and head, so multi-head attention reduces to
    ``out_proj(v_proj(key))`` for every query: the query and key projections cannot influence the result
    (and would receive no useful gradient), so they are not built. ``forward(key (B, 1, C) or (B, C))``
    returns the attended value with the key's shape; callers broadcast it over their queries.
    """

    def __init__(self, dim, bias=False):
        super().__init__()
        self.v = nn.Linear(dim, dim, bias=bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, key):
        return self.proj(self.v(key))


class TopKScorer(nn.Module):
    """Ranks keys by their head-averaged attention probability from one query and keeps the top fraction.

    ``forward(query (B, 1, C), keys (B, N, C)) -> indices (B, k)`` in descending score order with
    ``k = max(1, int(N * ratio))``. The scores only rank, so the projections get no gradient (they are
    frozen at their initial values, exactly what happens to them when trained).
    """

    def __init__(self, dim, num_heads=8, ratio=0.5):
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.ratio = ratio
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.requires_grad_(False)

    def num_kept(self, num_keys):
        return max(1, int(num_keys * self.ratio))

    @torch.no_grad()
    def forward(self, query, keys):
        batch, num_keys, dim = keys.shape
        head_dim = dim // self.num_heads
        q = self.q(query).view(batch, 1, self.num_heads, head_dim).transpose(1, 2)  # (B, h, 1, d)
        k = self.k(keys).view(batch, num_keys, self.num_heads, head_dim).transpose(1, 2)  # (B, h, N, d)
        scores = (q @ k.transpose(-2, -1) / math.sqrt(head_dim)).softmax(dim=-1).mean(dim=1)  # (B, 1, N)
        return scores[:, 0].topk(self.num_kept(num_keys), dim=-1).indices

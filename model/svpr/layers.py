"""Attention building blocks shared by the SVPR components."""
import torch
from timm.layers import trunc_normal_
from torch import nn

from model.kernels import attention, fp32_under_bf16
from model.mlp import Mlp


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


def unused_norm(dim):
    """A LayerNorm the reference builds but never applies, kept (frozen) so that the parameter count and the
    state dict match the reference's (docs/reference_differences.md); it gets no gradient either way."""
    norm = nn.LayerNorm(dim)
    norm.requires_grad_(False)
    return norm


def _split_heads(x, num_heads):
    batch, length, dim = x.shape
    return x.view(batch, length, num_heads, dim // num_heads).transpose(1, 2)  # (B, h, N, d)


def _as_sequence(x):
    return x[:, None] if x.dim() == 2 else x


class CrossAttention(nn.Module):
    """Multi-head attention of queries over separate keys/values (q/k/v without bias, output with bias).

    ``forward(query (B, Nq, C) or (B, C), key (B', Nk, C) or (B', C), value=None) -> (B, Nq, C)``; 2-D
    inputs are length-1 sequences, ``value`` defaults to ``key``. ``key`` may have a batch of 1 or B.
    ``unused`` adds the reference's never-applied LayerNorm (see ``unused_norm``).
    """

    def __init__(self, dim, num_heads=8, unused=False):
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)
        self.unused_norm = unused_norm(dim) if unused else None

    def forward(self, query, key, value=None):
        query, key = _as_sequence(query), _as_sequence(key)
        value = key if value is None else _as_sequence(value)
        q = _split_heads(self.q(query), self.num_heads)
        k = _split_heads(self.k(key), self.num_heads)
        v = _split_heads(self.v(value), self.num_heads)
        out = attention(q, k, v)  # (B, h, Nq, d)
        return self.proj(out.transpose(1, 2).reshape(query.shape))  # (B, Nq, C)


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused bias-free q/k/v projection and a biased output projection.

    ``forward(x (B, N, C)) -> (B, N, C)``.
    """

    def __init__(self, dim, num_heads=8):
        super().__init__()
        _check_heads(dim, num_heads)
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = (_split_heads(part, self.num_heads) for part in self.qkv(x).chunk(3, dim=-1))
        out = attention(q, k, v)  # (B, h, N, d)
        return self.proj(out.transpose(1, 2).reshape(x.shape))


class SingleKeyAttention(nn.Module):
    """Attention whose key/value sequence has exactly one token, computed as what it is.

    With one key the softmax weight is 1 for every query and head, so multi-head attention reduces to
    ``out_proj(v_proj(key))`` for every query: the query and key projections cannot influence the result,
    so they are not built (MODEL.FIXES.DROP_UNUSED_PARAMETERS). ``forward(query, key=None)`` returns the
    attended value with the key's shape (``key`` defaults to ``query``: self-attention of one token);
    callers broadcast it over their queries.
    """

    def __init__(self, dim, bias=False):
        super().__init__()
        self.v = nn.Linear(dim, dim, bias=bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, query, key=None):
        return self.proj(self.v(query if key is None else key))


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
        head_dim = keys.shape[-1] // self.num_heads
        # A ranking is a discrete decision: bf16 rounding would swap near-tied tokens (model.kernels).
        with fp32_under_bf16(keys.device.type):
            q = _split_heads(self.q(query.float()), self.num_heads)  # (B, h, 1, d)
            k = _split_heads(self.k(keys.float()), self.num_heads)  # (B, h, N, d)
        scores = ((q @ k.transpose(-2, -1)) * head_dim ** -0.5).softmax(dim=-1).mean(dim=1)  # (B, 1, N)
        return scores[:, 0].topk(self.num_kept(keys.shape[1]), dim=-1).indices


def mlp(in_dim, hidden_dim, out_dim=None, drop=0.0, unused=False):
    """Linear -> GELU -> dropout -> Linear -> dropout (timm's ``Mlp``, ``model.mlp.Mlp``); ``unused`` adds the reference MLP's
    never-applied input LayerNorm as ``unused_norm`` (see ``unused_norm``)."""
    module = Mlp(in_dim, hidden_features=hidden_dim, out_features=out_dim, act_layer=nn.GELU, drop=drop)
    if unused:
        module.unused_norm = unused_norm(in_dim)
    return module

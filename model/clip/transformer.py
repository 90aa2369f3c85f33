"""Pre-norm transformer blocks of CLIP (OpenAI parameter names) on batch-first tensors with fused attention."""
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.kernels import attention, linear, quick_gelu, quick_gelu_mlp


class QuickGELU(nn.Module):
    """x * sigmoid(1.702 x), the GELU approximation CLIP was trained with (``model.kernels.quick_gelu``)."""

    def forward(self, x):
        return quick_gelu(x)


class QuickGELUMLP(nn.Module):
    """CLIP's MLP: ``c_proj(quick_gelu(c_fc(x)))``, run by ``model.kernels.quick_gelu_mlp`` (which folds the
    activation's scale into the weights when training in bf16)."""

    def __init__(self, width, hidden):
        super().__init__()
        self.c_fc = nn.Linear(width, hidden)
        self.c_proj = nn.Linear(hidden, width)

    def forward(self, x):
        return quick_gelu_mlp(x, self.c_fc, self.c_proj)


class SelfAttention(nn.Module):
    """Multi-head self-attention with ``nn.MultiheadAttention``'s parameter layout, run by
    ``model.kernels.attention`` (fused attention, or its fastest form under bf16).

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

    def forward(self, x, num_queries=None):
        """(B, L, C) -> (B, L, C); with ``num_queries`` only the first that many positions attend (over all L
        positions) and the output is (B, num_queries, C): the same values as the first rows of the full
        output, without the queries nobody reads."""
        batch, length, width = x.shape
        head_dim = width // self.heads
        # q, k, v are strided views of the projection's (B, L, 3, H, Dh) layout: the backward of ``unbind``
        # writes their gradients straight back into that layout (indexing a permuted copy would allocate,
        # zero and sum a full-size gradient for each of the three).
        if not self.fused_attn or num_queries is None or num_queries >= length:
            qkv = linear(x, self.in_proj_weight, self.in_proj_bias).view(batch, length, 3, self.heads, head_dim)
            q, k, v = (part.transpose(1, 2) for part in qkv.unbind(2))  # (B, H, L, Dh) each
            if self.fused_attn:
                x = attention(q, k, v, is_causal=self.causal)  # (B, H, L, Dh)
            else:  # every query: the probabilities' hooks see the whole (B, H, L, L) map
                x = self.attn_probs(self._probabilities(q, k)) @ v  # (B, H, L, Dh)
            x = x.transpose(1, 2).reshape(batch, length, width)[:, :num_queries]  # (B, L or n, C)
            return linear(x, self.out_proj.weight, self.out_proj.bias)
        if self.causal:
            raise ValueError("num_queries is for bidirectional attention (the image tower)")
        q = linear(x[:, :num_queries], self.in_proj_weight[:width], self.in_proj_bias[:width])
        kv = linear(x, self.in_proj_weight[width:], self.in_proj_bias[width:])
        q = q.view(batch, num_queries, self.heads, head_dim).transpose(1, 2)  # (B, H, n, Dh)
        k, v = (part.transpose(1, 2) for part in kv.view(batch, length, 2, self.heads, head_dim).unbind(2))
        x = attention(q, k, v)  # (B, H, n, Dh)
        return linear(x.transpose(1, 2).reshape(batch, num_queries, width), self.out_proj.weight, self.out_proj.bias)  # (B, n, C)

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
        self.mlp = QuickGELUMLP(width, width * 4)

    def forward(self, x, num_queries=None):
        """(B, L, C) -> (B, L, C), or the first ``num_queries`` positions only (B, n, C) (see
        ``SelfAttention.forward``); all positions with the written-out attention (``fused_attn`` False)."""
        # Out-of-place sums: under autocast the residual stream stays in the wider dtype.
        if not self.attn.fused_attn:
            num_queries = None  # written-out attention (relevance maps) runs, and returns, every token
        residual = x if num_queries is None else x[:, :num_queries]
        x = residual + self.attn(self.ln_1(x), num_queries)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    """A stack of residual attention blocks on (B, L, C) tensors; ``causal`` gives text-style masking."""

    def __init__(self, width, layers, heads, causal=False):
        super().__init__()
        self.width = width
        self.layers = layers
        self.grad_checkpointing = False
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, causal) for _ in range(layers)])

    def forward(self, x, start=0, stop=None, num_queries=None):
        """Run blocks ``start`` .. ``stop - 1`` (all by default); ``num_queries``: the last of them computes
        only the first that many positions (see ``SelfAttention.forward``)."""
        blocks = self.resblocks[start:stop]
        for index, block in enumerate(blocks):
            queries = num_queries if index == len(blocks) - 1 else None
            if self.grad_checkpointing and torch.is_grad_enabled():
                x = checkpoint(block, x, queries, use_reentrant=False)
            else:
                x = block(x, queries)
        return x

"""SeCap's prompt modules (Wang et al., CVPR 2025): PRM (prompt re-calibration) and LFRM (a SAM-style
two-way transformer refining the prompts against the local tokens). LayerNorms use eps 1e-5, as the authors'."""
from torch import nn

from model.kernels import attention
from model.mlp import Mlp
from model.vit.attention import Attention


class CrossAttention(nn.Module):
    """Multi-head attention of queries ``q`` over keys ``k`` / values ``v`` (B, N, C) with bias-free q/k/v
    projections to ``dim / downsample`` and an output projection back to ``dim``."""

    def __init__(self, dim, num_heads, downsample=1):
        super().__init__()
        hidden = dim // downsample
        self.num_heads = num_heads
        self.q = nn.Linear(dim, hidden, bias=False)
        self.k = nn.Linear(dim, hidden, bias=False)
        self.v = nn.Linear(dim, hidden, bias=False)
        self.proj = nn.Linear(hidden, dim)

    def _heads(self, x):
        batch, length, width = x.shape
        return x.view(batch, length, self.num_heads, width // self.num_heads).transpose(1, 2)  # (B, H, N, d)

    def forward(self, q, k, v):
        batch, length = q.shape[:2]
        out = attention(self._heads(self.q(q)), self._heads(self.k(k)), self._heads(self.v(v)))  # (B, H, Nq, d)
        return self.proj(out.transpose(1, 2).reshape(batch, length, -1))  # (B, Nq, C)


class PromptRecalibration(nn.Module):
    """PRM: prompts (B, P, C) attend to the view-invariant feature (B, C), then self-attention and an MLP,
    each followed by a residual LayerNorm.

    With a single key the attention weights are exactly 1, so the cross-attention is ``proj(W_v inv)``
    added to every prompt; its query and key projections (which get no gradient in the authors' code)
    are therefore not built.
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.cross_value = nn.Linear(dim, dim, bias=False)
        self.cross_proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, prompts, invariant):
        prompts = self.norm1(prompts + self.cross_proj(self.cross_value(invariant)).unsqueeze(1))
        prompts = self.norm2(prompts + self.attn(prompts))
        return self.norm3(prompts + self.mlp(prompts))


class TwoWayBlock(nn.Module):
    """One LFRM layer: query self-attention, queries -> tokens, MLP, tokens -> queries (SAM's two-way block).

    The first layer's self-attention has no residual and no positional term (``first``).
    """

    def __init__(self, dim, num_heads, mlp_ratio=4.0, downsample=2, first=False):
        super().__init__()
        self.first = first
        self.self_attn = CrossAttention(dim, num_heads, downsample)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn_token_to_image = CrossAttention(dim, num_heads, downsample)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm3 = nn.LayerNorm(dim)
        self.norm4 = nn.LayerNorm(dim)
        self.cross_attn_image_to_token = CrossAttention(dim, num_heads, downsample)

    def forward(self, queries, keys, query_pe, key_pe):
        if self.first:
            queries = self.norm1(self.self_attn(queries, queries, queries))
        else:
            q = queries + query_pe
            queries = self.norm1(queries + self.self_attn(q, q, queries))
        queries = self.norm2(queries + self.cross_attn_token_to_image(queries + query_pe, keys + key_pe, keys))
        queries = self.norm3(queries + self.mlp(queries))
        keys = self.norm4(keys + self.cross_attn_image_to_token(keys + key_pe, queries + query_pe, queries))
        return queries, keys


class FinalTokenAttention(nn.Module):
    """LFRM's last step: queries attend to the tokens (values = keys, positional term included, as the
    authors'), then self-attention and an MLP, each with a residual LayerNorm."""

    def __init__(self, dim, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads=num_heads, qkv_bias=False)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, q, k):
        x = self.norm1(q + self.cross_attn(q, k, k))
        x = self.norm2(x + self.attn(x))
        return self.norm3(x + self.mlp(x))


class LocalFeatureRefinement(nn.Module):
    """LFRM: ``depth`` two-way layers and a final attention of the prompts (B, 1 + P, C) over the local
    tokens (B, N, C) with their positional embedding; returns the refined prompts (B, 1 + P, C)."""

    def __init__(self, dim, num_heads, depth=2, mlp_ratio=4.0):
        super().__init__()
        self.layers = nn.ModuleList(TwoWayBlock(dim, num_heads, mlp_ratio, first=i == 0) for i in range(depth))
        self.final_attn_token_to_image = FinalTokenAttention(dim, num_heads, mlp_ratio)
        self.norm_final_attn = nn.LayerNorm(dim)
        self.apply(_init_weights)

    def forward(self, tokens, token_pe, prompts):
        queries, keys = prompts, tokens
        for layer in self.layers:
            queries, keys = layer(queries, keys, prompts, token_pe)
        refined = self.final_attn_token_to_image(queries + prompts, keys + token_pe)
        return self.norm_final_attn(queries + refined)


def _init_weights(module):
    """The authors' LFRM initialisation: truncated-normal (std 0.02) linear weights, zero biases."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)

"""timm's multi-head self-attention with its fused path run by ``model.kernels.attention``."""
from timm.layers import Attention as TimmAttention

from model.kernels import attention, linear


class Attention(TimmAttention):
    """``timm.layers.Attention`` (same parameters and outputs) whose fused path goes through
    ``model.kernels.attention``, the fastest form of the same attention under bf16 training on a CPU, and its
    projections through ``model.kernels.linear`` (bias fused into the product at bf16 inference on a CPU);
    ``fused_attn = False`` keeps timm's written-out attention (relevance maps hook its probabilities)."""

    def forward(self, x, attn_mask=None, is_causal=False):
        if not self.fused_attn or attn_mask is not None or self.gate is not None:
            return super().forward(x, attn_mask=attn_mask, is_causal=is_causal)
        batch, length, _ = x.shape
        qkv = linear(x, self.qkv.weight, self.qkv.bias).reshape(batch, length, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, L, d) each
        x = attention(self.q_norm(q), self.k_norm(k), v, is_causal=is_causal,
                      dropout_p=self.attn_drop.p if self.training else 0.0)
        x = self.norm(x.transpose(1, 2).reshape(batch, length, self.attn_dim))  # (B, L, C)
        return self.proj_drop(linear(x, self.proj.weight, self.proj.bias))

"""Attribute-Scattered Mixture of Experts (ASMOE, docs/method.md)."""
import torch
import torch.nn.functional as F
from timm.layers import trunc_normal_
from torch import nn

from model.clip.transformer import QuickGELU
from model.heads import BNNeckHead
from model.kernels import QUICK_GELU_SCALE, autocast_dtype, folds_quick_gelu, fp32_under_bf16
from model.svpr.layers import CrossAttention, init_linear_trunc_normal, mlp


class MixtureOfExperts(nn.Module):
    """Soft top-k mixture of expert MLPs, every expert evaluated in one batched call.

    Expert e: Linear(C, 4C) -> QuickGELU -> Linear(4C, C) -> QuickGELU -> LayerNorm(eps 1e-6). Gate:
    softmax over the experts, keep the ``top_k`` largest weights without renormalising them, output
    ``sum_e w_e * expert_e(x)``. ``forward(x (N, C)) -> (N, C)``. The expert weights are stacked
    (E, ...) so that all experts run as one matrix product per layer instead of a loop.
    """

    def __init__(self, dim, num_experts=4, top_k=3, hidden_ratio=4):
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"expert top-k {top_k} must be between 1 and the number of experts {num_experts}")
        hidden = hidden_ratio * dim
        self.top_k = top_k
        self.gate = nn.Linear(dim, num_experts)
        self.fc1_weight = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.fc1_bias = nn.Parameter(torch.zeros(num_experts, 1, hidden))
        self.fc2_weight = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.fc2_bias = nn.Parameter(torch.zeros(num_experts, 1, dim))
        self.norm_weight = nn.Parameter(torch.ones(num_experts, 1, dim))
        self.norm_bias = nn.Parameter(torch.zeros(num_experts, 1, dim))
        self.act = QuickGELU()
        # SVPR initialises every expert Linear trunc-normal std 0.02 with zero bias (docs/reference_differences.md).
        trunc_normal_(self.fc1_weight, std=0.02)
        trunc_normal_(self.fc2_weight, std=0.02)
        init_linear_trunc_normal(self.gate)

    def experts(self, x):
        """Every expert's output (E, N, C) for inputs ``x`` (N, C)."""
        # bmm over the inputs broadcast to (E, N, C): ``torch.matmul`` of a 2-D by a 3-D tensor would copy the
        # transposed expert weights on every call (same products either way).
        # The per-expert biases and norm parameters join in the products' dtype: under bf16 autocast an fp32
        # parameter would promote every (E, N, 4C) activation to fp32 (identity casts in fp32).
        inputs = x.to(autocast_dtype(x)).expand(self.fc1_weight.shape[0], -1, -1)  # (E, N, C)
        if folds_quick_gelu(x):
            return self._folded_experts(inputs)
        hidden = torch.bmm(inputs, self.fc1_weight)
        hidden = self.act(hidden + self.fc1_bias.to(hidden.dtype))  # (E, N, 4C)
        out = torch.bmm(hidden, self.fc2_weight)
        out = self.act(out + self.fc2_bias.to(out.dtype))  # (E, N, C)
        out = F.layer_norm(out, out.shape[-1:], eps=1e-6)
        return out * self.norm_weight.to(out.dtype) + self.norm_bias.to(out.dtype)

    def _folded_experts(self, inputs):
        """``experts`` training under bf16: the QuickGELUs' 1.702 folded into the weights (``folds_quick_gelu``),
        so each (E, N, 4C) activation is written by two operations instead of five. The second activation
        comes out 1.702 times larger, which the layer norm absorbs with its eps scaled by 1.702^2."""
        dtype, scale = inputs.dtype, QUICK_GELU_SCALE
        hidden = F.silu(torch.baddbmm(self.fc1_bias.to(dtype) * scale, inputs, self.fc1_weight.to(dtype) * scale))
        out = F.silu(torch.baddbmm(self.fc2_bias.to(dtype) * scale, hidden, self.fc2_weight.to(dtype)))  # (E, N, C)
        out = F.layer_norm(out, out.shape[-1:], eps=1e-6 * scale ** 2)
        return out * self.norm_weight.to(out.dtype) + self.norm_bias.to(out.dtype)

    def gate_weights(self, x):
        """Top-k softmax gate weights (N, E), zero outside the top k, not renormalised."""
        # Which experts are kept is a discrete decision that bf16 rounding would flip for near ties.
        with fp32_under_bf16(x.device.type):
            probs = self.gate(x.float()).softmax(dim=-1)
        top = probs.topk(self.top_k, dim=-1)
        return torch.zeros_like(probs).scatter(-1, top.indices, top.values)

    def forward(self, x):
        return torch.einsum("ne,enc->nc", self.gate_weights(x), self.experts(x))


class AttributeScatterMoE(nn.Module):
    """ASMOE: one mixture-of-experts feature per attribute, routed into one attribute-aware feature.

    ``forward(f_inv (B, C), patches (B, N, C), text=None (B, C)) -> (f_asmoe (B, C), attr_logits)`` with
    ``attr_logits`` a list of (B, n_a) in attribute order. ``text`` (the T2I feature of the attribute
    caption) queries the patches; without it (no text) that term is left out of every attribute input.
    The attribute heads are keyed by attribute name, as in the reference. ``unused`` keeps the reference's
    never-applied LayerNorms (MODEL.FIXES.DROP_UNUSED_PARAMETERS off).
    """

    def __init__(self, dim, attributes, num_experts=4, expert_top_k=3, attr_top_k=0.7, num_heads=8,
                 unused=False):
        super().__init__()
        if not attributes:
            raise ValueError("AttributeScatterMoE needs at least one attribute")
        bad = [name for name, _ in attributes if "." in name or not name]
        if bad:
            raise ValueError(f"attribute names {bad} cannot name modules (empty or containing '.')")
        self.attribute_names = tuple(name for name, _ in attributes)
        self.num_kept = max(1, int(len(attributes) * attr_top_k))
        self.attribute_prompts = nn.Parameter(torch.randn(1, len(attributes), dim))
        self.cross_attention = CrossAttention(dim, num_heads, unused=unused)
        self.moe = MixtureOfExperts(dim, num_experts, expert_top_k)
        # The reference router: Linear(C, 1) -> GELU -> Linear(1, C), averaged over channels to one score.
        self.router = mlp(dim, 1, dim, unused=unused)
        self.heads = nn.ModuleDict({name: BNNeckHead(dim, num_classes) for name, num_classes in attributes})
        # The reference re-initialises the whole module, attribute classifiers included.
        self.apply(init_linear_trunc_normal)

    def forward(self, f_inv, patches, text=None):
        batch, dim = f_inv.shape
        inputs = self.attribute_prompts.expand(batch, -1, -1)  # (B, A, C)
        if text is not None:
            # The reference's order of additions: (attended patches + prompt) + f_inv.
            inputs = self.cross_attention(text, patches) + inputs  # (B, 1, C) broadcast over A
        inputs = inputs + f_inv[:, None]
        num_attributes = inputs.shape[1]
        expert_out = self.moe(inputs.reshape(batch * num_attributes, dim)).view(batch, num_attributes, dim)
        attr_logits = [self.heads[name](expert_out[:, a])[0] for a, name in enumerate(self.attribute_names)]
        with fp32_under_bf16(inputs.device.type):  # the kept attributes: a discrete decision
            scores = self.router(inputs.float()).mean(dim=-1)  # (B, A)
        top = scores.topk(self.num_kept, dim=-1)
        kept = expert_out.gather(1, top.indices[..., None].expand(-1, -1, dim))  # (B, k, C)
        f_asmoe = (top.values.softmax(dim=-1)[..., None] * kept).sum(dim=1)
        return f_asmoe, attr_logits

"""Prompted caption encoding with the (frozen or trainable) CLIP text tower, once per distinct caption."""
import torch
from torch import nn

from model.svpr.layers import mlp
from text.prompts import PROMPT_START


def encode_unique(encode, keys):
    """Apply ``encode`` (rows -> rows) to each distinct row of ``keys`` once and index the result.

    Same values and gradients as ``encode(keys)`` whenever ``encode`` treats rows independently: a row
    shared by several samples gets the sum of their gradients through the index, as it would per sample.
    """
    unique, inverse = torch.unique(keys, dim=0, return_inverse=True)
    return encode(unique)[inverse]


def trim_to_text(tokens, min_length=0):
    """Drop the padding columns after the last end-of-text token (at least ``min_length`` columns kept).

    Exact for every position up to the end-of-text token: the text transformer is causal, so no position
    attends to the padding after it.
    """
    return tokens[:, :max(int(tokens.argmax(dim=-1).max()) + 1, min_length)]


def inverse_net(text_dim, visual_dim, unused=False):
    """Text-to-image "inverse" network: MLP text_dim -> 4 text_dim -> visual_dim, GELU, dropout 0.1
    (``unused``: with the reference's never-applied LayerNorm)."""
    return mlp(text_dim, 4 * text_dim, visual_dim, drop=0.1, unused=unused)


class AttributeTextEncoder(nn.Module):
    """SVPR's attribute-caption branch: learnable prompts added to the caption's "X" tokens.

    ``forward(clip_model, text_tokens (B, L)) -> (B, C)``: CLIP text features of every position with the prompts added
    at positions 5 .. 5+n-1, pooled as EOT feature + mean of the prompt positions, then mapped to the
    visual width by the T2I inverse network. Each distinct caption is encoded once per batch.
    """

    def __init__(self, text_width, text_dim, visual_dim, num_prompts, unused=False):
        super().__init__()
        self.num_prompts = num_prompts
        self.text_prompt = (nn.Parameter(torch.randn(1, num_prompts, text_width) * text_width ** -0.5)
                            if num_prompts else None)
        self.inverse = inverse_net(text_dim, visual_dim, unused)

    def encode_captions(self, clip_model, text_tokens):
        """Per-caption pooled text feature (B, D) with the prompts added; no de-duplication."""
        end = PROMPT_START + self.num_prompts
        text_tokens = trim_to_text(text_tokens, end)
        embeds = clip_model.token_embedding(text_tokens)  # (B, L, W)
        if self.num_prompts:
            prompt = self.text_prompt.to(embeds.dtype)
            embeds = torch.cat([embeds[:, :PROMPT_START], embeds[:, PROMPT_START:end] + prompt, embeds[:, end:]],
                               dim=1)
        feats = clip_model.encode_text(text_tokens, token_embeds=embeds, return_all=True)  # (B, L, D)
        pooled = feats[torch.arange(feats.shape[0], device=feats.device), text_tokens.argmax(dim=-1)]
        if self.num_prompts:
            pooled = pooled + feats[:, PROMPT_START:end].mean(dim=1)
        return pooled

    def forward(self, clip_model, text_tokens):
        # The inverse network has dropout, so it runs per sample (after the index), as without de-duplication.
        pooled = encode_unique(lambda tokens: self.encode_captions(clip_model, tokens), text_tokens)
        return self.inverse(pooled)

"""CLIP with a vision transformer image tower, adapted for re-identification inputs.

The image tower accepts non-square inputs and overlapping patches (conv stride < patch size), adds an
optional side-information vector to every token, and can append extra tokens before its last block.
"""
from collections import namedtuple

import numpy as np
import torch
from torch import nn

from model.clip.transformer import Transformer
from model.kernels import patch_embedding
from utils.errors import ConfigError

VisualFeatures = namedtuple("VisualFeatures", ["penultimate", "tokens", "projected"])
VisualFeatures.__doc__ = """Image-tower outputs: ``penultimate`` (B, 1+N, C) after the second-to-last block,
``tokens`` (B, 1+N+P, C) after the last block and ``ln_post``, ``projected`` (B, 1+N+P, D) = ``tokens @ proj``."""


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(int(v) for v in value)


def patch_grid(image_size, patch_size, stride):
    """(rows, cols) of patches the patch convolution produces for ``image_size`` (H, W)."""
    (height, width), (stride_h, stride_w) = _pair(image_size), _pair(stride)
    if height < patch_size or width < patch_size:
        raise ConfigError(f"input size {height}x{width} is smaller than the patch size {patch_size}")
    return (height - patch_size) // stride_h + 1, (width - patch_size) // stride_w + 1


class VisionTransformer(nn.Module):
    """CLIP's ViT image encoder for a fixed input size (H, W) and patch stride (sh, sw)."""

    def __init__(self, image_size, patch_size, stride, width, layers, heads, output_dim):
        super().__init__()
        self.image_size = _pair(image_size)
        self.patch_size = patch_size
        self.stride = _pair(stride)
        self.width = width
        self.output_dim = output_dim
        self.grid_size = patch_grid(self.image_size, patch_size, self.stride)
        self.num_patches = self.grid_size[0] * self.grid_size[1]

        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=self.stride, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.num_patches + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def _embed(self, images, side_embed=None):
        if tuple(images.shape[-2:]) != self.image_size:
            raise ConfigError(f"images are {images.shape[-2]}x{images.shape[-1]} but the CLIP image encoder "
                              f"was built for {self.image_size[0]}x{self.image_size[1]} (INPUT.SIZE_TRAIN); "
                              f"test and train sizes must match")
        x = patch_embedding(images.to(self.conv1.weight.dtype), self.conv1.weight, stride=self.stride)  # (B, N, C)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        if side_embed is not None:  # the CLS token only, before its position, as CLIP-ReID and SVPR-ReID add it
            cls = cls + side_embed.to(x.dtype).unsqueeze(1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)  # (B, 1+N, C)
        return self.ln_pre(x)

    def forward(self, images):
        """Projected CLS embedding (B, D), as OpenAI's ``encode_image`` (the last block computes the CLS only)."""
        x = self.transformer(self._embed(images), num_queries=1)
        return self.ln_post(x[:, 0]) @ self.proj

    def forward_features(self, images, side_embed=None, extra_tokens=None, num_outputs=None):
        """All token features; see ``VisualFeatures``.

        ``side_embed`` (B, C) is added to the CLS token (with its positional embedding); ``extra_tokens``
        (B, P, C) are appended right before the last block, so only that block sees them. ``num_outputs``:
        the last block computes only the first that many tokens (1: the CLS), so ``tokens`` and
        ``projected`` have that many (all of them while the attention is written out for relevance maps);
        they attend over all tokens as before, so their values are the same.
        """
        penultimate = self.transformer(self._embed(images, side_embed), stop=-1)
        x = penultimate
        if extra_tokens is not None:
            x = torch.cat([x, extra_tokens.to(x.dtype)], dim=1)  # (B, 1+N+P, C)
        tokens = self.ln_post(self.transformer(x, start=len(self.transformer.resblocks) - 1,
                                               num_queries=num_outputs))
        return VisualFeatures(penultimate, tokens, tokens @ self.proj)


class CLIP(nn.Module):
    """CLIP image and text encoders with OpenAI's parameter names (OpenAI state dicts load strictly)."""

    def __init__(self, embed_dim, image_size, patch_size, stride, vision_width, vision_layers, vision_heads,
                 context_length, vocab_size, text_width, text_heads, text_layers):
        super().__init__()
        self.embed_dim = embed_dim
        self.context_length = context_length
        self.vocab_size = vocab_size
        self.text_width = text_width
        self.visual = VisionTransformer(image_size, patch_size, stride, vision_width, vision_layers,
                                        vision_heads, embed_dim)
        self.transformer = Transformer(text_width, text_layers, text_heads, causal=True)
        self.token_embedding = nn.Embedding(vocab_size, text_width)
        self.positional_embedding = nn.Parameter(torch.empty(context_length, text_width))
        self.ln_final = nn.LayerNorm(text_width)
        self.text_projection = nn.Parameter(torch.empty(text_width, embed_dim))
        self.logit_scale = nn.Parameter(torch.ones([]) * np.log(1 / 0.07))
        self.initialize_parameters()

    def initialize_parameters(self):
        """OpenAI's text-tower init (the image tower keeps its construction-time init, as in OpenAI's code)."""
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        width, layers = self.transformer.width, self.transformer.layers
        proj_std = width ** -0.5 * (2 * layers) ** -0.5
        for block in self.transformer.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=width ** -0.5)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.normal_(block.mlp.c_fc.weight, std=(2 * width) ** -0.5)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        nn.init.normal_(self.text_projection, std=width ** -0.5)

    def set_grad_checkpointing(self, enable=True):
        """Recompute block activations in the backward pass (both towers) to save memory."""
        self.visual.transformer.grad_checkpointing = enable
        self.transformer.grad_checkpointing = enable

    def encode_image(self, images):
        """Projected image embeddings (B, D)."""
        return self.visual(images)

    def encode_text(self, tokens, token_embeds=None, return_all=False):
        """Projected text features: the end-of-text position (B, D), or every position (B, L, D) with
        ``return_all``. ``token_embeds`` (B, L, W) replaces the token-embedding lookup of ``tokens``; the
        end-of-text position is always ``tokens.argmax(-1)``."""
        length = tokens.shape[1]
        if length > self.context_length:
            raise ValueError(f"text tokens have length {length} but the CLIP text encoder's context length "
                             f"is {self.context_length}")
        x = self.token_embedding(tokens) if token_embeds is None else token_embeds
        x = x + self.positional_embedding[:length].to(x.dtype)  # (B, L, W)
        x = self.ln_final(self.transformer(x))
        if return_all:
            return x @ self.text_projection
        return x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)] @ self.text_projection

    def forward(self, images, tokens):
        """Image-to-text and text-to-image logits of cosine similarities scaled by ``logit_scale``."""
        image_features = nn.functional.normalize(self.encode_image(images), dim=-1)
        text_features = nn.functional.normalize(self.encode_text(tokens), dim=-1)
        logits_per_image = self.logit_scale.exp() * image_features @ text_features.t()
        return logits_per_image, logits_per_image.t()


def build_clip(embed_dim, image_size=(224, 224), patch_size=16, stride=(16, 16), *, vision_width, vision_layers,
               vision_heads=None, context_length=77, vocab_size=49408, text_width, text_heads=None, text_layers):
    """A randomly initialised CLIP (OpenAI's init) of any size; heads default to width // 64."""
    return CLIP(embed_dim=embed_dim, image_size=image_size, patch_size=patch_size, stride=stride,
                vision_width=vision_width, vision_layers=vision_layers,
                vision_heads=vision_heads or max(1, vision_width // 64), context_length=context_length,
                vocab_size=vocab_size, text_width=text_width, text_heads=text_heads or max(1, text_width // 64),
                text_layers=text_layers)

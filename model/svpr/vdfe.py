"""View-Decoupled Feature Extractor (VDFE): view caption -> view token -> View Bidirectional Decoupling.

MODEL.FIXES.{VIEW_WORDS, VIEW_HEAD_CLASSES, DROP_UNUSED_PARAMETERS} switch the reference's behaviour
(docs/reference_differences.md).
"""
import math

import torch
from torch import nn

from text import prompts, tokenize
from model.heads import BNNeckHead
from model.svpr.layers import CrossAttention, SingleKeyAttention, init_linear_trunc_normal
from model.svpr.text import encode_unique, inverse_net, trim_to_text
from text.prompts import PROMPT_START
from utils.errors import ConfigError

# With MODEL.FIXES.VIEW_WORDS, one word per view id, by the dataset's number of views: CP2108 / CARGO /
# AG-ReID use 0 ground, 1 aerial; AG-ReID.v2 uses 0 CCTV, 1 wearable, 2 UAV. Each word is a single CLIP BPE
# token.
VIEW_WORDS = {
    2: ("ground", "aerial"),
    3: ("cctv", "wearable", "uav"),
}
# Without the fix, view id v takes token v + 1 of this text (after the start token), as the reference does:
# 0 "ground", 1 "aerial", 2 the end-of-text token (so AG-ReID.v2's wearable is "aerial", its UAV EOT).
REFERENCE_VIEW_TEXT = "ground aerial"
REFERENCE_MAX_VIEWS = 3
# The reference's view head always has this many classes (MODEL.FIXES.VIEW_HEAD_CLASSES sizes it by dataset).
REFERENCE_VIEW_CLASSES = 3


def view_words(num_views):
    """The view word of each view id for a dataset with ``num_views`` views (MODEL.FIXES.VIEW_WORDS)."""
    if num_views not in VIEW_WORDS:
        raise ConfigError(f"MODEL.SVPR.VDFE needs a dataset with {' or '.join(map(str, VIEW_WORDS))} views "
                          f"(got {num_views}); set MODEL.SVPR.VDFE False")
    return VIEW_WORDS[num_views]


def _caption_prefix_length(num_prompts, context_length):
    """Position of the view word in the view caption: tokens of "<SOT> A photo of a X..X person from"."""
    prefix = prompts.view_caption(num_prompts, "")[:-len(" view.")].rstrip()
    return int((tokenize(prefix, context_length=context_length, truncate=True) != 0).sum()) - 1  # no EOT


def _check_length(prefix_len, word_len, num_prompts, context_length):
    if prefix_len + word_len + 3 > context_length:
        raise ConfigError(f"MODEL.TEXT_LEN = {context_length} is too short for the view caption with "
                          f"MODEL.VIEW_PROMPT = {num_prompts} prompts")


def _view_captions(words, num_prompts, context_length):
    """Token ids of "A photo of a X..X person from <word> view." and the word's pooling weights, both (V, L').

    L' ends at the longest caption's end-of-text token (see ``trim_to_text``).
    """
    prefix_len = _caption_prefix_length(num_prompts, context_length)
    tokens, weights = [], []
    for word in words:
        word_len = int((tokenize(word, context_length=context_length) != 0).sum()) - 2  # no SOT / EOT
        _check_length(prefix_len, word_len, num_prompts, context_length)
        tokens.append(tokenize(prompts.view_caption(num_prompts, word), context_length=context_length)[0])
        weight = torch.zeros(context_length)
        weight[prefix_len:prefix_len + word_len] = 1.0 / word_len
        weights.append(weight)
    tokens = trim_to_text(torch.stack(tokens))  # (V, L') with L' the longest caption
    return tokens, torch.stack(weights)[:, :tokens.shape[1]]


def _reference_view_captions(num_views, num_prompts, context_length):
    """As ``_view_captions`` with the reference's view tokens (``REFERENCE_VIEW_TEXT``) in place of the word."""
    if num_views > REFERENCE_MAX_VIEWS:
        raise ConfigError(f"the reference's view words cover {REFERENCE_MAX_VIEWS} views, the dataset has "
                          f"{num_views}; set MODEL.FIXES.VIEW_WORDS True")
    prefix_len = _caption_prefix_length(num_prompts, context_length)
    _check_length(prefix_len, 1, num_prompts, context_length)
    word_ids = tokenize(REFERENCE_VIEW_TEXT, context_length=context_length)[0, 1:1 + num_views]
    tokens = tokenize(prompts.view_caption(num_prompts, "X"), context_length=context_length).repeat(num_views, 1)
    tokens[:, prefix_len] = word_ids
    weights = torch.zeros(num_views, context_length)
    weights[:, prefix_len] = 1.0
    # trim_to_text keeps up to the latest end-of-text token, i.e. past the view word of every row.
    tokens = trim_to_text(tokens)
    return tokens, weights[:, :tokens.shape[1]]


class ViewTextEncoder(nn.Module):
    """View caption -> view prompt token, encoded once per view id present in the batch.

    The caption's first ``num_prompts`` "X" words are replaced by learnable vectors; the text features of
    those positions attend to the view word's feature (a single key), are flattened and fused, and the P2I
    inverse network maps the result to the visual width. ``forward(clip_model, viewids (B,)) -> (B, C)``.
    """

    def __init__(self, num_views, num_prompts, text_width, text_dim, visual_dim, context_length, fixes):
        super().__init__()
        if num_prompts < 1:
            raise ConfigError(f"MODEL.VIEW_PROMPT = {num_prompts}: MODEL.SVPR.VDFE needs at least 1 view prompt")
        self.num_prompts = num_prompts
        if fixes.VIEW_WORDS:
            self.words = view_words(num_views)
            tokens, weights = _view_captions(self.words, num_prompts, context_length)
        else:
            self.words = None  # the reference's view tokens, not words (REFERENCE_VIEW_TEXT)
            tokens, weights = _reference_view_captions(num_views, num_prompts, context_length)
        # Token ids, not embeddings: embedding them at run time keeps them in step with the token table.
        self.register_buffer("caption_tokens", tokens, persistent=False)  # (V, L')
        self.register_buffer("word_weights", weights, persistent=False)  # (V, L')
        self.view_prompt = nn.Parameter(torch.randn(1, num_prompts, text_width) * text_width ** -0.5)
        keep_unused = not fixes.DROP_UNUSED_PARAMETERS
        # The reference's text2prompt cross-attention has 8 heads over one key (its q/k cannot matter).
        self.word_to_prompt = (CrossAttention(text_dim, 8, unused=True) if keep_unused
                               else SingleKeyAttention(text_dim))
        self.fusion = nn.Linear(text_dim * num_prompts, text_dim)
        self.word_to_prompt.apply(init_linear_trunc_normal)
        self.fusion.apply(init_linear_trunc_normal)
        self.inverse = inverse_net(text_dim, visual_dim, keep_unused)

    def encode_views(self, clip_model, view_ids):
        """Fused view-caption feature (U, D) of each view id in ``view_ids`` (U,)."""
        tokens = self.caption_tokens[view_ids]  # (U, L)
        embeds = clip_model.token_embedding(tokens)  # (U, L, W)
        end = PROMPT_START + self.num_prompts
        prompt = self.view_prompt.to(embeds.dtype).expand(view_ids.shape[0], -1, -1)
        embeds = torch.cat([embeds[:, :PROMPT_START], prompt, embeds[:, end:]], dim=1)
        feats = clip_model.encode_text(tokens, token_embeds=embeds, return_all=True)  # (U, L, D)
        prompt_feats = feats[:, PROMPT_START:end]  # (U, n, D)
        word = torch.einsum("ul,uld->ud", self.word_weights[view_ids].to(feats.dtype), feats)  # (U, D)
        # (U, n, D) from the cross-attention, (U, 1, D) broadcast over the prompts from SingleKeyAttention
        fused = self.word_to_prompt(prompt_feats, word[:, None]) + prompt_feats
        return self.fusion(fused.flatten(1))

    def forward(self, clip_model, viewids):
        # Dropout in the inverse network: applied per sample after the index, as without de-duplication.
        return self.inverse(encode_unique(lambda ids: self.encode_views(clip_model, ids), viewids))


class ViewBidirectionalDecoupling(nn.Module):
    """VBD: remove the view component from the CLS feature, and the identity from the view feature.

    ``forward(f_cls (B, C), f_view (B, C)) -> (f_inv, f_view_out)``. Both attentions have a single key; the
    reference's ``nn.MultiheadAttention`` (4 heads) is kept unless MODEL.FIXES.DROP_UNUSED_PARAMETERS, which
    computes each as its value and output projection (``SingleKeyAttention``, same init and values).
    """

    def __init__(self, dim, drop_unused=False):
        super().__init__()
        if drop_unused:
            self.view_to_cls = SingleKeyAttention(dim, bias=True)
            self.cls_to_view = SingleKeyAttention(dim, bias=True)
            for attention in (self.view_to_cls, self.cls_to_view):
                # nn.MultiheadAttention: Xavier-uniform over the packed (3C, C) in-projection, zero biases.
                bound = math.sqrt(6.0 / (4 * dim))
                nn.init.uniform_(attention.v.weight, -bound, bound)
                nn.init.zeros_(attention.v.bias)
                nn.init.zeros_(attention.proj.bias)
        else:
            self.view_to_cls = nn.MultiheadAttention(dim, 4, batch_first=True)
            self.cls_to_view = nn.MultiheadAttention(dim, 4, batch_first=True)
        self.alpha = nn.Parameter(torch.ones(()))
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))

    @staticmethod
    def _attend(attention, query, key):
        if isinstance(attention, nn.MultiheadAttention):
            return attention(query[:, None], key[:, None], key[:, None], need_weights=False)[0][:, 0]  # (B, C)
        return attention(query, key)

    def forward(self, f_cls, f_view):
        f_inv = f_cls - self.alpha * self._attend(self.view_to_cls, f_cls, f_view)
        f_view_out = self.mlp(self.norm(f_view - self._attend(self.cls_to_view, f_view, f_inv)))
        return f_inv, f_view_out


class ViewDecoupledFeatureExtractor(nn.Module):
    """VDFE: the view token appended before the last visual block, VBD on the outputs, and the view head.

    ``view_token(clip_model, viewids, side_embed=None) -> (B, 1, C)`` extra token for
    ``forward_features(extra_tokens=...)``; ``forward(f_cls, f_view) -> (f_inv, f_view_out, view_logits)``.
    """

    def __init__(self, num_views, num_prompts, text_width, text_dim, visual_dim, context_length, fixes):
        super().__init__()
        self.text = ViewTextEncoder(num_views, num_prompts, text_width, text_dim, visual_dim, context_length, fixes)
        # Positional vector of the appended token (the backbone's positional table has no row for it).
        self.pos_embed = nn.Parameter(torch.randn(1, visual_dim) * visual_dim ** -0.5)
        self.vbd = ViewBidirectionalDecoupling(visual_dim, fixes.DROP_UNUSED_PARAMETERS)
        if not fixes.VIEW_HEAD_CLASSES and num_views > REFERENCE_VIEW_CLASSES:
            raise ConfigError(f"the reference's view head has {REFERENCE_VIEW_CLASSES} classes, the dataset "
                              f"{num_views} views; set MODEL.FIXES.VIEW_HEAD_CLASSES True")
        self.head = BNNeckHead(visual_dim, num_views if fixes.VIEW_HEAD_CLASSES else REFERENCE_VIEW_CLASSES)

    def view_token(self, clip_model, viewids, side_embed=None):
        token = self.text(clip_model, viewids) + self.pos_embed  # (B, C)
        if side_embed is not None:
            token = token + side_embed
        return token[:, None]

    def forward(self, f_cls, f_view):
        f_inv, f_view_out = self.vbd(f_cls, f_view)
        view_logits, _ = self.head(f_view_out)
        return f_inv, f_view_out, view_logits

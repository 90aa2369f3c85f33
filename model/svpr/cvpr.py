"""Context-Vision Progressive Refinement (CVPR, docs/method.md), the reference's behaviour by default.

Four MODEL.FIXES switches change it (docs/reference_differences.md): CVPR_PER_SAMPLE_KEY (the semantic
key is per sample, (B, 1, C); the reference broadcasts it to (B, B, C), so test features depend on the rest
of the batch), CVPR_SCATTER_ORDER (refined tokens are written back to the patches they were read from; the
reference reads them in position order and writes them in score order), CVPR_PROGRESSIVE_KEYS (each stage
ranks and refines the tokens the previous stage produced; the reference re-reads the original patches) and
CVPR_SEPARATE_BLOCKS (one block per stage; the reference shares one block across the stages).
"""
import torch
from timm.layers import trunc_normal_
from torch import nn

from model.svpr.layers import (CrossAttention, SelfAttention, SingleKeyAttention, TopKScorer,
                               init_linear_trunc_normal, mlp, unused_norm)


def gather_tokens(tokens, indices):
    """``tokens`` (B, N, C) at ``indices`` (B, k) -> (B, k, C), in the order of ``indices``."""
    return tokens.gather(1, indices[..., None].expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(tokens, indices, values):
    """Copy of ``tokens`` (B, N, C) with row ``indices[b, i]`` replaced by ``values[b, i]`` (B, k, C)."""
    return tokens.scatter(1, indices[..., None].expand(-1, -1, tokens.shape[-1]), values)


class ContextVisionBlock(nn.Module):
    """Post-norm query/token block: the query attends to the selected tokens, the tokens to the query.

    ``forward(query (B, 1, C), tokens (B, k, C)) -> (query, tokens)``. The query's self-attention and the
    tokens' attention to the query have a single key; with ``drop_unused`` they are built as value + output
    projections (``SingleKeyAttention``), otherwise as the reference's full attentions (same values).
    """

    def __init__(self, dim, num_heads=8, mlp_ratio=4, drop_unused=False):
        super().__init__()
        keep = not drop_unused
        self.self_attn = SelfAttention(dim, num_heads) if keep else SingleKeyAttention(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads, unused=keep)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = mlp(dim, mlp_ratio * dim, unused=keep)
        self.norm_query = nn.LayerNorm(dim)
        self.token_attn = CrossAttention(dim, num_heads, unused=True) if keep else SingleKeyAttention(dim)
        self.norm_tokens = nn.LayerNorm(dim)

    def forward(self, query, tokens):
        query = self.norm1(query + self.self_attn(query))
        query = self.norm2(query + self.cross_attn(query, tokens))
        query = self.norm_query(query + self.mlp(query))
        # (B, k, C) from the cross-attention; (B, 1, C) broadcast over the tokens from SingleKeyAttention
        tokens = self.norm_tokens(tokens + self.token_attn(tokens, query))
        return query, tokens


class ContextVisionProgressiveRefinement(nn.Module):
    """CVPR: a learnable query, conditioned on the semantic feature, refines a shrinking top-k patch set.

    ``forward(f_inv (B, C), patches (B, N, C), f_sem=None (B, C)) -> (f_cvpr (B, C), refined (B, N, C))``.
    The semantic key is ``f_inv + f_sem`` (``f_inv`` alone without ASMOE); the query token attends to it.
    Stage s ranks the candidate tokens (all patches, then the previous stage's selection) by the query's
    attention, keeps the ``topk`` fraction, refines them with the query, and writes them into ``refined``
    (which starts as the patches). After each stage a sigmoid gate mixes the query into the output feature,
    which starts as the query token. ``fixes`` is the MODEL.FIXES config node (see the module docstring).
    """

    def __init__(self, dim, fixes, num_layers=3, topk=0.5, num_heads=8):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"CVPR needs at least one stage (MODEL.SVPR.CVPR_LAYERS = {num_layers})")
        self.per_sample_key = fixes.CVPR_PER_SAMPLE_KEY
        self.scatter_in_read_order = fixes.CVPR_SCATTER_ORDER
        self.progressive_keys = fixes.CVPR_PROGRESSIVE_KEYS
        drop_unused = fixes.DROP_UNUSED_PARAMETERS
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.semantic_fuse = CrossAttention(dim, num_heads, unused=not drop_unused)
        if fixes.CVPR_SEPARATE_BLOCKS:
            self.blocks = nn.ModuleList(ContextVisionBlock(dim, num_heads, drop_unused=drop_unused)
                                        for _ in range(num_layers))
        else:
            block = ContextVisionBlock(dim, num_heads, drop_unused=drop_unused)
            self.blocks = nn.ModuleList([block] * num_layers)
        self.unused_norm = None if drop_unused else unused_norm(dim)
        self.scorer = TopKScorer(dim, num_heads, topk)
        self.gate = nn.Sequential(nn.Linear(dim, dim), nn.Sigmoid())
        self.apply(init_linear_trunc_normal)
        trunc_normal_(self.query_token, std=0.02)

    def semantic_query(self, f_inv, f_sem, query):
        """The query token (B, 1, C) after attending to the semantic key."""
        semantic = f_inv[:, None]  # (B, 1, C)
        if f_sem is not None:
            # Per sample: (B, 1, C). The reference adds (B, C) to (B, 1, C), i.e. (B, B, C) with
            # semantic[i, j] = f_inv[i] + f_sem[j]: every query attends over the whole batch.
            semantic = semantic + (f_sem[:, None] if self.per_sample_key else f_sem)
        return self.semantic_fuse(query, semantic)

    def forward(self, f_inv, patches, f_sem=None):
        batch, num_patches, _ = patches.shape
        output = self.query_token.expand(batch, -1, -1)
        query = self.semantic_query(f_inv, f_sem, output)
        positions = torch.arange(num_patches, device=patches.device).expand(batch, -1)  # (B, n)
        candidates, refined = patches, patches
        for block in self.blocks:
            keys = candidates if self.progressive_keys else gather_tokens(patches, positions)  # (B, n, C)
            order = self.scorer(query, keys)  # (B, k), descending score
            # The reference selects with a boolean mask, i.e. in ascending candidate order.
            read = order if self.scatter_in_read_order else order.sort(dim=1).values
            query, tokens = block(query, gather_tokens(keys, read))
            positions = positions.gather(1, order)  # written at the score order's positions
            refined = scatter_tokens(refined, positions, tokens)
            # Progressive keys: the refined tokens in the order of the positions they were written to.
            candidates = tokens if self.scatter_in_read_order else gather_tokens(refined, positions)
            gate = self.gate(query)
            output = gate * query + (1 - gate) * output
        return output[:, 0], refined

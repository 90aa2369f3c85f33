"""Context-Vision Progressive Refinement (CVPR, SPEC 4.6) with the reference's defects fixed.

Fixes: the semantic key is per sample, (B, 1, C) (the reference broadcast it to (B, B, C), making test
features depend on the other images of the batch); the refined tokens are written back to the patches
they were read from (the reference gathered in score order but wrote in position order). Keys: each stage
ranks and refines the tokens produced by the previous stage (the first stage reads the backbone patches),
so refinement is progressive; the reference re-read the original patches at every stage.
"""
import torch
from timm.layers import Mlp, trunc_normal_
from torch import nn

from model.svpr.layers import CrossAttention, SingleKeyAttention, TopKScorer, init_linear_trunc_normal


def gather_tokens(tokens, indices):
    """``tokens`` (B, N, C) at ``indices`` (B, k) -> (B, k, C), in the order of ``indices``."""
    return tokens.gather(1, indices[..., None].expand(-1, -1, tokens.shape[-1]))


def scatter_tokens(tokens, indices, values):
    """Copy of ``tokens`` (B, N, C) with row ``indices[b, i]`` replaced by ``values[b, i]`` (B, k, C)."""
    return tokens.scatter(1, indices[..., None].expand(-1, -1, tokens.shape[-1]), values)


class ContextVisionBlock(nn.Module):
    """Post-norm query/token block: the query attends to the selected tokens, the tokens to the query.

    ``forward(query (B, 1, C), tokens (B, k, C)) -> (query, tokens)``. The query's self-attention and the
    tokens' attention to the query have a single key, so they are value + output projections.
    """

    def __init__(self, dim, num_heads=8, mlp_ratio=4):
        super().__init__()
        self.self_attn = SingleKeyAttention(dim)
        self.norm1 = nn.LayerNorm(dim)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, hidden_features=mlp_ratio * dim, act_layer=nn.GELU)
        self.norm_query = nn.LayerNorm(dim)
        self.token_attn = SingleKeyAttention(dim)
        self.norm_tokens = nn.LayerNorm(dim)

    def forward(self, query, tokens):
        query = self.norm1(query + self.self_attn(query))
        query = self.norm2(query + self.cross_attn(query, tokens))
        query = self.norm_query(query + self.mlp(query))
        tokens = self.norm_tokens(tokens + self.token_attn(query))  # (B, 1, C) broadcast over the k tokens
        return query, tokens


class ContextVisionProgressiveRefinement(nn.Module):
    """CVPR: a learnable query, conditioned on the semantic feature, refines a shrinking top-k patch set.

    ``forward(f_inv (B, C), patches (B, N, C), f_sem=None (B, C)) -> (f_cvpr (B, C), refined (B, N, C))``.
    The semantic key is ``f_inv + f_sem`` (``f_inv`` alone without ASMOE). Stage s keeps the
    ``topk`` fraction of the previous stage's tokens ranked by the query's attention, refines them with the
    query, and writes them back at their patch positions in ``refined`` (unselected patches are unchanged).
    After each stage a sigmoid gate mixes the query into the output feature, which starts as the query token.
    """

    def __init__(self, dim, num_layers=3, topk=0.5, shared_block=False, num_heads=8):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"CVPR needs at least one stage (MODEL.SVPR.CVPR_LAYERS = {num_layers})")
        self.query_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.semantic_fuse = SingleKeyAttention(dim)
        self.scorer = TopKScorer(dim, num_heads, topk)
        if shared_block:
            block = ContextVisionBlock(dim, num_heads)
            self.blocks = nn.ModuleList([block] * num_layers)
        else:
            self.blocks = nn.ModuleList(ContextVisionBlock(dim, num_heads) for _ in range(num_layers))
        self.gate = nn.Sequential(nn.Linear(dim, dim), nn.Sigmoid())
        self.apply(init_linear_trunc_normal)
        trunc_normal_(self.query_token, std=0.02)

    def forward(self, f_inv, patches, f_sem=None):
        batch, num_patches, _ = patches.shape
        semantic = f_inv if f_sem is None else f_inv + f_sem
        query = self.semantic_fuse(semantic[:, None])  # (B, 1, C): one key per sample
        output = self.query_token.expand(batch, -1, -1)
        positions = torch.arange(num_patches, device=patches.device).expand(batch, -1)  # (B, n)
        tokens, refined = patches, patches
        for block in self.blocks:
            order = self.scorer(query, tokens)  # (B, k), descending score
            positions = positions.gather(1, order)
            query, tokens = block(query, gather_tokens(tokens, order))
            refined = scatter_tokens(refined, positions, tokens)
            gate = self.gate(query)
            output = gate * query + (1 - gate) * output
        return output[:, 0], refined

"""The ImageNet ViT backbone of the ViT / TransReID / VDT / SeCap baselines, on timm's ``VisionTransformer``.

Differences from timm's own ``vit_base_patch16_224``: the patch embedding may overlap (stride
MODEL.STRIDE_SIZE smaller than the patch), the input is a fixed ReID size (e.g. 256x128), an optional
side-information embedding (SIE) of camera and/or view ids is added with the positional embedding, and an
optional learnable view token (timm's register token, zero at start) follows the class token. With
``subtract_view`` the view token is subtracted from the class token after every block (VDT's hierarchical
subtraction). Pretrained weights are read by ``model.vit.weights``.
"""
from functools import partial

import torch
from timm.layers import PatchEmbed
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

from configs import CN, declare_config
from model.clip.sie import SideInfoEmbedding
from model.kernels import attention, linear, patch_embedding
from model.mlp import Mlp
from model.vit.attention import Attention
from model.vit.weights import architecture_of, load_pretrained_vit, read_vit_weights
from utils.errors import ConfigError


@declare_config
def add_vit_backbone_config(cfg):
    """The ImageNet-ViT backbone's keys: random-init sizes (MODEL.VIT), drop rates, and the VDT/SeCap
    positional-embedding fix."""
    # ImageNet-ViT baselines only: stochastic-depth rate of the last block (block i gets DROP_PATH * i / (depth - 1)),
    cfg.MODEL.DROP_PATH = 0.1
    # dropout after the positional embedding, the attention projection and the MLP layers,
    cfg.MODEL.DROP_OUT = 0.0
    # and dropout of the attention weights.
    cfg.MODEL.ATT_DROP_RATE = 0.0
    # ImageNet-ViT hyper-parameters used only with MODEL.RANDOM_INIT; with a checkpoint they are read from the
    # weights (heads = width / 64, as in every ViT of that family).
    cfg.MODEL.VIT = CN()
    cfg.MODEL.VIT.EMBED_DIM = 768  # token width
    cfg.MODEL.VIT.DEPTH = 12  # number of transformer blocks
    cfg.MODEL.VIT.NUM_HEADS = 12  # attention heads per block
    cfg.MODEL.VIT.PATCH_SIZE = 16  # patch (kernel) size of the patch embedding; its stride is MODEL.STRIDE_SIZE
    # MODEL.FIXES (continued) for the ImageNet-ViT baselines (docs/baselines.md).
    # VDT/SeCap: place the pretrained positional embedding at [cls, view (= cls position), patches] instead of
    # the authors' table shifted by one row (view token at patch 0's position, each patch at its right
    # neighbour's, last patch on a row the authors leave uninitialised and this code sets to zeros).
    cfg.MODEL.FIXES.VIEW_POS_EMBED = False

#: MODEL.NAME -> whether the backbone has a view token ([cls, view, patches] instead of [cls, patches]).
BACKBONES = {
    "vit_base_patch16_224_TransReID": False,
    "vit_base_patch16_224_VDT": True,
}
#: Sizes of ViT-B/16, the architecture every MODEL.NAME above names.
VIT_BASE = {"embed_dim": 768, "depth": 12, "num_heads": 12, "patch_size": 16}
LAYER_NORM_EPS = 1e-6


class OverlapPatchEmbed(PatchEmbed):
    """timm's ``PatchEmbed`` with a convolution stride that may be smaller than the patch size.

    The grid is ``((H - p) // s_y + 1, (W - p) // s_x + 1)`` patches, flattened row-major.
    """

    def __init__(self, *args, stride=(16, 16), **kwargs):
        super().__init__(*args, **kwargs)
        self.proj.stride = tuple(stride)
        self.grid_size = tuple((size - patch) // step + 1
                               for size, patch, step in zip(self.img_size, self.patch_size, stride))
        self.num_patches = self.grid_size[0] * self.grid_size[1]

    def forward(self, x):
        """Patch tokens (B, N, C) of images (B, 3, H, W) at the built size (``model.kernels.patch_embedding``)."""
        if tuple(x.shape[-2:]) != tuple(self.img_size):
            raise ConfigError(f"images are {x.shape[-2]}x{x.shape[-1]} but the ViT was built for "
                              f"{self.img_size[0]}x{self.img_size[1]} (INPUT.SIZE_TRAIN)")
        return self.norm(patch_embedding(x, self.proj.weight, self.proj.bias, self.proj.stride))


def _has_dropout(module):
    return any(isinstance(m, nn.Dropout) and m.p > 0 for m in module.modules())


def block_first_tokens(block, x, num_queries=None):
    """A timm ``Block`` on ``x`` (B, L, C) computed for the first ``num_queries`` tokens only: (B, n, C).

    Those tokens attend over all L tokens as in the full block, so their values are the full block's; the
    other tokens' queries, output projections and MLPs, which only a caller reading them would need, are
    not computed. The full block runs, and all (B, L, C) tokens are returned, when ``num_queries`` is None,
    with timm's written-out attention (``fused_attn`` False: relevance maps read every token) and in training
    with dropout (whose random draws depend on the token count); callers read the first tokens either way.
    """
    attn = block.attn
    if (num_queries is None or num_queries >= x.shape[1] or not getattr(attn, "fused_attn", False)
            or getattr(attn, "gate", None) is not None or (block.training and _has_dropout(block))):
        return block(x)
    batch, length, _ = x.shape
    dim, heads, head_dim = attn.attn_dim, attn.num_heads, attn.head_dim
    h = block.norm1(x)
    weight, bias = attn.qkv.weight, attn.qkv.bias
    q = linear(h[:, :num_queries], weight[:dim], None if bias is None else bias[:dim])
    kv = linear(h, weight[dim:], None if bias is None else bias[dim:])
    q = q.view(batch, num_queries, heads, head_dim).transpose(1, 2)  # (B, H, n, d)
    k, v = (part.transpose(1, 2) for part in kv.view(batch, length, 2, heads, head_dim).unbind(2))  # (B, H, L, d)
    out = attention(attn.q_norm(q), attn.k_norm(k), v)  # (B, H, n, d)
    out = attn.norm(out.transpose(1, 2).reshape(batch, num_queries, dim))  # (B, n, C)
    out = attn.proj_drop(linear(out, attn.proj.weight, attn.proj.bias))
    x = x[:, :num_queries] + block.drop_path1(block.ls1(out))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def branch_first_tokens(branch, x, num_queries):
    """A (last block, final norm) branch (``nn.Sequential``, as TransReID's and SeCap's ``b1``/``b2``) on ``x``,
    computed for its first ``num_queries`` output tokens (``block_first_tokens``): (B, n, C), or all tokens."""
    block, norm = branch
    return norm(block_first_tokens(block, x, num_queries))


class ReIDVisionTransformer(VisionTransformer):
    """timm ViT (token pooling, no classification head) with overlapping patches, SIE and a view token.

    ``num_cameras`` / ``num_views`` > 1 switch the SIE on for cameras / views (``sie_coe`` scales it).
    """

    def __init__(self, img_size, patch_size=16, stride=(16, 16), embed_dim=768, depth=12, num_heads=12,
                 mlp_ratio=4.0, qkv_bias=True, view_token=False, drop_path=0.0, drop_out=0.0, attn_drop=0.0,
                 num_cameras=0, num_views=0, sie_coe=3.0):
        super().__init__(img_size=tuple(img_size), patch_size=patch_size, num_classes=0, global_pool="token",
                         embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
                         qkv_bias=qkv_bias, reg_tokens=int(view_token), pos_drop_rate=drop_out,
                         proj_drop_rate=drop_out, attn_drop_rate=attn_drop, drop_path_rate=drop_path,
                         embed_layer=partial(OverlapPatchEmbed, stride=tuple(stride)), attn_layer=Attention, mlp_layer=Mlp,
                         norm_layer=partial(nn.LayerNorm, eps=LAYER_NORM_EPS))
        if self.reg_token is not None:
            nn.init.zeros_(self.reg_token)  # the authors' view token starts at zero and is never loaded
        self.sie_embed = None
        if num_cameras > 1 or num_views > 1:
            self.sie_embed = SideInfoEmbedding(num_cameras, num_views, embed_dim, sie_coe)

    @property
    def has_view_token(self):
        """Whether the tokens are [cls, view, patches]."""
        return self.reg_token is not None

    def embed(self, images, camids=None, viewids=None):
        """Tokens before the first block: (B, P + N, C) with P = 1 or 2 prefix tokens."""
        x = self.patch_embed(images)  # (B, N, C)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.reg_token is not None:
            prefix.append(self.reg_token.expand(x.shape[0], -1, -1))
        x = torch.cat(prefix + [x], dim=1) + self.pos_embed  # (B, P + N, C)
        if self.sie_embed is not None:
            x = x + self.sie_embed(camids, viewids).unsqueeze(1)
        return self.pos_drop(x)

    def run_blocks(self, x, blocks, subtract_view=False, num_outputs=None):
        """Apply ``blocks`` to tokens ``x``; with ``subtract_view``, ``cls <- cls - view`` after each block;
        ``num_outputs``: the last block computes only the first that many tokens (``block_first_tokens``)."""
        for index, block in enumerate(blocks):
            queries = num_outputs if index == len(blocks) - 1 else None
            if self.grad_checkpointing and self.training:
                x = checkpoint(block_first_tokens, block, x, queries, use_reentrant=False)
            else:
                x = block_first_tokens(block, x, queries)
            if subtract_view:
                x = torch.cat([x[:, :1] - x[:, 1:2], x[:, 1:]], dim=1)
        return x

    def forward(self, images, camids=None, viewids=None, num_blocks=None, subtract_view=False, final_norm=True,
                num_outputs=None):
        """All tokens (B, P + N, C) after the first ``num_blocks`` blocks (all by default) and the final LN;
        with ``num_outputs`` the last block computes only the first that many tokens (same values) and only
        those are returned, unless it has to run in full (``block_first_tokens``)."""
        x = self.run_blocks(self.embed(images, camids, viewids), self.blocks[:num_blocks], subtract_view,
                            num_outputs)
        return self.norm(x) if final_norm else x


def vit_architecture(cfg):
    """Backbone sizes: MODEL.VIT.* with MODEL.RANDOM_INIT, else those of the weights file."""
    if cfg.MODEL.RANDOM_INIT:
        vit = cfg.MODEL.VIT
        return {"embed_dim": vit.EMBED_DIM, "depth": vit.DEPTH, "num_heads": vit.NUM_HEADS,
                "patch_size": vit.PATCH_SIZE, "mlp_ratio": 4.0, "qkv_bias": True}, None
    state = read_vit_weights(cfg.MODEL.PRETRAIN_PATH)
    return architecture_of(state, cfg.MODEL.PRETRAIN_PATH), state


def build_vit_backbone(cfg, num_cameras, num_views, view_token):
    """The backbone of ``cfg`` (MODEL.NAME, INPUT.SIZE_TRAIN, MODEL.STRIDE_SIZE, drop rates, SIE), with the
    weights of MODEL.PRETRAIN_PATH unless MODEL.RANDOM_INIT. ``view_token`` is what the model needs."""
    if cfg.MODEL.NAME not in BACKBONES:
        raise ConfigError(f"config key MODEL.NAME = {cfg.MODEL.NAME!r}: expected one of {', '.join(BACKBONES)} "
                          f"for MODEL.ARCH_NAME {cfg.MODEL.ARCH_NAME}")
    if BACKBONES[cfg.MODEL.NAME] != view_token:
        wanted = next(name for name, has_view in BACKBONES.items() if has_view == view_token)
        raise ConfigError(f"config key MODEL.NAME = {cfg.MODEL.NAME!r}: MODEL.ARCH_NAME {cfg.MODEL.ARCH_NAME} "
                          f"needs {wanted!r}")
    arch, state = vit_architecture(cfg)
    if arch["embed_dim"] % arch["num_heads"]:
        raise ConfigError(f"config key MODEL.VIT.NUM_HEADS = {arch['num_heads']}: expected a divisor of "
                          f"MODEL.VIT.EMBED_DIM = {arch['embed_dim']}")
    backbone = ReIDVisionTransformer(
        cfg.INPUT.SIZE_TRAIN, stride=cfg.MODEL.STRIDE_SIZE, view_token=view_token, drop_path=cfg.MODEL.DROP_PATH,
        drop_out=cfg.MODEL.DROP_OUT, attn_drop=cfg.MODEL.ATT_DROP_RATE,
        num_cameras=num_cameras if cfg.MODEL.SIE_CAMERA else 0, num_views=num_views if cfg.MODEL.SIE_VIEW else 0,
        sie_coe=cfg.MODEL.SIE_COE, **arch)
    if state is not None:
        load_pretrained_vit(backbone, state, cfg.MODEL.PRETRAIN_PATH, fix_view_pos=cfg.MODEL.FIXES.VIEW_POS_EMBED)
    backbone.set_grad_checkpointing(cfg.MODEL.GRAD_CHECKPOINT)
    return backbone

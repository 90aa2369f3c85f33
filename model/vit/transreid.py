"""The ImageNet-ViT baseline (``ViT``) and TransReID (He et al., ICCV 2021) with its jigsaw patch module.

ViT classifies the final class token; its test feature is that pre-BN token (C). TransReID runs all but the
last block, then two copies of (last block + final LN): ``b1`` on all tokens gives the global feature,
``b2`` on [cls, group k] of the shifted and shuffled patch tokens gives local feature k; its test feature
is [g, l_1 / G, ..., l_G / G] (C * (1 + G), pre-BN). Both use the camera/view SIE when it is switched on.
"""
import copy

import torch
from torch import nn

from configs import CN, declare_config
from model.contract import LossSpec, ModelOutput, ReIDModel
from model.heads import BNNeckHead
from model.registry import register_model
from model.vit.backbone import branch_first_tokens, build_vit_backbone
from model.vit.reference import (BACKBONE_NAMES, ReferenceLayout, reference_depth, rows, sie_counts,
                                 with_dead_last_block)
from utils.errors import ConfigError


@declare_config
def add_transreid_config(cfg):
    """TransReID's keys: the jigsaw patch module (MODEL.JPM) and its BNNeck fix."""
    # TransReID's jigsaw patch module (JPM): the patch tokens are rotated left by SHIFT - 1, interleaved from
    # SHUFFLE_GROUPS equal parts and cut into NUM_GROUPS local groups (the authors' fixed 5 / 2 / 4).
    cfg.MODEL.JPM = CN()
    cfg.MODEL.JPM.SHIFT = 5  # the patch tokens are rotated left by SHIFT - 1
    cfg.MODEL.JPM.SHUFFLE_GROUPS = 2  # equal parts interleaved after the shift
    cfg.MODEL.JPM.NUM_GROUPS = 4  # local groups (local branches); the test feature divides each by this number
    # TransReID: apply the global BNNeck once per training step (the authors apply it twice, so its running
    # statistics move twice per step).
    cfg.MODEL.FIXES.TRANSREID_SINGLE_BN = False

VIT_LAYOUT = ReferenceLayout(
    names=(("head.bn.", "bottleneck."), ("head.classifier.", "classifier."), *BACKBONE_NAMES),
    dead=(r"BACKBONE\.fc\..*",))


def _transreid_layout(num_groups, depth):
    heads = [(f"heads.{k}.bn.", f"bottleneck_{k}.") for k in range(1, num_groups + 1)]
    heads += [(f"heads.{k}.classifier.", f"classifier_{k}.") for k in range(1, num_groups + 1)]
    return ReferenceLayout(
        names=(*heads, ("heads.0.bn.", "bottleneck."), ("heads.0.classifier.", "classifier."), *BACKBONE_NAMES),
        dead=(r"BACKBONE\.fc\..*", rf"BACKBONE\.blocks\.{depth - 1}\..*", r"BACKBONE\.norm\..*"))


def id_and_triplet(cfg, reduction):
    """Identity and triplet losses with MODEL.ID_LOSS_WEIGHT / MODEL.TRIPLET_LOSS_WEIGHT."""
    return [LossSpec("id", cfg.MODEL.ID_LOSS_WEIGHT, {"reduction": reduction}),
            LossSpec("triplet", cfg.MODEL.TRIPLET_LOSS_WEIGHT, {"reduction": reduction})]


@register_model("ViT")
class ViT(ReIDModel):
    """ImageNet ViT + BNNeck; loss CE(cls) + triplet(cls); test feature: the pre-BN class token."""

    batch_inputs = ("camids", "viewids")
    identity_parameters = (r"head\.classifier\.weight",)
    dataset_parameters = (r"backbone\.sie_embed\..*",)

    def __init__(self, cfg, num_classes, num_cameras=1, num_views=1, attributes=()):
        super().__init__()
        self.backbone = build_vit_backbone(cfg, num_cameras, num_views, view_token=False)
        width = self.backbone.embed_dim
        self.head = BNNeckHead(width, num_classes)
        self.embedding_dim = self.feature_dim = width

    def loss_specs(self, cfg):
        """Identity and triplet losses of the class token."""
        return id_and_triplet(cfg, "sum")

    def forward(self, images, camids=None, viewids=None):
        """Training: ``ModelOutput`` of the class token; eval: the (B, C) pre-BN class token."""
        cls = self.backbone(images, camids, viewids, num_outputs=1)[:, 0]
        if not self.training:
            return cls
        return ModelOutput({"global": self.head(cls)[0]}, {"global": cls})

    @classmethod
    def from_reference_state_dict(cls, state_dict, cfg):
        """Authors' ``BACKBONE.* / bottleneck.* / classifier.*`` -> ``backbone.* / head.*``."""
        return VIT_LAYOUT.to_ours(state_dict)

    @classmethod
    def to_reference_state_dict(cls, state_dict, cfg):
        """Inverse of :meth:`from_reference_state_dict` (without the unused ``BACKBONE.fc``)."""
        return VIT_LAYOUT.to_reference(state_dict)

    @classmethod
    def reference_model_args(cls, state_dict, cfg):
        """Constructor sizes of an authors' checkpoint."""
        num_cameras, num_views = sie_counts(state_dict, cfg)
        return {"num_classes": rows(state_dict, "classifier.weight", "number of identities"),
                "num_cameras": num_cameras, "num_views": num_views, "attributes": []}


def jpm_rearrange(tokens, shift, shuffle_groups):
    """TransReID's shift and patch shuffle of the patch tokens of ``tokens`` (B, 1 + N, C) -> (B, N', C).

    Shift: the N patch tokens are rotated left by ``shift - 1``. Shuffle: they are cut into
    ``shuffle_groups`` equal parts which are interleaved (out[g * i + j] = part_j[i]). When N is not a
    multiple of ``shuffle_groups`` the second-to-last token is repeated to fill up (as the authors do).
    """
    batch, _, width = tokens.shape
    shifted = torch.cat([tokens[:, shift:], tokens[:, 1:shift]], dim=1)  # (B, N, C)
    missing = -shifted.shape[1] % shuffle_groups
    if missing:
        shifted = torch.cat([shifted] + [shifted[:, -2:-1]] * missing, dim=1)
    parts = shifted.view(batch, shuffle_groups, -1, width)  # (B, S, N' / S, C)
    return parts.transpose(1, 2).reshape(batch, -1, width)  # (B, N', C)


@register_model("TransReID")
class TransReID(ReIDModel):
    """TransReID: global branch + jigsaw patch module (MODEL.JPM.*) on an ImageNet ViT.

    Losses (as the authors' code): CE(g) + mean_k CE(l_k) and triplet(g) + mean_k triplet(l_k).
    """

    fixes = ("TRANSREID_SINGLE_BN",)

    batch_inputs = ("camids", "viewids")
    identity_parameters = (r"heads\.\d+\.classifier\.weight",)
    dataset_parameters = ViT.dataset_parameters

    def __init__(self, cfg, num_classes, num_cameras=1, num_views=1, attributes=()):
        super().__init__()
        jpm = cfg.MODEL.JPM
        if jpm.SHIFT < 1 or jpm.SHUFFLE_GROUPS < 1 or jpm.NUM_GROUPS < 1:
            raise ConfigError(f"config keys MODEL.JPM.SHIFT / SHUFFLE_GROUPS / NUM_GROUPS = {jpm.SHIFT} / "
                              f"{jpm.SHUFFLE_GROUPS} / {jpm.NUM_GROUPS}: expected positive integers")
        self.shift, self.shuffle_groups, self.num_groups = jpm.SHIFT, jpm.SHUFFLE_GROUPS, jpm.NUM_GROUPS
        self.single_bn = cfg.MODEL.FIXES.TRANSREID_SINGLE_BN
        backbone = build_vit_backbone(cfg, num_cameras, num_views, view_token=False)
        if backbone.patch_embed.num_patches < self.num_groups or self.shift > backbone.patch_embed.num_patches:
            raise ConfigError(f"config key MODEL.JPM: {backbone.patch_embed.num_patches} patch tokens are too few "
                              f"for NUM_GROUPS {self.num_groups} and SHIFT {self.shift}")
        # b1 / b2 start as copies of the (pretrained) last block and final LN, which the backbone then drops.
        self.b1 = nn.Sequential(copy.deepcopy(backbone.blocks[-1]), copy.deepcopy(backbone.norm))
        self.b2 = nn.Sequential(copy.deepcopy(backbone.blocks[-1]), copy.deepcopy(backbone.norm))
        backbone.blocks = backbone.blocks[:-1]
        backbone.norm = nn.Identity()
        self.backbone = backbone
        width = backbone.embed_dim
        self.heads = nn.ModuleList(BNNeckHead(width, num_classes) for _ in range(1 + self.num_groups))
        self.embedding_dim = width * (1 + self.num_groups)
        self.feature_dim = width

    def loss_specs(self, cfg):
        """Identity and triplet losses: global branch plus the mean over the local branches."""
        return id_and_triplet(cfg, "first_plus_mean")

    def local_features(self, tokens):
        """(B, G, C) class tokens of ``b2`` over [cls, group k] for the G JPM groups of ``tokens`` (B, 1 + N, C)."""
        batch, width = tokens.shape[0], tokens.shape[2]
        group_len = (tokens.shape[1] - 1) // self.num_groups
        patches = jpm_rearrange(tokens, self.shift, self.shuffle_groups)[:, :group_len * self.num_groups]
        groups = patches.reshape(batch * self.num_groups, group_len, width)  # (B * G, L, C)
        cls = tokens[:, :1].repeat_interleave(self.num_groups, dim=0)  # (B * G, 1, C)
        local = branch_first_tokens(self.b2, torch.cat([cls, groups], dim=1), 1)  # (B * G, 1, C)
        return local[:, 0].view(batch, self.num_groups, width)

    def forward(self, images, camids=None, viewids=None):
        """Training: ``ModelOutput`` (global + G local branches, pre-BN features); eval: (B, C * (1 + G))."""
        tokens = self.backbone(images, camids, viewids)  # (B, 1 + N, C), all blocks but the last, no LN
        global_feat = branch_first_tokens(self.b1, tokens, 1)[:, 0]
        local = self.local_features(tokens).unbind(dim=1)
        if not self.training:
            return torch.cat([global_feat] + [feat / self.num_groups for feat in local], dim=1)
        if not self.single_bn:
            self.heads[0].bn(global_feat)  # the authors' extra BN call: moves the running statistics once more
        features = {"global": global_feat, **{f"local{k + 1}": feat for k, feat in enumerate(local)}}
        logits = {name: head(feat)[0] for (name, feat), head in zip(features.items(), self.heads)}
        return ModelOutput(logits, features)

    @classmethod
    def from_reference_state_dict(cls, state_dict, cfg):
        """Authors' ``BACKBONE.* / b1 / b2 / bottleneck[_k] / classifier[_k]`` -> this layout."""
        return _transreid_layout(cfg.MODEL.JPM.NUM_GROUPS, reference_depth(state_dict)).to_ours(state_dict)

    @classmethod
    def to_reference_state_dict(cls, state_dict, cfg):
        """Inverse of :meth:`from_reference_state_dict`; the authors' unused last block and norm are copies of
        ``b1``, their unused ``BACKBONE.fc`` is left out."""
        return with_dead_last_block(_transreid_layout(cfg.MODEL.JPM.NUM_GROUPS, 0).to_reference(state_dict))

    @classmethod
    def reference_model_args(cls, state_dict, cfg):
        """Constructor sizes of an authors' checkpoint."""
        num_cameras, num_views = sie_counts(state_dict, cfg)
        return {"num_classes": rows(state_dict, "classifier.weight", "number of identities"),
                "num_cameras": num_cameras, "num_views": num_views, "attributes": []}

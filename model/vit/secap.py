"""SeCap (Wang et al., CVPR 2025): VDT's view-decoupled backbone plus prompts re-calibrated by the
view-invariant feature (PRM) and refined against the local tokens (LFRM).

The backbone runs all but the last block with the view subtraction; a copy of the last block + LN (``b1``)
gives the global token g and the view token v; inv = g - v re-calibrates the prompts; LFRM refines
[out token, prompts] against the patch tokens of the shortened backbone; its first output is ``out``.
Test feature: [g, out] (2C, pre-BN).
"""
import copy

import torch
from torch import nn

from configs import CN, declare_config
from model.contract import ModelOutput, ReIDModel
from model.heads import BNNeckHead
from model.registry import register_model
from model.vit.backbone import branch_first_tokens, build_vit_backbone
from model.vit.reference import BACKBONE_NAMES, ReferenceLayout, reference_depth, with_dead_last_block
from model.vit.secap_modules import LocalFeatureRefinement, PromptRecalibration
from model.vit.transreid import id_and_triplet
from model.vit.vdt import VDT, VIEW_DECOUPLED_HEAD_NAMES, view_loss_spec, view_model_args
from utils.errors import ConfigError


@declare_config
def add_secap_config(cfg):
    """SeCap's keys (MODEL.SECAP)."""
    # SeCap: number of learnable prompts recalibrated by PRM, and number of two-way LFRM layers.
    cfg.MODEL.SECAP = CN()
    cfg.MODEL.SECAP.PROMPT_LEN = 64  # learnable prompts re-calibrated by PRM
    cfg.MODEL.SECAP.LFRM_DEPTH = 2  # two-way transformer layers of LFRM

# (ours, the authors') inside PRM / LFRM (their MLP is ``layers.0`` / ``layers.1``, timm's ``fc1`` / ``fc2``).
_FRAGMENTS = (("prm.cross_value.", "prm.cross_attn.v_."), ("prm.cross_proj.", "prm.cross_attn.proj."),
              (".q.", ".q_."), (".k.", ".k_."), (".v.", ".v_."),
              (".mlp.fc1.", ".mlp.layers.0."), (".mlp.fc2.", ".mlp.layers.1."))
# Tensors of the authors' SeCap that no forward uses (docs/baselines.md).
_DEAD = (r"BACKBONE\.fc\..*", r"BACKBONE\.blocks\.{last}\..*", r"BACKBONE\.norm\..*", r".*\.normy\..*",
         r".*\.mlp\.norm_layer\..*", r"prm\.attn2\..*", r"prm\.cross_attn\.[qk]_\..*", r"lfrm\.out_token")


def _layout(depth):
    dead = tuple(pattern.replace("{last}", str(depth - 1)) for pattern in _DEAD)
    return ReferenceLayout(names=(*VIEW_DECOUPLED_HEAD_NAMES, *BACKBONE_NAMES), fragments=_FRAGMENTS,
                           fragment_scope=("prm.", "lfrm."),
                           dead=dead)


@register_model("SeCap")
class SeCap(ReIDModel):
    """SeCap: VDT backbone, PRM (MODEL.SECAP.PROMPT_LEN prompts) and LFRM (MODEL.SECAP.LFRM_DEPTH layers).

    Losses: CE and triplet of g and of out (summed), plus the weighted view loss on v (with |cos(g, v)|).
    """

    fixes = ("VIEW_POS_EMBED", "VIEW_LOSS_SMOOTHING")

    batch_inputs = ("camids", "viewids")
    identity_parameters = (r"head_(id|out)\.classifier\.weight",)
    dataset_parameters = VDT.dataset_parameters

    def __init__(self, cfg, num_classes, num_cameras=1, num_views=1, attributes=()):
        super().__init__()
        if cfg.MODEL.SECAP.PROMPT_LEN < 1 or cfg.MODEL.SECAP.LFRM_DEPTH < 1:
            raise ConfigError(f"config keys MODEL.SECAP.PROMPT_LEN / LFRM_DEPTH = {cfg.MODEL.SECAP.PROMPT_LEN} / "
                              f"{cfg.MODEL.SECAP.LFRM_DEPTH}: expected positive integers")
        backbone = build_vit_backbone(cfg, num_cameras, num_views, view_token=True)
        # b1 starts as a copy of the (pretrained) last block and final LN, which the backbone then drops.
        self.b1 = nn.Sequential(copy.deepcopy(backbone.blocks[-1]), copy.deepcopy(backbone.norm))
        backbone.blocks = backbone.blocks[:-1]
        backbone.norm = nn.Identity()
        self.backbone = backbone
        width, heads = backbone.embed_dim, backbone.blocks[0].attn.num_heads
        self.head_id = BNNeckHead(width, num_classes)
        self.head_out = BNNeckHead(width, num_classes)
        self.head_view = BNNeckHead(width, num_views)
        self.prompt = nn.Parameter(torch.zeros(1, cfg.MODEL.SECAP.PROMPT_LEN, width))
        self.out_token = nn.Parameter(torch.zeros(1, width))
        self.image_pe = nn.Parameter(torch.zeros(1, backbone.patch_embed.num_patches, width))
        for param in (self.prompt, self.out_token, self.image_pe):
            nn.init.trunc_normal_(param, std=0.02)
        self.prm = PromptRecalibration(width, heads)
        self.lfrm = LocalFeatureRefinement(width, heads, depth=cfg.MODEL.SECAP.LFRM_DEPTH)
        self.embedding_dim = 2 * width
        self.feature_dim = width

    def loss_specs(self, cfg):
        """Identity and triplet losses of g and out, plus the weighted view loss."""
        return id_and_triplet(cfg, "sum") + [view_loss_spec(cfg)]

    def forward(self, images, camids=None, viewids=None):
        """Training: ``ModelOutput`` (branches global and out; view logits and tokens for the view loss);
        eval: (B, 2C) = [g, out], pre-BN."""
        tokens = self.backbone(images, camids, viewids, subtract_view=True)  # (B, 2 + N, C), no last block / LN
        top = branch_first_tokens(self.b1, tokens, 2)  # class and view tokens only
        cls, view = top[:, 0], top[:, 1]
        batch = images.shape[0]
        prompts = self.prm(self.prompt.expand(batch, -1, -1), cls - view)  # (B, P, C)
        queries = torch.cat([self.out_token.expand(batch, 1, -1), prompts], dim=1)  # (B, 1 + P, C)
        out = self.lfrm(tokens[:, 2:], self.image_pe.expand(batch, -1, -1), queries)[:, 0]
        if not self.training:
            return torch.cat([cls, out], dim=1)
        logits = {"global": self.head_id(cls)[0], "out": self.head_out(out)[0]}
        return ModelOutput(logits, {"global": cls, "out": out},
                           {"view_logits": self.head_view(view)[0], "inv_feat": cls, "view_feat": view})

    @classmethod
    def from_reference_state_dict(cls, state_dict, cfg):
        """Authors' SeCap keys -> this layout (their unused tensors dropped)."""
        return _layout(reference_depth(state_dict)).to_ours(state_dict)

    @classmethod
    def to_reference_state_dict(cls, state_dict, cfg):
        """Inverse of :meth:`from_reference_state_dict`; the authors' unused last block and norm are copies of
        ``b1``, their other unused tensors are left out."""
        return with_dead_last_block(_layout(0).to_reference(state_dict))

    @classmethod
    def reference_model_args(cls, state_dict, cfg):
        """Constructor sizes of an authors' checkpoint."""
        return view_model_args(state_dict, cfg)

"""CLIP-ReID's image-only baseline: the CLIP image encoder fine-tuned with ID + triplet losses.

Two BNNeck heads classify the CLS feature (width C) and the projected CLS feature (D); the triplet loss
sees CLIP-ReID's three features (penultimate CLS, CLS, projected CLS); retrieval uses the concatenated
pre-BN CLS and projected CLS (C + D).
"""
import torch
from torch import nn

from model.backbone import build_clip_from_config
from model.clip import SideInfoEmbedding
from model.heads import BNNeckHead
from model.registry import register_model


@register_model("CLIP_baseline")
class CLIP_baseline(nn.Module):
    """CLIP image encoder with optional side-information embedding (SIE) and two BNNeck heads."""

    def __init__(self, cfg, num_classes, num_cameras=1, num_views=1, attributes=()):
        super().__init__()
        self.num_classes = num_classes
        self._attach_backbone(build_clip_from_config(cfg))
        width, proj_dim = self.visual.width, self.visual.output_dim
        self.sie_embed = None
        if cfg.MODEL.SIE_CAMERA or cfg.MODEL.SIE_VIEW:
            self.sie_embed = SideInfoEmbedding(num_cameras if cfg.MODEL.SIE_CAMERA else 0,
                                               num_views if cfg.MODEL.SIE_VIEW else 0,
                                               width, cfg.MODEL.SIE_COE)
        self.head_cls = BNNeckHead(width, num_classes)
        self.head_proj = BNNeckHead(proj_dim, num_classes)
        self.embedding_dim = width + proj_dim

    def _attach_backbone(self, clip):
        # Only the image tower is kept: unused text parameters would idle in the optimiser and break DDP.
        self.visual = clip.visual

    def _side_embedding(self, camids, viewids):
        if self.sie_embed is None or (camids is None and viewids is None):
            return None
        return self.sie_embed(camids, viewids)

    def image_features(self, images, camids=None, viewids=None):
        """Return (penultimate CLS (B, C), CLS (B, C), projected CLS (B, D))."""
        feats = self.visual.forward_features(images, side_embed=self._side_embedding(camids, viewids))
        return feats.penultimate[:, 0], feats.tokens[:, 0], feats.projected[:, 0]

    def forward(self, images, camids=None, viewids=None, text_tokens=None):
        """Training: dict with ``id_logits`` and ``triplet_feats``; eval: (B, C + D) embedding."""
        penultimate_cls, cls, proj_cls = self.image_features(images, camids, viewids)
        if not self.training:
            return torch.cat([cls, proj_cls], dim=1)
        logits_cls, _ = self.head_cls(cls)
        logits_proj, _ = self.head_proj(proj_cls)
        return {"id_logits": [logits_cls, logits_proj],
                "triplet_feats": [penultimate_cls, cls, proj_cls]}

"""CLIP-ReID's image-only baseline: the CLIP image encoder fine-tuned with ID + triplet losses.

Two BNNeck heads classify the CLS feature (width C) and the projected CLS feature (D); the triplet loss
sees CLIP-ReID's three features (penultimate CLS, CLS, projected CLS); retrieval uses the concatenated
pre-BN CLS and projected CLS (C + D).
"""
import torch

from model.backbone import build_clip_from_config
from model.clip import SideInfoEmbedding
from model.contract import LossSpec, ModelOutput, ReIDModel
from model.heads import BNNeckHead
from model.registry import register_model


@register_model("CLIP_baseline")
class CLIP_baseline(ReIDModel):
    """CLIP image encoder with optional side-information embedding (SIE) and two BNNeck heads."""

    batch_inputs = ("camids", "viewids")

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
        self.feature_dim = width

    def loss_specs(self, cfg):
        """Identity and triplet losses summed over the branches."""
        return [LossSpec("id", cfg.MODEL.ID_LOSS_WEIGHT, {"reduction": "sum"}),
                LossSpec("triplet", cfg.MODEL.TRIPLET_LOSS_WEIGHT, {"reduction": "sum"})]

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

    def forward(self, images, camids=None, viewids=None):
        """Training: ``ModelOutput`` (logits of the CLS and projected-CLS heads; triplet features penultimate
        CLS, CLS, projected CLS); eval: (B, C + D) embedding."""
        penultimate_cls, cls, proj_cls = self.image_features(images, camids, viewids)
        if not self.training:
            return torch.cat([cls, proj_cls], dim=1)
        logits = {"cls": self.head_cls(cls)[0], "proj": self.head_proj(proj_cls)[0]}
        features = {"penultimate": penultimate_cls, "cls": cls, "proj": proj_cls}
        return ModelOutput(logits, features)

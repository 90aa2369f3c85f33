"""VDT, the View-decoupled Transformer (Zhang et al., CVPR 2024) for aerial-ground ReID.

Tokens [cls, view, patches]; after every block the view token is subtracted from the class token
(hierarchical subtraction). The final class token g is classified by identity, the final view token v by
view, and the view loss adds |cos(g, v)|. Test feature: g (C, pre-BN).
"""
from configs import CN, declare_config
from model.contract import ModelOutput, ReIDModel, view_loss
from model.heads import BNNeckHead
from model.registry import register_model
from model.vit.backbone import build_vit_backbone
from model.vit.reference import BACKBONE_NAMES, ReferenceLayout, rows, sie_counts
from model.vit.transreid import id_and_triplet


@declare_config
def add_vdt_config(cfg):
    """VDT's keys (MODEL.VDT; SeCap shares them)."""
    # VDT and SeCap: weight of the view loss (view classification + |cos(global, view)|).
    cfg.MODEL.VDT = CN()
    cfg.MODEL.VDT.VIEW_LOSS_WEIGHT = 0.1  # weight of the view loss of VDT and SeCap

#: (our name, the authors') of the VDT heads (SeCap's too).
VIEW_DECOUPLED_HEAD_NAMES = (
    ("head_id.bn.", "header.bottleneck."), ("head_id.classifier.", "header.classifier."),
    ("head_view.bn.", "header_view.bottleneck."), ("head_view.classifier.", "header_view.classifier."),
    ("head_out.bn.", "header_out.bottleneck."), ("head_out.classifier.", "header_out.classifier."))
VDT_LAYOUT = ReferenceLayout(names=(*VIEW_DECOUPLED_HEAD_NAMES, *BACKBONE_NAMES), dead=(r"BACKBONE\.fc\..*",))


def view_loss_spec(cfg):
    """The view term with MODEL.VDT.VIEW_LOSS_WEIGHT (smoothing: ``model.contract.view_loss``)."""
    return view_loss(cfg, cfg.MODEL.VDT.VIEW_LOSS_WEIGHT)


def view_model_args(state_dict, cfg):
    """Constructor sizes of an authors' VDT / SeCap checkpoint."""
    num_views = rows(state_dict, "header_view.classifier.weight", "number of views")
    num_cameras, num_views = sie_counts(state_dict, cfg, num_views, has_view_head=True)
    return {"num_classes": rows(state_dict, "header.classifier.weight", "number of identities"),
            "num_cameras": num_cameras, "num_views": num_views, "attributes": []}


@register_model("VDT")
class VDT(ReIDModel):
    """View-decoupled Transformer: identity head on the class token, view head on the view token."""

    fixes = ("VIEW_POS_EMBED", "VIEW_LOSS_SMOOTHING")

    batch_inputs = ("camids", "viewids")
    identity_parameters = (r"head_id\.classifier\.weight",)
    dataset_parameters = (r"backbone\.sie_embed\..*", r"head_view\..*")

    def __init__(self, cfg, num_classes, num_cameras=1, num_views=1, attributes=()):
        super().__init__()
        self.backbone = build_vit_backbone(cfg, num_cameras, num_views, view_token=True)
        width = self.backbone.embed_dim
        self.head_id = BNNeckHead(width, num_classes)
        self.head_view = BNNeckHead(width, num_views)
        self.embedding_dim = self.feature_dim = width

    def loss_specs(self, cfg):
        """Identity and triplet losses of the class token, plus the weighted view loss."""
        return id_and_triplet(cfg, "sum") + [view_loss_spec(cfg)]

    def forward(self, images, camids=None, viewids=None):
        """Training: ``ModelOutput`` (identity logits, class token, view logits and tokens for the view loss);
        eval: the (B, C) pre-BN class token."""
        tokens = self.backbone(images, camids, viewids, subtract_view=True, num_outputs=2)  # (B, 2, C)
        cls, view = tokens[:, 0], tokens[:, 1]
        if not self.training:
            return cls
        return ModelOutput({"global": self.head_id(cls)[0]}, {"global": cls},
                           {"view_logits": self.head_view(view)[0], "inv_feat": cls, "view_feat": view})

    @classmethod
    def from_reference_state_dict(cls, state_dict, cfg):
        """Authors' ``BACKBONE.* / header.* / header_view.*`` -> ``backbone.* / head_id.* / head_view.*``."""
        return VDT_LAYOUT.to_ours(state_dict)

    @classmethod
    def to_reference_state_dict(cls, state_dict, cfg):
        """Inverse of :meth:`from_reference_state_dict` (without the unused ``BACKBONE.fc``)."""
        return VDT_LAYOUT.to_reference(state_dict)

    @classmethod
    def reference_model_args(cls, state_dict, cfg):
        """Constructor sizes of an authors' checkpoint."""
        return view_model_args(state_dict, cfg)

"""CLIP-ReID's image-only baseline as SVPR-ReID's code runs it: the CLIP image encoder fine-tuned with ID +
triplet losses on the CLS feature.

The CLS feature (after ``ln_post``, width C) feeds one BNNeck head (identity loss) and, before the BN, the
triplet loss and retrieval (C-d). The reference also builds a BNNeck head on the projected CLS that it never
uses; it is kept, frozen, so that parameters and state dicts are the reference's
(docs/reference_differences.md). ``ClipImageModel`` is the image side shared with ``CLIP_ReID``.
"""
import torch
from torch import nn

from model.backbone import CLIP_CHECKPOINT_HINTS, build_clip_from_config
from model.clip import SideInfoEmbedding
from model.contract import LossSpec, ModelOutput, ReIDModel
from model.heads import BNNeckHead
from model.reference_names import rename_state_dict
from model.registry import register_model
from utils.errors import CheckpointError

# (our name, the reference's) of the image side (``model/make_model_clipreid.py``; convention:
# model/reference_names.py). ``{visual}`` is where the model keeps the image encoder.
IMAGE_SIDE_NAMES = (
    ("new_positional_embedding", "image_encoder.new_positional_embedding"),
    ("sie_embed.table", "cv_embed"),
    ("{visual}", "image_encoder."),
    ("head_cls.bn.", "bottleneck."),
    ("head_cls.classifier.", "classifier."),
    ("head_proj.bn.", "bottleneck_proj."),
    ("head_proj.classifier.", "classifier_proj."),
)


def check_reference_shapes(state_dict, cfg):
    """``CheckpointError`` naming the reference keys whose shapes contradict ``cfg`` (input size, stride,
    MODEL.TEXT_LEN, SIE switches)."""
    problems = []
    positions = state_dict.get("image_encoder.positional_embedding")
    conv = state_dict.get("image_encoder.conv1.weight")
    if positions is not None and conv is not None:
        (height, width), (stride_h, stride_w) = cfg.INPUT.SIZE_TRAIN, cfg.MODEL.STRIDE_SIZE
        patch = conv.shape[-1]
        rows = 1 + ((height - patch) // stride_h + 1) * ((width - patch) // stride_w + 1)
        if positions.shape[0] != rows:
            problems.append(f"image_encoder.positional_embedding has {positions.shape[0]} rows, INPUT.SIZE_TRAIN "
                            f"{list(cfg.INPUT.SIZE_TRAIN)} with MODEL.STRIDE_SIZE {list(cfg.MODEL.STRIDE_SIZE)} "
                            f"needs {rows}")
    text_positions = state_dict.get("text_encoder.positional_embedding")
    if text_positions is not None and text_positions.shape[0] != cfg.MODEL.TEXT_LEN:
        problems.append(f"text_encoder.positional_embedding has {text_positions.shape[0]} rows, MODEL.TEXT_LEN is "
                        f"{cfg.MODEL.TEXT_LEN}")
    if "cv_embed" in state_dict and not (cfg.MODEL.SIE_CAMERA or cfg.MODEL.SIE_VIEW):
        problems.append("cv_embed (side-information embedding) is present but MODEL.SIE_CAMERA and "
                        "MODEL.SIE_VIEW are False")
    if problems:
        raise CheckpointError("reference weights do not fit the config: " + "; ".join(problems))


def reference_model_args(state_dict, cfg):
    """Constructor arguments of a CLIP model for reference weights: identities from ``classifier.weight``,
    cameras/views from the rows of ``cv_embed`` and the SIE switches."""
    if "classifier.weight" not in state_dict:
        raise CheckpointError("reference weights lack classifier.weight: cannot tell the number of identities")
    args = {"num_classes": state_dict["classifier.weight"].shape[0], "num_cameras": 1, "num_views": 1,
            "attributes": ()}
    if "cv_embed" in state_dict:
        rows = state_dict["cv_embed"].shape[0]
        if cfg.MODEL.SIE_CAMERA and cfg.MODEL.SIE_VIEW:
            raise CheckpointError(f"cv_embed has {rows} = cameras x views rows (MODEL.SIE_CAMERA and MODEL.SIE_VIEW); "
                                  f"the split cannot be read from the weights: build the model from the dataset")
        if not (cfg.MODEL.SIE_CAMERA or cfg.MODEL.SIE_VIEW):
            raise CheckpointError("cv_embed is present but MODEL.SIE_CAMERA and MODEL.SIE_VIEW are False")
        args["num_cameras" if cfg.MODEL.SIE_CAMERA else "num_views"] = rows
    return args


class ClipImageModel(ReIDModel):
    """The CLIP image side of CLIP_baseline and CLIP_ReID: image encoder, optional side-information
    embedding (SIE), BNNeck heads on the CLS (C) and projected CLS (D) features, and the reference's unused
    ``new_positional_embedding`` (a frozen (1, C) table its image encoder builds for prompts it is never
    given here)."""

    batch_inputs = ("camids", "viewids")
    checkpoint_hints = CLIP_CHECKPOINT_HINTS
    identity_parameters = (r"head_(cls|proj)\.classifier\.weight",)
    dataset_parameters = (r"sie_embed\..*",)
    #: Where ``visual`` lives in this model's state dict.
    visual_prefix = "visual."

    def __init__(self, cfg, num_classes, num_cameras=1, num_views=1, attributes=()):
        super().__init__()
        self.num_classes = num_classes
        self._attach_backbone(build_clip_from_config(cfg))
        width, proj_dim = self.visual.width, self.visual.output_dim
        sie = SideInfoEmbedding(num_cameras if cfg.MODEL.SIE_CAMERA else 0, num_views if cfg.MODEL.SIE_VIEW else 0,
                                width, cfg.MODEL.SIE_COE)
        self.sie_embed = sie if sie.enabled else None  # the reference has no table without cameras/views
        self.new_positional_embedding = nn.Parameter(width ** -0.5 * torch.randn(1, width), requires_grad=False)
        self.head_cls = BNNeckHead(width, num_classes)
        self.head_proj = BNNeckHead(proj_dim, num_classes)

    def _attach_backbone(self, clip):
        # Only the image tower is kept: unused text parameters would idle in the optimiser and break DDP.
        self.visual = clip.visual

    def _side_embedding(self, camids, viewids):
        if self.sie_embed is None or (camids is None and viewids is None):
            return None
        return self.sie_embed(camids, viewids)

    def image_features(self, images, camids=None, viewids=None):
        """Return (penultimate CLS (B, C), CLS (B, C), projected CLS (B, D)); the last block computes only the
        CLS token, the one token these models read."""
        feats = self.visual.forward_features(images, side_embed=self._side_embedding(camids, viewids), num_outputs=1)
        return feats.penultimate[:, 0], feats.tokens[:, 0], feats.projected[:, 0]

    @classmethod
    def reference_names(cls):
        """``(ours, reference)`` name pairs of this model's state dict (prefixes end in ".")."""
        return tuple((ours.format(visual=cls.visual_prefix), ref) for ours, ref in IMAGE_SIDE_NAMES)

    @classmethod
    def from_reference_state_dict(cls, state_dict, cfg):
        """Our state dict from the reference's (``model/make_model_clipreid.py``; ``module.`` stripped)."""
        check_reference_shapes(state_dict, cfg)
        return rename_state_dict(state_dict, cls.reference_names(), False, f"reference {cls.__name__} weights")

    @classmethod
    def to_reference_state_dict(cls, state_dict, cfg):
        """The reference's state dict of ours."""
        return rename_state_dict(state_dict, cls.reference_names(), True, f"{cls.__name__} weights")

    @classmethod
    def reference_model_args(cls, state_dict, cfg):
        """Constructor arguments fitting reference weights (see :func:`reference_model_args`)."""
        return reference_model_args(state_dict, cfg)


@register_model("CLIP_baseline")
class CLIP_baseline(ClipImageModel):
    """CLIP image encoder (+ optional SIE) with a BNNeck head on the CLS feature; retrieval on the pre-BN CLS."""

    def __init__(self, cfg, num_classes, num_cameras=1, num_views=1, attributes=()):
        super().__init__(cfg, num_classes, num_cameras, num_views, attributes)
        self.head_proj.requires_grad_(False)  # the reference builds it but never calls it
        self.embedding_dim = self.feature_dim = self.visual.width

    def loss_specs(self, cfg):
        """Identity and triplet losses (the reference's ``ReIDLoss`` with ``add_type='sum'``)."""
        return [LossSpec("id", cfg.MODEL.ID_LOSS_WEIGHT, {"reduction": "sum"}),
                LossSpec("triplet", cfg.MODEL.TRIPLET_LOSS_WEIGHT, {"reduction": "sum"})]

    def forward(self, images, camids=None, viewids=None):
        """Training: ``ModelOutput`` (logits of the CLS head; triplet feature the pre-BN CLS); eval: the
        (B, C) pre-BN CLS."""
        _, cls, _ = self.image_features(images, camids, viewids)
        if not self.training:
            return cls
        return ModelOutput({"cls": self.head_cls(cls)[0]}, {"cls": cls})

"""The SVPR-ReID model: CLIP visual tower + VDFE + ASMOE + CVPR + local weighting, each switchable."""
import logging

import torch

from configs import CN, declare_config
from model.backbone import CLIP_CHECKPOINT_HINTS, build_clip_from_config
from model.clip import SideInfoEmbedding
from model.contract import LossSpec, ModelOutput, ReIDModel, view_loss
from model.heads import BNNeckHead
from model.registry import register_model
from model.svpr.asmoe import AttributeScatterMoE
from model.svpr.cvpr import ContextVisionProgressiveRefinement
from model.svpr import reference_layout
from model.svpr.local import LocalPatchWeighting
from model.svpr.text import AttributeTextEncoder
from model.svpr.vdfe import ViewDecoupledFeatureExtractor
from utils.errors import ConfigError


@declare_config
def add_svpr_config(cfg):
    """SVPR-ReID's keys: its components (MODEL.SVPR), its view caption (MODEL.VIEW_PROMPT) and the
    MODEL.FIXES switches of its defects."""
    # Number of learnable "X" prompt tokens in SVPR's view caption ("A photo of a X X X X person from X view.").
    cfg.MODEL.VIEW_PROMPT = 4
    # SVPR-ReID components (MODEL.ARCH_NAME CLIP_SVPR_ReID). Each switch removes its branch entirely.
    cfg.MODEL.SVPR = CN()
    # View-Decoupled Feature Extractor: view caption prompts, view token and View Bidirectional Decoupling.
    cfg.MODEL.SVPR.VDFE = True
    # Attribute-Scattered Mixture of Experts (needs attribute labels: MODEL.USE_ATTR and a dataset with them).
    cfg.MODEL.SVPR.ASMOE = True
    # Context-Vision Progressive Refinement of the patch tokens.
    cfg.MODEL.SVPR.CVPR = True
    # Learned per-patch weighting of the (refined) patch tokens into a local feature.
    cfg.MODEL.SVPR.LOCAL = True
    # Number of CVPR refinement stages; each keeps the top CVPR_TOPK fraction of the previous selection.
    cfg.MODEL.SVPR.CVPR_LAYERS = 3
    cfg.MODEL.SVPR.CVPR_TOPK = 0.5
    # Weight of the refined patches added back to the patch tokens (F + w * F_refined).
    cfg.MODEL.SVPR.PATCH_UPDATE = 0.1
    # ASMOE: number of experts, experts used per input, fraction of attributes kept by the router.
    cfg.MODEL.SVPR.NUM_EXPERTS = 4
    cfg.MODEL.SVPR.EXPERT_TOPK = 3
    cfg.MODEL.SVPR.ATTR_TOPK = 0.7
    # Loss weights of the view loss (VDFE) and of the summed attribute cross-entropies (ASMOE).
    cfg.MODEL.SVPR.VIEW_LOSS_WEIGHT = 1.0
    cfg.MODEL.SVPR.ATTR_LOSS_WEIGHT = 0.05
    # SVPR CVPR: the reference adds f_asmoe (B, C) to f_inv (B, 1, C), a (B, B, C) semantic key, so every image's
    # CVPR query attends over the whole batch's attribute features. True: a per-sample (B, 1, C) key.
    cfg.MODEL.FIXES.CVPR_PER_SAMPLE_KEY = False
    # SVPR CVPR: the reference reads the selected tokens in position order but writes the refined ones back in
    # score order (to permuted patches). True: each refined token goes back to the patch it was read from.
    cfg.MODEL.FIXES.CVPR_SCATTER_ORDER = False
    # SVPR CVPR: every reference stage ranks and refines the original backbone patches of the remaining
    # candidates. True: each stage reads the tokens the previous stage refined (progressive refinement).
    cfg.MODEL.FIXES.CVPR_PROGRESSIVE_KEYS = False
    # SVPR CVPR: the reference uses one block for all stages (weights shared). True: one block per stage.
    cfg.MODEL.FIXES.CVPR_SEPARATE_BLOCKS = False
    # SVPR view caption: the reference words view id v as token v+1 of "ground aerial" (0 ground, 1 aerial, 2 the
    # end-of-text token: AG-ReID.v2's wearable becomes "aerial", its UAV EOT). True: ground/aerial for two views,
    # cctv/wearable/uav for three.
    cfg.MODEL.FIXES.VIEW_WORDS = False
    # SVPR view head: the reference always has 3 view classes. True: as many classes as the dataset has views.
    cfg.MODEL.FIXES.VIEW_HEAD_CLASSES = False
    # SVPR: the reference builds parameters its forward never uses (q/k projections of attentions over a single
    # key, LayerNorms never applied: CrossAttention "normy", MLP "norm_layer", CVPR "ln_norm"). True: they are
    # not built (same outputs; fewer parameters, a state dict that no longer matches the reference's).
    cfg.MODEL.FIXES.DROP_UNUSED_PARAMETERS = False
    # SVPR: the reference crashes when the dataset has no attribute labels (CARGO). True: ASMOE is not built.
    cfg.MODEL.FIXES.NO_ATTRIBUTES = True
    # SVPR: the reference hard-codes 128 local weights (256x128 inputs, stride 16) and crashes on other sizes.
    # True: one weight row per real patch (identical for 256x128).
    cfg.MODEL.FIXES.LOCAL_PATCH_COUNT = True

logger = logging.getLogger(__name__)
# The reference sizes its local weights for 256x128 inputs with stride 16 (MODEL.FIXES.LOCAL_PATCH_COUNT).
REFERENCE_NUM_PATCHES = 128


@register_model("CLIP_SVPR_ReID")
class CLIPSVPRReID(ReIDModel):
    """SVPR-ReID (docs/method.md) on a CLIP ViT; ``MODEL.SVPR.{VDFE, ASMOE, CVPR, LOCAL}`` remove whole branches.

    ``forward(images (B, 3, H, W), camids=None, viewids=None, text_tokens=None)``: in training mode a
    ``ModelOutput`` with identity logits of the branches [inv, cvpr, local], triplet features [inv, cvpr,
    local, penultimate], and ``aux`` ``view_logits``/``view_feat``/``inv_feat`` (VDFE) and ``attr_logits``
    (ASMOE); in eval mode the (B, embedding_dim) concatenation of the enabled features
    [f_inv, f_cvpr, f_local, f_asmoe]. With every switch off it is the CLIP CLS-feature baseline.

    VDFE needs ``viewids``. ASMOE needs MODEL.USE_ATTR and a dataset with attributes (otherwise it is not
    built); its caption query needs MODEL.USE_TEXT and ``text_tokens`` (without them ASMOE runs without
    the caption term).

    With the MODEL.FIXES switches off (as shipped) this is exactly the authors' model, module for module;
    ``from_reference_state_dict``/``to_reference_state_dict`` convert its weights
    (docs/reference_differences.md).
    """

    fixes = ("CVPR_PER_SAMPLE_KEY", "CVPR_SCATTER_ORDER", "CVPR_PROGRESSIVE_KEYS", "CVPR_SEPARATE_BLOCKS", "VIEW_WORDS",
             "VIEW_HEAD_CLASSES", "DROP_UNUSED_PARAMETERS", "NO_ATTRIBUTES", "LOCAL_PATCH_COUNT",
             "ANNOTATION_PER_IMAGE", "VIEW_LOSS_SMOOTHING")

    batch_inputs = ("camids", "viewids", "text_tokens")
    identity_parameters = (r"head(_cvpr|_local)?\.classifier\.weight",)
    dataset_parameters = (r"sie\..*", r"vdfe\.head\..*", r"asmoe\.heads\..*", r"asmoe\.attribute_prompts")
    components = ("MODEL.SVPR.VDFE", "MODEL.SVPR.ASMOE", "MODEL.SVPR.CVPR", "MODEL.SVPR.LOCAL")
    checkpoint_hints = (
        ("asmoe", ("MODEL.SVPR.ASMOE", "MODEL.USE_ATTR")),
        ("attr", ("MODEL.USE_ATTR", "DATASETS.NAMES")),
        ("vdfe", ("MODEL.SVPR.VDFE",)),
        ("head_view", ("DATASETS.NAMES", "MODEL.FIXES.VIEW_HEAD_CLASSES")),
        ("view", ("MODEL.SVPR.VDFE", "MODEL.VIEW_PROMPT")),
        ("cvpr", ("MODEL.SVPR.CVPR", "MODEL.SVPR.CVPR_LAYERS", "MODEL.FIXES.CVPR_SEPARATE_BLOCKS",
                  "MODEL.FIXES.DROP_UNUSED_PARAMETERS")),
        ("local", ("MODEL.SVPR.LOCAL", "INPUT.SIZE_TRAIN", "MODEL.STRIDE_SIZE")),
    ) + CLIP_CHECKPOINT_HINTS

    def __init__(self, cfg, num_classes, num_cameras=1, num_views=1, attributes=()):
        super().__init__()
        svpr = cfg.MODEL.SVPR
        self.backbone = build_clip_from_config(cfg)
        visual = self.backbone.visual
        dim, num_patches = visual.width, visual.num_patches
        self.num_patches = num_patches

        self.sie = None
        if cfg.MODEL.SIE_CAMERA or cfg.MODEL.SIE_VIEW:
            self.sie = SideInfoEmbedding(num_cameras if cfg.MODEL.SIE_CAMERA else 0,
                                         num_views if cfg.MODEL.SIE_VIEW else 0, dim, cfg.MODEL.SIE_COE)

        fixes = cfg.MODEL.FIXES
        keep_unused = not fixes.DROP_UNUSED_PARAMETERS
        self.vdfe = None
        if svpr.VDFE:
            self.vdfe = ViewDecoupledFeatureExtractor(num_views, cfg.MODEL.VIEW_PROMPT, self.backbone.text_width,
                                                      self.backbone.embed_dim, dim, self.backbone.context_length,
                                                      fixes)

        self.asmoe = self.attribute_text = None
        if svpr.ASMOE and cfg.MODEL.USE_ATTR and attributes:
            self.asmoe = AttributeScatterMoE(dim, attributes, svpr.NUM_EXPERTS, svpr.EXPERT_TOPK, svpr.ATTR_TOPK,
                                             unused=keep_unused)
            if cfg.MODEL.USE_TEXT:
                self.attribute_text = AttributeTextEncoder(self.backbone.text_width, self.backbone.embed_dim, dim,
                                                           cfg.MODEL.TEXT_PROMPT, unused=keep_unused)
        elif svpr.ASMOE and cfg.MODEL.USE_ATTR and not fixes.NO_ATTRIBUTES:
            raise ConfigError("the dataset has no attribute labels, which the reference's ASMOE needs (it "
                              "crashes); set MODEL.FIXES.NO_ATTRIBUTES True or MODEL.USE_ATTR False")
        elif svpr.ASMOE:
            logger.info("ASMOE not built: %s", "the dataset has no attributes" if cfg.MODEL.USE_ATTR
                        else "MODEL.USE_ATTR is False")

        self.cvpr = None
        if svpr.CVPR:
            self.cvpr = ContextVisionProgressiveRefinement(dim, fixes, svpr.CVPR_LAYERS, svpr.CVPR_TOPK)
            self.head_cvpr = BNNeckHead(dim, num_classes)
        self.patch_update = svpr.PATCH_UPDATE

        self.local = None
        if svpr.LOCAL:
            if not fixes.LOCAL_PATCH_COUNT and num_patches != REFERENCE_NUM_PATCHES:
                raise ConfigError(f"the reference's local weights have {REFERENCE_NUM_PATCHES} rows but "
                                  f"INPUT.SIZE_TRAIN {list(cfg.INPUT.SIZE_TRAIN)} with MODEL.STRIDE_SIZE "
                                  f"{list(cfg.MODEL.STRIDE_SIZE)} gives {num_patches} patches; set "
                                  f"MODEL.FIXES.LOCAL_PATCH_COUNT True")
            self.local = LocalPatchWeighting(num_patches, dim)
            self.head_local = BNNeckHead(dim, num_classes)

        self.head = BNNeckHead(dim, num_classes)
        self._freeze_unused_backbone_parts()

        parts = ["inv" if self.vdfe is not None else "cls"] + [
            name for name, module in (("cvpr", self.cvpr), ("local", self.local), ("asmoe", self.asmoe))
            if module is not None]
        self.embedding_dim = dim * len(parts)
        self.feature_dim = dim
        logger.info("CLIP_SVPR_ReID: VDFE %s, ASMOE %s (caption query %s), CVPR %s, LOCAL %s; retrieval "
                    "embedding %d-d = [%s]", self.vdfe is not None, self.asmoe is not None,
                    self.attribute_text is not None, self.cvpr is not None, self.local is not None,
                    self.embedding_dim, ", ".join(parts))

    @classmethod
    def from_reference_state_dict(cls, state_dict, cfg):
        """Our state dict from the authors' (model/svpr/reference_layout.py)."""
        return reference_layout.from_reference(state_dict, cfg)

    @classmethod
    def to_reference_state_dict(cls, state_dict, cfg):
        """The authors' state dict (their ``load_param`` accepts it) of ours."""
        return reference_layout.to_reference(state_dict, cfg)

    @classmethod
    def reference_model_args(cls, state_dict, cfg):
        """Constructor sizes of the authors' model behind ``state_dict`` (reference layout)."""
        return reference_layout.model_args(state_dict, cfg)

    def test_feature_inputs(self):
        """Camera ids are read only by the side-information embedding of cameras (MODEL.SIE_CAMERA)."""
        reads_cameras = self.sie is not None and self.sie.num_cameras > 0
        return tuple(key for key in self.batch_inputs if key != "camids" or reads_cameras)

    def loss_specs(self, cfg):
        """Main branch + mean of the other branches for ID and triplet (as the paper's code weighs them),
        the view loss with VDFE (smoothed as the authors do unless MODEL.FIXES.VIEW_LOSS_SMOOTHING), the
        summed attribute cross-entropies with ASMOE."""
        specs = [LossSpec("id", cfg.MODEL.ID_LOSS_WEIGHT, {"reduction": "first_plus_mean"}),
                 LossSpec("triplet", cfg.MODEL.TRIPLET_LOSS_WEIGHT, {"reduction": "first_plus_mean"})]
        if self.vdfe is not None:
            specs.append(view_loss(cfg, cfg.MODEL.SVPR.VIEW_LOSS_WEIGHT))
        if self.asmoe is not None:
            specs.append(LossSpec("attr", cfg.MODEL.SVPR.ATTR_LOSS_WEIGHT))
        return specs

    def _freeze_unused_backbone_parts(self):
        # These never receive a gradient here; freezing them changes nothing numerically (optimisers skip
        # parameters without gradients) but keeps DDP from waiting for them.
        self.backbone.logit_scale.requires_grad_(False)
        self.backbone.visual.proj.requires_grad_(False)
        if self.vdfe is None and self.attribute_text is None:
            for module in (self.backbone.token_embedding, self.backbone.transformer, self.backbone.ln_final):
                module.requires_grad_(False)
            self.backbone.positional_embedding.requires_grad_(False)
            self.backbone.text_projection.requires_grad_(False)

    def forward(self, images, camids=None, viewids=None, text_tokens=None):
        side = self.sie(camids, viewids) if self.sie is not None else None
        extra = None
        if self.vdfe is not None:
            if viewids is None:
                raise ValueError("CLIP_SVPR_ReID with MODEL.SVPR.VDFE needs the view ids of the images")
            extra = self.vdfe.view_token(self.backbone, viewids, side)  # (B, 1, C)
        feats = self.backbone.visual.forward_features(images, side_embed=side, extra_tokens=extra)
        tokens = feats.tokens  # (B, 1 + N [+ 1], C)
        f_cls = tokens[:, 0]
        patches = tokens[:, 1:1 + self.num_patches]  # (B, N, C)
        aux = {}

        f_inv = f_cls
        if self.vdfe is not None:
            f_inv, f_view, view_logits = self.vdfe(f_cls, tokens[:, 1 + self.num_patches])
            aux.update(view_logits=view_logits, view_feat=f_view, inv_feat=f_inv)

        f_asmoe = None
        if self.asmoe is not None:
            text = None
            if self.attribute_text is not None and text_tokens is not None:
                text = self.attribute_text(self.backbone, text_tokens)
            f_asmoe, aux["attr_logits"] = self.asmoe(f_inv, patches, text)

        branches = {"inv": (f_inv, self.head)}
        if self.cvpr is not None:
            f_cvpr, refined = self.cvpr(f_inv, patches, f_asmoe)
            patches = patches + self.patch_update * refined
            branches["cvpr"] = (f_cvpr, self.head_cvpr)
        if self.local is not None:
            branches["local"] = (self.local(patches), self.head_local)

        if not self.training:
            features = [feature for feature, _ in branches.values()]
            return torch.cat(features + ([f_asmoe] if f_asmoe is not None else []), dim=1)

        logits = {name: head(feature)[0] for name, (feature, head) in branches.items()}
        features = {name: feature for name, (feature, _) in branches.items()}
        features["penultimate"] = feats.penultimate[:, 0]
        return ModelOutput(logits, features, aux)

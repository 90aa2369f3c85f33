"""CLIP-ReID (Li et al., AAAI 2023): identity-specific text prompts learned in stage 1 guide stage-2
fine-tuning of the CLIP image encoder.

Stage 1 (both encoders frozen) learns, per identity, four context vectors that replace the four ``X``
words of "A photo of a X X X X person." so that the prompt's text feature matches the identity's image
features. Stage 2 fixes the resulting text features and fine-tunes the image side with ID + triplet losses
plus an image-to-text cross-entropy on ``projected CLS @ text_features^T`` (the raw dot product, as in
CLIP-ReID: neither normalisation nor a logit scale).

As in the reference (``model/make_model_clipreid.py``), the prompt is built from stored embeddings of the
template's words before (``token_prefix``) and after (``token_suffix``) the context, so the model keeps
neither CLIP's token embedding nor its logit scale.
"""
import torch
from torch import nn

from configs import declare_config
from text import prompts, tokenize
from model.clip_baseline import ClipImageModel
from model.clip_reid.prompt_learning import PromptLearning
from model.contract import LossSpec, ModelOutput
from model.registry import register_model
from utils.errors import CheckpointError, ConfigError


@declare_config
def add_clip_reid_config(cfg):
    """CLIP-ReID's keys: the image-to-text loss weight and its prompt-length fix."""
    # Weight of CLIP-ReID's stage-2 image-to-text cross-entropy.
    cfg.MODEL.I2T_LOSS_WEIGHT = 1.0
    # CLIP-ReID's prompt: the reference tokenizes it at 77 tokens and crashes when MODEL.TEXT_LEN is not 77
    # (False raises a ConfigError there); True tokenizes it at MODEL.TEXT_LEN (identical results at 77).
    cfg.MODEL.FIXES.CLIPREID_PROMPT_AT_TEXT_LEN = True

NUM_CONTEXT_TOKENS = prompts.CLIP_REID_CONTEXT_WORDS
# The reference tokenizes the prompt at CLIP's own length (MODEL.FIXES.CLIPREID_PROMPT_AT_TEXT_LEN off).
REFERENCE_PROMPT_LENGTH = 77

TEXT_SIDE_NAMES = (
    ("clip.transformer.", "text_encoder.transformer."),
    ("clip.positional_embedding", "text_encoder.positional_embedding"),
    ("clip.ln_final.", "text_encoder.ln_final."),
    ("clip.text_projection", "text_encoder.text_projection"),
    ("cls_ctx", "prompt_learner.cls_ctx"),
    ("token_prefix", "prompt_learner.token_prefix"),
    ("token_suffix", "prompt_learner.token_suffix"),
)


def prompt_length(cfg):
    """Token length of the CLIP-ReID prompt for ``cfg``; ``ConfigError`` where the reference crashes."""
    if cfg.MODEL.FIXES.CLIPREID_PROMPT_AT_TEXT_LEN:
        return cfg.MODEL.TEXT_LEN
    if cfg.MODEL.TEXT_LEN != REFERENCE_PROMPT_LENGTH:
        raise ConfigError(f"MODEL.TEXT_LEN = {cfg.MODEL.TEXT_LEN} with MODEL.FIXES.CLIPREID_PROMPT_AT_TEXT_LEN False: "
                          f"the reference's {REFERENCE_PROMPT_LENGTH}-token CLIP-ReID prompt does not fit (it "
                          f"crashes); set TEXT_LEN 77 or the fix True")
    return REFERENCE_PROMPT_LENGTH


@register_model("CLIP_ReID")
class CLIP_ReID(ClipImageModel):
    """The CLIP-ReID image side (``ClipImageModel``) plus the frozen text tower and per-identity prompts."""

    fixes = ("CLIPREID_PROMPT_AT_TEXT_LEN", "STAGE1_EMPTY_BATCH")
    identity_parameters = ClipImageModel.identity_parameters + ("cls_ctx",)
    checkpoint_hints = (
        ("cls_ctx", ("DATASETS.NAMES",)),
        ("class_text_features", ("DATASETS.NAMES",)),
        ("token_suffix", ("MODEL.TEXT_LEN", "MODEL.FIXES.CLIPREID_PROMPT_AT_TEXT_LEN")),
    ) + ClipImageModel.checkpoint_hints

    training_phases = (PromptLearning,)
    # The authors' stage-2 loop (processor_clipreid_stage2.py) steps its warm-up schedule before each epoch.
    lr_step_at_epoch_start = True
    visual_prefix = "clip.visual."

    def __init__(self, cfg, num_classes, num_cameras=1, num_views=1, attributes=()):
        length = prompt_length(cfg)
        super().__init__(cfg, num_classes, num_cameras, num_views, attributes)
        width = self.clip.text_width
        tokens = tokenize(prompts.clip_reid_template(cfg.MODEL.PROMPT_SUBJECT), context_length=length)  # (1, L)
        self.register_buffer("prompt_tokens", tokens, persistent=False)
        # The prefix's EOT index is the number of tokens before the first X (SOT included).
        start = int(tokenize(prompts.CLIP_REID_PREFIX, context_length=length).argmax(-1))
        with torch.no_grad():
            embeds = self.clip.token_embedding(tokens)  # (1, L, W)
        self.register_buffer("token_prefix", embeds[:, :start].clone())  # (1, 5, W)
        self.register_buffer("token_suffix", embeds[:, start + NUM_CONTEXT_TOKENS:].clone())  # (1, L-9, W)
        # The reference's model holds neither; dropping them gives its parameter set and state dict.
        self.clip.token_embedding = None
        self.clip.logit_scale = None
        self.cls_ctx = nn.Parameter(torch.empty(num_classes, NUM_CONTEXT_TOKENS, width))
        nn.init.normal_(self.cls_ctx, std=0.02)
        # Stage 2's fixed text features of every identity; the prompt-learning phase recomputes them from the
        # prompts, so checkpoints (ours and the reference's) do not carry them.
        self.register_buffer("class_text_features", torch.zeros(num_classes, self.clip.embed_dim), persistent=False)
        self._class_text_features_set = False
        self.embedding_dim = self.visual.width + self.visual.output_dim
        self.feature_dim = self.visual.width
        self._trainable_at_build = frozenset(name for name, p in self.named_parameters() if p.requires_grad)

    def _attach_backbone(self, clip):
        self.clip = clip

    @property
    def visual(self):
        return self.clip.visual

    @classmethod
    def reference_names(cls):
        """Image-side names plus the text encoder and prompt learner."""
        return super().reference_names() + TEXT_SIDE_NAMES

    @classmethod
    def from_reference_state_dict(cls, state_dict, cfg):
        """Our state dict from the reference's. Its ``token_suffix`` always holds the 77-token template's rows
        9..76; at a longer prompt the extra rows are more padding, so its last (padding) row is repeated."""
        ours = super().from_reference_state_dict(state_dict, cfg)
        prefix, suffix = ours.get("token_prefix"), ours.get("token_suffix")
        if prefix is not None and suffix is not None:
            missing = prompt_length(cfg) - prefix.shape[1] - NUM_CONTEXT_TOKENS - suffix.shape[1]
            if missing > 0:
                ours["token_suffix"] = torch.cat([suffix, suffix[:, -1:].expand(-1, missing, -1)], dim=1)
        return ours

    @classmethod
    def to_reference_state_dict(cls, state_dict, cfg):
        """The reference's state dict of ours; ``token_suffix`` cut to the reference's 77-token template,
        which only drops repeated padding rows (``CheckpointError`` otherwise)."""
        reference = super().to_reference_state_dict(state_dict, cfg)
        prefix, suffix = reference.get("prompt_learner.token_prefix"), reference.get("prompt_learner.token_suffix")
        keep = REFERENCE_PROMPT_LENGTH - NUM_CONTEXT_TOKENS - (prefix.shape[1] if prefix is not None else 0)
        if prefix is not None and suffix is not None and suffix.shape[1] > keep:
            if not torch.equal(suffix[:, keep:], suffix[:, keep - 1:keep].expand_as(suffix[:, keep:])):
                raise CheckpointError(f"token_suffix rows {keep}.. are not padding; the reference's 77-token prompt "
                                      f"cannot hold them")
            reference["prompt_learner.token_suffix"] = suffix[:, :keep]
        return reference

    def loss_specs(self, cfg):
        """Identity and triplet losses summed over the branches, plus the image-to-text cross-entropy."""
        return [LossSpec("id", cfg.MODEL.ID_LOSS_WEIGHT, {"reduction": "sum"}),
                LossSpec("triplet", cfg.MODEL.TRIPLET_LOSS_WEIGHT, {"reduction": "sum"}),
                LossSpec("i2t", cfg.MODEL.I2T_LOSS_WEIGHT)]

    def prompt_parameters(self):
        """The learnable prompt parameters (stage 1 optimises only these)."""
        return [self.cls_ctx]

    def encode_image_for_prompts(self, images):
        """Projected CLS features (B, D) without side information, the image side of stage 1 (projected from
        all tokens as the reference does, so that even the float rounding is its)."""
        return self.visual.forward_features(images).projected[:, 0]

    def text_features(self, pids):
        """Projected EOT features (B, D) of the prompts of identities ``pids`` (B,)."""
        batch = pids.shape[0]
        context = self.cls_ctx[pids].to(self.token_prefix.dtype)  # (B, 4, W)
        embeds = torch.cat([self.token_prefix.expand(batch, -1, -1), context,
                            self.token_suffix.expand(batch, -1, -1)], dim=1)  # (B, L, W)
        return self.clip.encode_text(self.prompt_tokens.expand(batch, -1), token_embeds=embeds)

    @torch.no_grad()
    def set_class_text_features(self, feats):
        """Store the text features (num_classes, D) of every identity for stage 2's ``i2t_logits``."""
        if tuple(feats.shape) != tuple(self.class_text_features.shape):
            raise ValueError(f"class text features must have shape {tuple(self.class_text_features.shape)}, "
                             f"got {tuple(feats.shape)}")
        self.class_text_features.copy_(feats.detach())
        self._class_text_features_set = True

    def stand_in_for_phases(self, generator):
        """Random class text features in place of stage 1's (see ``ReIDModel.stand_in_for_phases``)."""
        feats = torch.randn(*self.class_text_features.shape, generator=generator)
        self.set_class_text_features(feats.to(self.class_text_features.device))

    @staticmethod
    def _image_side(name):
        return not name.startswith("clip.") or name.startswith("clip.visual.")

    def freeze_for_stage1(self):
        """Stage 1: only the prompt context vectors are trained."""
        for param in self.parameters():
            param.requires_grad_(False)
        for param in self.prompt_parameters():
            param.requires_grad_(True)

    def unfreeze_for_stage2(self):
        """Stage 2: the image side (encoder, SIE, heads) trains as built; text tower and prompts are frozen."""
        prompt_ids = {id(p) for p in self.prompt_parameters()}
        for name, param in self.named_parameters():
            trainable = (name in self._trainable_at_build and self._image_side(name)
                         and id(param) not in prompt_ids)
            param.requires_grad_(trainable)

    def forward(self, images, camids=None, viewids=None):
        """Training: ``ModelOutput`` (logits of the CLS and projected-CLS heads; triplet features penultimate
        CLS, CLS, projected CLS; ``aux["i2t_logits"]`` (B, num_classes)); eval: (B, C + D) pre-BN CLS and
        projected CLS."""
        penultimate_cls, cls, proj_cls = self.image_features(images, camids, viewids)
        if not self.training:
            return torch.cat([cls, proj_cls], dim=1)
        if not self._class_text_features_set:
            raise RuntimeError("CLIP_ReID: call set_class_text_features() (stage 2 text features of all "
                               "identities) before training forward passes")
        logits = {"cls": self.head_cls(cls)[0], "proj": self.head_proj(proj_cls)[0]}
        features = {"penultimate": penultimate_cls, "cls": cls, "proj": proj_cls}
        i2t = proj_cls @ self.class_text_features.to(proj_cls.dtype).t()
        return ModelOutput(logits, features, {"i2t_logits": i2t})

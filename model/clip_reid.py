"""CLIP-ReID (Li et al., AAAI 2023): identity-specific text prompts learned in stage 1 guide stage-2
fine-tuning of the CLIP image encoder.

Stage 1 (both encoders frozen) learns, per identity, four context vectors that replace the four ``X``
words of "A photo of a X X X X person." so that the prompt's text feature matches the identity's image
features. Stage 2 fixes the resulting text features and fine-tunes the image side with ID + triplet losses
plus an image-to-text cross-entropy on ``projected CLS @ text_features^T`` (the raw dot product, as in
CLIP-ReID: neither normalisation nor a logit scale).
"""
import torch
from torch import nn

from text import prompts, tokenize
from model.clip_baseline import CLIP_baseline
from model.contract import LossSpec
from model.registry import register_model

NUM_CONTEXT_TOKENS = prompts.CLIP_REID_CONTEXT_WORDS


@register_model("CLIP_ReID")
class CLIP_ReID(CLIP_baseline):
    """The CLIP-ReID image side (as ``CLIP_baseline``) plus the frozen text tower and per-identity prompts."""

    training_phases = ("prompt_learning",)

    def __init__(self, cfg, num_classes, num_cameras=1, num_views=1, attributes=()):
        super().__init__(cfg, num_classes, num_cameras, num_views, attributes)
        context_length = self.clip.context_length
        # The template is tokenized at the backbone's own context length, so any MODEL.TEXT_LEN works.
        self.register_buffer("prompt_tokens", tokenize(prompts.CLIP_REID_TEMPLATE, context_length=context_length),
                             persistent=False)  # (1, L)
        # The prefix's EOT index is the number of tokens before the first X (SOT included).
        self.context_start = int(tokenize(prompts.CLIP_REID_PREFIX, context_length=context_length).argmax(-1))
        self.cls_ctx = nn.Parameter(torch.empty(num_classes, NUM_CONTEXT_TOKENS, self.clip.text_width))
        nn.init.normal_(self.cls_ctx, std=0.02)
        # Stage 2's fixed text features of every identity; a buffer so that checkpoints carry them.
        self.register_buffer("class_text_features", torch.zeros(num_classes, self.clip.embed_dim))
        self._class_text_features_set = False
        self.register_load_state_dict_post_hook(self._mark_loaded_text_features)
        self._trainable_at_build = frozenset(name for name, p in self.named_parameters() if p.requires_grad)

    def _attach_backbone(self, clip):
        self.clip = clip

    def loss_specs(self, cfg):
        """CLIP_baseline's losses plus the image-to-text cross-entropy."""
        return CLIP_baseline.loss_specs(self, cfg) + [LossSpec("i2t", cfg.MODEL.I2T_LOSS_WEIGHT)]

    @property
    def visual(self):
        return self.clip.visual

    @staticmethod
    def _mark_loaded_text_features(module, incompatible_keys):
        if not any(key.endswith("class_text_features") for key in incompatible_keys.missing_keys):
            module._class_text_features_set = True

    def prompt_parameters(self):
        """The learnable prompt parameters (stage 1 optimises only these)."""
        return [self.cls_ctx]

    def encode_image_for_prompts(self, images):
        """Projected CLS features (B, D) without side information, the image side of stage 1."""
        return self.clip.encode_image(images)

    def text_features(self, pids):
        """Projected EOT features (B, D) of the prompts of identities ``pids`` (B,)."""
        tokens = self.prompt_tokens.expand(pids.shape[0], -1)  # (B, L)
        embeds = self.clip.token_embedding(tokens)  # (B, L, W)
        start, end = self.context_start, self.context_start + NUM_CONTEXT_TOKENS
        context = self.cls_ctx[pids].to(embeds.dtype)  # (B, 4, W)
        embeds = torch.cat([embeds[:, :start], context, embeds[:, end:]], dim=1)
        return self.clip.encode_text(tokens, token_embeds=embeds)

    @torch.no_grad()
    def set_class_text_features(self, feats):
        """Store the text features (num_classes, D) of every identity for stage 2's ``i2t_logits``."""
        if tuple(feats.shape) != tuple(self.class_text_features.shape):
            raise ValueError(f"class text features must have shape {tuple(self.class_text_features.shape)}, "
                             f"got {tuple(feats.shape)}")
        self.class_text_features.copy_(feats.detach())
        self._class_text_features_set = True

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
        """As ``CLIP_baseline`` plus ``aux["i2t_logits"]`` (B, num_classes) in training mode."""
        outputs = super().forward(images, camids, viewids)
        if not self.training:
            return outputs
        if not self._class_text_features_set:
            raise RuntimeError("CLIP_ReID: call set_class_text_features() (stage 2 text features of all "
                               "identities) before training forward passes")
        proj_cls = outputs.features["proj"]
        outputs.aux["i2t_logits"] = proj_cls @ self.class_text_features.to(proj_cls.dtype).t()
        return outputs

"""Build the CLIP backbone a config asks for: OpenAI weights from MODEL.PRETRAIN_PATH or random weights."""
from model.clip import build_clip, load_clip


def _freeze_text_tower(clip):
    for module in (clip.token_embedding, clip.transformer, clip.ln_final):
        module.requires_grad_(False)
    clip.positional_embedding.requires_grad_(False)
    clip.text_projection.requires_grad_(False)


def build_clip_from_config(cfg):
    """CLIP for ``cfg``: input size INPUT.SIZE_TRAIN, patch stride MODEL.STRIDE_SIZE, text length MODEL.TEXT_LEN
    (position tables resized with MODEL.POS_EMBED_INTERP).

    MODEL.RANDOM_INIT builds it from MODEL.CLIP.* with random weights; otherwise the weights (and thus the
    architecture) come from MODEL.PRETRAIN_PATH. Applies MODEL.FREEZE_TEXT and MODEL.GRAD_CHECKPOINT.
    """
    input_size = tuple(cfg.INPUT.SIZE_TRAIN)
    stride = tuple(cfg.MODEL.STRIDE_SIZE)
    if cfg.MODEL.RANDOM_INIT:
        arch = cfg.MODEL.CLIP
        clip = build_clip(arch.EMBED_DIM, image_size=input_size, patch_size=arch.PATCH_SIZE, stride=stride,
                          vision_width=arch.VISION_WIDTH, vision_layers=arch.VISION_LAYERS,
                          vision_heads=arch.VISION_HEADS, context_length=cfg.MODEL.TEXT_LEN,
                          vocab_size=arch.VOCAB_SIZE, text_width=arch.TEXT_WIDTH, text_heads=arch.TEXT_HEADS,
                          text_layers=arch.TEXT_LAYERS)
    else:
        clip = load_clip(cfg.MODEL.PRETRAIN_PATH, input_size=input_size, stride=stride,
                         context_length=cfg.MODEL.TEXT_LEN, pos_embed_interp=cfg.MODEL.POS_EMBED_INTERP)
    if cfg.MODEL.FREEZE_TEXT:
        _freeze_text_tower(clip)
    clip.set_grad_checkpointing(cfg.MODEL.GRAD_CHECKPOINT)
    return clip

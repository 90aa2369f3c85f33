"""Build the CLIP backbone a config asks for: OpenAI weights from MODEL.PRETRAIN_PATH or random weights."""
from configs import CN, declare_config
from model.clip import build_clip, load_clip


@declare_config
def add_clip_backbone_config(cfg):
    """The CLIP backbone's keys: random-init sizes (MODEL.CLIP), position-table interpolation, text
    freezing."""
    # Freeze the CLIP text tower (token embedding, transformer, positional embedding, final LN, projection).
    cfg.MODEL.FREEZE_TEXT = False
    # Freeze only the token-embedding table (vocabulary x text width). Its gradient is a dense table of which a
    # model reads a few hundred rows, so filling, accumulating and updating it is a sizeable part of a small
    # CLIP's training step (8% of the bf16 quickstart's epoch); the rest of the text tower keeps learning.
    cfg.MODEL.FREEZE_TOKEN_EMBEDDING = False
    # Interpolation of CLIP's 14x14 image position grid to the input's patch grid: "bilinear" (the
    # reference's, align_corners False, no antialiasing) or "bicubic".
    cfg.MODEL.POS_EMBED_INTERP = "bilinear"
    # CLIP hyper-parameters used only with MODEL.RANDOM_INIT; with a checkpoint they are read from the weights.
    cfg.MODEL.CLIP = CN()
    cfg.MODEL.CLIP.EMBED_DIM = 512  # joint image-text embedding size
    cfg.MODEL.CLIP.VISION_WIDTH = 768  # image transformer width
    cfg.MODEL.CLIP.VISION_LAYERS = 12  # image transformer depth
    cfg.MODEL.CLIP.VISION_HEADS = 12  # image transformer heads
    cfg.MODEL.CLIP.PATCH_SIZE = 16  # patch (kernel) size of the patch embedding
    cfg.MODEL.CLIP.TEXT_WIDTH = 512  # text transformer width
    cfg.MODEL.CLIP.TEXT_LAYERS = 12  # text transformer depth
    cfg.MODEL.CLIP.TEXT_HEADS = 8  # text transformer heads
    cfg.MODEL.CLIP.VOCAB_SIZE = 49408  # BPE vocabulary size (CLIP's tokenizer needs 49408)


#: ``checkpoint_hints`` rows of the CLIP backbone's parameters (models on CLIP add them to their own).
CLIP_CHECKPOINT_HINTS = (
    ("new_positional_embedding", ("MODEL.CLIP.VISION_WIDTH",)),
    ("visual.positional_embedding", ("INPUT.SIZE_TRAIN", "MODEL.STRIDE_SIZE")),
    ("visual.conv1", ("MODEL.CLIP.PATCH_SIZE",)),
    ("visual", ("MODEL.CLIP.VISION_WIDTH", "MODEL.CLIP.VISION_LAYERS", "MODEL.CLIP.EMBED_DIM")),
    ("positional_embedding", ("MODEL.TEXT_LEN",)),
    ("text", ("MODEL.TEXT_LEN", "MODEL.USE_TEXT", "MODEL.TEXT_PROMPT")),
)


def _freeze_text_tower(clip):
    for module in (clip.token_embedding, clip.transformer, clip.ln_final):
        module.requires_grad_(False)
    clip.positional_embedding.requires_grad_(False)
    clip.text_projection.requires_grad_(False)


def build_clip_from_config(cfg):
    """CLIP for ``cfg``: input size INPUT.SIZE_TRAIN, patch stride MODEL.STRIDE_SIZE, text length MODEL.TEXT_LEN
    (position tables resized with MODEL.POS_EMBED_INTERP).

    MODEL.RANDOM_INIT builds it from MODEL.CLIP.* with random weights; otherwise the weights (and thus the
    architecture) come from MODEL.PRETRAIN_PATH. Applies MODEL.FREEZE_TEXT, MODEL.FREEZE_TOKEN_EMBEDDING and
    MODEL.GRAD_CHECKPOINT.
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
    if cfg.MODEL.FREEZE_TOKEN_EMBEDDING:
        clip.token_embedding.requires_grad_(False)
    clip.set_grad_checkpointing(cfg.MODEL.GRAD_CHECKPOINT)
    return clip

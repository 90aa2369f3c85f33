"""Config keys of the authors' code that have no effect there either: accepted so that the reference's YAML
files load, ignored with a single warning naming them, and absent from our configs and ``config.yaml``."""

REFERENCE_ONLY_KEYS = (
    # Device pinning: CUDA_VISIBLE_DEVICES and MODEL.DEVICE choose the device here.
    "MODEL.DEVICE_ID",
    # Model switches the reference stores but never reads (ResNet stride, neck type, cosine classifier,
    # ID loss type, timm type string, text format, visual prompt, uniform heads, DDP flag: torchrun decides).
    "MODEL.LAST_STRIDE", "MODEL.NECK", "MODEL.COS_LAYER", "MODEL.ID_LOSS_TYPE", "MODEL.TRANSFORMER_TYPE",
    "MODEL.TEXT_FORMAT", "MODEL.VISUAL_PROMPT", "MODEL.HEAD_UNIFORM", "MODEL.DIST_TRAIN",
    # Unused augmentation switch; the sampler class name (the P x K identity sampler is the only one, and
    # DATALOADER.SAMPLER chooses between it and plain shuffling).
    "DATALOADER.AUG", "DATALOADER.SAMPLER_NAME",
    # Hyper-parameters of losses and schedules the reference defines but never uses.
    "SOLVER.CLUSTER_MARGIN", "SOLVER.RANGE_K", "SOLVER.RANGE_MARGIN", "SOLVER.RANGE_ALPHA", "SOLVER.RANGE_BETA",
    "SOLVER.RANGE_LOSS_WEIGHT", "SOLVER.COSINE_MARGIN", "SOLVER.COSINE_SCALE", "SOLVER.LR_MIN",
    "SOLVER.STAGE1.WARMUP_FACTOR", "SOLVER.STAGE1.WARMUP_ITERS", "SOLVER.STAGE1.WARMUP_METHOD",
    "SOLVER.STAGE1.COSINE_MARGIN", "SOLVER.STAGE1.COSINE_SCALE", "SOLVER.STAGE1.EVAL_PERIOD",
    "SOLVER.STAGE1.WEIGHT_DECAY_BIAS",
    # Periodic stage-1 weight files: stage 1's result is saved once, as OUTPUT_DIR/stage1.pth.
    "SOLVER.STAGE1.CHECKPOINT_PERIOD",
    # Test options the reference ignores: every model documents its test feature (pre-BN, as the
    # reference computes it); the distance matrix is not saved under this name.
    "TEST.NECK_FEAT", "TEST.DIST_MAT",
    # The reference's legacy CLIP-ReID schema (train_clipreid.py) and its per-stage keys.
    "SOLVER.STAGE2", "TEST.EVAL",
)


def split_reference_only(data, prefix=""):
    """Remove the reference-only keys from a nested config dict (in place); return their dotted names."""
    removed = []
    for key in list(data):
        dotted = f"{prefix}{key}"
        if dotted in REFERENCE_ONLY_KEYS:
            del data[key]
            removed.append(dotted)
        elif isinstance(data[key], dict):
            removed.extend(split_reference_only(data[key], dotted + "."))
    return removed

"""Load OpenAI CLIP weights (TorchScript archive or plain state dict) into our CLIP, resizing position tables."""
import os

import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from model.clip.archive import is_torchscript_archive, read_torchscript_state_dict
from model.clip.model import CLIP, patch_grid
from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError, ConfigError

# Entries of OpenAI's TorchScript archives that are metadata, not weights.
METADATA_KEYS = ("input_resolution", "context_length", "vocab_size")
_REQUIRED_KEYS = ("token_embedding.weight", "positional_embedding", "text_projection", "ln_final.weight")
# ResNet block counts of OpenAI's ResNet CLIP models, to name them in the error message.
_RESNET_NAMES = {(3, 4, 6, 3): "RN50", (3, 4, 23, 3): "RN101", (4, 6, 10, 6): "RN50x4",
                 (6, 8, 18, 8): "RN50x16", (3, 15, 36, 10): "RN50x64"}


def read_state_dict(path):
    """Tensors of a CLIP weights file: a TorchScript archive (OpenAI's release) or a ``torch.save``d dict."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"CLIP weights file not found: {path or '(empty MODEL.PRETRAIN_PATH)'}; get OpenAI's "
                              "ViT-B/16 with: python tools/download_weights.py ViT-B-16 (writes "
                              "pretrained/ViT-B-16.pt), or set MODEL.PRETRAIN_PATH to your copy")
    state_dict = read_torchscript_state_dict(path) if is_torchscript_archive(path) else load_checkpoint(path)
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise CheckpointError(f"{path} is not a CLIP checkpoint: expected a TorchScript archive or a state dict "
                              f"of tensors, got {type(state_dict).__name__}")
    return {key: value for key, value in state_dict.items() if key not in METADATA_KEYS}


def _count_blocks(state_dict, prefix):
    return len({key[len(prefix):].split(".")[0] for key in state_dict if key.startswith(prefix)})


def infer_architecture(state_dict, path="checkpoint"):
    """CLIP hyper-parameters from the weights' shapes (ViT image towers only)."""
    if "visual.proj" not in state_dict and "visual.layer1.0.conv1.weight" in state_dict:
        blocks = tuple(_count_blocks(state_dict, f"visual.layer{i}.") for i in range(1, 5))
        name = _RESNET_NAMES.get(blocks, "ResNet CLIP")
        raise CheckpointError(f"{path}: {name} not supported yet (only ViT CLIP weights such as ViT-B/16, "
                              f"ViT-B/32, ViT-L/14)")
    missing = [key for key in (*_REQUIRED_KEYS, "visual.proj", "visual.conv1.weight",
                               "visual.positional_embedding") if key not in state_dict]
    if missing:
        raise CheckpointError(f"{path} is not a CLIP checkpoint: missing {', '.join(missing)}")
    conv = state_dict["visual.conv1.weight"]
    vision_width, patch_size = conv.shape[0], conv.shape[-1]
    text_width = state_dict["ln_final.weight"].shape[0]
    num_positions = state_dict["visual.positional_embedding"].shape[0] - 1
    grid = round(num_positions ** 0.5)
    if conv.shape[-2] != patch_size or grid * grid != num_positions or vision_width % 64 or text_width % 64:
        raise CheckpointError(f"{path}: unsupported CLIP architecture (patch {tuple(conv.shape[-2:])}, "
                              f"{num_positions} image positions, widths {vision_width}/{text_width}); expected "
                              f"square patches, a square position grid and widths divisible by 64")
    return dict(
        embed_dim=state_dict["text_projection"].shape[1],
        patch_size=patch_size,
        vision_width=vision_width,
        vision_layers=_count_blocks(state_dict, "visual.transformer.resblocks."),
        vision_heads=vision_width // 64,
        pretrained_grid=(grid, grid),
        context_length=state_dict["positional_embedding"].shape[0],
        vocab_size=state_dict["token_embedding.weight"].shape[0],
        text_width=text_width,
        text_heads=text_width // 64,
        text_layers=_count_blocks(state_dict, "transformer.resblocks."),
    )


# Interpolation modes of the image position grid (MODEL.POS_EMBED_INTERP).
POS_EMBED_MODES = ("bilinear", "bicubic")


def resize_visual_positions(positions, old_grid, new_grid, mode="bilinear"):
    """(1+G*G, C) -> (1+rows*cols, C): resize of the patch grid (``mode`` "bilinear", as CLIP-ReID and
    SVPR-ReID do, or "bicubic"; align_corners False, no antialiasing), class row kept."""
    if mode not in POS_EMBED_MODES:
        raise ConfigError(f"MODEL.POS_EMBED_INTERP = {mode!r}: expected one of {', '.join(POS_EMBED_MODES)}")
    if tuple(old_grid) == tuple(new_grid):
        return positions
    resized = resample_abs_pos_embed(positions.float().unsqueeze(0), list(new_grid), list(old_grid),
                                     num_prefix_tokens=1, interpolation=mode, antialias=False,
                                     align_corners=False)
    return resized.squeeze(0).to(positions.dtype)


def resize_text_positions(positions, context_length):
    """(L0, W) -> (context_length, W): truncate when shorter; when longer keep the first and last rows and
    linearly interpolate the rows between them."""
    old_length = positions.shape[0]
    if context_length <= old_length:
        return positions[:context_length]
    middle = positions[1:-1].float().t().unsqueeze(0)  # (1, W, L0-2)
    middle = F.interpolate(middle, size=context_length - 2, mode="linear", align_corners=False)
    middle = middle.squeeze(0).t().to(positions.dtype)  # (context_length-2, W)
    return torch.cat([positions[:1], middle, positions[-1:]], dim=0)


def load_clip(path, input_size=(224, 224), stride=16, context_length=77, pos_embed_interp="bilinear"):
    """Build a CLIP from OpenAI weights at ``path`` for ``input_size`` (H, W), patch ``stride`` (int or
    (sh, sw)) and text ``context_length``, resizing the image position grid with ``pos_embed_interp``;
    fp32, eval mode. Raises ``CheckpointError`` on bad files."""
    state_dict = read_state_dict(path)
    arch = infer_architecture(state_dict, path)
    old_grid = arch.pop("pretrained_grid")
    arch["context_length"] = context_length
    model = CLIP(image_size=input_size, stride=stride, **arch)
    state_dict["visual.positional_embedding"] = resize_visual_positions(
        state_dict["visual.positional_embedding"], old_grid,
        patch_grid(input_size, arch["patch_size"], stride), pos_embed_interp)
    state_dict["positional_embedding"] = resize_text_positions(state_dict["positional_embedding"], context_length)
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as exc:
        reason = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: weights do not fit the inferred CLIP architecture ({reason})") from None
    return model.float().eval()

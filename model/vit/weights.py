"""ImageNet ViT weight files: the original ``jx_vit_base_p16_224-80ecf9dd.pth`` release and timm's own
ViT weight files (``.pth`` or ``.safetensors``), read into ``model.vit.backbone.ReIDVisionTransformer``.

Both formats use timm's key names (``cls_token``, ``pos_embed``, ``patch_embed.proj.*``, ``blocks.{i}.*``,
``norm.*``, ``head.*``); a ``model`` / ``state_dict`` wrapper, ``module.`` (DDP) and ``BACKBONE.`` (the
authors' ReID checkpoints) prefixes and a flattened 2-D patch weight are accepted too. Nothing is downloaded.
"""
import logging
import math
import os

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError

logger = logging.getLogger(__name__)

HEAD_DIM = 64  # every ViT of the jx/timm family has 64-wide heads, so heads = width / 64
_WRAPPERS = ("model", "state_dict")
_PREFIXES = ("module.", "BACKBONE.")
_REQUIRED = ("cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.0.attn.qkv.weight")
# Backbone tensors that pretrained ViT weights do not hold: the view token (zero at start) and the SIE.
_NOT_PRETRAINED = ("reg_token", "sie_embed.")


def read_vit_weights(path):
    """``{name: tensor}`` of the ViT weight file ``path`` (MODEL.PRETRAIN_PATH); one-line CheckpointError if
    it is missing, unreadable or not a ViT of the jx/timm layout."""
    if not path or not os.path.isfile(path):
        raise CheckpointError(f"ViT weights file not found: {path or '(empty)'} (MODEL.PRETRAIN_PATH); get the "
                              "ImageNet ViT-B/16 with: python tools/download_weights.py jx_vit_base_p16_224 (writes "
                              "pretrained/jx_vit_base_p16_224-80ecf9dd.pth), or set MODEL.PRETRAIN_PATH to your copy")
    if path.endswith(".safetensors"):
        try:
            state = load_file(path, device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path} (MODEL.PRETRAIN_PATH): expected a safetensors file "
                                  f"({' '.join(str(exc).split())[:160]})") from None
    else:
        state = load_checkpoint(path)
    for wrapper in _WRAPPERS:
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path} (MODEL.PRETRAIN_PATH): expected a state dict of tensors "
                              f"(ImageNet ViT weights such as jx_vit_base_p16_224-80ecf9dd.pth)")
    for prefix in _PREFIXES:
        state = {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state.items()}
    missing = [key for key in _REQUIRED if key not in state]
    if missing:
        raise CheckpointError(f"{path} (MODEL.PRETRAIN_PATH): not ImageNet ViT weights in the jx/timm layout "
                              f"(no {missing[0]!r} among its {len(state)} keys)")
    return state


def architecture_of(state, path):
    """Backbone sizes (embed_dim, depth, num_heads, patch_size, mlp_ratio, qkv_bias) read from the weights."""
    embed_dim = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"]
    patch_size = patch.shape[-1] if patch.dim() == 4 else math.isqrt(patch.shape[1] // 3)
    depth = len({key.split(".")[1] for key in state if key.startswith("blocks.")})
    if embed_dim % HEAD_DIM:
        raise CheckpointError(f"{path} (MODEL.PRETRAIN_PATH): width {embed_dim} is not a multiple of {HEAD_DIM}, "
                              "so the number of attention heads cannot be inferred")
    return {"embed_dim": embed_dim, "depth": depth, "num_heads": embed_dim // HEAD_DIM, "patch_size": patch_size,
            "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim,
            "qkv_bias": "blocks.0.attn.qkv.bias" in state}


def fit_pos_embed(posemb, grid_size, view_token, fix_view_pos, path=""):
    """The pretrained (1, 1 + S*S, C) table resized to ``grid_size`` and laid out for the backbone's tokens.

    The grid part is resized bilinearly without antialiasing (the authors' ``F.interpolate`` resize). With a
    view token: ``fix_view_pos`` gives [cls, cls, grid]; otherwise the authors' layout [cls, grid, 0], i.e.
    the view token at grid row 0 and every patch at its right neighbour's row; the authors' last row is
    uninitialised memory, which cannot be reproduced, so it is zero here (docs/baselines.md).
    """
    side = math.isqrt(posemb.shape[1] - 1)
    if side * side != posemb.shape[1] - 1:
        raise CheckpointError(f"{path} (MODEL.PRETRAIN_PATH): pos_embed has {posemb.shape[1]} rows; expected a "
                              "class row plus a square grid")
    table = resample_abs_pos_embed(posemb.float(), new_size=list(grid_size), old_size=[side, side],
                                   num_prefix_tokens=1, interpolation="bilinear", antialias=False)  # (1, 1 + N, C)
    if not view_token:
        return table
    if fix_view_pos:
        return torch.cat([table[:, :1], table], dim=1)  # (1, 2 + N, C)
    return torch.cat([table, table.new_zeros(1, 1, table.shape[2])], dim=1)  # (1, 2 + N, C)


def load_pretrained_vit(backbone, state, path, fix_view_pos=False):
    """Copy the weights ``state`` (from :func:`read_vit_weights`) into ``backbone``; log one line naming the
    skipped keys. A backbone tensor without weights or with another shape raises a one-line CheckpointError."""
    target = backbone.state_dict()
    loaded, skipped = {}, []
    for key, value in state.items():
        if key not in target:
            skipped.append(key)
            continue
        if key == "pos_embed":
            value = fit_pos_embed(value, backbone.patch_embed.grid_size, backbone.has_view_token, fix_view_pos, path)
        elif key == "patch_embed.proj.weight" and value.dim() == 2:
            value = value.reshape(target[key].shape)  # (C, 3*p*p) -> (C, 3, p, p)
        if value.shape != target[key].shape:
            raise CheckpointError(f"{path} (MODEL.PRETRAIN_PATH): {key} has shape {tuple(value.shape)}, the backbone "
                                  f"needs {tuple(target[key].shape)}")
        loaded[key] = value
    absent = [key for key in target if key not in loaded and not key.startswith(_NOT_PRETRAINED)]
    if absent:
        raise CheckpointError(f"{path} (MODEL.PRETRAIN_PATH): no weights for {len(absent)} backbone tensors "
                              f"({', '.join(absent[:3])})")
    backbone.load_state_dict(loaded, strict=False)
    kind = "safetensors" if path.endswith(".safetensors") else "torch"
    logger.info("loaded %d ViT tensors from %s (%s file, jx/timm layout; pos_embed resized to %dx%d); skipped %d "
                "unused: %s", len(loaded), path, kind, *backbone.patch_embed.grid_size, len(skipped),
                ", ".join(sorted(skipped)) or "none")

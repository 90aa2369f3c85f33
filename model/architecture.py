"""Backbone sizes read from the tensors of a whole-model checkpoint, so that a model whose every weight comes
from that checkpoint is built without the backbone weight file (OpenAI's ``ViT-B-16.pt``, the jx ViT file)."""
from utils.errors import CheckpointError

# Released CLIP and ImageNet ViT weights have 64 channels per attention head; the shapes of the weights do not
# tell the number of heads, so it is read the way the weight-file loaders read it (model/clip/loader.py,
# model/vit/weights.py).
HEAD_WIDTH = 64


def _count_blocks(weights, prefix):
    return len({key[len(prefix):].split(".")[0] for key in weights if key.startswith(prefix)})


def _heads(width, key, source):
    if width % HEAD_WIDTH:
        raise CheckpointError(f"{source}: the backbone width {width} is not a multiple of {HEAD_WIDTH}, so its "
                              f"number of attention heads cannot be read from the weights; set MODEL.RANDOM_INIT "
                              f"True with {key} as in training")
    return width // HEAD_WIDTH


def clip_sizes(weights, source="checkpoint"):
    """``{MODEL.CLIP key: value}`` of the CLIP backbone in ``weights`` (our layout, any prefix), or None if it
    holds none. Text-tower sizes are read only where the model keeps that tower."""
    conv = next((key for key in weights if key.endswith("visual.conv1.weight")), None)
    if conv is None:
        return None
    prefix = conv[:-len("visual.conv1.weight")]
    width = weights[conv].shape[0]
    sizes = {"VISION_WIDTH": width, "PATCH_SIZE": weights[conv].shape[-1],
             "VISION_LAYERS": _count_blocks(weights, prefix + "visual.transformer.resblocks."),
             "VISION_HEADS": _heads(width, "MODEL.CLIP.VISION_HEADS", source)}
    for key in ("visual.proj", "text_projection"):
        if prefix + key in weights:
            sizes["EMBED_DIM"] = weights[prefix + key].shape[1]
            break
    if prefix + "ln_final.weight" in weights:
        text_width = weights[prefix + "ln_final.weight"].shape[0]
        sizes.update(TEXT_WIDTH=text_width, TEXT_HEADS=_heads(text_width, "MODEL.CLIP.TEXT_HEADS", source),
                     TEXT_LAYERS=_count_blocks(weights, prefix + "transformer.resblocks."))
    else:
        sizes["TEXT_LAYERS"] = 1  # a model without the text tower drops it after building: build the least
    if prefix + "token_embedding.weight" in weights:
        sizes["VOCAB_SIZE"] = weights[prefix + "token_embedding.weight"].shape[0]
    return sizes


def vit_sizes(weights, source="checkpoint"):
    """``{MODEL.VIT key: value}`` of the ImageNet-ViT backbone in ``weights`` (our layout), or None."""
    patch = next((key for key in weights if key.endswith("patch_embed.proj.weight")
                  and key[:-len("patch_embed.proj.weight")] + "cls_token" in weights), None)
    if patch is None:
        return None
    prefix = patch[:-len("patch_embed.proj.weight")]
    width = weights[prefix + "cls_token"].shape[-1]
    # TransReID and SeCap move the backbone's last block and final LayerNorm into their own branch (b1): a
    # backbone without its final norm was built one block deeper than it holds.
    moved_out = 0 if prefix + "norm.weight" in weights else 1
    return {"EMBED_DIM": width, "PATCH_SIZE": weights[patch].shape[-1],
            "DEPTH": _count_blocks(weights, prefix + "blocks.") + moved_out,
            "NUM_HEADS": _heads(width, "MODEL.VIT.NUM_HEADS", source)}


def config_for_weights(cfg, weights, source="checkpoint"):
    """A frozen copy of ``cfg`` that builds the architecture of ``weights`` (a whole model's state dict in our
    layout) with random weights, to be overwritten by them: MODEL.RANDOM_INIT with the MODEL.CLIP.* /
    MODEL.VIT.* sizes read from the tensors. A config that already builds from those keys (RANDOM_INIT True)
    is returned as it is."""
    if cfg.MODEL.RANDOM_INIT:
        return cfg
    build = cfg.clone()
    build.defrost()
    build.MODEL.RANDOM_INIT = True
    for node, sizes in (("CLIP", clip_sizes(weights, source)), ("VIT", vit_sizes(weights, source))):
        for key, value in (sizes or {}).items():
            build.MODEL[node][key] = int(value)
    build.freeze()
    return build

"""CLIP_SVPR_ReID's state dict in the layout of the authors' code (ahu-xhao/SVPR-ReID) and back.

The reference's module tree (``model/make_model_clipreid_xhao.py``) is mirrored module by module, so most
keys differ only by name (``PREFIXES``, then ``COMPONENTS`` inside the module). The exceptions:

* the mixture of experts: ours stacks the expert weights (E, ...) for one batched product, the reference
  has ``experts.<e>.mlp.{0,2,4}`` Linear/LayerNorm modules (weights transposed);
* the view-caption builder's tensors, saved by the reference but derived from the frozen token table:
  ``TextNet.view_promptlearner.token_embedding.weight`` (the token table itself, a second time) and the
  buffers ``token_prefix_suffix`` / ``token_view`` (the embedded caption template and "ground aerial").
  To the reference they are recomputed; from the reference they are checked against the token table and
  a mismatch (a text tower trained after the buffers were made) raises ``CheckpointError``;
* MODEL.FIXES.DROP_UNUSED_PARAMETERS removes parameters the reference has: no conversion with it on.

docs/reference_differences.md lists the reference key of every parameter.
"""
import re

import torch

from model.reference_names import match_name
from text import tokenize
from utils.errors import CheckpointError

# (our name, the reference's) of each module (convention: model/reference_names.py).
PREFIXES = (
    ("backbone.", "BACKBONE."),
    ("sie.table", "cv_embed"),
    ("vdfe.pos_embed", "BACKBONE.visual.new_positional_embedding"),
    ("vdfe.text.view_prompt", "TextNet.view_prompt"),
    ("vdfe.text.word_to_prompt.", "TextNet.CA_text2prompt."),
    ("vdfe.text.fusion.", "TextNet.view_fusion."),
    ("vdfe.text.inverse.", "inverseNet_P2I."),
    ("vdfe.vbd.view_to_cls.", "VBD.CA_view2cls."),
    ("vdfe.vbd.cls_to_view.", "VBD.CA_cls2view."),
    ("vdfe.vbd.", "VBD."),
    ("vdfe.head.", "header_view."),
    ("attribute_text.text_prompt", "TextNet.text_prompt"),
    ("attribute_text.inverse.", "inverseNet_T2I."),
    ("asmoe.attribute_prompts", "ASMOE.attributesPrompt"),
    ("asmoe.cross_attention.", "ASMOE.cross_attention."),
    ("asmoe.moe.gate.", "ASMOE.attributesMOE.gate."),
    ("asmoe.router.", "ASMOE.attributesRouter."),
    ("asmoe.heads.", "ASMOE.attributsHeader."),
    ("cvpr.query_token", "use_cvpr_token"),
    ("cvpr.semantic_fuse.", "CVPRNet.vt_fuse."),
    ("cvpr.blocks.", "CVPRNet.blocks."),
    ("cvpr.unused_norm.", "CVPRNet.ln_norm."),
    ("cvpr.scorer.", "CVPRNet.attn_masker."),
    ("cvpr.gate.", "CVPRNet.gate_fc."),
    ("head_cvpr.", "header_cvpr."),
    ("local.weight", "local_weight"),
    ("head_local.", "header_local."),
    ("head.", "header."),
)
# Module names inside a prefix: ours -> the reference's.
COMPONENTS = {"q": "q_", "k": "k_", "v": "v_", "bn": "bottleneck", "fc1": "layers.0", "fc2": "layers.1",
              "self_attn": "attn", "token_attn": "cross_attn2", "norm_query": "norm4", "norm_tokens": "norm3"}
# The reference's MLPs call their never-applied LayerNorm "norm_layer", its attentions "normy".
_MLP_PREFIXES = ("inverseNet_P2I.", "inverseNet_T2I.", "ASMOE.attributesRouter.")

MOE_OURS = "asmoe.moe."
MOE_REFERENCE = "ASMOE.attributesMOE.experts."
# Our stacked expert tensor -> (reference layer index in experts.<e>.mlp, parameter, transposed).
MOE_PARAMETERS = {"fc1_weight": (0, "weight", True), "fc1_bias": (0, "bias", False),
                  "fc2_weight": (2, "weight", True), "fc2_bias": (2, "bias", False),
                  "norm_weight": (4, "weight", False), "norm_bias": (4, "bias", False)}
VIEW_BUILDER = "TextNet.view_promptlearner."
TOKEN_TABLE = "BACKBONE.token_embedding.weight"
# The reference's view-caption template and view words, exactly as its ViewPromptBuilder writes them.
REFERENCE_VIEW_TEMPLATE = "A photo of a {}person from X view."
REFERENCE_VIEW_TEXT = "ground aerial"


def _rename_components(rest, table):
    for old, new in table.items():
        rest = re.sub(rf"(^|\.){re.escape(old)}(?=\.|$)", rf"\g<1>{new}", rest)
    return rest


def _split_head_name(rest):
    """``<attribute name>.<module>.<param>`` -> (name, remainder): names may contain spaces, never dots."""
    name, _, remainder = rest.partition(".")
    return name, remainder


def to_reference_key(key):
    """The reference's name of our parameter ``key`` (not for the stacked experts), or None."""
    found = match_name(key, PREFIXES, to_reference=True)
    if found is None:
        return None
    ours, theirs = found
    rest = key[len(ours):]
    if theirs == "BACKBONE.":
        return theirs + rest
    if theirs == "ASMOE.attributsHeader.":
        name, rest = _split_head_name(rest)
        return f"{theirs}{name}.{_rename_components(rest, COMPONENTS)}"
    rest = _rename_components(rest, COMPONENTS)
    norm = "norm_layer" if theirs.startswith(_MLP_PREFIXES) or re.search(r"(^|\.)mlp\.unused_norm", rest) \
        else "normy"
    return theirs + re.sub(r"(^|\.)unused_norm(?=\.|$)", rf"\g<1>{norm}", rest)


def from_reference_key(key):
    """Our name of the reference's parameter ``key`` (not for the experts or the view builder), or None."""
    inverse = {new: old for old, new in COMPONENTS.items()}
    inverse.update(normy="unused_norm", norm_layer="unused_norm")
    found = match_name(key, PREFIXES, to_reference=False)
    if found is None:
        return None
    theirs, ours = found
    rest = key[len(theirs):]
    if ours == "backbone.":
        return ours + rest
    if ours == "asmoe.heads.":
        name, rest = _split_head_name(rest)
        return f"{ours}{name}.{_rename_components(rest, inverse)}"
    return ours + _rename_components(rest, inverse)


def view_builder_tensors(token_table, text_length, num_prompts):
    """The reference ViewPromptBuilder's saved tensors, computed from the token table ``(vocab, W)``."""
    template = REFERENCE_VIEW_TEMPLATE.format("X " * num_prompts)
    return {
        VIEW_BUILDER + "token_embedding.weight": token_table,
        VIEW_BUILDER + "token_prefix_suffix": token_table[tokenize(template, text_length, truncate=True)],
        VIEW_BUILDER + "token_view": token_table[tokenize(REFERENCE_VIEW_TEXT, text_length, truncate=True)],
    }


def _check_unused_kept(cfg):
    if cfg.MODEL.FIXES.DROP_UNUSED_PARAMETERS:
        raise CheckpointError("MODEL.FIXES.DROP_UNUSED_PARAMETERS is True: this model lacks parameters the "
                              "reference's state dict has; convert with it False")


def to_reference(state_dict, cfg):
    """The reference's state dict of our CLIP_SVPR_ReID ``state_dict`` (``model.state_dict()`` layout).

    Refuses models whose parameters the reference cannot hold (MODEL.FIXES that change parameters).
    """
    _check_unused_kept(cfg)
    changed = [name for name in ("CVPR_SEPARATE_BLOCKS", "VIEW_HEAD_CLASSES") if cfg.MODEL.FIXES[name]]
    if changed:
        raise CheckpointError(f"MODEL.FIXES.{changed[0]} is True: the reference model has no place for these "
                              f"parameters (one shared CVPR block, a 3-class view head)")
    out, unmapped = {}, []
    for key, value in state_dict.items():
        if key.startswith(MOE_OURS) and key[len(MOE_OURS):] in MOE_PARAMETERS:
            layer, param, transpose = MOE_PARAMETERS[key[len(MOE_OURS):]]
            for expert, tensor in enumerate(value):
                tensor = tensor.t() if transpose else tensor.reshape(-1)
                out[f"{MOE_REFERENCE}{expert}.mlp.{layer}.{param}"] = tensor.contiguous().clone()
            continue
        new = to_reference_key(key)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        raise CheckpointError(f"no reference name for {len(unmapped)} parameter(s): {', '.join(unmapped[:5])}")
    if "vdfe.text.view_prompt" in state_dict:
        out.update(view_builder_tensors(out[TOKEN_TABLE], cfg.MODEL.TEXT_LEN, cfg.MODEL.VIEW_PROMPT))
    return out


def _stack_experts(expert_tensors):
    """Our stacked expert tensors from the reference's ``experts.<e>.mlp.<layer>.<param>`` entries."""
    out = {}
    for name, (layer, param, transpose) in MOE_PARAMETERS.items():
        experts = sorted(e for (e, lay, par) in expert_tensors if (lay, par) == (layer, param))
        if experts != list(range(len(experts))) or not experts:
            raise CheckpointError(f"reference experts {MOE_REFERENCE}<e>.mlp.{layer}.{param} are not numbered "
                                  f"0..E-1 (found {experts})")
        tensors = [expert_tensors.pop((e, layer, param)) for e in experts]
        out[MOE_OURS + name] = torch.stack([t.t() if transpose else t.reshape(1, -1) for t in tensors])
    if expert_tensors:
        raise CheckpointError(f"unexpected reference expert entries: {sorted(expert_tensors)[:5]}")
    return out


def _check_view_builder(state_dict, cfg):
    """Pop the view builder's tensors, checking they are what the token table gives."""
    saved = {key: state_dict.pop(key) for key in list(state_dict) if key.startswith(VIEW_BUILDER)}
    if not saved:
        return
    if TOKEN_TABLE not in state_dict:
        raise CheckpointError(f"reference state dict has {VIEW_BUILDER}* but no {TOKEN_TABLE}")
    expected = view_builder_tensors(state_dict[TOKEN_TABLE], cfg.MODEL.TEXT_LEN, cfg.MODEL.VIEW_PROMPT)
    unknown = sorted(set(saved) - set(expected))
    if unknown:
        raise CheckpointError(f"unknown reference view-builder entries: {', '.join(unknown)}")
    for key, value in saved.items():
        if tuple(value.shape) != tuple(expected[key].shape):
            raise CheckpointError(f"{key} has shape {tuple(value.shape)}, expected {tuple(expected[key].shape)} "
                                  f"for MODEL.TEXT_LEN {cfg.MODEL.TEXT_LEN} and MODEL.VIEW_PROMPT "
                                  f"{cfg.MODEL.VIEW_PROMPT}")
        if not torch.equal(value.to(expected[key].dtype), expected[key]):
            raise CheckpointError(f"{key} differs from the embedding of its text by {TOKEN_TABLE}; this model "
                                  f"embeds the view caption with the current token table (was the text tower "
                                  f"trained, MODEL.FREEZE_TEXT False?)")


def from_reference(state_dict, cfg):
    """Our CLIP_SVPR_ReID state dict from the reference's (``module.`` prefixes already removed)."""
    _check_unused_kept(cfg)
    state_dict = dict(state_dict)
    _check_view_builder(state_dict, cfg)
    out, unmapped, experts = {}, [], {}
    pattern = re.compile(rf"^{re.escape(MOE_REFERENCE)}(\d+)\.mlp\.(\d+)\.(weight|bias)$")
    for key, value in state_dict.items():
        match = pattern.match(key)
        if match:
            experts[(int(match.group(1)), int(match.group(2)), match.group(3))] = value
            continue
        new = from_reference_key(key)
        if new is None:
            unmapped.append(key)
        else:
            out[new] = value
    if unmapped:
        raise CheckpointError(f"cannot map {len(unmapped)} reference key(s) to CLIP_SVPR_ReID: "
                              f"{', '.join(unmapped[:5])}")
    if experts:
        out.update(_stack_experts(experts))
    if not cfg.MODEL.FIXES.CVPR_SEPARATE_BLOCKS:
        _check_shared_blocks(out)
    return out


def _check_shared_blocks(state_dict):
    """With one shared CVPR block every ``cvpr.blocks.<i>`` copy must hold the same tensors."""
    first = {key[len("cvpr.blocks.0."):]: value for key, value in state_dict.items()
             if key.startswith("cvpr.blocks.0.")}
    for key, value in state_dict.items():
        match = re.match(r"cvpr\.blocks\.(\d+)\.(.+)$", key)
        if match and match.group(2) in first and not torch.equal(first[match.group(2)], value):
            raise CheckpointError(f"reference CVPR blocks differ ({to_reference_key(key)} vs block 0) but "
                                  f"MODEL.FIXES.CVPR_SEPARATE_BLOCKS is False (one shared block); set it True")


def model_args(state_dict, cfg, default_views=3):
    """Constructor sizes of the reference model behind ``state_dict``: classes from ``header``, attributes
    (name, classes) from the attribute heads in saved order, SIE sizes from ``cv_embed``. The reference
    records no view count: ``default_views`` (3, the width of its view-word table and view head) unless the
    SIE table holds views only."""
    if "header.classifier.weight" not in state_dict:
        raise CheckpointError("reference state dict has no header.classifier.weight: not a CLIP_SVPR_ReID model")
    attributes = []
    for key, value in state_dict.items():
        match = re.match(r"ASMOE\.attributsHeader\.([^.]+)\.classifier\.weight$", key)
        if match:
            attributes.append([match.group(1), int(value.shape[0])])
    num_cameras, num_views = 1, default_views
    if "cv_embed" in state_dict:
        rows = int(state_dict["cv_embed"].shape[0])
        if cfg.MODEL.SIE_CAMERA and cfg.MODEL.SIE_VIEW:
            if rows % num_views:
                raise CheckpointError(f"cv_embed has {rows} rows, not a multiple of {num_views} views")
            num_cameras = rows // num_views
        elif cfg.MODEL.SIE_CAMERA:
            num_cameras = rows
        elif cfg.MODEL.SIE_VIEW:
            num_views = rows
    return {"num_classes": int(state_dict["header.classifier.weight"].shape[0]), "num_cameras": num_cameras,
            "num_views": num_views, "attributes": attributes}

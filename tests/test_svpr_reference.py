"""CLIP_SVPR_ReID against the authors' code: state-dict layout, parameter count, test-time feature, fixes,
and tools/convert_reference.py end to end. Tiny random-weight CLIP (64x32 input, 2 layers) on the CPU.

The reference layout and forward are written here from the authors' module tree and forward pass
(docs/reference_differences.md), independently of model/svpr/.
"""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from configs import load_config
from tests import fixtures
from model import MODELS, build_model
from model.checkpoint_fit import load_model_weights
from model.clip import build_clip
from processor.model_io import load_trained_model
from text import tokenize
from utils.errors import CheckpointError, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
C, D, W, L = 96, 64, 64, 32  # visual width, text embedding dim, text width, text length
VOCAB = 49408
N_PROMPTS = 4
NUM_PATCHES = 8  # 64x32 input, stride 16
NUM_CLASSES = 5
ATTRIBUTES = (("gender", 2), ("upper color", 4), ("hat", 2), ("bag", 3))
CLIP_SIZES = {"EMBED_DIM": D, "VISION_WIDTH": C, "VISION_HEADS": 4, "TEXT_WIDTH": W, "TEXT_HEADS": 4}
# The same tiny model as command-line overrides, for the scripts run as subprocesses.
TINY = ["MODEL.RANDOM_INIT", "True", "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "MODEL.TEXT_LEN",
        str(L), *(item for key, value in {**fixtures.TINY_CLIP, **CLIP_SIZES}.items()
                  for item in (f"MODEL.CLIP.{key}", str(value)))]
CONFIG = os.path.join(ROOT, "configs", "CP2108", "svpr_reid.yml")
NUMERIC_FIXES = ("CVPR_PER_SAMPLE_KEY", "CVPR_SCATTER_ORDER", "CVPR_PROGRESSIVE_KEYS", "CVPR_SEPARATE_BLOCKS",
                 "VIEW_WORDS", "VIEW_HEAD_CLASSES", "DROP_UNUSED_PARAMETERS")

pytestmark = pytest.mark.usefixtures("single_thread")


def tiny_cfg(*opts):
    return fixtures.tiny_cfg("CLIP_SVPR_ReID", CONFIG, opts=["MODEL.TEXT_LEN", str(L), *opts], clip=CLIP_SIZES,
                             frozen=True)


# ---- the reference's state-dict layout, from its module tree -------------------------------------------

def reference_layout(attributes=ATTRIBUTES, num_classes=NUM_CLASSES, experts=4, blocks=3):
    """{key: shape} of the authors' CLIP_SVPR_ReID (USE_TEXT, USE_ATTR, VIEW_PROMPT 4, TEXT_PROMPT 4)."""
    keys = {}

    def linear(prefix, fan_in, fan_out, bias=True):
        keys[prefix + ".weight"] = (fan_out, fan_in)
        if bias:
            keys[prefix + ".bias"] = (fan_out,)

    def layer_norm(prefix, dim):
        keys[prefix + ".weight"] = keys[prefix + ".bias"] = (dim,)

    def cross_attention(prefix, dim):  # attention.CrossAttention: normy (unused), q_/k_/v_ without bias, proj
        layer_norm(prefix + ".normy", dim)
        for name in ("q_", "k_", "v_"):
            linear(f"{prefix}.{name}", dim, dim, bias=False)
        linear(prefix + ".proj", dim, dim)

    def mlp(prefix, fan_in, hidden, fan_out):  # attention.MLP: norm_layer (unused), layers.0, layers.1
        layer_norm(prefix + ".norm_layer", fan_in)
        linear(prefix + ".layers.0", fan_in, hidden)
        linear(prefix + ".layers.1", hidden, fan_out)

    def header(prefix, dim, classes):  # Header: bottleneck BatchNorm1d, classifier without bias
        for name in ("weight", "bias", "running_mean", "running_var"):
            keys[f"{prefix}.bottleneck.{name}"] = (dim,)
        keys[prefix + ".bottleneck.num_batches_tracked"] = ()
        linear(prefix + ".classifier", dim, classes, bias=False)

    def multihead(prefix, dim):  # nn.MultiheadAttention
        keys[prefix + ".in_proj_weight"] = (3 * dim, dim)
        keys[prefix + ".in_proj_bias"] = (3 * dim,)
        linear(prefix + ".out_proj", dim, dim)

    clip = build_clip(D, image_size=(64, 32), patch_size=16, stride=(16, 16), vision_width=C, vision_layers=2,
                      vision_heads=4, context_length=L, text_width=W, text_heads=4, text_layers=2)
    keys.update({"BACKBONE." + key: tuple(value.shape) for key, value in clip.state_dict().items()})
    keys["BACKBONE.visual.new_positional_embedding"] = (1, C)
    keys["TextNet.text_prompt"] = keys["TextNet.view_prompt"] = (1, N_PROMPTS, W)
    keys["TextNet.view_promptlearner.token_embedding.weight"] = (VOCAB, W)
    keys["TextNet.view_promptlearner.token_prefix_suffix"] = keys["TextNet.view_promptlearner.token_view"] = (1, L, W)
    cross_attention("TextNet.CA_text2prompt", D)
    linear("TextNet.view_fusion", D * N_PROMPTS, D)
    mlp("inverseNet_T2I", D, 4 * D, C)
    mlp("inverseNet_P2I", D, 4 * D, C)
    multihead("VBD.CA_view2cls", C)
    multihead("VBD.CA_cls2view", C)
    keys["VBD.alpha"] = ()
    layer_norm("VBD.norm", C)
    linear("VBD.mlp.0", C, C)
    linear("VBD.mlp.2", C, C)
    header("header_view", C, 3)
    keys["ASMOE.attributesPrompt"] = (1, len(attributes), C)
    cross_attention("ASMOE.cross_attention", C)
    for e in range(experts):
        linear(f"ASMOE.attributesMOE.experts.{e}.mlp.0", C, 4 * C)
        linear(f"ASMOE.attributesMOE.experts.{e}.mlp.2", 4 * C, C)
        layer_norm(f"ASMOE.attributesMOE.experts.{e}.mlp.4", C)
    linear("ASMOE.attributesMOE.gate", C, experts)
    mlp("ASMOE.attributesRouter", C, 1, C)
    for name, classes in attributes:
        header(f"ASMOE.attributsHeader.{name}", C, classes)
    keys["use_cvpr_token"] = (1, 1, C)
    cross_attention("CVPRNet.vt_fuse", C)
    for b in range(blocks):
        prefix = f"CVPRNet.blocks.{b}"
        layer_norm(prefix + ".norm1", C)
        linear(prefix + ".attn.qkv", C, 3 * C, bias=False)
        linear(prefix + ".attn.proj", C, C)
        cross_attention(prefix + ".cross_attn", C)
        cross_attention(prefix + ".cross_attn2", C)
        for norm in ("norm2", "norm3", "norm4"):
            layer_norm(f"{prefix}.{norm}", C)
        mlp(prefix + ".mlp", C, 4 * C, C)
    layer_norm("CVPRNet.ln_norm", C)
    linear("CVPRNet.attn_masker.q_", C, C, bias=False)
    linear("CVPRNet.attn_masker.k_", C, C, bias=False)
    linear("CVPRNet.gate_fc.0", C, C)
    header("header_cvpr", C, num_classes)
    keys["local_weight"] = (NUM_PATCHES, C)
    header("header_local", C, num_classes)
    header("header", C, num_classes)
    return keys


def _is_buffer(key):
    return key.endswith(("running_mean", "running_var", "num_batches_tracked"))


def reference_parameter_count(layout):
    """Unique parameters of the reference: no buffers, the view builder's copies and the shared block once."""
    return sum(math.prod(shape) for key, shape in layout.items()
               if not _is_buffer(key) and not key.startswith("TextNet.view_promptlearner.")
               and not key.startswith(("CVPRNet.blocks.1.", "CVPRNet.blocks.2.")))


def random_reference_state_dict(seed=0, layout=None):
    """Random tensors in the reference's layout, consistent the way the authors' model is: one shared CVPR
    block, the token table twice, the view builder's buffers embedded from it."""
    generator = torch.Generator().manual_seed(seed)
    layout = layout or reference_layout()
    state = {}
    for key, shape in layout.items():
        noise = torch.randn(shape, generator=generator)
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=generator) + 0.5
        elif key.endswith((".bias", "running_mean")):
            state[key] = 0.02 * noise
        elif len(shape) == 1 and key.endswith(".weight"):  # LayerNorm / BatchNorm scales
            state[key] = 1 + 0.1 * noise
        elif len(shape) >= 2 and not any(word in key for word in ("prompt", "Prompt", "cvpr_token", "local_weight")):
            state[key] = 0.02 * noise  # projections, tables
        else:
            state[key] = noise  # prompts, query token, local weights, class embedding, alpha
    for key in layout:
        if key.startswith(("CVPRNet.blocks.1.", "CVPRNet.blocks.2.")):
            state[key] = state["CVPRNet.blocks.0." + key.split(".", 3)[3]]
    table = state["BACKBONE.token_embedding.weight"]
    builder = "TextNet.view_promptlearner."
    state[builder + "token_embedding.weight"] = table
    template = tokenize("A photo of a X X X X  person from X view.", context_length=L, truncate=True)
    state[builder + "token_prefix_suffix"] = table[template]
    state[builder + "token_view"] = table[tokenize("ground aerial", context_length=L, truncate=True)]
    return state


def ours_from_reference(reference, *opts, num_views=2):
    cfg = tiny_cfg(*opts)
    model_class = MODELS.get("CLIP_SVPR_ReID")
    args = model_class.reference_model_args(reference, cfg)
    model = build_model(cfg, args["num_classes"], args["num_cameras"], num_views, args["attributes"])
    model.load_state_dict(model_class.from_reference_state_dict(reference, cfg), strict=True)
    return model.eval(), cfg


def test_reference_layout_loads_strictly_round_trips_and_counts_the_same_parameters():
    layout = reference_layout()
    reference = random_reference_state_dict()
    model, cfg = ours_from_reference(reference)
    assert sum(p.numel() for p in model.parameters()) == reference_parameter_count(layout)
    assert MODELS.get("CLIP_SVPR_ReID").reference_model_args(reference, cfg) == {
        "num_classes": NUM_CLASSES, "num_cameras": 1, "num_views": 3,
        "attributes": [list(item) for item in ATTRIBUTES]}
    back = type(model).to_reference_state_dict(model.state_dict(), cfg)
    assert set(back) == set(reference)
    for key, value in reference.items():
        assert back[key].shape == value.shape and torch.equal(back[key], value.to(back[key].dtype)), key
    # ours -> reference -> ours is the identity as well
    ours = model.state_dict()
    again = type(model).from_reference_state_dict(back, cfg)
    assert set(again) == set(ours) and all(torch.equal(again[k], ours[k]) for k in ours)


def test_conversion_refuses_what_it_cannot_map():
    reference = random_reference_state_dict()
    cfg = tiny_cfg()
    model_class = MODELS.get("CLIP_SVPR_ReID")
    with pytest.raises(CheckpointError, match="ASMOE.extra_head.weight"):
        model_class.from_reference_state_dict({**reference, "ASMOE.extra_head.weight": torch.zeros(2)}, cfg)
    stale = dict(reference)
    stale["TextNet.view_promptlearner.token_view"] = stale["TextNet.view_promptlearner.token_view"] + 1
    with pytest.raises(CheckpointError, match="token_view"):
        model_class.from_reference_state_dict(stale, cfg)
    unshared = dict(reference)
    unshared["CVPRNet.blocks.2.norm1.weight"] = unshared["CVPRNet.blocks.2.norm1.weight"] + 1
    with pytest.raises(CheckpointError, match="CVPR_SEPARATE_BLOCKS"):
        model_class.from_reference_state_dict(unshared, cfg)
    separate = model_class.from_reference_state_dict(unshared, tiny_cfg("MODEL.FIXES.CVPR_SEPARATE_BLOCKS", "True"))
    assert not torch.equal(separate["cvpr.blocks.2.norm1.weight"], separate["cvpr.blocks.0.norm1.weight"])
    for fix in ("DROP_UNUSED_PARAMETERS", "CVPR_SEPARATE_BLOCKS", "VIEW_HEAD_CLASSES"):
        fixed_cfg = tiny_cfg(f"MODEL.FIXES.{fix}", "True")
        fixed = build_model(fixed_cfg, NUM_CLASSES, 1, 2, ATTRIBUTES)
        with pytest.raises(CheckpointError, match=fix):
            model_class.to_reference_state_dict(fixed.state_dict(), fixed_cfg)
    with pytest.raises(CheckpointError, match="DROP_UNUSED_PARAMETERS"):
        model_class.from_reference_state_dict(reference, tiny_cfg("MODEL.FIXES.DROP_UNUSED_PARAMETERS", "True"))
    model, _ = ours_from_reference(reference)
    with pytest.raises(CheckpointError, match="another shape"):
        bad = dict(reference, local_weight=torch.zeros(9, C))
        load_model_weights(model, model_class.from_reference_state_dict(bad, cfg), cfg)


# ---- the reference's test-time feature, written from its forward pass -----------------------------------

def attention(query, key, value, w_q, w_k, w_v, w_o, b_o, heads, b_q=None, b_k=None, b_v=None):
    """softmax(Q K^T / sqrt(d)) V per head, then the output projection; (B, Nq, C) x (B, Nk, C)."""
    q, k, v = F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)
    batch, n_q, dim = q.shape
    split = lambda x: x.reshape(batch, x.shape[1], heads, dim // heads).transpose(1, 2)
    q, k, v = split(q), split(k), split(v)
    weights = (q @ k.transpose(-2, -1) / math.sqrt(dim // heads)).softmax(-1)
    return F.linear((weights @ v).transpose(1, 2).reshape(batch, n_q, dim), w_o, b_o)


def cross(R, prefix, query, key, heads=8):
    return attention(query, key, key, R[prefix + ".q_.weight"], R[prefix + ".k_.weight"], R[prefix + ".v_.weight"],
                     R[prefix + ".proj.weight"], R[prefix + ".proj.bias"], heads)


def multihead(R, prefix, query, key, heads=4):
    w, b = R[prefix + ".in_proj_weight"].chunk(3), R[prefix + ".in_proj_bias"].chunk(3)
    return attention(query, key, key, w[0], w[1], w[2], R[prefix + ".out_proj.weight"], R[prefix + ".out_proj.bias"],
                     heads, b[0], b[1], b[2])


def mlp(R, prefix, x):
    x = F.gelu(F.linear(x, R[prefix + ".layers.0.weight"], R[prefix + ".layers.0.bias"]))
    return F.linear(x, R[prefix + ".layers.1.weight"], R[prefix + ".layers.1.bias"])


def layer_norm(R, prefix, x, eps=1e-5):
    return F.layer_norm(x, x.shape[-1:], R[prefix + ".weight"], R[prefix + ".bias"], eps)


def reference_features(R, clip, images, viewids, tokens):
    """[f_inv, f_cvpr, f_local, f_asmoe] (B, 4C) of the authors' model in eval mode with weights ``R``."""
    batch = images.shape[0]
    # Attribute caption: prompts ADDED at positions 5..8, EOT feature + mean of the prompt positions.
    embeds = clip.token_embedding(tokens).clone()
    embeds[:, 5:9] = embeds[:, 5:9] + R["TextNet.text_prompt"]
    feats = clip.encode_text(tokens, token_embeds=embeds, return_all=True)  # (B, L, D), all L positions
    t_tok = feats[torch.arange(batch), tokens.argmax(-1)] + feats[:, 5:9].mean(1)
    T = mlp(R, "inverseNet_T2I", t_tok)
    # View caption: the saved template embedding, prompts REPLACE positions 5..8, the view slot 11 takes
    # token_view[:, 1:][view] (0 ground, 1 aerial, 2 EOT).
    caption = R["TextNet.view_promptlearner.token_prefix_suffix"].expand(batch, -1, -1).clone()
    caption[:, 5:9] = R["TextNet.view_prompt"][0]
    caption[:, 11] = R["TextNet.view_promptlearner.token_view"][0, 1:][viewids]
    template = tokenize("A photo of a X X X X  person from X view.", context_length=L, truncate=True).expand(batch, -1)
    view_feats = clip.encode_text(template, token_embeds=caption, return_all=True)
    prompts, word = view_feats[:, 5:9], view_feats[:, 11:12]
    fused = cross(R, "TextNet.CA_text2prompt", prompts, word) + prompts
    v_tok = F.linear(fused.reshape(batch, -1), R["TextNet.view_fusion.weight"], R["TextNet.view_fusion.bias"])
    V0 = mlp(R, "inverseNet_P2I", v_tok)
    # Image: the view token (+ new_positional_embedding) joins before the last block.
    extra = (V0 + R["BACKBONE.visual.new_positional_embedding"])[:, None]
    x12 = clip.visual.forward_features(images, extra_tokens=extra).tokens
    f_cls, patches, f_view = x12[:, 0], x12[:, 1:-1], x12[:, -1]
    # VBD
    f_inv = f_cls - R["VBD.alpha"] * multihead(R, "VBD.CA_view2cls", f_cls[:, None], f_view[:, None])[:, 0]
    # ASMOE
    m = cross(R, "ASMOE.cross_attention", T[:, None], patches)[:, 0]
    outs, scores = [], []
    for a in range(len(ATTRIBUTES)):
        u = m + R["ASMOE.attributesPrompt"][0, a] + f_inv
        experts = []
        for e in range(4):
            p = f"ASMOE.attributesMOE.experts.{e}.mlp."
            h = F.linear(u, R[p + "0.weight"], R[p + "0.bias"])
            h = h * torch.sigmoid(1.702 * h)
            h = F.linear(h, R[p + "2.weight"], R[p + "2.bias"])
            h = h * torch.sigmoid(1.702 * h)
            experts.append(F.layer_norm(h, (C,), R[p + "4.weight"], R[p + "4.bias"], 1e-6))
        gate = F.linear(u, R["ASMOE.attributesMOE.gate.weight"], R["ASMOE.attributesMOE.gate.bias"]).softmax(-1)
        top = gate.topk(3, dim=-1)  # top-3 experts, weights not renormalised
        stacked = torch.stack(experts, 1)  # (B, E, C)
        outs.append((stacked.gather(1, top.indices[..., None].expand(-1, -1, C)) * top.values[..., None]).sum(1))
        scores.append(mlp(R, "ASMOE.attributesRouter", u).mean(-1))
    outs, scores = torch.stack(outs, 1), torch.stack(scores, 1)
    top = scores.topk(int(len(ATTRIBUTES) * 0.7), dim=1)
    f_asmoe = (outs.gather(1, top.indices[..., None].expand(-1, -1, C)) * top.values.softmax(1)[..., None]).sum(1)
    # CVPR: batch-wide semantic key (B, 1, C) + (B, C) -> (B, B, C); one shared block; keys always from the
    # original patches; selected tokens in position order written at the score-ordered positions.
    sem = f_inv[:, None] + f_asmoe
    prompt = R["use_cvpr_token"].expand(batch, -1, -1)
    query = cross(R, "CVPRNet.vt_fuse", prompt, sem)
    current = torch.arange(NUM_PATCHES).repeat(batch, 1)
    updated = patches.clone()
    blk = "CVPRNet.blocks.0."
    for _ in range(3):
        key = torch.stack([patches[b, current[b]] for b in range(batch)])
        q = F.linear(query, R["CVPRNet.attn_masker.q_.weight"]).reshape(batch, 1, 8, C // 8).transpose(1, 2)
        k = F.linear(key, R["CVPRNet.attn_masker.k_.weight"]).reshape(batch, -1, 8, C // 8).transpose(1, 2)
        score = ((q @ k.transpose(-2, -1)) * (C // 8) ** -0.5).softmax(-1).mean(1)[:, 0]  # (B, n)
        idx = score.topk(int(key.shape[1] * 0.5), dim=-1).indices
        mask = torch.zeros_like(score, dtype=torch.bool).scatter(1, idx, True)
        selected = key[mask].view(batch, -1, C)
        w_q, w_k, w_v = R[blk + "attn.qkv.weight"].chunk(3)
        self_attended = attention(query, query, query, w_q, w_k, w_v, R[blk + "attn.proj.weight"],
                                  R[blk + "attn.proj.bias"], 8)
        query = layer_norm(R, blk + "norm1", query + self_attended)
        query = layer_norm(R, blk + "norm2", query + cross(R, blk + "cross_attn", query, selected))
        query = layer_norm(R, blk + "norm4", query + mlp(R, blk + "mlp", query))
        selected = layer_norm(R, blk + "norm3", selected + cross(R, blk + "cross_attn2", selected, query))
        global_idx = current.gather(1, idx)
        for b in range(batch):
            updated[b, global_idx[b]] = selected[b]
        current = global_idx
        gate = torch.sigmoid(F.linear(query, R["CVPRNet.gate_fc.0.weight"], R["CVPRNet.gate_fc.0.bias"]))
        prompt = gate * query + (1 - gate) * prompt
    f_cvpr = prompt[:, 0]
    refined = patches + 0.1 * updated
    f_local = (refined * torch.tanh(R["local_weight"])).mean(1)
    return torch.cat([f_inv, f_cvpr, f_local, f_asmoe], dim=1)


def _batch(size=4, seed=3, num_views=2):
    generator = torch.Generator().manual_seed(seed)
    images = torch.randn(size, 3, 64, 32, generator=generator)
    viewids = torch.arange(size) % num_views
    captions = [f"A photo of a X X X X  person. The person is {w}." for w in ("male", "female", "young", "old")]
    return images, viewids, tokenize(captions[:size], context_length=L)


@pytest.mark.parametrize("num_views", [2, 3])
def test_each_test_time_branch_equals_the_reference_forward(num_views):
    reference = random_reference_state_dict(seed=num_views)
    model, _ = ours_from_reference(reference, num_views=num_views)
    images, viewids, tokens = _batch(num_views=num_views)
    with torch.no_grad():
        ours = model(images, viewids=viewids, text_tokens=tokens)
        expected = reference_features(reference, model.backbone, images, viewids, tokens)
    assert ours.shape == expected.shape == (4, 4 * C)
    for part, name in enumerate(("inv", "cvpr", "local", "asmoe")):
        torch.testing.assert_close(ours[:, part * C:(part + 1) * C], expected[:, part * C:(part + 1) * C],
                                   rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f"{name}: {m}")
    # The batch-wide key makes f_cvpr depend on the batch (the reference's behaviour); the fix removes that.
    with torch.no_grad():
        alone = torch.cat([model(images[i:i + 1], viewids=viewids[i:i + 1], text_tokens=tokens[i:i + 1])
                           for i in range(4)])
    assert not torch.allclose(alone[:, C:2 * C], ours[:, C:2 * C], atol=1e-4)
    fixed, _ = ours_from_reference(reference, "MODEL.FIXES.CVPR_PER_SAMPLE_KEY", "True", num_views=num_views)
    with torch.no_grad():
        together = fixed(images, viewids=viewids, text_tokens=tokens)
        alone = torch.cat([fixed(images[i:i + 1], viewids=viewids[i:i + 1], text_tokens=tokens[i:i + 1])
                           for i in range(4)])
    torch.testing.assert_close(together, alone, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("fix", NUMERIC_FIXES)
def test_each_numeric_fix_changes_the_model_and_runs(fix):
    # Two views have the same words either way; AG-ReID.v2's three do not.
    num_views = 3 if fix == "VIEW_WORDS" else 2
    images, viewids, tokens = _batch(num_views=num_views)
    reference = random_reference_state_dict(seed=5)
    base, _ = ours_from_reference(reference, num_views=num_views)
    torch.manual_seed(0)
    fixed = build_model(tiny_cfg(f"MODEL.FIXES.{fix}", "True"), NUM_CLASSES, 1, num_views, ATTRIBUTES)
    out = fixed.train()(images, viewids=viewids, text_tokens=tokens)
    assert out.aux["view_logits"].shape == (4, 2 if fix == "VIEW_HEAD_CLASSES" else 3)
    if fix in ("CVPR_SEPARATE_BLOCKS", "VIEW_HEAD_CLASSES", "DROP_UNUSED_PARAMETERS"):  # parameters change
        assert sum(p.numel() for p in fixed.parameters()) != sum(p.numel() for p in base.parameters())
        return
    fixed.load_state_dict(base.state_dict(), strict=True)  # same parameters, other numerics
    with torch.no_grad():
        assert not torch.allclose(fixed.eval()(images, viewids=viewids, text_tokens=tokens),
                                  base(images, viewids=viewids, text_tokens=tokens), atol=1e-5)


def test_crash_fixes_are_on_by_default_and_off_reproduces_the_reference_refusal():
    cfg = tiny_cfg()
    assert cfg.MODEL.FIXES.NO_ATTRIBUTES and cfg.MODEL.FIXES.LOCAL_PATCH_COUNT
    assert build_model(cfg, NUM_CLASSES, 1, 2, ()).asmoe is None  # CARGO: no attribute labels
    with pytest.raises(ConfigError, match="MODEL.FIXES.NO_ATTRIBUTES"):
        build_model(tiny_cfg("MODEL.FIXES.NO_ATTRIBUTES", "False"), NUM_CLASSES, 1, 2, ())
    with pytest.raises(ConfigError, match="MODEL.FIXES.LOCAL_PATCH_COUNT"):  # 8 patches, the reference's 128
        build_model(tiny_cfg("MODEL.FIXES.LOCAL_PATCH_COUNT", "False"), NUM_CLASSES, 1, 2, ATTRIBUTES)


@pytest.mark.parametrize("benchmark", ["CP2108", "CARGO", "AGReIDv1", "AGReIDv2"])
def test_shipped_configs_build_the_reference_model(benchmark):
    cfg = load_config(os.path.join(ROOT, "configs", benchmark, "svpr_reid.yml"))
    assert cfg.MODEL.ARCH_NAME == "CLIP_SVPR_ReID" and cfg.MODEL.TEXT_LEN == 100
    assert list(cfg.INPUT.SIZE_TRAIN) == [256, 128] and list(cfg.MODEL.STRIDE_SIZE) == [16, 16]
    assert not any(cfg.MODEL.FIXES[name] for name in NUMERIC_FIXES)


# ---- tools/convert_reference.py end to end -------------------------------------------------------------

def _convert(*args):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_reference.py"), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


def test_convert_reference_tool_round_trip_and_errors(tmp_path):
    reference = random_reference_state_dict(seed=11)
    ref_file = tmp_path / "transformer_1.pth"
    # The authors' training saves model.state_dict() of a DDP-wrapped model: "module." prefixes.
    torch.save({"module." + key: value for key, value in reference.items()}, ref_file)
    ours_file, back_file = tmp_path / "ours.pth", tmp_path / "back.pth"
    result = _convert("--reference", str(ref_file), "--config_file", CONFIG, "--out", str(ours_file),
                      "--num_views", "2", *TINY)
    assert result.returncode == 0, result.stderr
    model, epoch = load_trained_model(tiny_cfg(), str(ours_file), torch.device("cpu"))
    saved = torch.load(ours_file, weights_only=True)
    assert epoch is None and saved["model_args"]["num_views"] == 2 and "CLIP_SVPR_ReID" in saved["config"]
    images, viewids, tokens = _batch()
    with torch.no_grad():
        torch.testing.assert_close(model(images, viewids=viewids, text_tokens=tokens),
                                   reference_features(reference, model.backbone, images, viewids, tokens),
                                   rtol=1e-4, atol=1e-5)
    result = _convert("--to-reference", str(ours_file), "--config_file", CONFIG, "--out", str(back_file), *TINY)
    assert result.returncode == 0, result.stderr
    back = torch.load(back_file, weights_only=True)
    assert set(back) == set(reference) and all(torch.equal(back[k], reference[k]) for k in reference)

    torch.save({**reference, "CVPRNet.extra.weight": torch.zeros(3)}, ref_file)
    result = _convert("--reference", str(ref_file), "--config_file", CONFIG, "--out", str(ours_file), *TINY)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "CVPRNet.extra.weight" in lines[0]


def _drop_unused(state_dict, dim=C):
    """Our reference-layout state dict -> the DROP_UNUSED_PARAMETERS layout: single-key attentions keep
    their value rows and output projection, never-applied LayerNorms and the q/k projections go."""
    out = {}
    for key, value in state_dict.items():
        if key.startswith("backbone."):
            out[key] = value
        elif "unused_norm" in key or key.startswith(("vdfe.text.word_to_prompt.q.", "vdfe.text.word_to_prompt.k.")):
            continue
        elif ".token_attn.q." in key or ".token_attn.k." in key:
            continue
        elif key.endswith("self_attn.qkv.weight"):
            out[key.replace("qkv", "v")] = value[2 * dim:]
        elif key.endswith("in_proj_weight"):
            out[key.replace("in_proj_weight", "v.weight")] = value[2 * dim:]
        elif key.endswith("in_proj_bias"):
            out[key.replace("in_proj_bias", "v.bias")] = value[2 * dim:]
        elif ".out_proj." in key:
            out[key.replace("out_proj", "proj")] = value
        else:
            out[key] = value
    return out


def test_dropping_the_unused_parameters_keeps_every_output():
    reference = random_reference_state_dict(seed=7)
    model, _ = ours_from_reference(reference)
    slim = build_model(tiny_cfg("MODEL.FIXES.DROP_UNUSED_PARAMETERS", "True"), NUM_CLASSES, 1, 2, ATTRIBUTES)
    slim.load_state_dict(_drop_unused(model.state_dict()), strict=True)
    slim.eval()
    removed = sum(p.numel() for p in model.parameters()) - sum(p.numel() for p in slim.parameters())
    # per CVPR block: q/k of the self-attention and of cross_attn2, 3 LayerNorms; CVPR: 2; text: q/k + 1;
    # VBD: 2 x (q/k weights + biases); ASMOE: 2; inverse nets: 2
    assert removed == (2 * C * C + 2 * C * C + 3 * 2 * C) + 2 * 2 * C + (2 * D * D + 2 * D) \
        + 2 * (2 * C * C + 2 * C) + 2 * 2 * C + 2 * 2 * D
    images, viewids, tokens = _batch()
    with torch.no_grad():
        torch.testing.assert_close(slim(images, viewids=viewids, text_tokens=tokens),
                                   model(images, viewids=viewids, text_tokens=tokens), rtol=1e-5, atol=1e-6)

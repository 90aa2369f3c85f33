"""CLIP_baseline and CLIP_ReID against the reference's layout and behaviour (tiny random CLIP, CPU).

The reference's state-dict keys and its forward passes are written out here from its description
(docs/reference_differences.md; ``model/make_model_clipreid.py`` and ``model/backbone/clip/model_xhao.py`` of
ahu-xhao/SVPR-ReID), independently of the model code: a reference-layout state dict made from that key list
loads strictly, converts back unchanged, has the reference's parameter count, and gives the features the
written-out forward passes give.
"""
import math
import os

import pytest
import torch
import torch.nn.functional as F

from configs import get_cfg_defaults
from model import build_model
from model.checkpoint_fit import load_model_weights
from model.clip import build_clip
from model.contract import ReIDModel
from tests.fixtures import tiny_cfg
from text import tokenize
from utils.errors import CheckpointError, ConfigError

NUM_CLASSES, BATCH = 5, 4
WIDTH, LAYERS, EMBED_DIM, TEXT_WIDTH, TEXT_LAYERS, PATCH = 64, 2, 32, 64, 2, 16
HEIGHT, IMG_WIDTH = 64, 32
GRID = ((HEIGHT - PATCH) // PATCH + 1) * ((IMG_WIDTH - PATCH) // PATCH + 1)  # 4 x 2 patches
TEMPLATE = "A photo of a X X X X person."
ARCHS = ("CLIP_baseline", "CLIP_ReID")


# ---- the reference's state dict, written out from its module tree ---------------------------------------------------
def _block_keys(prefix, width):
    return {f"{prefix}attn.in_proj_weight": (3 * width, width), f"{prefix}attn.in_proj_bias": (3 * width,),
            f"{prefix}attn.out_proj.weight": (width, width), f"{prefix}attn.out_proj.bias": (width,),
            f"{prefix}ln_1.weight": (width,), f"{prefix}ln_1.bias": (width,),
            f"{prefix}mlp.c_fc.weight": (4 * width, width), f"{prefix}mlp.c_fc.bias": (4 * width,),
            f"{prefix}mlp.c_proj.weight": (width, 4 * width), f"{prefix}mlp.c_proj.bias": (width,),
            f"{prefix}ln_2.weight": (width,), f"{prefix}ln_2.bias": (width,)}


def reference_layout(arch, num_classes=NUM_CLASSES, width=WIDTH, layers=LAYERS, embed_dim=EMBED_DIM,
                     text_width=TEXT_WIDTH, text_layers=TEXT_LAYERS, patch=PATCH, grid=GRID, text_len=77,
                     sie_rows=0):
    """``(parameters, buffers)``: key -> shape of the reference model's state dict.

    Image side (both models): ``image_encoder`` = CLIP's visual tower incl. its never-used
    ``new_positional_embedding`` (1, C); ``classifier``/``bottleneck`` on the CLS (C) and
    ``classifier_proj``/``bottleneck_proj`` on the projected CLS (D); ``cv_embed`` with SIE.
    CLIP_ReID adds ``prompt_learner`` (``cls_ctx`` parameter; ``token_prefix``/``token_suffix`` buffers: the
    template's embeddings before and after the four X) and ``text_encoder`` (text transformer, positional
    embedding, ln_final, text_projection); neither the token embedding nor the logit scale is kept.
    """
    params = {"image_encoder.class_embedding": (width,), "image_encoder.positional_embedding": (grid + 1, width),
              "image_encoder.new_positional_embedding": (1, width),
              "image_encoder.conv1.weight": (width, 3, patch, patch),
              "image_encoder.ln_pre.weight": (width,), "image_encoder.ln_pre.bias": (width,),
              "image_encoder.ln_post.weight": (width,), "image_encoder.ln_post.bias": (width,),
              "image_encoder.proj": (width, embed_dim),
              "classifier.weight": (num_classes, width), "classifier_proj.weight": (num_classes, embed_dim),
              "bottleneck.weight": (width,), "bottleneck.bias": (width,),
              "bottleneck_proj.weight": (embed_dim,), "bottleneck_proj.bias": (embed_dim,)}
    for i in range(layers):
        params.update(_block_keys(f"image_encoder.transformer.resblocks.{i}.", width))
    buffers = {"bottleneck.running_mean": (width,), "bottleneck.running_var": (width,),
               "bottleneck.num_batches_tracked": (), "bottleneck_proj.running_mean": (embed_dim,),
               "bottleneck_proj.running_var": (embed_dim,), "bottleneck_proj.num_batches_tracked": ()}
    if sie_rows:
        params["cv_embed"] = (sie_rows, width)
    if arch == "CLIP_ReID":
        params.update({"prompt_learner.cls_ctx": (num_classes, 4, text_width),
                       "text_encoder.positional_embedding": (text_len, text_width),
                       "text_encoder.ln_final.weight": (text_width,), "text_encoder.ln_final.bias": (text_width,),
                       "text_encoder.text_projection": (text_width, embed_dim)})
        for i in range(text_layers):
            params.update(_block_keys(f"text_encoder.transformer.resblocks.{i}.", text_width))
        # The template is tokenized at 77 whatever the text length: the suffix is rows 9..76.
        buffers.update({"prompt_learner.token_prefix": (1, 5, text_width),
                        "prompt_learner.token_suffix": (1, 77 - 9, text_width)})
    return params, buffers


def reference_state_dict(arch, seed=0, **layout):
    """Random reference-layout weights (BN statistics plausible, LayerNorm weights near 1)."""
    params, buffers = reference_layout(arch, **layout)
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in {**params, **buffers}.items():
        if key.endswith("num_batches_tracked"):
            state[key] = torch.tensor(7)
        elif key.endswith("running_var"):
            state[key] = torch.rand(shape, generator=gen) + 0.5
        elif key.endswith(("ln_1.weight", "ln_2.weight", "ln_pre.weight", "ln_post.weight", "ln_final.weight")):
            state[key] = 1 + 0.1 * torch.randn(shape, generator=gen)
        else:
            state[key] = 0.1 * torch.randn(shape, generator=gen)
    return state


def model_from_reference(arch, state, cfg):
    cls = type(build_model(cfg, NUM_CLASSES, 1, 1, ()))
    args = cls.reference_model_args(state, cfg)
    model = build_model(cfg, args["num_classes"], args["num_cameras"], args["num_views"], args["attributes"])
    result = model.load_state_dict(cls.from_reference_state_dict(state, cfg), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


# ---- the reference's forward passes, written out --------------------------------------------------------------------
def _layer_norm(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[prefix + "weight"], state[prefix + "bias"], eps=1e-5)


def _block(x, state, prefix, heads, causal=False):
    """Pre-norm CLIP block: x + MHA(LN1 x); x + MLP(LN2 x) with QuickGELU; (B, L, C)."""
    batch, length, width = x.shape
    h = _layer_norm(x, state, prefix + "ln_1.")
    q, k, v = (h @ state[prefix + "attn.in_proj_weight"].t() + state[prefix + "attn.in_proj_bias"]).chunk(3, -1)
    split = lambda t: t.reshape(batch, length, heads, width // heads).transpose(1, 2)  # noqa: E731 (B, H, L, d)
    scores = split(q) @ split(k).transpose(-1, -2) / math.sqrt(width // heads)
    if causal:
        scores = scores + torch.full((length, length), float("-inf")).triu(1)
    attn = (scores.softmax(-1) @ split(v)).transpose(1, 2).reshape(batch, length, width)
    x = x + attn @ state[prefix + "attn.out_proj.weight"].t() + state[prefix + "attn.out_proj.bias"]
    h = _layer_norm(x, state, prefix + "ln_2.")
    h = h @ state[prefix + "mlp.c_fc.weight"].t() + state[prefix + "mlp.c_fc.bias"]
    h = h * torch.sigmoid(1.702 * h)
    return x + h @ state[prefix + "mlp.c_proj.weight"].t() + state[prefix + "mlp.c_proj.bias"]


def reference_image_encoder(state, images, cv_emb=None, layers=LAYERS, heads=2):
    """``(x11, x12, xproj)``: patches + CLS (+ ``cv_emb`` on the CLS only) + positions, ln_pre, all blocks but
    the last (x11, no LN), the last block, ln_post (x12), projection. (The reference slices 11 + 1 blocks of
    ViT-B/16; here the same split of a ``layers``-deep tower.)"""
    v = "image_encoder."
    x = F.conv2d(images, state[v + "conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)  # (B, N, C)
    cls = state[v + "class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1)
    if cv_emb is not None:
        x = torch.cat([x[:, :1] + cv_emb[:, None], x[:, 1:]], dim=1)
    x = _layer_norm(x + state[v + "positional_embedding"], state, v + "ln_pre.")
    for i in range(layers - 1):
        x = _block(x, state, f"{v}transformer.resblocks.{i}.", heads)
    x11 = x
    x12 = _layer_norm(_block(x, state, f"{v}transformer.resblocks.{layers - 1}.", heads), state, v + "ln_post.")
    return x11, x12, x12 @ state[v + "proj"]


def reference_bn(x, state, prefix, training):
    return F.batch_norm(x, state[prefix + "running_mean"].clone(), state[prefix + "running_var"].clone(),
                        state[prefix + "weight"], state[prefix + "bias"], training=training, eps=1e-5)


def reference_text_features(state, labels, text_len=77, heads=2):
    """PromptLearner + TextEncoder: [prefix; cls_ctx[label]; suffix] + positions, causal transformer,
    ln_final, the EOT row (argmax of the template's ids) projected."""
    prompts = torch.cat([state["prompt_learner.token_prefix"].expand(len(labels), -1, -1),
                         state["prompt_learner.cls_ctx"][labels],
                         state["prompt_learner.token_suffix"].expand(len(labels), -1, -1)], dim=1)
    x = prompts + state["text_encoder.positional_embedding"]
    for i in range(TEXT_LAYERS):
        x = _block(x, state, f"text_encoder.transformer.resblocks.{i}.", heads, causal=True)
    x = _layer_norm(x, state, "text_encoder.ln_final.")
    eot = tokenize(TEMPLATE, context_length=text_len).argmax(-1)
    return x[torch.arange(len(labels)), eot.expand(len(labels))] @ state["text_encoder.text_projection"]


@pytest.fixture(scope="module")
def images():
    return torch.randn(BATCH, 3, HEIGHT, IMG_WIDTH, generator=torch.Generator().manual_seed(3))


# ---- layout ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sie", [False, True])
def test_reference_state_dict_loads_strictly_and_converts_back_unchanged(arch, sie):
    cfg = tiny_cfg(arch, **({"MODEL.SIE_CAMERA": True} if sie else {}))
    state = reference_state_dict(arch, sie_rows=3 if sie else 0)
    model = model_from_reference(arch, state, cfg)
    assert (model.sie_embed is not None) == sie
    cls = type(model)
    back = cls.to_reference_state_dict(model.state_dict(), cfg)
    assert set(back) == set(state)
    assert all(torch.equal(back[key], state[key]) for key in state)


@pytest.mark.parametrize("arch", ARCHS)
def test_our_state_dict_round_trips_through_the_reference_layout(arch):
    cfg = tiny_cfg(arch, **{"MODEL.SIE_CAMERA": True, "MODEL.SIE_VIEW": True})
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES, 3, 2, ())
    ours = model.state_dict()
    reference = type(model).to_reference_state_dict(ours, cfg)
    params, buffers = reference_layout(arch, sie_rows=6)
    assert {k: tuple(v.shape) for k, v in reference.items()} == {**params, **buffers}
    again = type(model).from_reference_state_dict(reference, cfg)
    assert set(again) == set(ours) and all(again[k] is ours[k] for k in ours)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sie", [False, True])
def test_parameter_count_is_the_references(arch, sie):
    cfg = tiny_cfg(arch, **({"MODEL.SIE_VIEW": True} if sie else {}))
    model = build_model(cfg, NUM_CLASSES, 1, 2, ())
    params, buffers = reference_layout(arch, sie_rows=2 if sie else 0)
    assert sum(p.numel() for p in model.parameters()) == sum(math.prod(s) for s in params.values())
    saved = model.state_dict()
    persistent = {name: b for name, b in model.named_buffers() if name in saved}
    reference_buffers = type(model).to_reference_state_dict(persistent, cfg)
    assert {name: tuple(b.shape) for name, b in reference_buffers.items()} == buffers
    assert not any("token_embedding" in name or "logit_scale" in name for name in saved)


def test_reference_weights_at_text_length_120_load_and_convert_back():
    """The reference builds its prompt at 77 tokens even with TEXT_LEN 120; our 120-token prompt only adds
    padding rows to the suffix, which the conversion repeats and cuts back."""
    cfg = tiny_cfg("CLIP_ReID", **{"MODEL.TEXT_LEN": 120})
    state = reference_state_dict("CLIP_ReID", text_len=120)
    state["prompt_learner.token_suffix"][:, 3:] = state["prompt_learner.token_suffix"][:, -1:]  # padding rows
    model = model_from_reference("CLIP_ReID", state, cfg)
    assert tuple(model.token_suffix.shape) == (1, 120 - 9, TEXT_WIDTH)
    assert torch.equal(model.token_suffix[0, 68:], state["prompt_learner.token_suffix"][0, -1:].expand(43, -1))
    back = type(model).to_reference_state_dict(model.state_dict(), cfg)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    ours = dict(model.state_dict())
    ours["token_suffix"] = ours["token_suffix"].clone()
    ours["token_suffix"][0, 100] += 1
    with pytest.raises(CheckpointError, match="token_suffix rows 68.. are not padding"):
        type(model).to_reference_state_dict(ours, cfg)


# ---- test-time and training outputs ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_test_time_feature_is_the_references(arch, images):
    cfg = tiny_cfg(arch)
    state = reference_state_dict(arch, seed=1)
    model = model_from_reference(arch, state, cfg).eval()
    with torch.no_grad():
        ours = model(images)
    _, x12, xproj = reference_image_encoder(state, images)
    # CLIP_baseline: the pre-BN CLS (C); CLIP_ReID: pre-BN CLS and projected CLS (C + D).
    expected = x12[:, 0] if arch == "CLIP_baseline" else torch.cat([x12[:, 0], xproj[:, 0]], dim=1)
    assert ours.shape == expected.shape == (BATCH, model.embedding_dim)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_outputs_are_the_references(arch, images):
    cfg = tiny_cfg(arch)
    state = reference_state_dict(arch, seed=2)
    model = model_from_reference(arch, state, cfg).train()
    x11, x12, xproj = reference_image_encoder(state, images)
    cls_score = reference_bn(x12[:, 0], state, "bottleneck.", True) @ state["classifier.weight"].t()
    if arch == "CLIP_ReID":
        text = reference_text_features(state, torch.arange(NUM_CLASSES))
        with torch.no_grad():
            model.set_class_text_features(model.text_features(torch.arange(NUM_CLASSES)))
        torch.testing.assert_close(model.class_text_features, text, atol=1e-5, rtol=1e-5)
        with torch.no_grad():  # stage 1's image side: get_image=True -> xproj[:, 0]
            torch.testing.assert_close(model.encode_image_for_prompts(images), xproj[:, 0], atol=1e-5, rtol=1e-5)
    out = model(images)
    if arch == "CLIP_baseline":  # ([cls_score], [img_feature])
        assert list(out.id_logits) == ["cls"] and list(out.features) == ["cls"]
        torch.testing.assert_close(out.id_logits["cls"], cls_score, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.features["cls"], x12[:, 0], atol=1e-5, rtol=1e-5)
        return
    # ([cls_score, cls_score_proj], [x11 CLS, x12 CLS, xproj CLS], xproj CLS) and stage 2's xproj @ text^T.
    proj_score = reference_bn(xproj[:, 0], state, "bottleneck_proj.", True) @ state["classifier_proj.weight"].t()
    for got, want in zip(out.id_logits.values(), (cls_score, proj_score)):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for got, want in zip(out.features.values(), (x11[:, 0], x12[:, 0], xproj[:, 0])):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.aux["i2t_logits"], xproj[:, 0] @ text.t(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_side_information_enters_the_cls_token_only_as_in_the_reference(arch, images):
    cfg = tiny_cfg(arch, **{"MODEL.SIE_CAMERA": True, "MODEL.SIE_VIEW": True})
    state = reference_state_dict(arch, seed=4, sie_rows=3 * 2)
    model = build_model(cfg, NUM_CLASSES, 3, 2, ()).eval()
    model.load_state_dict(type(model).from_reference_state_dict(state, cfg), strict=True)
    camids, viewids = torch.tensor([0, 2, 1, 2]), torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        ours = model(images, camids=camids, viewids=viewids)
    # cv_embed[camera * num_views + view], scaled by SIE_COE, on the CLS token.
    cv_emb = cfg.MODEL.SIE_COE * state["cv_embed"][camids * 2 + viewids]
    _, x12, xproj = reference_image_encoder(state, images, cv_emb=cv_emb)
    expected = x12[:, 0] if arch == "CLIP_baseline" else torch.cat([x12[:, 0], xproj[:, 0]], dim=1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)


# ---- building from a CLIP file --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """An OpenAI-layout CLIP state dict (96x96 input: a 6x6 position grid; 77 text positions; width // 64 heads
    as OpenAI's models and the reference's ``build_model``)."""
    torch.manual_seed(11)
    clip = build_clip(EMBED_DIM, image_size=(96, 96), patch_size=PATCH, vision_width=WIDTH, vision_layers=LAYERS,
                      vision_heads=WIDTH // 64, text_width=TEXT_WIDTH, text_heads=TEXT_WIDTH // 64,
                      text_layers=TEXT_LAYERS)
    path = str(tmp_path_factory.mktemp("clip") / "tiny-clip.pt")
    torch.save(clip.state_dict(), path)
    return path, {k: v.clone() for k, v in clip.state_dict().items()}


def reference_grid_resize(positions, old, new):
    """CLS row kept; the old x old grid resized bilinearly (align_corners False) to new (rows, cols)."""
    grid = positions[1:].reshape(1, old, old, -1).permute(0, 3, 1, 2)  # (1, C, G, G)
    grid = F.interpolate(grid, size=new, mode="bilinear", align_corners=False)
    return torch.cat([positions[:1], grid.permute(0, 2, 3, 1).reshape(new[0] * new[1], -1)])


def reference_text_resize(positions, length):
    """First and last rows kept, the middle rows linearly interpolated (align_corners False) to length - 2."""
    middle = F.interpolate(positions[1:-1].t()[None], size=length - 2, mode="linear", align_corners=False)[0].t()
    return torch.cat([positions[:1], middle, positions[-1:]])


@pytest.mark.parametrize("text_len", [77, 120])
def test_built_from_a_clip_file_as_the_reference_builds(clip_file, text_len, images):
    path, openai = clip_file
    cfg = tiny_cfg("CLIP_ReID", **{"MODEL.RANDOM_INIT": False, "MODEL.PRETRAIN_PATH": path,
                                   "MODEL.TEXT_LEN": text_len})
    torch.manual_seed(0)
    model = build_model(cfg, NUM_CLASSES, 1, 1, ()).eval()
    torch.testing.assert_close(model.visual.positional_embedding.detach(),
                               reference_grid_resize(openai["visual.positional_embedding"], 6, (4, 2)))
    expected_text = (openai["positional_embedding"] if text_len == 77
                     else reference_text_resize(openai["positional_embedding"], text_len))
    torch.testing.assert_close(model.clip.positional_embedding.detach(), expected_text)
    # The prompt learner's buffers: the template's token embeddings before and after the four X.
    template = openai["token_embedding.weight"][tokenize(TEMPLATE, context_length=text_len)[0]]
    torch.testing.assert_close(model.token_prefix[0], template[:5])
    torch.testing.assert_close(model.token_suffix[0], template[9:])
    state = type(model).to_reference_state_dict(model.state_dict(), cfg)
    # At 120 the reference crashes (77-token prompt); the fix's prompt is the 120-token template.
    state["prompt_learner.token_suffix"] = template[9:][None]
    with torch.no_grad():
        ours = model.text_features(torch.tensor([0, 3, 3]))
    expected = reference_text_features(state, torch.tensor([0, 3, 3]), text_len, heads=TEXT_WIDTH // 64)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=1e-5)
    _, x12, xproj = reference_image_encoder(state, images, heads=WIDTH // 64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), torch.cat([x12[:, 0], xproj[:, 0]], dim=1), atol=1e-5, rtol=1e-5)


def test_bicubic_position_resize_is_a_switch(clip_file):
    path, openai = clip_file
    cfg = tiny_cfg("CLIP_baseline", **{"MODEL.RANDOM_INIT": False, "MODEL.PRETRAIN_PATH": path,
                                       "MODEL.POS_EMBED_INTERP": "bicubic"})
    model = build_model(cfg, NUM_CLASSES, 1, 1, ())
    bilinear = reference_grid_resize(openai["visual.positional_embedding"], 6, (4, 2))
    assert not torch.allclose(model.visual.positional_embedding.detach(), bilinear)


# ---- fixes ----------------------------------------------------------------------------------------------------------
def test_prompt_length_fix_off_reproduces_77_and_refuses_other_lengths(images):
    outputs = []
    for fix in (True, False):
        torch.manual_seed(0)
        model = build_model(tiny_cfg("CLIP_ReID", **{"MODEL.FIXES.CLIPREID_PROMPT_AT_TEXT_LEN": fix}),
                            NUM_CLASSES, 1, 1, ()).eval()
        with torch.no_grad():
            outputs.append((model.text_features(torch.arange(NUM_CLASSES)), model(images)))
    torch.testing.assert_close(outputs[0], outputs[1], atol=0, rtol=0)
    cfg = tiny_cfg("CLIP_ReID", **{"MODEL.FIXES.CLIPREID_PROMPT_AT_TEXT_LEN": False, "MODEL.TEXT_LEN": 120})
    with pytest.raises(ConfigError, match=r"MODEL.TEXT_LEN = 120 with MODEL.FIXES.CLIPREID_PROMPT_AT_TEXT_LEN False"):
        build_model(cfg, NUM_CLASSES, 1, 1, ())
    model = build_model(tiny_cfg("CLIP_ReID", **{"MODEL.TEXT_LEN": 120}), NUM_CLASSES, 1, 1, ())
    assert tuple(model.token_suffix.shape) == (1, 120 - 9, TEXT_WIDTH)


# ---- bad reference weights ------------------------------------------------------------------------------------------
def test_unmappable_reference_key_is_named():
    state = reference_state_dict("CLIP_baseline")
    state["header_cvpr.classifier.weight"] = torch.zeros(NUM_CLASSES, WIDTH)
    model_cls = type(build_model(tiny_cfg("CLIP_baseline"), NUM_CLASSES, 1, 1, ()))
    with pytest.raises(CheckpointError, match=r"1 key\(s\) have no counterpart: header_cvpr\.classifier\.weight"):
        model_cls.from_reference_state_dict(state, tiny_cfg("CLIP_baseline"))


def test_reference_shapes_that_contradict_the_config_are_named():
    cfg = tiny_cfg("CLIP_ReID", **{"MODEL.TEXT_LEN": 120})
    model_cls = type(build_model(tiny_cfg("CLIP_ReID"), NUM_CLASSES, 1, 1, ()))
    with pytest.raises(CheckpointError,
                       match=r"text_encoder\.positional_embedding has 77 rows, MODEL\.TEXT_LEN is 120"):
        model_cls.from_reference_state_dict(reference_state_dict("CLIP_ReID"), cfg)
    cfg = tiny_cfg("CLIP_baseline", **{"INPUT.SIZE_TRAIN": [96, 32]})
    with pytest.raises(CheckpointError, match=r"image_encoder\.positional_embedding has 9 rows.*needs 13"):
        model_cls.from_reference_state_dict(reference_state_dict("CLIP_baseline"), cfg)
    with pytest.raises(CheckpointError, match=r"cv_embed .* MODEL\.SIE_CAMERA and MODEL\.SIE_VIEW are False"):
        model_cls.from_reference_state_dict(reference_state_dict("CLIP_baseline", sie_rows=3), tiny_cfg("CLIP_ReID"))


def test_wrong_shape_inside_reference_weights_is_named_when_loading():
    cfg = tiny_cfg("CLIP_baseline")
    state = reference_state_dict("CLIP_baseline", num_classes=NUM_CLASSES + 2)
    model = build_model(cfg, NUM_CLASSES, 1, 1, ())
    with pytest.raises(CheckpointError, match=r"head_cls\.classifier\.weight"):
        load_model_weights(model, type(model).from_reference_state_dict(state, cfg), cfg)


def test_reference_model_args():
    cfg = tiny_cfg("CLIP_ReID")
    model_cls = type(build_model(cfg, NUM_CLASSES, 1, 1, ()))
    assert model_cls.reference_model_args(reference_state_dict("CLIP_ReID", num_classes=7), cfg) == {
        "num_classes": 7, "num_cameras": 1, "num_views": 1, "attributes": ()}
    views = tiny_cfg("CLIP_ReID", **{"MODEL.SIE_VIEW": True})
    assert model_cls.reference_model_args(reference_state_dict("CLIP_ReID", sie_rows=3), views)["num_views"] == 3
    both = tiny_cfg("CLIP_ReID", **{"MODEL.SIE_CAMERA": True, "MODEL.SIE_VIEW": True})
    with pytest.raises(CheckpointError, match="cv_embed has 6 = cameras x views rows"):
        model_cls.reference_model_args(reference_state_dict("CLIP_ReID", sie_rows=6), both)
    state = reference_state_dict("CLIP_ReID")
    del state["classifier.weight"]
    with pytest.raises(CheckpointError, match="lack classifier.weight"):
        model_cls.reference_model_args(state, cfg)
    with pytest.raises(CheckpointError, match="ReIDModel .* cannot read the model sizes"):
        ReIDModel.reference_model_args({}, cfg)


@pytest.mark.parametrize("name", ["clipreid", "clip_baseline"])
@pytest.mark.parametrize("bench", ["CP2108", "CARGO", "AGReIDv1", "AGReIDv2"])
def test_shipped_configs_are_the_references(bench, name):
    from configs import load_config
    from tests.fixtures import REPO_ROOT
    cfg = load_config(os.path.join(REPO_ROOT, "configs", bench, f"{name}.yml"))
    assert cfg.MODEL.POS_EMBED_INTERP == "bilinear"
    assert cfg.MODEL.FIXES.ANNOTATION_PER_IMAGE is False
    assert not (cfg.MODEL.SIE_CAMERA or cfg.MODEL.SIE_VIEW)
    if name == "clipreid":
        assert cfg.MODEL.TEXT_LEN == (120 if bench in ("CP2108", "AGReIDv1") else 77)
        assert cfg.MODEL.FIXES.CLIPREID_PROMPT_AT_TEXT_LEN is True


def test_weights_for_another_text_length_name_the_keys_and_config():
    cfg = tiny_cfg("CLIP_ReID", **{"MODEL.TEXT_LEN": 120})
    other = build_model(tiny_cfg("CLIP_ReID"), NUM_CLASSES, 1, 1, ()).state_dict()
    with pytest.raises(CheckpointError, match=r"token_suffix.*MODEL\.TEXT_LEN=120"):
        load_model_weights(build_model(cfg, NUM_CLASSES, 1, 1, ()), other, cfg)


@pytest.mark.parametrize("per_image", [False, True])
def test_annotation_fix_reaches_the_dataset_through_the_loaders(tmp_path, per_image):
    from datasets import SynthConfig, generate_synthag, make_dataloaders
    generate_synthag(tmp_path, SynthConfig(num_ids=6, images_per_id=6, height=32, width=16, seed=2), num_workers=1)
    cfg = get_cfg_defaults()
    cfg.DATASETS.ROOT_DIR, cfg.DATASETS.NAMES, cfg.MODEL.DEVICE = str(tmp_path), "SynthAG_ALL", "cpu"
    cfg.MODEL.USE_ATTR = True
    cfg.INPUT.SIZE_TRAIN = cfg.INPUT.SIZE_TEST = [32, 16]
    cfg.DATALOADER.NUM_WORKERS, cfg.DATALOADER.NUM_INSTANCE = 0, 2
    cfg.SOLVER.IMS_PER_BATCH = cfg.SOLVER.STAGE1.IMS_PER_BATCH = cfg.TEST.IMS_PER_BATCH = 4
    cfg.MODEL.FIXES.ANNOTATION_PER_IMAGE = per_image
    dataset = make_dataloaders(cfg).dataset
    assert dataset.annotation_per_image is per_image
    labels_per_id = {}
    for sample in dataset.train:
        labels_per_id.setdefault(sample.pid, set()).add(sample.attrs)
    # The reference gives all images of an identity one label vector; per image, views/times differ.
    assert all(len(labels) == 1 for labels in labels_per_id.values()) is (not per_image)


def test_vehicle_benchmarks_prompt_a_vehicle():
    """CLIP-ReID writes "A photo of a X X X X vehicle." on VeRi and VehicleID (MODEL.PROMPT_SUBJECT)."""
    from configs import load_config
    from tests.fixtures import REPO_ROOT
    from text import prompts, tokenize

    for folder in ("VeRi", "VehicleID"):
        assert load_config(os.path.join(REPO_ROOT, "configs", folder, "clipreid.yml")).MODEL.PROMPT_SUBJECT == "vehicle"
    assert prompts.clip_reid_template("vehicle") == "A photo of a X X X X vehicle."
    person = tokenize(prompts.clip_reid_template("person"))
    vehicle = tokenize(prompts.clip_reid_template("vehicle"))
    assert (person != vehicle).sum() == 1 and person[0, 9] != vehicle[0, 9]  # only the subject word differs

"""The ImageNet-ViT baselines (ViT, TransReID, VDT, SeCap) on CPU with random weights.

Checked against independent definitions: timm's own ViT-B/16, hand-written jx-layout weight files, the
jigsaw index formula and the view subtraction written from docs/baselines.md, the authors' tensor counts.
"""
import json
import logging
import math
import os
import re

import pytest
import timm
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from datasets.synthetic import SynthConfig, generate_synthag
from loss import LOSSES, build_criterion
from model import ModelOutput, build_model
from model.vit.backbone import ReIDVisionTransformer, block_first_tokens
from model.vit.transreid import jpm_rearrange
from model.vit.weights import load_pretrained_vit, read_vit_weights
from processor import run_training
from processor.model_io import load_trained_model
from tests import fixtures
from tests.fixtures import run_script
from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError, ConfigError

ARCHS = ("ViT", "TransReID", "VDT", "SeCap")
NUM_CLASSES, NUM_CAMERAS, NUM_VIEWS, BATCH = 5, 3, 2, 4
WIDTH, DEPTH, HEADS = 128, 2, 2  # heads = width / 64, as the weights loader infers
H, W = 64, 32  # 4 x 2 patches at stride 16


def tiny_cfg(arch, **keys):
    return fixtures.tiny_cfg(arch, vit={"EMBED_DIM": WIDTH, "DEPTH": DEPTH, "NUM_HEADS": HEADS}, size=(H, W), **keys)


def build(arch, seed=0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(arch, **overrides), NUM_CLASSES, NUM_CAMERAS, NUM_VIEWS)


@pytest.fixture(scope="module")
def images():
    return torch.randn(BATCH, 3, H, W, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def batch(images):
    return {"images": images, "pids": torch.tensor([0, 0, 3, 3]), "camids": torch.tensor([0, 1, 2, 0]),
            "viewids": torch.tensor([0, 1, 0, 1])}


def jx_state_dict(width=WIDTH, depth=DEPTH, grid=14, patch=16, classes=1000, seed=0):
    """A random state dict in the key layout of jx_vit_base_p16_224-80ecf9dd.pth (docs/baselines.md)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return 0.02 * torch.randn(*shape, generator=gen)

    state = {"cls_token": rand(1, 1, width), "pos_embed": rand(1, 1 + grid * grid, width),
             "patch_embed.proj.weight": rand(width, 3, patch, patch), "patch_embed.proj.bias": rand(width)}
    for i in range(depth):
        block = f"blocks.{i}."
        for norm in ("norm1", "norm2"):
            state[block + norm + ".weight"] = 1 + rand(width)
            state[block + norm + ".bias"] = rand(width)
        for name, out_dim, in_dim in (("attn.qkv", 3 * width, width), ("attn.proj", width, width),
                                      ("mlp.fc1", 4 * width, width), ("mlp.fc2", width, 4 * width)):
            state[block + name + ".weight"] = rand(out_dim, in_dim)
            state[block + name + ".bias"] = rand(out_dim)
    state.update({"norm.weight": 1 + rand(width), "norm.bias": rand(width), "head.weight": rand(classes, width),
                  "head.bias": rand(classes)})
    return state


@pytest.fixture(scope="module")
def jx_file(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("pretrained") / "jx_vit_tiny.pth")
    torch.save(jx_state_dict(), path)
    return path


def test_jx_layout_has_the_documented_152_tensors_at_vit_base_size():
    assert len(jx_state_dict(width=8, depth=12, grid=2, classes=3)) == 152


@pytest.mark.usefixtures("single_thread")
def test_backbone_equals_timm_vit_base_patch16_224():
    torch.manual_seed(0)
    reference = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0).eval()
    ours = ReIDVisionTransformer((224, 224)).eval()
    load_pretrained_vit(ours, reference.state_dict(), "timm vit_base_patch16_224")
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference.forward_features(x)
        got = ours(x)
    assert got.shape == (2, 197, 768)
    assert (got - expected).abs().max().item() <= 1e-5


def _loaded_backbone(path, view_token=False, fix=False):
    backbone = ReIDVisionTransformer((H, W), embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS, view_token=view_token)
    load_pretrained_vit(backbone, read_vit_weights(path), path, fix_view_pos=fix)
    return backbone


def test_jx_timm_pth_and_safetensors_files_give_the_same_model(jx_file, tmp_path, caplog):
    # timm's own layout: a timm ViT holding the same weights, saved by torch and by safetensors.
    timm_vit = VisionTransformer(img_size=224, patch_size=16, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                                 num_classes=1000)
    timm_vit.load_state_dict(load_checkpoint(jx_file))
    timm_pth, timm_st = str(tmp_path / "timm.pth"), str(tmp_path / "model.safetensors")
    torch.save({"state_dict": {f"module.{k}": v for k, v in timm_vit.state_dict().items()}}, timm_pth)
    save_file({k: v.contiguous() for k, v in timm_vit.state_dict().items()}, timm_st)
    with caplog.at_level(logging.INFO, logger="model.vit.weights"):
        states = [_loaded_backbone(path).state_dict() for path in (jx_file, timm_pth, timm_st)]
    for state in states[1:]:
        assert state.keys() == states[0].keys()
        assert all(torch.equal(state[k], states[0][k]) for k in state)
    # head.* is reported as skipped in one line per load
    lines = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == 3 and all("skipped 2 unused: head.bias, head.weight" in line for line in lines)


def _bilinear_grid(posemb, grid):
    """The authors' resize: 14x14 grid -> ``grid`` with F.interpolate bilinear, no antialias."""
    side = math.isqrt(posemb.shape[1] - 1)
    table = posemb[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=grid, mode="bilinear", align_corners=False)
    return table.permute(0, 2, 3, 1).reshape(1, grid[0] * grid[1], -1)


@pytest.mark.parametrize("stride", [16, 12])
def test_positional_embedding_is_resized_bilinearly(jx_file, stride):
    posemb = load_checkpoint(jx_file)["pos_embed"]
    grid = ((H - 16) // stride + 1, (W - 16) // stride + 1)
    backbone = ReIDVisionTransformer((H, W), stride=(stride, stride), embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
    load_pretrained_vit(backbone, read_vit_weights(jx_file), jx_file)
    assert backbone.patch_embed.num_patches == grid[0] * grid[1]
    assert torch.allclose(backbone.pos_embed[:, 1:], _bilinear_grid(posemb, grid), atol=1e-7)
    assert torch.equal(backbone.pos_embed[:, 0], posemb[:, 0])


def test_view_token_table_is_the_authors_shifted_one_unless_fixed(jx_file):
    posemb = load_checkpoint(jx_file)["pos_embed"]
    grid = _bilinear_grid(posemb, (4, 2))
    authors = _loaded_backbone(jx_file, view_token=True)
    # [cls, grid_0 .. grid_{N-1}, last row]: the authors leave the last row uninitialised, here it is zero
    assert torch.equal(authors.pos_embed[:, 0], posemb[:, 0])
    assert torch.allclose(authors.pos_embed[:, 1:-1], grid, atol=1e-7)
    assert torch.count_nonzero(authors.pos_embed[:, -1]) == 0
    assert torch.count_nonzero(authors.reg_token) == 0
    fixed = _loaded_backbone(jx_file, view_token=True, fix=True).pos_embed
    assert torch.equal(fixed[:, 0], fixed[:, 1]) and torch.allclose(fixed[:, 2:], grid, atol=1e-7)


def test_wrong_weight_files_are_one_line_checkpoint_errors(tmp_path):
    not_vit = str(tmp_path / "clip.pth")
    torch.save({"visual.conv1.weight": torch.zeros(2, 3, 4, 4)}, not_vit)
    garbage = str(tmp_path / "broken.safetensors")
    with open(garbage, "wb") as handle:
        handle.write(b"not a safetensors file")
    for path, needle in ((not_vit, "cls_token"), (garbage, "safetensors"), (str(tmp_path / "none.pth"), "not found")):
        with pytest.raises(CheckpointError) as info:
            read_vit_weights(path)
        assert needle in str(info.value) and "\n" not in str(info.value) and path in str(info.value)
    wrong_width = str(tmp_path / "wide.pth")
    torch.save(jx_state_dict(width=64, depth=DEPTH), wrong_width)
    backbone = ReIDVisionTransformer((H, W), embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS)
    with pytest.raises(CheckpointError, match="cls_token has shape"):
        load_pretrained_vit(backbone, read_vit_weights(wrong_width), wrong_width)


@pytest.mark.parametrize("arch", ARCHS)
def test_training_output_and_test_feature_shapes(arch, batch):
    model = build(arch).train()
    out = model(batch["images"], **model.forward_inputs(batch))
    branches = {"ViT": ["global"], "TransReID": ["global", "local1", "local2", "local3", "local4"],
                "VDT": ["global"], "SeCap": ["global", "out"]}[arch]
    assert list(out.id_logits) == branches and list(out.features) == branches
    assert all(v.shape == (BATCH, NUM_CLASSES) for v in out.id_logits.values())
    assert all(v.shape == (BATCH, WIDTH) for v in out.features.values())
    if arch in ("VDT", "SeCap"):
        assert out.aux["view_logits"].shape == (BATCH, NUM_VIEWS)
        assert out.aux["view_feat"].shape == (BATCH, WIDTH) and out.aux["inv_feat"] is out.features["global"]
    losses = build_criterion(tiny_cfg(arch), model, NUM_CLASSES)(out, batch)
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        feature = model(batch["images"], **model.forward_inputs(batch))
    expected = {"ViT": WIDTH, "TransReID": 5 * WIDTH, "VDT": WIDTH, "SeCap": 2 * WIDTH}[arch]
    assert feature.shape == (BATCH, expected) == (BATCH, model.embedding_dim)


def test_stride_12_and_sie_work_for_every_model(batch):
    images = torch.randn(BATCH, 3, 64, 40)
    for arch in ARCHS:
        torch.manual_seed(0)
        cfg = tiny_cfg(arch, **{"MODEL.STRIDE_SIZE": [12, 12], "INPUT.SIZE_TRAIN": [64, 40],
                                "INPUT.SIZE_TEST": [64, 40], "MODEL.SIE_CAMERA": True, "MODEL.SIE_VIEW": True})
        model = build_model(cfg, NUM_CLASSES, NUM_CAMERAS, NUM_VIEWS).eval()
        assert model.backbone.patch_embed.grid_size == (5, 3)
        assert model.backbone.sie_embed.table.shape == (NUM_CAMERAS * NUM_VIEWS, WIDTH)
        with torch.no_grad():
            a = model(images, batch["camids"], batch["viewids"])
            b = model(images, torch.tensor([1, 1, 1, 1]), batch["viewids"])
        assert not torch.allclose(a, b), arch  # the camera ids reach the tokens


def test_drop_rates_reach_the_timm_blocks():
    model = build("ViT", **{"MODEL.DROP_PATH": 0.3, "MODEL.DROP_OUT": 0.2, "MODEL.ATT_DROP_RATE": 0.1})
    blocks = model.backbone.blocks
    assert blocks[0].drop_path1.__class__.__name__ == "Identity"
    assert blocks[-1].drop_path1.drop_prob == pytest.approx(0.3)
    assert blocks[0].attn.attn_drop.p == pytest.approx(0.1) and blocks[0].mlp.drop1.p == pytest.approx(0.2)
    assert model.backbone.pos_drop.p == pytest.approx(0.2)


def test_grad_checkpointing_gives_the_same_loss_and_gradients(batch):
    results = []
    for checkpointing in (False, True):
        model = build("VDT", **{"MODEL.GRAD_CHECKPOINT": checkpointing, "MODEL.DROP_PATH": 0.0}).train()
        out = model(batch["images"], **model.forward_inputs(batch))
        loss = sum(build_criterion(tiny_cfg("VDT"), model, NUM_CLASSES)(out, batch).values())
        loss.backward()
        results.append((loss.detach(), model.backbone.blocks[0].attn.qkv.weight.grad.clone()))
    assert torch.allclose(results[0][0], results[1][0], atol=1e-6)
    assert torch.allclose(results[0][1], results[1][1], atol=1e-6)


@pytest.mark.parametrize("train", [False, True])
def test_last_block_for_the_first_tokens_equals_the_full_block(train):
    """``block_first_tokens`` against timm's own block: values and every gradient, stochastic depth included."""
    block = build("ViT", **{"MODEL.DROP_PATH": 0.5}).backbone.blocks[-1].train(train)
    x = torch.randn(3, 9, WIDTH, generator=torch.Generator().manual_seed(2))
    results = []
    for first_tokens in (False, True):
        block.zero_grad()
        inputs = x.clone().requires_grad_(True)
        torch.manual_seed(7)  # the same drop-path draw for both
        out = block_first_tokens(block, inputs, 2) if first_tokens else block(inputs)[:, :2]
        out.square().sum().backward()
        results.append((out.detach(), inputs.grad, {n: p.grad.clone() for n, p in block.named_parameters()}))
    (full, full_x, full_p), (first, first_x, first_p) = results
    assert first.shape == (3, 2, WIDTH)
    torch.testing.assert_close(first, full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(first_x, full_x, atol=1e-5, rtol=1e-5)
    for name in full_p:
        torch.testing.assert_close(first_p[name], full_p[name], atol=1e-5, rtol=1e-4, msg=name)


def test_last_block_with_dropout_runs_the_full_block():
    """Dropout's random draws depend on the token count: the full block keeps them the authors' way."""
    block = build("ViT", **{"MODEL.DROP_OUT": 0.2}).backbone.blocks[-1].train()
    x = torch.randn(3, 9, WIDTH)
    torch.manual_seed(3)
    full = block(x)
    torch.manual_seed(3)
    assert torch.equal(block_first_tokens(block, x, 1), full)  # every token: callers read the first


def test_jpm_shift_and_shuffle_follow_the_index_formula():
    n, width = 128, 3
    tokens = torch.arange(1 + n, dtype=torch.float32).view(1, 1 + n, 1).expand(2, -1, width)  # value = position
    out = jpm_rearrange(tokens, shift=5, shuffle_groups=2)
    # r = patches rotated left by 4; s[2i] = r[i], s[2i+1] = r[N/2 + i]; patch j sits at position 1 + j
    r = [(j + 4) % n for j in range(n)]
    expected = [r[i // 2] if i % 2 == 0 else r[n // 2 + i // 2] for i in range(n)]
    assert out[0, :, 0].long().tolist() == [1 + p for p in expected]
    # at stride 16 group k holds {p_(16k+4+j) mod 128, p_(16k+68+j) mod 128 : j < 16}, interleaved
    for k in range(4):
        group = out[0, 32 * k:32 * (k + 1), 0].long() - 1
        assert group[0::2].tolist() == [(16 * k + 4 + j) % n for j in range(16)]
        assert group[1::2].tolist() == [(16 * k + 68 + j) % n for j in range(16)]
    odd = jpm_rearrange(torch.arange(1 + 5.0).view(1, 6, 1), shift=2, shuffle_groups=2)
    # odd N: r = [2, 3, 4, 5, 1], padded with r[-2] = 5, then the halves [2, 3, 4] and [5, 1, 5] interleaved
    assert odd[0, :, 0].tolist() == [2, 5, 3, 1, 4, 5]


def test_vdt_subtracts_the_view_token_after_every_block(images):
    model = build("VDT").eval()
    backbone = model.backbone
    with torch.no_grad():
        x = torch.cat([backbone.cls_token.expand(BATCH, -1, -1), backbone.reg_token.expand(BATCH, -1, -1),
                       backbone.patch_embed(images)], dim=1) + backbone.pos_embed
        for block in backbone.blocks:
            x = block(x)
            x[:, 0] = x[:, 0] - x[:, 1]
        expected = backbone.norm(x)
        got = backbone(images, subtract_view=True)
        plain = backbone(images)
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(model(images), expected[:, 0], atol=1e-6)
    assert not torch.allclose(plain[:, 0], expected[:, 0], atol=1e-3)


def test_transreid_extra_bn_call_is_a_switch(images):
    counts = {}
    for fixed in (False, True):
        model = build("TransReID", **{"MODEL.FIXES.TRANSREID_SINGLE_BN": fixed}).train()
        model(images)
        counts[fixed] = int(model.heads[0].bn.num_batches_tracked)
    assert counts == {False: 2, True: 1}


def test_view_loss_smoothing_over_identities_or_views(batch):
    logits = torch.tensor([[2.0, -1.0], [0.5, 0.3], [-1.0, 1.0], [0.0, 0.0]])
    view_feat = torch.zeros(4, 8)
    view_feat[:, 0] = 1.0
    out = ModelOutput({}, {}, {"view_logits": logits, "inv_feat": torch.ones(4, 8), "view_feat": view_feat})
    cfg = tiny_cfg("VDT")
    log_p = logits.log_softmax(1)
    onehot = F.one_hot(batch["viewids"], 2).float()
    cos = 1 / math.sqrt(8)  # |cos| of a ones vector and a unit axis in 8 dimensions
    authors = -((0.9 * onehot + 0.1 / 700) * log_p).sum(1).mean() + cos
    plain = -((0.9 * onehot + 0.1 / 2) * log_p).sum(1).mean() + cos
    assert LOSSES.get("view_identity_smoothing")(cfg, 700, 8)(out, batch).item() == pytest.approx(authors.item(), 1e-6)
    assert LOSSES.get("view")(cfg, 700, 8)(out, batch).item() == pytest.approx(plain.item(), 1e-6)
    model = build("VDT")
    names = {fixed: [spec.name for spec in
                     model.loss_specs(tiny_cfg("VDT", **{"MODEL.FIXES.VIEW_LOSS_SMOOTHING": fixed}))]
             for fixed in (False, True)}
    assert names == {False: ["id", "triplet", "view_identity_smoothing"], True: ["id", "triplet", "view"]}
    assert [spec.weight for spec in model.loss_specs(cfg)][-1] == pytest.approx(0.1)


# Tensors of the authors' models that no forward uses, with their shapes (docs/baselines.md).
def _dead_reference_tensors(arch):
    dead = {"BACKBONE.fc.weight": (NUM_CLASSES, WIDTH), "BACKBONE.fc.bias": (NUM_CLASSES,)}
    if arch != "SeCap":
        return dead
    for prefix in ["prm.cross_attn", "lfrm.final_attn_token_to_image.cross_attn"] + [
            f"lfrm.layers.{i}.{name}" for i in range(DEPTH) for name in
            ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")]:
        dead[f"{prefix}.normy.weight"] = dead[f"{prefix}.normy.bias"] = (WIDTH,)
    for prefix in ["prm", "lfrm.final_attn_token_to_image"] + [f"lfrm.layers.{i}" for i in range(DEPTH)]:
        dead[f"{prefix}.mlp.norm_layer.weight"] = dead[f"{prefix}.mlp.norm_layer.bias"] = (WIDTH,)
    dead.update({"prm.cross_attn.q_.weight": (WIDTH, WIDTH), "prm.cross_attn.k_.weight": (WIDTH, WIDTH),
                 "prm.attn2.qkv.weight": (3 * WIDTH, WIDTH), "prm.attn2.proj.weight": (WIDTH, WIDTH),
                 "prm.attn2.proj.bias": (WIDTH,), "lfrm.out_token": (1, WIDTH)})
    return dead


@pytest.mark.parametrize("arch", ARCHS)
def test_reference_state_dict_maps_with_no_leftovers(arch):
    cfg = tiny_cfg(arch)
    model = build(arch)
    ours = model.state_dict()
    reference = type(model).to_reference_state_dict(ours, cfg)
    reference.update({k: torch.zeros(shape) for k, shape in _dead_reference_tensors(arch).items()})
    backbone = {k for k in reference if k.startswith("BACKBONE.")}
    # the authors' backbone: cls, pos, patch (2), 12 per block, norm (2), fc (2) [+ view token]
    assert len(backbone) == 2 + 2 + 12 * DEPTH + 2 + 2 + (arch in ("VDT", "SeCap"))
    others = {k.split(".")[0] for k in reference if not k.startswith("BACKBONE.")}
    expected = {"ViT": {"bottleneck", "classifier"},
                "TransReID": {"b1", "b2", "bottleneck", "classifier"}
                | {f"{n}_{k}" for n in ("bottleneck", "classifier") for k in range(1, 5)},
                "VDT": {"header", "header_view"},
                "SeCap": {"header", "header_view", "header_out", "b1", "prm", "lfrm", "prompt", "image_pe",
                          "out_token"}}[arch]
    assert others == expected
    if arch == "SeCap":
        assert sum(k.startswith("prm.") for k in reference) == 25
        assert sum(k.startswith("lfrm.") for k in reference) == 95
        assert reference["lfrm.layers.0.self_attn.q_.weight"].shape == (WIDTH // 2, WIDTH)
        assert reference["prm.mlp.layers.0.weight"].shape == (4 * WIDTH, WIDTH)
    back = type(model).from_reference_state_dict(reference, cfg)
    assert back.keys() == ours.keys()
    assert all(torch.equal(back[k], ours[k]) for k in ours)
    args = type(model).reference_model_args(reference, cfg)
    assert args == {"num_classes": NUM_CLASSES, "num_cameras": 1,
                    "num_views": NUM_VIEWS if arch in ("VDT", "SeCap") else 1, "attributes": []}


def test_reference_sie_table_maps_to_the_side_embedding():
    cfg = tiny_cfg("VDT", **{"MODEL.SIE_CAMERA": True})
    model = build("VDT", **{"MODEL.SIE_CAMERA": True})
    reference = type(model).to_reference_state_dict(model.state_dict(), cfg)
    assert reference["BACKBONE.sie_embed"].shape == (NUM_CAMERAS, 1, WIDTH)
    assert "BACKBONE.view_token" in reference
    args = type(model).reference_model_args(reference, cfg)
    assert (args["num_cameras"], args["num_views"]) == (NUM_CAMERAS, NUM_VIEWS)


def test_mismatched_backbone_name_is_a_config_error():
    with pytest.raises(ConfigError, match="MODEL.NAME"):
        build("VDT", **{"MODEL.NAME": "vit_base_patch16_224_TransReID"})


# ------------------------------------------------------------------------------------------------------
# runs on a tiny SynthAG
# ------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    generate_synthag(root, SynthConfig(num_ids=20, images_per_id=16, height=H, width=W, seed=0), num_workers=1)
    return root


def run_cfg(arch, root, output_dir, **overrides):
    settings = {"DATASETS.ROOT_DIR": root, "DATASETS.AUTO_GENERATE": False, "DATASETS.TESTS": ("SynthAG_ALL",),
                "DATALOADER.NUM_WORKERS": 0, "DATALOADER.NUM_INSTANCE": 4, "SOLVER.IMS_PER_BATCH": 16,
                "SOLVER.OPTIMIZER_NAME": "AdamW", "SOLVER.BASE_LR": 0.001, "SOLVER.WARMUP_ITERS": 0,
                "SOLVER.MAX_EPOCHS": 1, "SOLVER.EVAL_PERIOD": 1, "SOLVER.LOG_PERIOD": 1, "SOLVER.AMP": False,
                "TEST.IMS_PER_BATCH": 64, "INPUT.PADDING": 2, "INPUT.RE_PROB": 0.0, "MODEL.DROP_PATH": 0.0,
                "OUTPUT_DIR": output_dir, **overrides}
    cfg = tiny_cfg(arch, **settings)
    cfg.freeze()
    return cfg


def _iteration_losses(records):
    """Per-iteration losses from the running means of the trainer's log lines."""
    means = [float(m.group(1)) for m in (re.search(r"iter \d+/\d+: loss ([0-9.]+)", r.getMessage()) for r in records)
             if m]
    return [i * m - (i - 1) * means[i - 2] if i > 1 else m for i, m in enumerate(means, start=1)]


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("arch", ARCHS)
def test_one_epoch_on_synthag_lowers_the_loss(arch, synth_root, tmp_path, caplog):
    torch.manual_seed(0)
    with caplog.at_level(logging.INFO, logger="processor.hooks"):
        results = run_training(run_cfg(arch, synth_root, str(tmp_path)), torch.device("cpu"))
    losses = _iteration_losses(caplog.records)
    assert len(losses) >= 6, losses
    third = len(losses) // 3
    assert sum(losses[-third:]) / third < sum(losses[:third]) / third, losses
    assert 0 <= results["SynthAG_ALL"]["mAP"] <= 1
    assert os.path.isfile(tmp_path / "model_final.pth")


def _timm_tokens(jx, image_size):
    """timm's ViT with the jx weights, the positional embedding resized as the authors' code does."""
    state = dict(jx)
    grid = ((image_size[0] - 16) // 16 + 1, (image_size[1] - 16) // 16 + 1)
    state["pos_embed"] = torch.cat([jx["pos_embed"][:, :1], _bilinear_grid(jx["pos_embed"], grid)], dim=1)
    vit = VisionTransformer(img_size=image_size, patch_size=16, embed_dim=WIDTH, depth=DEPTH, num_heads=HEADS,
                            num_classes=1000).eval()
    vit.load_state_dict(state)
    return vit


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("arch", ARCHS)
def test_untrained_run_from_jx_weights_writes_the_pretrained_model(arch, synth_root, jx_file, tmp_path, images):
    cfg = run_cfg(arch, synth_root, str(tmp_path), **{"MODEL.RANDOM_INIT": False, "MODEL.PRETRAIN_PATH": jx_file,
                                                        "SOLVER.MAX_EPOCHS": 0})
    run_training(cfg, torch.device("cpu"))
    state = load_checkpoint(str(tmp_path / "model_final.pth"))
    assert state["epoch"] == 0
    model, _ = load_trained_model(cfg, str(tmp_path / "model_final.pth"), torch.device("cpu"))
    with torch.no_grad():
        feature = model(images, **model.forward_inputs({"camids": None, "viewids": None}))
    if arch in ("VDT", "SeCap"):
        assert torch.count_nonzero(model.backbone.reg_token) == 0
        return
    jx = load_checkpoint(jx_file)
    vit = _timm_tokens(jx, (H, W))
    with torch.no_grad():
        if arch == "ViT":
            expected = vit.forward_features(images)[:, 0]
        else:
            x = vit._pos_embed(vit.patch_embed(images))
            x = vit.blocks[:-1](x)  # the authors' local_feature path: all but the last block, no LN
            last = lambda t: vit.norm(vit.blocks[-1](t))[:, 0]  # noqa: E731 (b1 / b2 = copies of block + LN)
            n = x.shape[1] - 1
            order = [(j + 4) % n for j in range(n)]  # shift 5: patches rotated left by 4
            shuffled = [order[i // 2] if i % 2 == 0 else order[n // 2 + i // 2] for i in range(n)]
            length = n // 4
            local = [last(torch.cat([x[:, :1], x[:, [1 + p for p in shuffled[k * length:(k + 1) * length]]]], dim=1))
                     for k in range(4)]
            expected = torch.cat([last(x)] + [f / 4 for f in local], dim=1)
    assert feature.shape == expected.shape
    assert (feature - expected).abs().max().item() <= 1e-5


def test_bench_model_times_the_vit_baselines_next_to_clip_baseline():
    small = ["MODEL.VIT.EMBED_DIM", "64", "MODEL.VIT.DEPTH", "2", "MODEL.VIT.NUM_HEADS", "1",
             "MODEL.CLIP.VISION_WIDTH", "64", "MODEL.CLIP.VISION_LAYERS", "2", "MODEL.CLIP.VISION_HEADS", "1",
             "MODEL.CLIP.TEXT_LAYERS", "1", "MODEL.SECAP.PROMPT_LEN", "4",
             "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]"]
    result = run_script(["tools/bench_model.py", "--config_file", "configs/Synthetic/vit.yml", "--also",
                         "configs/Synthetic/transreid.yml", "configs/Synthetic/vdt.yml", "configs/Synthetic/secap.yml",
                         "--baseline_config", "configs/Synthetic/clip_baseline.yml", "--random-weights", "--device",
                         "cpu", "--batch", "8", "--iters", "1", "--warmup", "0", "--threads", "1", *small])
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert set(report["train_step_s"]) == {"ViT", "CLIP_baseline", "TransReID", "VDT", "SeCap"}
    assert all(seconds > 0 for seconds in report["train_step_s"].values())
    assert [row["arch"] for row in report["also"]] == ["TransReID", "VDT", "SeCap"]
    # SeCap adds PRM + LFRM to the same backbone, so it has more parameters than VDT
    assert report["params_m"]["SeCap"] > report["params_m"]["VDT"]

"""CLIP_baseline and CLIP_ReID on a tiny random-weight CLIP: output contract, prompts, stages, SIE, checkpoints.

Exactness against the reference's layout and test-time features: tests/test_clip_reference.py.
"""
import glob
import os

import pytest
import torch
import torch.nn.functional as F

from configs import load_config
from model import build_model
from model.backbone import build_clip_from_config
from model.checkpoint_fit import load_model_weights
from text import tokenize
from tests.fixtures import REPO_ROOT, tiny_cfg
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import CheckpointError

NUM_CLASSES, NUM_CAMERAS, NUM_VIEWS, BATCH = 5, 3, 2, 4
WIDTH, EMBED_DIM = 64, 32
X_TOKEN = 343  # BPE id of "x" in CLIP's vocabulary


def build(arch, seed=0, num_classes=NUM_CLASSES, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_cfg(arch, **overrides), num_classes, NUM_CAMERAS, NUM_VIEWS, ())


@pytest.fixture(scope="module")
def images():
    return torch.randn(BATCH, 3, 64, 32, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def pids():
    return torch.tensor([0, 0, 3, 4])


def text_tower_names(model):
    return [name for name, _ in model.named_parameters()
            if name.startswith("clip.") and not name.startswith("clip.visual.")]


@pytest.mark.parametrize("arch", ["CLIP_baseline", "CLIP_ReID"])
def test_training_outputs_follow_the_contract(arch, images, pids):
    model = build(arch).train()
    if arch == "CLIP_ReID":
        model.set_class_text_features(torch.randn(NUM_CLASSES, EMBED_DIM))
    out = model(images)
    if arch == "CLIP_baseline":  # the reference's ([logits], [CLS])
        assert list(out.id_logits) == ["cls"] and tuple(out.id_logits["cls"].shape) == (BATCH, NUM_CLASSES)
        assert {k: tuple(f.shape) for k, f in out.features.items()} == {"cls": (BATCH, WIDTH)}
        assert not out.aux
        return
    assert list(out.id_logits) == ["cls", "proj"]
    assert all(tuple(logits.shape) == (BATCH, NUM_CLASSES) for logits in out.id_logits.values())
    assert {k: tuple(f.shape) for k, f in out.features.items()} == {
        "penultimate": (BATCH, WIDTH), "cls": (BATCH, WIDTH), "proj": (BATCH, EMBED_DIM)}
    # The penultimate CLS is taken before the last block and ln_post, so it differs from the final CLS.
    assert not torch.allclose(out.features["penultimate"], out.features["cls"])
    assert ("i2t_logits" in out.aux) == (arch == "CLIP_ReID")
    if arch == "CLIP_ReID":
        assert tuple(out.aux["i2t_logits"].shape) == (BATCH, NUM_CLASSES)


@pytest.mark.parametrize("arch", ["CLIP_baseline", "CLIP_ReID"])
def test_gradients_of_id_and_triplet_terms_reach_the_visual_encoder(arch, images, pids):
    model = build(arch).train()
    if arch == "CLIP_ReID":
        model.unfreeze_for_stage2()
        model.set_class_text_features(torch.randn(NUM_CLASSES, EMBED_DIM))
    out = model(images)
    loss = sum(F.cross_entropy(logits, pids) for logits in out.id_logits.values())
    loss = loss + sum(f.pow(2).mean() for f in out.features.values())
    loss.backward()
    visual = dict(model.visual.named_parameters())
    if arch == "CLIP_baseline":  # the reference's baseline never uses the projection (CLS only)
        assert visual.pop("proj").grad is None
    assert visual and all(p.grad is not None for p in visual.values())
    assert any(p.grad.abs().sum() > 0 for name, p in visual.items() if "conv1" in name)
    assert model.head_cls.classifier.weight.grad.abs().sum() > 0
    if arch == "CLIP_ReID":
        assert model.head_proj.classifier.weight.grad.abs().sum() > 0
    else:  # the reference's unused projected head: present, frozen, untouched
        assert not any(p.requires_grad or p.grad is not None for p in model.head_proj.parameters())


def test_eval_embedding_is_pre_bn_cls_and_openai_projected_cls(images):
    reid = build("CLIP_ReID").eval()
    baseline = build("CLIP_baseline", seed=1).eval()
    baseline.visual.load_state_dict(reid.clip.visual.state_dict())
    with torch.no_grad():
        emb_reid, emb_base = reid(images), baseline(images)
        projected = reid.clip.encode_image(images)
    assert reid.embedding_dim == WIDTH + EMBED_DIM and baseline.embedding_dim == WIDTH
    assert tuple(emb_reid.shape) == (BATCH, WIDTH + EMBED_DIM) and tuple(emb_base.shape) == (BATCH, WIDTH)
    torch.testing.assert_close(emb_reid[:, WIDTH:], projected)
    torch.testing.assert_close(emb_base, emb_reid[:, :WIDTH])
    # Eval embeddings do not depend on the BNNeck (pre-BN) nor on the other images of the batch.
    with torch.no_grad():
        torch.testing.assert_close(reid(images[:1]), emb_reid[:1], rtol=1e-4, atol=1e-5)


def test_baseline_keeps_only_the_image_tower():
    model = build("CLIP_baseline")
    assert not any("token_embedding" in name or name.startswith("clip.") for name, _ in model.named_parameters())


def test_prompt_text_features_equal_the_template_with_cls_ctx_inserted_by_hand(pids):
    model = build("CLIP_ReID", **{"MODEL.TEXT_LEN": 24}).eval()
    torch.manual_seed(0)  # the CLIP the model was built from, token embedding included
    clip = build_clip_from_config(tiny_cfg("CLIP_ReID", **{"MODEL.TEXT_LEN": 24})).eval()
    assert model.clip.token_embedding is None and clip.token_embedding is not None
    tokens = tokenize("A photo of a X X X X person.", context_length=24)
    assert tuple(model.prompt_tokens.shape) == (1, 24)
    x_positions = (tokens[0] == X_TOKEN).nonzero().flatten().tolist()
    assert x_positions == [5, 6, 7, 8]
    with torch.no_grad():
        got = model.text_features(pids)
        expected = []
        for pid in pids.tolist():
            embeds = clip.token_embedding(tokens).clone()
            for slot, position in enumerate(x_positions):
                embeds[0, position] = model.cls_ctx[pid, slot]
            expected.append(clip.encode_text(tokens, token_embeds=embeds))
        expected = torch.cat(expected)
        # With the X embeddings themselves as context the prompt is the plain template.
        model.cls_ctx[2] = clip.token_embedding.weight[X_TOKEN]
        plain = model.text_features(torch.tensor([2]))
        reference_plain = clip.encode_text(tokens)
    assert tuple(got.shape) == (BATCH, EMBED_DIM)
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got[0], got[1])
    assert not torch.allclose(got[0], got[2])
    torch.testing.assert_close(plain, reference_plain)


def test_class_text_features_feed_i2t_logits_and_are_recomputed_not_saved(images, tmp_path):
    model = build("CLIP_ReID").train()
    with pytest.raises(RuntimeError, match="set_class_text_features"):
        model(images)
    with pytest.raises(ValueError):
        model.set_class_text_features(torch.randn(NUM_CLASSES + 1, EMBED_DIM))
    with torch.no_grad():
        class_feats = model.text_features(torch.arange(NUM_CLASSES))
    model.set_class_text_features(class_feats)
    out = model(images)
    torch.testing.assert_close(out.aux["i2t_logits"], out.features["proj"] @ class_feats.t())

    # As in the reference, checkpoints carry the prompts, and the prompt-learning phase recomputes the features.
    assert "class_text_features" not in model.state_dict()
    path = str(tmp_path / "clipreid.pth")
    save_checkpoint(model.state_dict(), path)
    restored = build("CLIP_ReID", seed=5).train()
    load_model_weights(restored, load_checkpoint(path), tiny_cfg("CLIP_ReID"))
    with pytest.raises(RuntimeError, match="set_class_text_features"):
        restored(images)
    with torch.no_grad():
        restored.set_class_text_features(restored.text_features(torch.arange(NUM_CLASSES)))
    torch.testing.assert_close(restored.class_text_features, class_feats)
    torch.testing.assert_close(restored(images).aux["i2t_logits"], out.aux["i2t_logits"])


def test_stage1_trains_only_prompts_and_stage2_only_the_image_side(images, pids):
    model = build("CLIP_ReID")
    model.freeze_for_stage1()
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["cls_ctx"] and model.prompt_parameters()[0] is model.cls_ctx
    with torch.no_grad():
        image_feats = model.encode_image_for_prompts(images)
    text_feats = model.text_features(pids)
    (image_feats @ text_feats.t()).logsumexp(1).mean().backward()
    assert model.cls_ctx.grad[pids].abs().sum() > 0
    assert model.cls_ctx.grad[[1, 2]].abs().sum() == 0
    assert all(p.grad is None for name, p in model.named_parameters() if name != "cls_ctx")

    model.unfreeze_for_stage2()
    assert not model.cls_ctx.requires_grad
    text_names = text_tower_names(model)
    assert text_names and not any("token_embedding" in name for name in text_names)
    assert not any(p.requires_grad for name, p in model.named_parameters() if name in text_names)
    assert all(p.requires_grad for p in model.visual.parameters())
    for head in (model.head_cls, model.head_proj):
        assert head.classifier.weight.requires_grad and head.bn.weight.requires_grad
        assert not head.bn.bias.requires_grad  # BNNeck keeps its zero bias


def test_sie_adds_parameters_and_changes_outputs_only_with_side_ids(images):
    plain = build("CLIP_baseline").eval()
    sie = build("CLIP_baseline", **{"MODEL.SIE_CAMERA": True, "MODEL.SIE_VIEW": True}).eval()
    sie_params = sum(p.numel() for p in sie.sie_embed.parameters())
    assert sie_params > 0
    assert sum(p.numel() for p in sie.parameters()) == sum(p.numel() for p in plain.parameters()) + sie_params
    result = sie.load_state_dict(plain.state_dict(), strict=False)
    assert result.missing_keys and all(key.startswith("sie_embed.") for key in result.missing_keys)
    camids, viewids = torch.tensor([0, 1, 2, 1]), torch.tensor([0, 1, 1, 0])
    with torch.no_grad():
        torch.testing.assert_close(sie(images), plain(images))
        torch.testing.assert_close(plain(images, camids, viewids), plain(images))
        assert not torch.allclose(sie(images, camids, viewids), plain(images, camids, viewids))


def test_load_model_weights_strips_ddp_prefixes_and_loads_exactly(images, tmp_path):
    source = build("CLIP_baseline", seed=3).eval()
    path = str(tmp_path / "ddp.pth")
    save_checkpoint({f"module.{key}": value for key, value in source.state_dict().items()}, path)
    target = build("CLIP_baseline", seed=4).eval()
    load_model_weights(target, load_checkpoint(path), tiny_cfg("CLIP_baseline"))
    with torch.no_grad():
        torch.testing.assert_close(target(images), source(images))


def test_load_model_weights_names_sie_keys_in_one_line(tmp_path):
    trained = build("CLIP_baseline", **{"MODEL.SIE_CAMERA": True})
    path = str(tmp_path / "sie.pth")
    save_checkpoint(trained.state_dict(), path)
    cfg = tiny_cfg("CLIP_baseline")
    with pytest.raises(CheckpointError) as info:
        load_model_weights(build("CLIP_baseline"), load_checkpoint(path), cfg, source=path)
    message = str(info.value)
    assert "\n" not in message
    assert path in message and "unexpected" in message and "sie_embed." in message
    assert "MODEL.SIE_CAMERA=False" in message and "MODEL.SIE_VIEW=False" in message


def test_load_model_weights_names_identity_count_and_input_size(tmp_path):
    cfg = tiny_cfg("CLIP_ReID")
    other_ids = build("CLIP_ReID", num_classes=NUM_CLASSES + 2).state_dict()
    with pytest.raises(CheckpointError) as info:
        load_model_weights(build("CLIP_ReID"), other_ids, cfg)
    message = str(info.value)
    assert "head_cls.classifier.weight" in message and "cls_ctx" in message
    assert f"[{NUM_CLASSES + 2}, {WIDTH}] vs [{NUM_CLASSES}, {WIDTH}]" in message
    assert "DATASETS.NAMES" in message and "MODEL.SIE_CAMERA" not in message

    other_size = build("CLIP_baseline", **{"INPUT.SIZE_TRAIN": [96, 32], "INPUT.SIZE_TEST": [96, 32]})
    with pytest.raises(CheckpointError, match=r"visual\.positional_embedding.*INPUT\.SIZE_TRAIN"):
        load_model_weights(build("CLIP_baseline"), other_size.state_dict(), tiny_cfg("CLIP_baseline"))


SHIPPED = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*", "clipreid.yml"))
                 + glob.glob(os.path.join(REPO_ROOT, "configs", "*", "clip_baseline.yml")))


@pytest.mark.parametrize("path", SHIPPED, ids=[os.path.relpath(p, REPO_ROOT) for p in SHIPPED])
def test_shipped_configs_load_and_name_the_method(path):
    cfg = load_config(path)
    reid = os.path.basename(path) == "clipreid.yml"
    assert cfg.MODEL.ARCH_NAME == ("CLIP_ReID" if reid else "CLIP_baseline")
    assert cfg.SOLVER.STAGE1.TRAIN is reid
    assert cfg.DATASETS.NAMES == cfg.DATASETS.TESTS[0]
    assert os.path.basename(path)[:-4] in cfg.OUTPUT_DIR


def test_shipped_configs_cover_every_benchmark():
    folders = {os.path.basename(os.path.dirname(p)) for p in SHIPPED}
    aerial_ground = {"CP2108", "CARGO", "AGReIDv1", "AGReIDv2", "Synthetic"}
    standard = {"Market1501", "DukeMTMC", "MSMT17", "OccDuke", "VeRi", "VehicleID"}
    assert folders == aerial_ground | standard
    assert len(SHIPPED) == 2 * len(folders)


@pytest.mark.parametrize("method", ["clipreid", "clip_baseline"])
def test_synthetic_configs_build_a_working_cpu_model(method):
    cfg = load_config(os.path.join(REPO_ROOT, "configs", "Synthetic", f"{method}.yml"))
    torch.manual_seed(0)
    model = build_model(cfg, 6, 2, 2, ()).eval()
    with torch.no_grad():
        embedding = model(torch.randn(2, 3, *cfg.INPUT.SIZE_TEST))
    assert tuple(embedding.shape) == (2, model.embedding_dim)


def test_overlapping_patches_follow_the_stride(images, pids):
    model = build("CLIP_baseline", **{"MODEL.STRIDE_SIZE": [12, 12]}).train()
    assert model.visual.grid_size == ((64 - 16) // 12 + 1, (32 - 16) // 12 + 1)
    out = model(images)
    assert [tuple(f.shape) for f in out.features.values()] == [(BATCH, WIDTH)]


def test_clipreid_stages_run_under_bfloat16_autocast(images, pids):
    model = build("CLIP_ReID")
    model.freeze_for_stage1()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        image_feats = model.encode_image_for_prompts(images)
        text_feats = model.text_features(pids)
        loss = (image_feats @ text_feats.t()).float().logsumexp(1).mean()
    loss.backward()
    assert model.cls_ctx.grad is not None and model.cls_ctx.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.set_class_text_features(model.text_features(torch.arange(NUM_CLASSES)))
    assert model.class_text_features.dtype == torch.float32
    model.unfreeze_for_stage2()
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(images)
    assert tuple(out.aux["i2t_logits"].shape) == (BATCH, NUM_CLASSES) and torch.isfinite(out.aux["i2t_logits"]).all()


def test_load_model_weights_names_the_architecture_for_another_model():
    baseline_weights = build("CLIP_baseline").state_dict()
    # The image tower's parameters are found under another prefix, so the model class comes first.
    with pytest.raises(CheckpointError, match=r"missing.*unexpected.*used for training: MODEL\.ARCH_NAME='CLIP_ReID'"):
        load_model_weights(build("CLIP_ReID"), baseline_weights, tiny_cfg("CLIP_ReID"))

"""Relevance maps (evaluation/relevance.py, tools/explain.py) and their faithfulness (evaluation/faithfulness.py,
tools/faithfulness.py) for all seven models.

The relevance rules (attention probabilities and LayerNorm scales held constant in the backward pass) are checked
against their definitions and against conservation, the property they exist for; the explainer's features
against single-image forwards under autocast. The maps of briefly trained tiny models must pass the faithfulness
benchmark: beat random, permuted, transposed and shifted patch-level maps on the deletion and insertion curves,
with bootstrap intervals above zero, and put more of their mass on the person than the person's share of the
image (SynthAG's masks); a model with random weights must get other maps (Adebayo et al. 2018).
"""
import contextlib
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.stats import spearmanr
from torch import nn

from configs import load_config
from datasets import collate, make_dataloaders
from datasets.synthetic import person_mask
import evaluation.relevance as relevance
from evaluation.faithfulness import NULLS, REQUIRED_NULLS, FaithfulnessBenchmark
from evaluation.relevance import METHODS, ConservativePropagation, Explainer, patches_to_pixels, unfaithful_reason
from model import build_model
from model.clip.transformer import SelfAttention
from processor import run_training
from processor.inference import FeatureExtractor
from processor.model_io import build_from_args
from tests.fixtures import REPO_ROOT, run_script, tiny, tiny_cfg
from tools import explain as explain_tool
from tools import faithfulness as faithfulness_tool
from utils.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.seed import set_seed

MODELS = ("clip_baseline", "clipreid", "svpr_reid", "vit", "transreid", "vdt", "secap")
# Tiny backbones with 8-pixel patches: an 8 x 4 grid of patches on 64 x 32 images. SVPR-ReID with a per-image CVPR
# key: its features do not depend on the batch, so the benchmark's perturbed images go through it in batches
# (the reference's batch-dependent features are explained one image at a time: see
# test_features_are_each_images_own_in_float32_under_autocast).
TINY = ["MODEL.CLIP.PATCH_SIZE", "8", "MODEL.STRIDE_SIZE", "[8, 8]", "MODEL.VIT.EMBED_DIM", "64", "MODEL.VIT.DEPTH",
        "2", "MODEL.VIT.NUM_HEADS", "2", "MODEL.VIT.PATCH_SIZE", "8", "MODEL.SECAP.PROMPT_LEN", "4",
        "MODEL.FIXES.LOCAL_PATCH_COUNT", "True", "MODEL.FIXES.CVPR_PER_SAMPLE_KEY", "True", "DATASETS.TESTS",
        "('SynthAG_ALL',)", "SOLVER.EVAL_PERIOD", "100", "SOLVER.TENSORBOARD", "False"]

# Training epochs (default 4). SeCap 12: after 4 its feature barely depends on the image (cosine 0.9995 between any
# two test images) and no method's maps beat the shifted nulls on the insertion curve; after 12 both methods' do.
EPOCHS = {"secap": 12}


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory, single_thread):
    """Briefly trained tiny checkpoints of the seven models: name -> model_final.pth."""
    weights = {}
    for name in MODELS:
        out = str(tmp_path_factory.mktemp(name))
        epochs = EPOCHS.get(name, 4)
        cfg = load_config(f"configs/Synthetic/{name}.yml", tiny(synth_root, out, epochs=epochs, extra=TINY))
        set_seed(cfg.SOLVER.SEED)
        run_training(cfg, torch.device("cpu"))
        weights[name] = os.path.join(out, "model_final.pth")
    return weights


# ----------------------------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("causal", [False, True])
def test_explicit_attention_matches_fused_and_multihead_attention(causal):
    torch.manual_seed(0)
    attention = SelfAttention(32, 4, causal=causal)
    nn.init.normal_(attention.in_proj_bias)
    reference = nn.MultiheadAttention(32, 4, batch_first=True)
    reference.load_state_dict({k: v for k, v in attention.state_dict().items()})
    x = torch.randn(3, 7, 32)
    mask = torch.ones(7, 7, dtype=torch.bool).triu(1) if causal else None
    expected, expected_probs = reference(x, x, x, attn_mask=mask, average_attn_weights=False)
    fused = attention(x)
    recorded = []
    attention.attn_probs.register_forward_hook(lambda _m, _i, out: recorded.append(out))
    attention.fused_attn = False
    explicit = attention(x)
    torch.testing.assert_close(fused, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(explicit, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(recorded[0], expected_probs, rtol=1e-5, atol=1e-6)
    assert SelfAttention.fused_attn is True  # the switch is per instance; the default stays fused


@pytest.mark.parametrize("mask", [None, "causal", "bool", "float"])
def test_attention_with_constant_probabilities_is_attention_whose_gradient_reaches_only_the_values(mask):
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=generator, requires_grad=True) for _ in range(3))
    keywords = {"causal": {"is_causal": True}, None: {},
                "bool": {"attn_mask": (torch.rand(5, 5, generator=generator) > 0.3) | torch.eye(5, dtype=torch.bool)},
                "float": {"attn_mask": torch.randn(5, 5, generator=generator)}}[mask]
    expected = F.scaled_dot_product_attention(q, k, v, **keywords)
    with ConservativePropagation():  # what the models' own calls of the fused function become
        out = F.scaled_dot_product_attention(q, k, v, **keywords)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    weights = torch.randn(out.shape, generator=generator)
    grad_q, grad_k, grad_v = torch.autograd.grad((out * weights).sum(), (q, k, v), allow_unused=True)
    assert grad_q is None and grad_k is None  # the probabilities are constants
    scores = q @ k.transpose(-2, -1) / 2  # head width 4: scale 1 / sqrt(4)
    if mask == "causal":
        scores = scores.masked_fill(torch.ones(5, 5, dtype=torch.bool).triu(1), float("-inf"))
    elif mask == "bool":
        scores = scores.masked_fill(~keywords["attn_mask"], float("-inf"))
    elif mask == "float":
        scores = scores + keywords["attn_mask"]
    probabilities = scores.softmax(-1)
    torch.testing.assert_close(grad_v, probabilities.transpose(-2, -1) @ weights, rtol=1e-5, atol=1e-6)


def test_layer_norm_with_constant_scale_keeps_the_values_and_differentiates_only_the_centring():
    generator = torch.Generator().manual_seed(3)
    norm = nn.LayerNorm(6)
    nn.init.normal_(norm.weight, generator=generator)
    nn.init.normal_(norm.bias, generator=generator)
    x = torch.randn(6, generator=generator) * 3 + 1
    with ConservativePropagation():
        torch.testing.assert_close(norm(x), F.layer_norm(x, (6,), norm.weight, norm.bias), rtol=1e-5, atol=1e-6)
        jacobian = torch.autograd.functional.jacobian(norm, x)
    # d/dx [(x - mean(x)) * s * w + b] with s = 1 / std(x) held constant: s * diag(w) (I - 1/n).
    scale = 1 / torch.sqrt(x.var(unbiased=False) + norm.eps)
    expected = scale * norm.weight.detach()[:, None] * (torch.eye(6) - 1 / 6)
    torch.testing.assert_close(jacobian, expected, rtol=1e-5, atol=1e-6)


class BiasFreeBlock(nn.Module):
    """LayerNorm (no bias) -> self-attention -> MLP with a GELU, residuals, no bias anywhere: a function that is
    linear in its input once the attention probabilities, the normalisation and the GELU gates are fixed."""

    def __init__(self, width=8, heads=2):
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(width, bias=False)
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.up = nn.Linear(width, 2 * width, bias=False)
        self.down = nn.Linear(2 * width, width, bias=False)

    def forward(self, x):  # (B, L, C) -> (B, C)
        batch, length, width = x.shape
        q, k, v = self.qkv(self.norm(x)).view(batch, length, 3, self.heads, -1).transpose(1, 3).unbind(2)
        x = x + F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, length, width)
        return (x + self.down(F.relu(self.up(self.norm(x))))).mean(1)


def test_relevance_rules_make_gradient_times_input_conservative():
    """Ali et al. 2022's point: with the attention probabilities and LayerNorm's scale held constant (ReLU's gate
    is piecewise constant anyway), gradient x input sums to the explained output, so no relevance is lost or
    made up on the way; plain gradient x input does not."""
    torch.manual_seed(4)
    block = BiasFreeBlock()
    x = torch.randn(1, 5, 8, requires_grad=True)
    direction = torch.randn(8)
    for rules, conserved in ((True, True), (False, False)):
        with ConservativePropagation() if rules else contextlib.nullcontext():
            target = (block(x) * direction).sum()
        (gradient,) = torch.autograd.grad(target, x)
        total = float((gradient * x.detach()).sum())
        explained = float(target.detach())
        assert (total == pytest.approx(explained, rel=1e-4)) is conserved, (rules, total, explained)


def test_patch_relevance_covers_its_pixels_and_averages_overlaps():
    patches = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    pixels = patches_to_pixels(patches, (4, 4), (2, 2), (2, 2))
    np.testing.assert_array_equal(pixels[0].numpy(), np.kron(patches[0].numpy(), np.ones((2, 2))))
    # Stride 1, patch 2 over 3 x 3 pixels: the centre pixel is covered by all four patches.
    overlapping = patches_to_pixels(patches, (4, 3), (2, 2), (1, 1))[0]
    assert overlapping[1, 1] == pytest.approx(2.5) and overlapping[0, 0] == 1.0 and overlapping[2, 2] == 4.0
    assert overlapping[3].abs().sum() == 0  # the last row is covered by no patch


def test_features_are_each_images_own_in_float32_under_autocast(single_thread):
    """The reference SVPR-ReID's feature depends on its batch: the explainer's features are those of each image
    alone, chunked or not; a surrounding bfloat16 autocast (mixed-precision training) changes nothing."""
    cfg = tiny_cfg("CLIP_SVPR_ReID", **{"MODEL.USE_TEXT": False, "MODEL.USE_ATTR": True})
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=5, num_cameras=3, num_views=2, attributes=(("hat", 2), ("bag", 3))).eval()
    images = torch.randn(4, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    inputs = {"camids": torch.zeros(4, dtype=torch.long), "viewids": torch.tensor([0, 1, 1, 0]), "text_tokens": None}
    with torch.no_grad():
        alone = torch.cat([model(images[i:i + 1], **{k: v[i:i + 1] if torch.is_tensor(v) else v
                                                     for k, v in inputs.items()}) for i in range(4)])
        assert not torch.allclose(model(images, **inputs), alone, atol=1e-4)  # it does depend on the batch
    explainer = Explainer(model)
    torch.testing.assert_close(explainer.features(images, inputs, chunk=4), alone, rtol=0, atol=0)
    maps, features = explainer(images, inputs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        maps_autocast, features_autocast = explainer(images, inputs)
    assert maps_autocast.dtype == features_autocast.dtype == torch.float32
    assert torch.equal(maps_autocast, maps) and torch.equal(features_autocast, features)


# ---------------------------------------------------------------------------------- trained tiny models
IMAGES = 24


def evaluation_batch(weights):
    """The checkpoint's extractor, a batch of IMAGES evaluation images spread over queries + gallery, and their
    person masks."""
    extractor = FeatureExtractor.from_checkpoint(weights, device="cpu")
    dataset = make_dataloaders(extractor.cfg).val_loader.dataset
    chosen = np.linspace(0, len(dataset) - 1, IMAGES).round().astype(int)
    masks = [person_mask(os.path.dirname(os.path.dirname(dataset.samples[i].path)),
                         os.path.basename(dataset.samples[i].path)) for i in chosen]
    return extractor, collate([dataset[i] for i in chosen]), torch.from_numpy(np.stack(masks))


def benchmark(explainer):
    return FaithfulnessBenchmark(explainer, steps=6, draws=1, resamples=2000, nulls=REQUIRED_NULLS)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_maps_are_faithful_and_depend_on_the_weights(name, trained, single_thread, monkeypatch):
    """Every method the explainer offers for the model draws maps that beat every required null on the deletion
    and insertion curves and point at the person (SynthAG's masks); the methods it refuses (found unfaithful on
    the quickstart-trained models, ``UNFAITHFUL``) are refused with one line naming the method. (Integrated
    Gradients with 16 steps instead of 32: half the time, the same method.)"""
    monkeypatch.setattr(relevance, "IG_STEPS", 16)
    extractor, batch, masks = evaluation_batch(trained[name])
    model = extractor.model
    inputs = model.forward_inputs(batch)
    for method in METHODS:
        if unfaithful_reason(model, method) is not None:
            with pytest.raises(UserError, match=f"{method}.*no faithful maps"):
                Explainer(model, method)
            continue
        explainer = Explainer(model, method)
        result = benchmark(explainer)(batch["images"], inputs, masks=masks)
        print(f"{name} {method}: " + ", ".join(
            f"{null} {result.deletion_gain[null].mean:+.3f} / {result.insertion_gain[null].mean:+.3f}"
            for null in REQUIRED_NULLS) + f"; pointing {result.pointing.ratio:.2f}x")
        assert result.faithful, result.as_dict()

    # Cascading randomisation (all weights), on 8 of the images: the maps must change.
    batch = {key: value[:8] if torch.is_tensor(value) else value for key, value in batch.items()}
    inputs = model.forward_inputs(batch)
    explainer = Explainer(model)
    maps, _ = explainer(batch["images"], inputs)
    assert maps.shape == (8, 64, 32) and (maps >= 0).all() and (maps.flatten(1).amax(1) > 0).all()
    state = load_checkpoint(trained[name])
    torch.manual_seed(1234)
    randomised = build_from_args(extractor.cfg, state["model_args"], torch.device("cpu")).eval()
    random_maps, _ = Explainer(randomised)(batch["images"], randomised.forward_inputs(batch))
    correlation = np.mean([spearmanr(a.flatten(), b.flatten())[0] for a, b in zip(maps, random_maps)])
    print(f"{name}: mean Spearman correlation of trained and random-weight maps {correlation:.3f}")
    assert abs(correlation) < 0.5
    again, _ = explainer(batch["images"], inputs)
    torch.testing.assert_close(again, maps)  # deterministic


@pytest.mark.slow
def test_default_forward_is_left_as_it_was(trained, single_thread):
    """Explaining runs every attention fused under the relevance rules, then sets the switches back: features
    before and after agree bit for bit, and the rules leave the forward values alone (to float tolerance)."""
    extractor, batch, _ = evaluation_batch(trained["svpr_reid"])
    model = extractor.model
    inputs = model.forward_inputs(batch)
    switches = [module for module in model.modules() if hasattr(module, "fused_attn")]
    switches[0].fused_attn = False  # a switch set otherwise is restored as it was
    with torch.no_grad():
        before = model(batch["images"], **inputs)
    Explainer(model)(batch["images"][:2], inputs={k: v[:2] if torch.is_tensor(v) else v for k, v in inputs.items()})
    assert switches[0].fused_attn is False and all(module.fused_attn for module in switches[1:])
    with torch.no_grad():
        after = model(batch["images"], **inputs)
        with ConservativePropagation():
            ruled = model(batch["images"], **inputs)
    assert torch.equal(before, after)
    torch.testing.assert_close(ruled, before, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ the tool
def image_paths(root, count):
    folder = os.path.join(root, "SynthAG", "images")
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))[:count]]


@pytest.mark.slow
@pytest.mark.parametrize("method", METHODS)
def test_explain_tool_writes_a_map_per_image_at_its_size(method, trained, synth_root, tmp_path, single_thread):
    """A map per image at the image's own size, or, for a method found unfaithful for the model, one line
    saying so and no map."""
    paths = image_paths(synth_root, 2)
    # A larger copy: the map follows the image's own size, not the model's input size.
    big = tmp_path / "big.png"
    Image.open(paths[1]).resize((48, 96)).save(big)
    out = tmp_path / "maps"
    args = ["--weights", trained["vdt"], "--images", paths[0], str(big), "--viewids", "1", "0", "--out", str(out),
            "--method", method]
    if method == "gradcam":  # refused for every built-in model (docs/explain.md)
        with pytest.raises(UserError) as refused:
            explain_tool.main(args)
        assert str(refused.value) == "relevance method 'gradcam' draws no faithful maps of VDT: on the " \
            "quickstart-trained model its maps do not beat random, shifted or transposed patch-level maps " \
            "(docs/explain.md); use --method relevance or --method integrated_gradients"
        assert not out.exists()
        return
    explain_tool.main(args)
    stem = os.path.splitext(os.path.basename(paths[0]))[0]
    for name, size in ((stem, (64, 32)), ("big", (96, 48))):
        relevance = np.load(out / f"{name}.npy")
        assert relevance.shape == size and relevance.dtype == np.float32 and (relevance >= 0).all()
        assert relevance.max() > 0
        assert Image.open(out / f"{name}.png").size == size[::-1]


@pytest.mark.parametrize("stride", [8, 6])
def test_gradcam_maps_are_placed_on_the_patch_grid(stride, single_thread):
    """Grad-CAM's map is computed on the patch grid and each patch's value covers its pixels (averaged where
    patches overlap), as patches_to_pixels places them; measured though refused (refuse_unfaithful=False)."""
    cfg = tiny_cfg("ViT", vit={"PATCH_SIZE": 8}, **{"MODEL.STRIDE_SIZE": [stride, stride]})
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=5, num_cameras=1, num_views=1).eval()
    images = torch.randn(2, 3, 64, 32, generator=torch.Generator().manual_seed(1))
    maps, _ = Explainer(model, "gradcam", refuse_unfaithful=False)(images, {"camids": None, "viewids": None})
    assert maps.shape == (2, 64, 32) and (maps >= 0).all() and maps.amax() == pytest.approx(1.0)
    rows, cols = (64 - 8) // stride + 1, (32 - 8) // stride + 1
    if stride == 8:  # non-overlapping: constant within each 8 x 8 patch
        blocks = maps.view(2, rows, 8, cols, 8)
        assert torch.equal(blocks, blocks[:, :, :1, :, :1].expand_as(blocks))
    else:  # 10 x 5 overlapping patches: pixels only the first patch covers carry its value; no patch reaches
        # the last two rows
        assert (rows, cols) == (10, 5) and (maps[:, :6, :6] == maps[:, :1, :1]).all()
        assert maps[:, 62:].abs().sum() == 0 and maps[:, 60:62].abs().sum() > 0


@pytest.mark.slow
def test_explain_tool_explains_a_pair_towards_the_other_image(trained, synth_root, tmp_path, capsys, single_thread):
    query, gallery = image_paths(synth_root, 13)[0], image_paths(synth_root, 13)[12]
    explain_tool.main(["--weights", trained["svpr_reid"], "--pair", query, gallery, "--viewids", "1",
                       "--out", str(tmp_path / "pair")])
    explain_tool.main(["--weights", trained["svpr_reid"], "--images", query, "--viewids", "1",
                       "--out", str(tmp_path / "self")])
    stem = os.path.splitext(os.path.basename(query))[0]
    towards_gallery = np.load(tmp_path / "pair" / f"{stem}.npy")
    own = np.load(tmp_path / "self" / f"{stem}.npy")
    assert not np.allclose(towards_gallery, own)  # another target, another map
    pictures = [name for name in os.listdir(tmp_path / "pair") if name.startswith("pair_")]
    assert len(pictures) == 1 and "cosine similarity" in capsys.readouterr().out


@pytest.mark.slow
@pytest.mark.parametrize("case", ["existing", "viewids", "missing", "stems"])
def test_explain_tool_bad_input_is_a_user_error(case, trained, synth_root, tmp_path):
    paths = image_paths(synth_root, 2)
    out = tmp_path / "maps"
    args = ["--weights", trained["clip_baseline"], "--images", *paths, "--out", str(out)]
    if case == "existing":
        out.mkdir()
        (out / (os.path.splitext(os.path.basename(paths[1]))[0] + ".png")).write_bytes(b"")
        needle = "--overwrite"
    elif case == "viewids":
        args += ["--viewids", "0", "1", "1"]
        needle = "--viewids"
    elif case == "missing":
        args[args.index(paths[1])] = str(tmp_path / "nowhere.jpg")
        needle = "nowhere.jpg"
    else:
        (tmp_path / "copy").mkdir()
        args[args.index(paths[1])] = str(tmp_path / "copy" / os.path.basename(paths[0]))
        Image.open(paths[0]).save(args[args.index(paths[0]) + 1])
        needle = "file name"
    with pytest.raises(UserError, match=needle.replace("-", "\\-")):
        explain_tool.main(args)
    assert case == "existing" or not out.exists()  # nothing written


@pytest.mark.slow
def test_explain_tool_error_is_one_line_and_exit_code_2(trained, synth_root, tmp_path):
    result = run_script(["tools/explain.py", "--weights", trained["clip_baseline"], "--images",
                         str(tmp_path / "nowhere.jpg"), "--out", str(tmp_path / "maps")])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "nowhere.jpg" in lines[0], result.stderr


# ------------------------------------------------------------------------------------ the benchmark tool
@pytest.mark.slow
def test_faithfulness_tool_prints_the_verdicts_and_writes_every_figure(trained, tmp_path, capsys, single_thread):
    out = tmp_path / "faithfulness.json"
    faithfulness_tool.main(["--weights", trained["vit"], "--method", "relevance", "gradcam", "--images", "12",
                            "--steps", "4", "--draws", "1", "--resamples", "1000", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "| ViT | `relevance` |" in printed and "| ViT | `gradcam` |" in printed
    assert "pointing game:" in printed and "not faithful although tools/explain.py offers them" not in printed
    document = json.loads(out.read_text())
    methods = document[trained["vit"]]["methods"]
    assert document[trained["vit"]]["arch"] == "ViT" and set(methods) == {"relevance", "gradcam"}
    assert methods["relevance"]["images"] == 12 and len(methods["relevance"]["deletion_curve"]) == 5
    assert set(methods["relevance"]["deletion_gain"]) == set(NULLS)
    assert methods["relevance"]["pointing"]["mask_share"] > 0


@pytest.mark.slow
def test_faithfulness_tool_bad_input_is_one_line(trained, tmp_path):
    config = tmp_path / "untrained.yml"
    config.write_text(f"_BASE_: {os.path.join(REPO_ROOT, 'configs/Synthetic/vit.yml')}\n"
                      f"OUTPUT_DIR: '{tmp_path / 'nothing_here'}'\n")
    result = run_script(["tools/faithfulness.py", "--config_file", str(config)])
    assert result.returncode == 2, result.stderr[-2000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no trained model" in lines[0] and "nothing_here" in lines[0], result.stderr
    with pytest.raises(UserError, match="--images 1"):
        faithfulness_tool.main(["--weights", trained["vit"], "--images", "1"])

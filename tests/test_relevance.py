"""Relevance maps (evaluation/relevance.py, tools/explain.py) for all seven models.

The explicit attention path is checked against ``nn.MultiheadAttention``, the relevance rollout against its
definition (Chefer et al. 2021) written out here, and the maps of briefly trained tiny models against two
properties a faithful map must have: removing the 15% most relevant pixels moves the test feature further
than removing 15% random pixels, and a model with random weights gets other maps (Adebayo et al. 2018).
"""
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
from evaluation.relevance import Explainer, patches_to_pixels, rollout, token_layout
from model.clip.transformer import SelfAttention
from processor import run_training
from processor.inference import FeatureExtractor
from processor.model_io import build_from_args
from tests.fixtures import run_script, tiny
from tools import explain as explain_tool
from utils.checkpoint import load_checkpoint
from utils.errors import UserError
from utils.seed import set_seed

MODELS = ("clip_baseline", "clipreid", "svpr_reid", "vit", "transreid", "vdt", "secap")
# Tiny backbones with 8-pixel patches: an 8 x 4 grid of patches on 64 x 32 images.
TINY = ["MODEL.CLIP.PATCH_SIZE", "8", "MODEL.STRIDE_SIZE", "[8, 8]", "MODEL.VIT.EMBED_DIM", "64", "MODEL.VIT.DEPTH",
        "2", "MODEL.VIT.NUM_HEADS", "2", "MODEL.VIT.PATCH_SIZE", "8", "MODEL.SECAP.PROMPT_LEN", "4",
        "MODEL.FIXES.LOCAL_PATCH_COUNT", "True", "DATASETS.TESTS", "('SynthAG_ALL',)", "SOLVER.EVAL_PERIOD", "100",
        "SOLVER.TENSORBOARD", "False"]
REMOVED = 0.15


@pytest.fixture(scope="module")
def trained(synth_root, tmp_path_factory, single_thread):
    """Briefly trained (4 epochs) tiny checkpoints of the seven models: name -> model_final.pth."""
    weights = {}
    for name in MODELS:
        out = str(tmp_path_factory.mktemp(name))
        cfg = load_config(f"configs/Synthetic/{name}.yml", tiny(synth_root, out, epochs=4, extra=TINY))
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


def definition_rollout(probabilities, gradients, subtract_view):
    """Chefer et al.'s rule for one image, written with explicit loops over heads and tokens."""
    relevance = None
    for probs, grads in zip(probabilities, gradients):
        heads, tokens = probs.shape[1], probs.shape[-1]
        weighted = np.zeros((tokens, tokens))
        for h in range(heads):
            for i in range(tokens):
                for j in range(tokens):
                    weighted[i, j] += max(float(grads[0, h, i, j] * probs[0, h, i, j]), 0.0) / heads
        previous = np.eye(tokens)
        if relevance is not None:
            previous[:relevance.shape[0], :relevance.shape[1]] = relevance
        relevance = previous + weighted @ previous
        if subtract_view:
            relevance[0] = relevance[0] + relevance[1]
    return relevance


@pytest.mark.parametrize("subtract_view", [False, True])
def test_rollout_follows_the_definition_with_appended_tokens(subtract_view):
    generator = torch.Generator().manual_seed(1)
    shapes = [5, 5, 6]  # a token is appended before the last layer (SVPR-ReID's view token)
    probabilities = [torch.rand(1, 3, t, t, generator=generator).softmax(-1) for t in shapes]
    gradients = [torch.randn(1, 3, t, t, generator=generator) for t in shapes]
    ours = rollout(probabilities, gradients, subtract_view)
    np.testing.assert_allclose(ours[0].numpy(), definition_rollout(probabilities, gradients, subtract_view),
                               rtol=1e-5, atol=1e-6)


def test_patch_relevance_covers_its_pixels_and_averages_overlaps():
    patches = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])
    pixels = patches_to_pixels(patches, (4, 4), (2, 2), (2, 2))
    np.testing.assert_array_equal(pixels[0].numpy(), np.kron(patches[0].numpy(), np.ones((2, 2))))
    # Stride 1, patch 2 over 3 x 3 pixels: the centre pixel is covered by all four patches.
    overlapping = patches_to_pixels(patches, (4, 3), (2, 2), (1, 1))[0]
    assert overlapping[1, 1] == pytest.approx(2.5) and overlapping[0, 0] == 1.0 and overlapping[2, 2] == 4.0
    assert overlapping[3].abs().sum() == 0  # the last row is covered by no patch


# ---------------------------------------------------------------------------------- trained tiny models
def query_batch(weights):
    """The checkpoint's extractor and a batch of 24 evaluation images (every 4th of queries + gallery)."""
    extractor = FeatureExtractor.from_checkpoint(weights, device="cpu")
    dataset = make_dataloaders(extractor.cfg).val_loader.dataset
    return extractor, collate([dataset[i] for i in range(0, 4 * 24, 4)])


def removal_distances(explainer, images, inputs, maps, generator):
    """Mean cosine distance of the test features after removing (setting to the mean image, 0 after
    normalisation) the 15% most relevant pixels, and after removing 15% random pixels."""
    batch, _, height, width = images.shape
    count = int(REMOVED * height * width)
    most, random = torch.ones(batch, height * width), torch.ones(batch, height * width)
    for b in range(batch):
        most[b, maps[b].flatten().argsort(descending=True, stable=True)[:count]] = 0
        random[b, torch.randperm(height * width, generator=generator)[:count]] = 0
    clean = explainer.features(images, inputs)
    return [float((1 - F.cosine_similarity(clean, explainer.features(images * keep.view(batch, 1, height, width),
                                                                     inputs))).mean()) for keep in (most, random)]


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_maps_are_faithful_and_depend_on_the_weights(name, trained, single_thread):
    extractor, batch = query_batch(trained[name])
    model = extractor.model
    inputs = model.forward_inputs(batch)
    explainer = Explainer(model)
    maps, _ = explainer(batch["images"], inputs)
    assert maps.shape == (24, 64, 32) and (maps >= 0).all() and (maps.flatten(1).amax(1) > 0).all()

    most, random = removal_distances(explainer, batch["images"], inputs, maps, torch.Generator().manual_seed(0))
    print(f"{name}: cosine distance after removing 15% most relevant / random pixels {most:.3g} / {random:.3g} "
          f"= {most / random:.2f}")
    assert most > 1.5 * random

    # Cascading randomisation (all weights): the maps must change.
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
    """Explaining switches the attention to its explicit path and back: features before and after agree
    bit for bit, and the explicit path gives the same features to float tolerance."""
    extractor, batch = query_batch(trained["svpr_reid"])
    model = extractor.model
    inputs = model.forward_inputs(batch)
    with torch.no_grad():
        before = model(batch["images"], **inputs)
    Explainer(model)(batch["images"][:2], inputs={k: v[:2] if torch.is_tensor(v) else v for k, v in inputs.items()})
    layout = token_layout(model)
    assert all(attention.fused_attn for attention in layout.attentions)
    with torch.no_grad():
        after = model(batch["images"], **inputs)
        for attention in layout.attentions:
            attention.fused_attn = False
        explicit = model(batch["images"], **inputs)
    assert torch.equal(before, after)
    torch.testing.assert_close(explicit, before, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------------ the tool
def image_paths(root, count):
    folder = os.path.join(root, "SynthAG", "images")
    return [os.path.join(folder, name) for name in sorted(os.listdir(folder))[:count]]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["relevance", "gradcam", "integrated_gradients"])
def test_explain_tool_writes_a_map_per_image_at_its_size(method, trained, synth_root, tmp_path, single_thread):
    paths = image_paths(synth_root, 2)
    # A larger copy: the map follows the image's own size, not the model's input size.
    big = tmp_path / "big.png"
    Image.open(paths[1]).resize((48, 96)).save(big)
    out = tmp_path / "maps"
    explain_tool.main(["--weights", trained["vdt"], "--images", paths[0], str(big), "--viewids", "1", "0",
                       "--out", str(out), "--method", method])
    stem = os.path.splitext(os.path.basename(paths[0]))[0]
    for name, size in ((stem, (64, 32)), ("big", (96, 48))):
        relevance = np.load(out / f"{name}.npy")
        assert relevance.shape == size and relevance.dtype == np.float32 and (relevance >= 0).all()
        # Grad-CAM's ReLU may leave nothing of a map whose weighted activations are all negative.
        assert relevance.max() > 0 or method == "gradcam"
        assert Image.open(out / f"{name}.png").size == size[::-1]


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

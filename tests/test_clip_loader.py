"""load_clip on OpenAI-format weights (TorchScript archive and state dict) against OpenAI's own model."""
import warnings

import pytest
import torch
import torch.nn.functional as F

from configs.defaults import get_cfg_defaults
from model.backbone import build_clip_from_config
from model.clip import load_clip
from text import tokenize
from model.clip.loader import METADATA_KEYS
from utils.errors import CheckpointError, ConfigError
from tests.fixtures import openai_clip_module

OPENAI = openai_clip_module("model")


def _with_release_metadata(model, image_resolution):
    """Give OpenAI's model the three metadata tensors its released TorchScript archives carry."""
    for name, value in (("input_resolution", image_resolution), ("context_length", model.context_length),
                        ("vocab_size", model.vocab_size)):
        if hasattr(model, name):
            delattr(model, name)
        model.register_buffer(name, torch.tensor(value))
    return model


def _save_archive(model, image_resolution, path):
    images = torch.randn(1, 3, image_resolution, image_resolution)
    tokens = tokenize("a photo", context_length=model.positional_embedding.shape[0])
    with warnings.catch_warnings():  # tracing OpenAI's code warns about its Python-side shape checks
        warnings.simplefilter("ignore")
        traced = torch.jit.trace_module(model, {"encode_image": images, "encode_text": tokens}, check_trace=False)
    traced.save(path)


@pytest.fixture(scope="module")
def vit_b16(tmp_path_factory):
    """OpenAI's ViT-B/16 CLIP with seeded random weights, saved as a TorchScript archive and a state dict."""
    torch.manual_seed(0)
    reference = OPENAI.CLIP(512, 224, 12, 768, 16, 77, 49408, 512, 8, 12).eval()  # runs initialize_parameters
    reference = _with_release_metadata(reference, 224)
    folder = tmp_path_factory.mktemp("vit_b16")
    archive, state = str(folder / "ViT-B-16.pt"), str(folder / "ViT-B-16-state.pt")
    _save_archive(reference, 224, archive)
    torch.save(reference.state_dict(), state)
    torch.manual_seed(2)
    images = torch.randn(2, 3, 224, 224)
    tokens = tokenize(["a photo of a person in a red coat", "ground aerial"])
    with torch.no_grad():
        expected = reference.encode_image(images), reference.encode_text(tokens)
    return set(reference.state_dict()), archive, state, (images, tokens, expected)


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small OpenAI ViT CLIP (96x96, patch 16, 6x6 grid) saved as a state dict."""
    torch.manual_seed(1)
    reference = OPENAI.CLIP(64, 96, 2, 128, 16, 77, 49408, 128, 2, 2).eval()
    path = str(tmp_path_factory.mktemp("small") / "small.pt")
    torch.save(reference.state_dict(), path)
    return reference, path


def test_archive_has_openai_release_keys(vit_b16):
    reference_keys, archive, _, _ = vit_b16
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        keys = set(torch.jit.load(archive).state_dict())
    assert set(METADATA_KEYS) <= keys
    assert keys == reference_keys


@pytest.mark.parametrize("kind", ["archive", "state_dict"])
def test_vit_b16_matches_openai(vit_b16, kind):
    _, archive, state, (images, tokens, (expected_image, expected_text)) = vit_b16
    model = load_clip(archive if kind == "archive" else state)
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert model.visual.width == 768 and len(model.visual.transformer.resblocks) == 12
    assert model.visual.grid_size == (14, 14) and model.embed_dim == 512 and model.text_width == 512
    with torch.no_grad():
        image_features = model.encode_image(images)
        text_features = model.encode_text(tokens)
    assert image_features.shape == (2, 512) and text_features.shape == (2, 512)
    torch.testing.assert_close(image_features, expected_image, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(text_features, expected_text, atol=1e-4, rtol=1e-4)


def _resized_grid(positions, grid, size, mode):
    patches = positions[1:].reshape(1, grid, grid, -1).permute(0, 3, 1, 2)  # (1, C, G, G)
    patches = F.interpolate(patches, size=size, mode=mode, align_corners=False)
    return torch.cat([positions[:1], patches.permute(0, 2, 3, 1).reshape(size[0] * size[1], -1)])


def test_native_size_keeps_positions_unchanged(small):
    reference, path = small
    model = load_clip(path, input_size=(96, 96), stride=16)
    assert torch.equal(model.visual.positional_embedding, reference.visual.positional_embedding)
    assert torch.equal(model.positional_embedding, reference.positional_embedding)


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize("stride, grid", [(16, (16, 8)), (12, (21, 10)), ((16, 8), (16, 15))])
def test_reid_input_resizes_visual_positions(small, stride, grid, mode):
    reference, path = small
    options = {} if mode == "bilinear" else {"pos_embed_interp": mode}  # bilinear is the default
    model = load_clip(path, input_size=(256, 128), stride=stride, **options)
    assert model.visual.grid_size == grid and model.visual.num_patches == grid[0] * grid[1]
    expected = _resized_grid(reference.visual.positional_embedding.detach(), 6, grid, mode)
    torch.testing.assert_close(model.visual.positional_embedding.detach(), expected, atol=1e-6, rtol=1e-6)
    # OpenAI's encoder with the same table and stride gives the same embeddings at 256x128.
    visual = reference.visual
    original = visual.positional_embedding
    visual.positional_embedding = torch.nn.Parameter(expected)
    visual.conv1.stride = (stride, stride) if isinstance(stride, int) else stride
    images = torch.randn(2, 3, 256, 128)
    try:
        with torch.no_grad():
            torch.testing.assert_close(model.encode_image(images), visual(images), atol=1e-5, rtol=1e-5)
    finally:
        visual.positional_embedding, visual.conv1.stride = original, (16, 16)


def test_bilinear_and_bicubic_tables_differ_and_unknown_mode_is_a_config_error(small):
    _, path = small
    bilinear = load_clip(path, input_size=(256, 128), pos_embed_interp="bilinear").visual.positional_embedding
    bicubic = load_clip(path, input_size=(256, 128), pos_embed_interp="bicubic").visual.positional_embedding
    assert torch.equal(bilinear[0], bicubic[0]) and not torch.allclose(bilinear[1:], bicubic[1:])
    with pytest.raises(ConfigError, match="MODEL.POS_EMBED_INTERP = 'nearest'"):
        load_clip(path, input_size=(256, 128), pos_embed_interp="nearest")


def test_longer_text_context_loads_and_runs(small):
    reference, path = small
    model = load_clip(path, input_size=(96, 96), context_length=100)
    positions = model.positional_embedding.detach()
    original = reference.positional_embedding.detach()
    assert positions.shape == (100, 128) and model.context_length == 100
    assert torch.equal(positions[0], original[0]) and torch.equal(positions[-1], original[-1])
    middle = F.interpolate(original[1:-1].t()[None], size=98, mode="linear", align_corners=False)[0].t()
    torch.testing.assert_close(positions[1:-1], middle)
    tokens = tokenize(["a person riding a bike", "ground aerial"], context_length=100)
    with torch.no_grad():
        features = model.encode_text(tokens)
    assert features.shape == (2, 64) and torch.isfinite(features).all()


def test_shorter_text_context_truncates_and_matches_openai(small):
    reference, path = small
    model = load_clip(path, input_size=(96, 96), context_length=32)
    assert torch.equal(model.positional_embedding, reference.positional_embedding[:32])
    texts = ["a person riding a bike", "ground aerial"]
    with torch.no_grad():  # causal attention: positions up to the EOT do not see the dropped ones
        torch.testing.assert_close(model.encode_text(tokenize(texts, context_length=32)),
                                   reference.encode_text(tokenize(texts)), atol=1e-5, rtol=1e-5)


def test_half_precision_weights_load_as_fp32(small, tmp_path):
    reference, _ = small
    path = str(tmp_path / "half.pt")
    torch.save({key: value.half() for key, value in reference.state_dict().items()}, path)
    model = load_clip(path, input_size=(96, 96))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    torch.testing.assert_close(model.visual.proj, reference.visual.proj.half().float())


def _assert_one_line(info, *fragments):
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file(tmp_path):
    path = str(tmp_path / "nowhere" / "ViT-B-16.pt")
    with pytest.raises(CheckpointError) as info:
        load_clip(path)
    _assert_one_line(info, path, "not found")


def test_non_clip_files(tmp_path):
    text_file = tmp_path / "notes.pt"
    text_file.write_text("not a checkpoint\n")
    with pytest.raises(CheckpointError) as info:
        load_clip(str(text_file))
    _assert_one_line(info, str(text_file))
    other = tmp_path / "resnet18.pt"
    torch.save(torch.nn.Linear(4, 2).state_dict(), other)
    with pytest.raises(CheckpointError) as info:
        load_clip(str(other))
    _assert_one_line(info, str(other), "not a CLIP checkpoint", "token_embedding.weight")


def test_resnet_clip_is_reported_unsupported(tmp_path):
    torch.manual_seed(0)
    resnet = OPENAI.CLIP(32, 64, (3, 4, 6, 3), 8, None, 16, 100, 64, 1, 1)  # RN50 block layout, tiny widths
    path = str(tmp_path / "RN50.pt")
    torch.save(resnet.state_dict(), path)
    with pytest.raises(CheckpointError) as info:
        load_clip(path)
    _assert_one_line(info, path, "RN50 not supported yet")


def test_mismatched_weights_are_reported(small, tmp_path):
    reference, _ = small
    state = reference.state_dict()
    state["visual.transformer.resblocks.0.attn.in_proj_weight"] = torch.zeros(5, 5)
    path = str(tmp_path / "broken.pt")
    torch.save(state, path)
    with pytest.raises(CheckpointError) as info:
        load_clip(path, input_size=(96, 96))
    _assert_one_line(info, path, "in_proj_weight")


def test_build_clip_from_config_loads_weights(small, tmp_path):
    reference, path = small
    cfg = get_cfg_defaults()
    cfg.MODEL.PRETRAIN_PATH = path
    cfg.MODEL.STRIDE_SIZE = [12, 12]
    cfg.MODEL.TEXT_LEN = 100
    cfg.MODEL.FREEZE_TEXT = True
    model = build_clip_from_config(cfg)
    assert model.visual.grid_size == (21, 10) and model.context_length == 100
    torch.testing.assert_close(model.visual.conv1.weight, reference.visual.conv1.weight, atol=0, rtol=0)
    assert not model.text_projection.requires_grad and model.visual.proj.requires_grad
    cfg.MODEL.PRETRAIN_PATH = str(tmp_path / "missing.pt")
    with pytest.raises(CheckpointError) as info:
        build_clip_from_config(cfg)
    _assert_one_line(info, "missing.pt", "not found")

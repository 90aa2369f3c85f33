"""Where a model's weights come from: MODEL.PRETRAIN_CHOICE "self" (a whole model, ours or in the authors'
layout) and "finetune" (all but the identity classifiers, for other identities) through real training runs,
and checkpoints that hold every weight used with no backbone weight file present (conversion, test_svpr.py,
FeatureExtractor, export). Tiny random-weight models on SynthAG; every backbone width is a multiple of 64, as
in the released weight files, so that sizes can be read from the tensors."""
import glob
import json
import os

import pytest
import torch

from configs import read_config
from datasets import SynthConfig, generate_synthag
from datasets.loader import load_dataset
from model import MODELS, build_model
from model.architecture import clip_sizes, config_for_weights, vit_sizes
from model.checkpoint_fit import to_our_layout
from processor.hooks import weights_file
from processor.inference import FeatureExtractor
from processor.model_io import build_from_args, build_training_model, model_args_from_dataset
from tests.fixtures import check_ok, run_script, tiny, tiny_cfg
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import CheckpointError, ConfigError

pytestmark = pytest.mark.usefixtures("single_thread")

SVPR, VDT = "configs/Synthetic/svpr_reid.yml", "configs/Synthetic/vdt.yml"
# Widths with 64 channels per head (the rule the weight files follow), so no MODEL.CLIP.*/VIT.* key is needed.
SIZES = ["MODEL.CLIP.VISION_WIDTH", "128", "MODEL.CLIP.VISION_HEADS", "2", "MODEL.CLIP.TEXT_WIDTH", "64",
         "MODEL.CLIP.TEXT_HEADS", "1", "MODEL.CLIP.EMBED_DIM", "64", "MODEL.VIT.EMBED_DIM", "128",
         "MODEL.VIT.NUM_HEADS", "2", "MODEL.VIT.DEPTH", "2"]
NO_BACKBONE_FILE = ["MODEL.RANDOM_INIT", "False", "MODEL.PRETRAIN_PATH", "/nonexistent/ViT-B-16.pt"]


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    """Two SynthAG benchmarks with different numbers of training identities (6 and 4)."""
    base = tmp_path_factory.mktemp("initial_weights")
    roots = {}
    for name, ids, seed in (("a", 12, 0), ("b", 8, 4)):
        roots[name] = str(base / name)
        generate_synthag(roots[name], SynthConfig(num_ids=ids, images_per_id=8, height=64, width=32, seed=seed),
                         num_workers=1)
    return roots


def run_opts(root, out, epochs=0):
    return tiny(root, out, epochs=epochs) + SIZES + ["DATASETS.TESTS", "('SynthAG_ALL',)"]


def source_checkpoint(tmp_path, config, root, seed=0):
    """A weights file as training writes it, with random weights (BN statistics too) for ``root``'s training
    set; its config builds the backbone from MODEL.CLIP.* / MODEL.VIT.* (random init)."""
    cfg, _ = read_config(config, run_opts(root, str(tmp_path / "source")))
    args = model_args_from_dataset(load_dataset(cfg))
    torch.manual_seed(seed)
    model = build_from_args(cfg, args, torch.device("cpu"))
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    path = str(tmp_path / "source.pth")
    save_checkpoint(weights_file(cfg, model, args, 3), path)
    return cfg, model, path


def image_paths(root, count=6):
    return sorted(glob.glob(os.path.join(root, "SynthAG", "images", "*.jpg")))[:count]


def features(path, paths, opts=()):
    return FeatureExtractor.from_checkpoint(path, device="cpu", opts=["MODEL.DEVICE", "cpu", *opts])(paths, [0, 1] * 3)


def train(config, root, out, *opts):
    result = run_script(["train_svpr.py", "--config_file", config, *run_opts(root, out), *opts])
    return result


@pytest.mark.parametrize("layout", ["ours", "authors"])
def test_self_then_zero_epochs_reproduces_the_source_checkpoint(tmp_path, roots, layout):
    cfg, model, source = source_checkpoint(tmp_path, SVPR, roots["a"])
    start = source
    if layout == "authors":
        start = str(tmp_path / "transformer_best.pth")
        save_checkpoint(MODELS.get(cfg.MODEL.ARCH_NAME).to_reference_state_dict(model.state_dict(), cfg), start)
    out = str(tmp_path / "run")
    # No backbone file: the architecture is read from the checkpoint's tensors.
    check_ok(train(SVPR, roots["a"], out, "MODEL.PRETRAIN_CHOICE", "self", "MODEL.RANDOM_INIT", "False",
                   "MODEL.PRETRAIN_PATH", start))
    final = load_checkpoint(os.path.join(out, "model_final.pth"))["model"]
    assert final.keys() == model.state_dict().keys()
    assert all(torch.equal(final[key], value) for key, value in model.state_dict().items())
    paths = image_paths(roots["a"])
    assert torch.equal(features(os.path.join(out, "model_final.pth"), paths), features(source, paths))
    settings = json.load(open(os.path.join(out, "results.json")))["settings"]
    kind = "the authors' layout, converted" if layout == "authors" else "this framework's layout"
    assert settings["initial_weights"] == f"every weight of {start} ({kind})"


def test_finetune_on_other_identities_keeps_all_but_the_identity_classifiers(tmp_path, roots):
    cfg, model, source = source_checkpoint(tmp_path, SVPR, roots["a"])
    out = str(tmp_path / "run")
    check_ok(train(SVPR, roots["b"], out, "MODEL.PRETRAIN_CHOICE", "finetune", "MODEL.PRETRAIN_PATH", source))
    final = load_checkpoint(os.path.join(out, "model_final.pth"))
    assert final["model_args"]["num_classes"] == 4 and model.head.classifier.weight.shape[0] == 6
    identity = {"head.classifier.weight", "head_cvpr.classifier.weight", "head_local.classifier.weight"}
    for key, value in model.state_dict().items():
        if key in identity:
            assert final["model"][key].shape == (4, value.shape[1]), key
        else:
            assert torch.equal(final["model"][key], value), key
    settings = json.load(open(os.path.join(out, "results.json")))["settings"]
    assert settings["initial_weights"].endswith("but 3 re-initialised for this training set: "
                                                + ", ".join(sorted(identity)))


def test_self_with_other_identities_is_one_line_naming_tensors_and_keys(tmp_path, roots):
    _, _, source = source_checkpoint(tmp_path, SVPR, roots["a"])
    result = train(SVPR, roots["b"], str(tmp_path / "run"), "MODEL.PRETRAIN_CHOICE", "self",
                   "MODEL.PRETRAIN_PATH", source)
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()
    assert len(message) == 1 and "head.classifier.weight [6, 128] vs [4, 128]" in message[0]
    assert "DATASETS.NAMES='SynthAG_ALL'" in message[0] and "use finetune" in message[0]


def test_authors_checkpoint_converted_and_evaluated_without_a_backbone_file(tmp_path, roots):
    cfg, model, source = source_checkpoint(tmp_path, VDT, roots["a"])
    reference = str(tmp_path / "transformer_best.pth")
    save_checkpoint(MODELS.get("VDT").to_reference_state_dict(model.state_dict(), cfg), reference)
    opts = run_opts(roots["a"], "") + NO_BACKBONE_FILE
    opts = [v for i, v in enumerate(opts) if not (opts[i] == "OUTPUT_DIR" or (i and opts[i - 1] == "OUTPUT_DIR"))]
    converted = str(tmp_path / "converted.pth")
    check_ok(run_script(["tools/convert_reference.py", "--reference", reference, "--config_file", VDT,
                         "--out", converted, *opts]))
    evaluated = {}
    for name, args in (("authors", ["--weights", reference, "--config_file", VDT, *opts]),
                       ("ours", ["--weights", source, *NO_BACKBONE_FILE])):
        out = str(tmp_path / f"test_{name}")
        check_ok(run_script(["test_svpr.py", *args, "OUTPUT_DIR", out]))
        evaluated[name] = json.load(open(os.path.join(out, "results.json")))["protocols"]
    assert evaluated["authors"] == evaluated["ours"]
    paths = image_paths(roots["a"])
    assert torch.equal(features(converted, paths), features(source, paths, NO_BACKBONE_FILE[:2]))
    exported = str(tmp_path / "model.safetensors")
    check_ok(run_script(["tools/export.py", "--weights", converted, "--format", "safetensors", "--out", exported]))
    assert os.path.getsize(exported) > 0


@pytest.mark.parametrize("arch", ["CLIP_SVPR_ReID", "CLIP_baseline", "CLIP_ReID", "ViT", "TransReID", "VDT",
                                  "SeCap"])
def test_both_layouts_are_recognised_and_sizes_read_from_the_tensors(arch):
    cfg = tiny_cfg(arch, clip={"VISION_WIDTH": 128, "VISION_HEADS": 2, "TEXT_WIDTH": 64, "TEXT_HEADS": 1},
                   vit={"EMBED_DIM": 128, "NUM_HEADS": 2}, frozen=True)
    attributes = (("hat", 2), ("bag", 3)) if arch == "CLIP_SVPR_ReID" else ()
    model = build_model(cfg, num_classes=5, num_cameras=3, num_views=2, attributes=attributes)
    ours = model.state_dict()
    model_class = MODELS.get(arch)
    reference = model_class.to_reference_state_dict(ours, cfg)
    assert to_our_layout(model_class, ours, cfg) == (ours, False)
    converted, was_reference = to_our_layout(model_class, reference, cfg)
    assert was_reference == (set(reference) != set(ours)) and converted.keys() == ours.keys()
    # The sizes the config built, read back from the tensors.
    from_file = cfg.clone()
    from_file.defrost()
    from_file.MODEL.RANDOM_INIT = False
    build = config_for_weights(from_file, ours)
    sizes = clip_sizes(ours) or vit_sizes(ours)
    node = "CLIP" if clip_sizes(ours) else "VIT"
    # (A model that keeps no text tower is built with the least one: it drops it.)
    read = [key for key in sizes if not (key == "TEXT_LAYERS" and "TEXT_WIDTH" not in sizes)]
    assert read and all(build.MODEL[node][key] == cfg.MODEL[node][key] for key in read)
    rebuilt = build_model(build, num_classes=5, num_cameras=3, num_views=2, attributes=attributes)
    assert {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_head_count_that_cannot_be_read_is_a_checkpoint_error():
    cfg = tiny_cfg("ViT", vit={"EMBED_DIM": 48, "NUM_HEADS": 3}, frozen=True)
    weights = build_model(cfg, num_classes=5).state_dict()
    with pytest.raises(CheckpointError, match="width 48 is not a multiple of 64.*MODEL.VIT.NUM_HEADS"):
        vit_sizes(weights, "w.pth")


def test_pretrain_choice_values():
    with pytest.raises(ConfigError, match="MODEL.PRETRAIN_CHOICE = 'whole': expected one of imagenet, self, "
                                          "finetune"):
        read_config(SVPR, ["MODEL.PRETRAIN_CHOICE", "whole"])
    cfg = tiny_cfg("ViT", opts=["MODEL.PRETRAIN_CHOICE", "self"], frozen=True)
    with pytest.raises(CheckpointError, match="MODEL.PRETRAIN_CHOICE self needs MODEL.PRETRAIN_PATH"):
        build_training_model(cfg, {"num_classes": 5, "num_cameras": 1, "num_views": 1, "attributes": []},
                             torch.device("cpu"))

"""tools/export.py on tiny random-weight models: ONNX (onnxruntime) and TorchScript outputs equal the PyTorch
model's at another batch size, safetensors files round-trip through ``load_checkpoint`` and
``load_model_weights``, and bad input ends with one ``error:`` line."""
import os

import numpy as np
import pytest
import torch
import yaml

from model import build_model
from model.checkpoint_fit import load_model_weights
from processor.model_io import load_trained_model
from tests.fixtures import run_script
from tests.test_baselines import tiny_cfg
from text import prompts, tokenize
from tools import export
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import CheckpointError

MODEL_ARGS = {"num_classes": 5, "num_cameras": 3, "num_views": 2, "attributes": [["hat", 2], ["bag", 3], ["sex", 2]]}
SETTINGS = {
    # SIE on cameras and views: the ids change the features, so they must reach the exported graph.
    "CLIP_baseline": {"MODEL.SIE_CAMERA": True, "MODEL.SIE_VIEW": True},
    # Every SVPR branch, with the attribute-caption query (the baked-in test caption) and SIE.
    "CLIP_SVPR_ReID": {"MODEL.SIE_CAMERA": True, "MODEL.USE_TEXT": True, "MODEL.USE_ATTR": True,
                       "MODEL.TEXT_LEN": 77},
}


def write_checkpoint(tmp_path, arch, seed=0):
    """A weights file as training writes it (processor.hooks.weights_file) with random weights."""
    cfg = tiny_cfg(arch, **SETTINGS[arch])
    torch.manual_seed(seed)
    args = dict(MODEL_ARGS, attributes=[tuple(a) for a in MODEL_ARGS["attributes"]])
    model = build_model(cfg, **args)
    # Random BNNeck statistics and SIE tables, so that every part of the test-time path matters.
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith(("running_mean", "running_var")):
                tensor.copy_(torch.rand_like(tensor) + 0.5)
    path = str(tmp_path / f"{arch}.pth")
    save_checkpoint({"model": model.state_dict(), "model_args": MODEL_ARGS, "epoch": 3, "config": cfg.dump()}, path)
    return cfg, model.eval(), path


def batch(num=3, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(num, 3, 64, 32, generator=generator), torch.tensor([0, 2, 1][:num]),
            torch.tensor([1, 0, 1][:num]))


def reference(cfg, model, images, camids, viewids):
    """The model's own test-time features, with the batch entries evaluation gives it."""
    inputs = {"camids": camids, "viewids": viewids}
    if "text_tokens" in model.batch_inputs and cfg.MODEL.USE_TEXT:
        caption = tokenize([prompts.test_caption(cfg.MODEL.TEXT_PROMPT)] * len(images), context_length=77,
                           truncate=True).long()
        inputs["text_tokens"] = caption
    with torch.no_grad():
        return model(images, **{k: v for k, v in inputs.items() if k in model.batch_inputs}).numpy()


@pytest.mark.parametrize("arch", ["CLIP_baseline", "CLIP_SVPR_ReID"])
def test_onnx_matches_pytorch(tmp_path, arch, single_thread):
    import onnxruntime  # requirements-dev.txt: a broken install fails, it is not skipped

    cfg, model, weights = write_checkpoint(tmp_path, arch)
    out = str(tmp_path / "model.onnx")
    export.main(["--weights", weights, "--format", "onnx", "--out", out])
    session = onnxruntime.InferenceSession(out, providers=["CPUExecutionProvider"])
    images, camids, viewids = batch(3)
    feeds = {"images": images.numpy(), "camids": camids.numpy(), "viewids": viewids.numpy()}
    assert [i.name for i in session.get_inputs()] == ["images", "camids", "viewids"]
    (features,) = session.run(["features"], feeds)
    expected = reference(cfg, model, images, camids, viewids)
    assert features.shape == expected.shape == (3, model.embedding_dim)
    np.testing.assert_allclose(features, expected, atol=1e-4, rtol=0)
    # The ids are live inputs: other cameras give other features.
    (moved,) = session.run(["features"], dict(feeds, camids=(camids.numpy() + 1) % 3))
    assert np.abs(moved - features).max() > 1e-3


@pytest.mark.parametrize("arch", [
    "CLIP_baseline",
    "CLIP_SVPR_ReID",
])
def test_torchscript_matches_pytorch(tmp_path, arch, single_thread):
    cfg, model, weights = write_checkpoint(tmp_path, arch)
    out = str(tmp_path / "model.pt")
    export.main(["--weights", weights, "--format", "torchscript", "--out", out])
    traced = torch.jit.load(out)
    # Another batch size than the trace's, and two distinct views where the trace saw one.
    for images, camids, viewids in (batch(1), batch(3)):
        with torch.no_grad():
            features = traced(images, camids, viewids).numpy()
        np.testing.assert_allclose(features, reference(cfg, model, images, camids, viewids), atol=1e-5, rtol=0)


class CountsViews(torch.nn.Module):
    """A model whose output depends on a Python number computed from its inputs (fixed by a trace)."""

    batch_inputs = ("viewids",)

    def forward(self, images, viewids=None):
        return images.flatten(1)[:, :4] * len(torch.unique(viewids))


def test_torchscript_refuses_a_trace_that_does_not_generalise(tmp_path):
    wrapper = export.ExportWrapper(CountsViews())
    inputs = (torch.randn(2, 3, 4, 4), torch.zeros(2, dtype=torch.int64))
    probe = (torch.randn(4, 3, 4, 4), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(export.ExportError, match="TorchScript trace of CountsViews differs"):
        export.export_torchscript(wrapper, inputs, probe, str(tmp_path / "x.pt"))
    assert not (tmp_path / "x.pt").exists()
    # The same model on a probe with one view is reproduced, and written.
    export.export_torchscript(wrapper, inputs, (probe[0], torch.zeros(4, dtype=torch.int64)), str(tmp_path / "x.pt"))
    assert (tmp_path / "x.pt").is_file()


def test_safetensors_round_trip(tmp_path, single_thread):
    cfg, model, weights = write_checkpoint(tmp_path, "CLIP_SVPR_ReID")
    out = str(tmp_path / "weights.safetensors")
    export.main(["--weights", weights, "--format", "safetensors", "--out", out])
    state = load_checkpoint(out)
    assert state["model_args"] == MODEL_ARGS and state["epoch"] == 3 and state["config"] == cfg.dump()
    original = load_checkpoint(weights)["model"]
    assert sorted(state["model"]) == sorted(original)
    for name, tensor in original.items():
        assert torch.equal(state["model"][name], tensor), name
    fresh = build_model(cfg, 5, 3, 2, [tuple(a) for a in MODEL_ARGS["attributes"]])
    load_model_weights(fresh, state["model"], cfg)
    images, camids, viewids = batch(3)
    np.testing.assert_array_equal(reference(cfg, fresh.eval(), images, camids, viewids),
                                  reference(cfg, model, images, camids, viewids))
    # TEST.WEIGHT x.safetensors goes through the same loader.
    loaded, epoch = load_trained_model(cfg, out, torch.device("cpu"))
    assert epoch == 3
    np.testing.assert_array_equal(reference(cfg, loaded, images, camids, viewids),
                                  reference(cfg, model, images, camids, viewids))


def test_safetensors_from_config_file_and_corrupt_file(tmp_path, single_thread):
    cfg, _, weights = write_checkpoint(tmp_path, "CLIP_baseline")
    config_file = tmp_path / "train.yml"
    # A hand-written training config: only the keys that differ from the defaults.
    config_file.write_text(yaml.safe_dump({
        "MODEL": {"ARCH_NAME": "CLIP_baseline", "RANDOM_INIT": True, "FREEZE_TEXT": True, "SIE_CAMERA": True,
                  "SIE_VIEW": True, "CLIP": {k: cfg.MODEL.CLIP[k] for k in cfg.MODEL.CLIP}},
        "INPUT": {"SIZE_TRAIN": [64, 32], "SIZE_TEST": [64, 32]}}))
    out = str(tmp_path / "w.safetensors")
    export.main(["--weights", weights, "--format", "safetensors", "--out", out, "--config_file", str(config_file),
                 "TEST.FEAT_NORM", "no"])
    stored = yaml.safe_load(load_checkpoint(out)["config"])
    assert stored["TEST"]["FEAT_NORM"] == "no" and stored["MODEL"]["SIE_VIEW"] is True
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(CheckpointError, match="broken.safetensors"):
        load_checkpoint(str(broken))


def test_cli_without_stored_config_exits_2(tmp_path):
    weights = str(tmp_path / "bare.pth")
    save_checkpoint({"weight": torch.zeros(2)}, weights)
    result = run_script(["tools/export.py", "--weights", weights, "--format", "onnx", "--out",
                         str(tmp_path / "x.onnx")])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint") and "--config_file" in lines[0]
    assert not os.path.exists(tmp_path / "x.onnx")


class Eigenvalues(torch.nn.Module):
    """A model with an operator ONNX has no translation for (symmetric eigenvalues)."""

    batch_inputs = ("viewids",)

    def forward(self, images, viewids=None):
        block = images[:, 0, :8, :8]  # (B, 8, 8)
        return torch.linalg.eigvalsh(block @ block.transpose(1, 2))


def test_unsupported_operator_is_named_in_one_line(tmp_path, single_thread):
    import onnxscript  # noqa: F401  (what torch's exporter translates with; a broken install fails here)

    inputs = (torch.randn(2, 3, 8, 8), torch.zeros(2, dtype=torch.int64))
    with pytest.raises(export.ExportError) as caught:
        export.export_onnx(export.ExportWrapper(Eigenvalues()), inputs, str(tmp_path / "x.onnx"))
    message = str(caught.value)
    assert "\n" not in message and "\x1b" not in message
    assert message.startswith("ONNX export of Eigenvalues failed") and "linalg_eigh" in message

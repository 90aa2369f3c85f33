"""Mixed precision: which precision a run uses (``utils/amp.py``), the operations whose formulation follows it
(``model/kernels.py``), bf16 test features against fp32 ones for every model, and fp16 with the gradient
scaler on the CPU, the twin of the CUDA default: an overflow skips the step and halves the scale, training goes
on, and ``--resume`` restores the scaler exactly."""
import glob
import json
import os

import pytest
import torch
import torch.nn.functional as F

import utils.amp as amp
from configs import get_cfg_defaults, load_config
from datasets import make_dataloaders
from loss import build_criterion
from model import MODELS
from model.kernels import (attention, bf16_weight_cache, fuses_linear_epilogue, linear, patch_embedding, quick_gelu,
                           quick_gelu_mlp)
from model.mlp import Mlp
from model.svpr.asmoe import MixtureOfExperts
from processor.hooks import weights_file
from processor.inference import FeatureExtractor
from processor.model_io import build_from_args, model_args_from_dataset
from processor.trainer import Trainer
from tests.fixtures import BASELINE, REPO_ROOT, check_ok, run_script, set_keys, tiny, tiny_cfg
from utils.checkpoint import load_checkpoint, save_checkpoint

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
# Training steps (at a learning rate of 5e-3) before features are compared: enough to move every model away
# from its random start, where SVPR-ReID's top-k token selections are near ties that any rounding flips.
TRAIN_STEPS, TRAIN_LR = 12, "0.005"
BUILT_IN = sorted(name for name in MODELS.names() if MODELS.get(name).__module__.startswith("model."))
SYNTHETIC = {load_config(path).MODEL.ARCH_NAME: path
             for path in sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "Synthetic", "*.yml")))
             if not os.path.basename(path).startswith("Base-")}


def config(**keys):
    cfg = get_cfg_defaults()
    set_keys(cfg, keys)
    return cfg


@pytest.mark.parametrize("device, keys, units, expected", [
    (CPU, {}, ("amx_bf16",), ("fp32", False)),  # the authors' numerics on a CPU, whatever it has
    (CPU, {"SOLVER.CPU_AMP": "auto"}, ("amx_bf16", "avx512_bf16"), ("bf16", False)),
    (CPU, {"SOLVER.CPU_AMP": "auto"}, ("avx512_bf16",), ("bf16", False)),
    (CPU, {"SOLVER.CPU_AMP": "auto"}, (), ("fp32", False)),
    (CPU, {"SOLVER.CPU_AMP": "bfloat16"}, (), ("bf16", False)),  # forced
    (CPU, {"SOLVER.CPU_AMP": "float16"}, (), ("fp16", True)),  # the CUDA default's twin
    (CPU, {"SOLVER.AMP_DTYPE": "bfloat16"}, (), ("bf16", False)),  # as before SOLVER.CPU_AMP existed
    (CPU, {"SOLVER.AMP": False, "SOLVER.CPU_AMP": "auto"}, ("amx_bf16",), ("fp32", False)),
    (CUDA, {}, (), ("fp16", True)),  # the authors' CUDA setting
    (CUDA, {"SOLVER.AMP_DTYPE": "bfloat16", "SOLVER.CPU_AMP": "float16"}, (), ("bf16", False)),
    (CUDA, {"SOLVER.AMP": False}, (), ("fp32", False)),
])
def test_the_precision_follows_the_keys_and_the_cpu(device, keys, units, expected, monkeypatch):
    monkeypatch.setattr(amp, "native_bf16_units", lambda: units)
    cfg = config(**keys)
    precision = amp.training_precision(cfg, device)
    assert (precision.name, precision.scaler) == expected
    if device == CPU:  # (a GradScaler for CUDA cannot be built without CUDA)
        assert amp.make_grad_scaler(cfg, CPU).is_enabled() == expected[1]
    # Test features: fp32 without TEST.AMP (the reference), the training precision with it.
    assert amp.test_precision(cfg, device).name == "fp32"
    cfg.TEST.AMP = True
    assert amp.test_precision(cfg, device).name == expected[0]
    assert amp.precision_settings(cfg, device) == {"training": expected[0], "test_features": expected[0]}


def test_auto_says_why_it_stays_fp32(monkeypatch):
    monkeypatch.setattr(amp, "native_bf16_units", lambda: ())
    reason = amp.training_precision(config(**{"SOLVER.CPU_AMP": "auto"}), CPU).describe()
    assert reason.startswith("fp32 (") and "no native bf16 matrix units" in reason and "bfloat16" in reason


def test_native_bf16_units_agree_with_torchs_own_cpu_checks():
    amp.native_bf16_units.cache_clear()
    units = set(amp.native_bf16_units())
    assert ("amx_bf16" in units) == torch.cpu._is_amx_tile_supported()
    assert ("avx512_bf16" in units) == torch.cpu._is_avx512_bf16_supported()


def test_the_kernels_are_the_reference_operations_in_fp32():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8) for _ in range(3))
    for causal in (False, True):
        assert torch.equal(attention(q.requires_grad_(), k, v, is_causal=causal),
                           F.scaled_dot_product_attention(q, k, v, is_causal=causal))
    x = torch.randn(4, 33)
    assert torch.equal(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    assert torch.equal(quick_gelu(x.clone(), inplace=True), x * torch.sigmoid(1.702 * x))
    images, weight, bias = torch.randn(2, 3, 40, 24), torch.randn(5, 3, 16, 16), torch.randn(5)
    for stride in ((16, 16), (12, 8)):
        assert torch.equal(patch_embedding(images, weight, bias, stride),
                           F.conv2d(images, weight, bias, stride=stride).flatten(2).transpose(1, 2))


def test_fp16_keeps_the_authors_operations():
    """fp16 autocast is the authors' CUDA setting: only bf16 takes the fast forms."""
    torch.manual_seed(0)
    x = torch.randn(4, 33).half().requires_grad_()
    assert torch.equal(quick_gelu(x), x * torch.sigmoid(1.702 * x))
    images, weight = torch.randn(2, 3, 32, 16), torch.randn(5, 3, 16, 16)
    with torch.autocast("cpu", dtype=torch.float16):
        tokens = patch_embedding(images, weight)
        assert torch.equal(tokens, F.conv2d(images, weight, stride=16).flatten(2).transpose(1, 2))


def _close(low, high, tolerance):
    """Relative L2 distance of ``low`` from ``high`` below ``tolerance``."""
    distance = (low.float() - high.float()).norm() / high.float().norm()
    assert distance < tolerance, distance


def test_the_low_precision_kernels_compute_the_same_functions():
    """Under bf16 on a CPU each kernel takes its fast form; values and gradients agree with the fp32 form up
    to bf16 rounding (8 bits of mantissa: a relative error of about 2^-8 per operation)."""
    torch.manual_seed(0)
    for causal in (False, True):
        q, k, v = (torch.randn(2, 3, 9, 16, requires_grad=True) for _ in range(3))
        reference = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        grads = torch.autograd.grad(reference.square().sum(), (q, k, v))
        low = [t.detach().bfloat16().requires_grad_() for t in (q, k, v)]
        out = attention(*low, is_causal=causal)
        assert out.dtype == torch.bfloat16
        _close(out, reference, 0.02)
        for mine, theirs in zip(torch.autograd.grad(out.float().square().sum(), low), grads):
            _close(mine, theirs, 0.03)
    x = torch.randn(64, 48, requires_grad=True)
    reference = x * torch.sigmoid(1.702 * x)
    low = x.detach().bfloat16().requires_grad_()
    _close(quick_gelu(low), reference, 0.01)
    _close(torch.autograd.grad(quick_gelu(low).float().sum(), low)[0],
           torch.autograd.grad(reference.sum(), x)[0], 0.01)
    _check_folded_mlps()
    images, weight = torch.randn(2, 3, 40, 24), torch.randn(5, 3, 16, 16)
    for stride in ((16, 16), (12, 8)):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens = patch_embedding(images, weight, None, stride)
        assert tokens.dtype == torch.bfloat16
        _close(tokens, F.conv2d(images, weight, stride=stride).flatten(2).transpose(1, 2), 0.01)


def _relative(low, exact):
    return float((low.double() - exact).norm() / exact.norm())


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fused linear is oneDNN's")
def test_bf16_inference_linear_fuses_bias_and_activation_with_one_rounding_fewer():
    """At bf16 inference on a CPU ``linear`` is one oneDNN product whose bias and activation act on the fp32
    accumulator: against the function computed in float64 (GELU from its erf definition) it is within bf16
    rounding and, with an activation, closer than autocast's product followed by it, which rounds twice. With a
    gradient recorded, or in fp32, it is exactly what autocast's F.linear gives."""
    torch.manual_seed(0)
    x, weight, bias = torch.randn(3, 50, 96), torch.randn(384, 96) * 0.1, torch.randn(384)
    definitions = {None: lambda z: z, "gelu": lambda z: 0.5 * z * (1 + torch.erf(z / 2 ** 0.5)),
                   "silu": lambda z: z * torch.sigmoid(z)}
    eager = {None: lambda z: z, "gelu": F.gelu, "silu": F.silu}
    for activation, definition in definitions.items():
        for scale, bias_scale, with_bias in ((None, None, True), (1.702, 1.702, True), (0.5, None, False)):
            w64 = weight.double() * (scale or 1)
            b64 = bias.double() * (bias_scale or 1) if with_bias else 0
            exact = definition(x.double() @ w64.T + b64)
            b = bias if with_bias else None
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                assert fuses_linear_epilogue(x)
                fused = linear(x, weight, b, activation, scale=scale, bias_scale=bias_scale)
                unfused = eager[activation](F.linear(x, weight * (scale or 1),
                                                     None if b is None else b * (bias_scale or 1)))
            assert fused.dtype == torch.bfloat16 and fused.shape == exact.shape
            assert _relative(fused, exact) < 2 ** -8, (activation, scale)
            # An activation on the rounded product rounds twice; a bare product rounds once either way.
            closer = _relative(fused, exact) < _relative(unfused, exact)
            assert closer or activation is None and _relative(fused, exact) <= 1.01 * _relative(unfused, exact)
    x.requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fuses_linear_epilogue(x)
        assert torch.equal(linear(x, weight, bias, "gelu"), F.gelu(F.linear(x, weight, bias)))
    assert torch.equal(linear(x, weight, bias, "silu"), F.silu(F.linear(x, weight, bias)))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="the fused linear is oneDNN's")
def test_the_bf16_weight_cache_never_serves_a_stale_weight():
    """Inside ``bf16_weight_cache`` a weight is cast once; a weight changed in place (a training step between
    two evaluations, a loaded state dict) is cast again, and another tensor never gets its copy."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(32, 16)
    x = torch.randn(5, 32)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16), bf16_weight_cache():
        first = linear(x, layer.weight, layer.bias)
        assert torch.equal(linear(x, layer.weight, layer.bias), first)
        layer.weight.mul_(2)
        layer.bias.mul_(2)
        doubled = linear(x, layer.weight, layer.bias)
        _close(doubled, 2 * first.float(), 0.01)
        layer.load_state_dict({"weight": layer.weight / 4, "bias": layer.bias / 4})
        _close(linear(x, layer.weight, layer.bias), first.float() / 2, 0.01)
        other = torch.nn.Linear(32, 16)
        _close(linear(x, other.weight, other.bias), other(x).float(), 0.01)


def test_mlp_is_timms_with_its_bf16_inference_fused():
    """``model.mlp.Mlp`` has timm's parameters and state dict keys, equals it exactly in fp32 and in training
    (dropout included), and at bf16 inference is within rounding of the fp32 function."""
    from timm.layers import Mlp as TimmMlp

    torch.manual_seed(0)
    ours, theirs = Mlp(48, 192, drop=0.1), TimmMlp(48, 192, drop=0.1)
    theirs.load_state_dict(ours.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    x = torch.randn(4, 9, 48)
    for training in (True, False):
        ours.train(training)
        theirs.train(training)
        torch.manual_seed(1)
        mine = ours(x)
        torch.manual_seed(1)
        assert torch.equal(mine, theirs(x))
    with torch.no_grad():
        exact = theirs(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = ours(x)
    assert low.dtype == torch.bfloat16
    _close(low, exact, 0.01)


def test_bf16_attention_keeps_its_softmax_backward_in_fp32():
    """The softmax's backward, P * (dP - sum(P dP)), cancels the incoming gradient's probability-weighted mean.
    When that mean dominates (here values with a common component, as a trained model's features have),
    probabilities rounded to bf16 lose the difference: the q and k gradients of the bf16 attention stay as close
    to fp32 ones (from the same bf16-rounded inputs) as the products' own rounding allows. Measured over six
    seeds: 0.026-0.031 relative with the softmax in fp32, 0.045-0.060 with it in bf16."""
    torch.manual_seed(0)
    q, k = (torch.randn(8, 4, 33, 16) * 2 for _ in range(2))
    v = torch.randn(8, 4, 33, 16) + 16
    low = [t.bfloat16().requires_grad_() for t in (q, k, v)]
    high = [t.detach().float().requires_grad_() for t in low]
    reference = F.scaled_dot_product_attention(*high)
    probe = torch.randn_like(reference)
    expected = torch.autograd.grad((reference * probe).sum(), high)
    got = torch.autograd.grad((attention(*low).float() * probe).sum(), low)
    for mine, theirs in zip(got, expected):
        _close(mine, theirs, 0.04)


def _check_folded_mlps():
    """CLIP's MLP and ASMOE's experts, with QuickGELU's 1.702 folded into their weights when training under
    bf16: values and the gradients of inputs and weights as the fp32 modules' up to rounding; in fp32 the
    operations of the authors' code, bit for bit."""
    fc, proj = torch.nn.Linear(48, 192), torch.nn.Linear(192, 48)
    experts = MixtureOfExperts(48, num_experts=3, top_k=2)
    with torch.no_grad():  # biases and norm parameters away from their zero / one initialisation
        for parameter in experts.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    x = torch.randn(64, 48, requires_grad=True)
    hidden = fc(x)
    assert torch.equal(quick_gelu_mlp(x, fc, proj), proj(hidden * torch.sigmoid(1.702 * hidden)))
    for function, weights in ((lambda t: quick_gelu_mlp(t, fc, proj), (fc.weight, proj.weight)),
                              (experts.experts, (experts.fc1_weight, experts.fc2_weight, experts.norm_weight))):
        reference = function(x)
        # A random projection as the loss: a squared layer-norm output sums to a constant, whose gradient is
        # all cancellation.
        probe = torch.randn_like(reference)
        grads = torch.autograd.grad((reference * probe).sum(), (x, *weights))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = function(x)
        assert low.dtype == torch.bfloat16
        _close(low, reference, 0.01)
        for mine, theirs in zip(torch.autograd.grad((low.float() * probe).sum(), (x, *weights)), grads):
            _close(mine, theirs, 0.03)


def small_config(name, root, output_dir, *opts):
    """``name``'s Synthetic config shrunk to seconds on the small SynthAG of ``root``."""
    return load_config(SYNTHETIC[name], [
        "MODEL.DEVICE", "cpu", "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]", "INPUT.PADDING", "2",
        "DATASETS.ROOT_DIR", root, "DATASETS.AUTO_GENERATE", "False", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "16", "DATALOADER.NUM_INSTANCE", "4", "SOLVER.CPU_AMP", "float32",
        "TEST.AMP", "False", "OUTPUT_DIR", str(output_dir), *opts])


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name", BUILT_IN)
def test_bf16_test_features_match_fp32_for_every_model(name, synth_root, tmp_path):
    """One checkpoint of each model, trained for a few steps; its test features through ``FeatureExtractor``
    in fp32 and under bf16 autocast: every image's two features have a cosine similarity of at least 0.999
    (measured: SVPR-ReID 0.9997, whose top-k selections bf16 can flip; the others 0.99998 or more)."""
    cfg = small_config(name, synth_root, tmp_path, "SOLVER.BASE_LR", TRAIN_LR)
    bundle = make_dataloaders(cfg)
    model_args = model_args_from_dataset(bundle.dataset)
    torch.manual_seed(0)
    model = build_from_args(cfg, model_args, CPU)
    model.stand_in_for_phases(torch.Generator().manual_seed(0))
    trainer = Trainer(cfg, model, build_criterion(cfg, model, model_args["num_classes"]), bundle.train_loader,
                      None, CPU, model_args, hooks=[])
    model.train()
    batches = list(bundle.train_loader)
    for step in range(TRAIN_STEPS):
        trainer.run_step(batches[step % len(batches)])
    path = os.path.join(tmp_path, "model_final.pth")
    save_checkpoint(weights_file(cfg, model, model_args, 1), path)

    samples = bundle.dataset.query + bundle.dataset.gallery
    paths, views = [s.path for s in samples], [s.viewid for s in samples]
    state = load_checkpoint(path)
    full = FeatureExtractor.from_checkpoint(path, opts=["TEST.AMP", "False"])(paths, views)
    low = FeatureExtractor.from_checkpoint(path, opts=["TEST.AMP", "True", "SOLVER.CPU_AMP", "bfloat16"])(paths, views)
    assert state["epoch"] == 1 and full.shape == low.shape == (len(samples), model.embedding_dim)
    assert not torch.equal(full, low)  # bf16 did run
    cosine = F.cosine_similarity(full, low, dim=1)
    assert cosine.min() >= 0.999, (name, cosine.min().item())


@pytest.mark.usefixtures("single_thread")
def test_fp16_overflow_skips_the_step_halves_the_scale_and_training_goes_on(synth_root, tmp_path):
    cfg = tiny_cfg("CLIP_baseline", BASELINE, frozen=True, opts=[
        "DATASETS.ROOT_DIR", synth_root, "DATASETS.AUTO_GENERATE", "False", "DATALOADER.NUM_WORKERS", "0",
        "SOLVER.IMS_PER_BATCH", "16", "DATALOADER.NUM_INSTANCE", "4", "SOLVER.CPU_AMP", "float16",
        "SOLVER.AMP_INIT_SCALE", str(2.0 ** 40), "OUTPUT_DIR", str(tmp_path)])
    bundle = make_dataloaders(cfg)
    model_args = model_args_from_dataset(bundle.dataset)
    torch.manual_seed(0)
    model = build_from_args(cfg, model_args, CPU)
    trainer = Trainer(cfg, model, build_criterion(cfg, model, model_args["num_classes"]), bundle.train_loader,
                      None, CPU, model_args, hooks=[])
    assert trainer.scaler.is_enabled() and trainer.precision.dtype == torch.float16
    model.train()
    batch = next(iter(bundle.train_loader))
    weights = dict(model.named_parameters())  # (BatchNorm statistics move in every forward, taken or not)
    before = {key: value.detach().clone() for key, value in weights.items()}
    _, terms = trainer.run_step(batch)
    # The scaled fp16 gradients overflowed: no weight moved, the scale halved, the loss itself is finite.
    assert all(torch.isfinite(value) for value in terms.values())
    assert all(torch.equal(before[key], value) for key, value in weights.items())
    assert trainer.skipped_steps == 1 and trainer.scaler.get_scale() == 2.0 ** 39
    for _ in range(40):
        trainer.run_step(batch)
        if any(not torch.equal(before[key], value) for key, value in weights.items()):
            break
    else:
        pytest.fail("the scale never came down to where a step is taken")
    assert 1 < trainer.skipped_steps < 41 and trainer.scaler.get_scale() <= 2.0 ** 39


def _final_state(output_dir):
    return load_checkpoint(os.path.join(output_dir, "checkpoint_last.pth"))


def test_fp16_with_the_scaler_resumes_exactly(synth_root, tmp_path):
    """Training with fp16 autocast and the gradient scaler on the CPU, whose first steps overflow; interrupted
    in epoch 2 and resumed: the scaler's state, the weights and the optimiser end bit-identical to an
    uninterrupted run, and results.json records the precision."""
    extra = ["SOLVER.CPU_AMP", "float16", "SOLVER.AMP_INIT_SCALE", str(2.0 ** 30), "SOLVER.EVAL_PERIOD", "10",
             "DATASETS.TESTS", "('SynthAG_AG',)"]
    whole, split = str(tmp_path / "whole"), str(tmp_path / "split")
    result = run_script(["train_svpr.py", "--config_file", BASELINE, *tiny(synth_root, whole, epochs=2, extra=extra)])
    check_ok(result)
    log = open(os.path.join(whole, "train.log")).read()
    assert "precision: training fp16 autocast with a gradient scaler (SOLVER.CPU_AMP float16" in log
    assert "epoch 1: the gradient scaler skipped" in log
    settings = json.load(open(os.path.join(whole, "results.json")))["settings"]
    assert settings["precision"] == {"training": "fp16", "test_features": "fp16"}

    env = {"SVPR_TEST_INTERRUPT": "stage2:epoch=2:iter=2:signal=SIGTERM"}
    interrupted = run_script(["train_svpr.py", "--config_file", BASELINE, *tiny(synth_root, split, epochs=2,
                                                                                  extra=extra)], env=env)
    assert interrupted.returncode != 0
    check_ok(run_script(["train_svpr.py", "--config_file", BASELINE, "--resume",
                         *tiny(synth_root, split, epochs=2, extra=extra)]))
    expected, resumed = _final_state(whole), _final_state(split)
    assert expected["scaler"]["scale"] < 2.0 ** 30  # the scale did drop
    assert resumed["scaler"] == expected["scaler"]
    assert resumed["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    torch.testing.assert_close(resumed["model"], expected["model"], rtol=0, atol=0)
    torch.testing.assert_close(resumed["optimizer"]["state"], expected["optimizer"]["state"], rtol=0, atol=0)

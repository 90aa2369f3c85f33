"""The CUDA paths and their CPU twins: every test runs on the CPU here and again on a GPU when there is one
(``tools/gpu_check.sh`` runs the CUDA ones: ``pytest tests/test_cuda.py -k cuda``).

Mixed-precision training steps against fp32, fused attention against the explicit definition, the compiled
training step (SOLVER.COMPILE) against the eager
one, the benchmark's throughput / memory / FLOP report under each precision, and (with two GPUs) a 2-process
NCCL step equal to one process.
"""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from loss import build_criterion
from model import build_model
from model.clip.transformer import SelfAttention
from processor.trainer import Trainer
from tests.fixtures import run_script, tiny_cfg

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine)")
DEVICES = ["cpu", pytest.param("cuda", marks=needs_cuda)]
# Small sizes of every Synthetic config, for the benchmark.
SMALL = ["MODEL.VIT.EMBED_DIM", "64", "MODEL.VIT.DEPTH", "2", "MODEL.VIT.NUM_HEADS", "1",
         "MODEL.CLIP.VISION_WIDTH", "64", "MODEL.CLIP.VISION_LAYERS", "2", "MODEL.CLIP.VISION_HEADS", "1",
         "MODEL.CLIP.EMBED_DIM", "32", "MODEL.CLIP.TEXT_WIDTH", "32", "MODEL.CLIP.TEXT_LAYERS", "1",
         "MODEL.CLIP.TEXT_HEADS", "1", "MODEL.SECAP.PROMPT_LEN", "4", "INPUT.SIZE_TRAIN", "[64, 32]",
         "INPUT.SIZE_TEST", "[64, 32]", "MODEL.TEXT_LEN", "32"]


def explicit_attention(x, attention, num_queries=None):
    """softmax(q k^T / sqrt(d)) v with ``nn.MultiheadAttention``'s packed projection, written out."""
    batch, length, width = x.shape
    heads, head_dim = attention.heads, width // attention.heads
    q, k, v = F.linear(x, attention.in_proj_weight, attention.in_proj_bias).chunk(3, dim=-1)
    split = lambda t: t.reshape(batch, -1, heads, head_dim).transpose(1, 2)  # noqa: E731 (B, H, L, d)
    q, k, v = split(q[:, :num_queries]), split(k), split(v)
    probs = (q @ k.transpose(-1, -2) / math.sqrt(head_dim)).softmax(dim=-1)
    out = (probs @ v).transpose(1, 2).reshape(batch, -1, width)
    return F.linear(out, attention.out_proj.weight, attention.out_proj.bias)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("num_queries", [None, 1])
def test_fused_attention_equals_the_explicit_definition_with_gradients(device, num_queries):
    torch.manual_seed(0)
    attention = SelfAttention(64, 4).to(device)
    x = torch.randn(3, 9, 64, device=device)
    results = []
    for fused in (True, False):
        attention.zero_grad()
        inputs = x.clone().requires_grad_(True)
        out = attention(inputs, num_queries) if fused else explicit_attention(inputs, attention, num_queries)
        out.square().sum().backward()
        results.append((out.detach(), inputs.grad, attention.in_proj_weight.grad.clone()))
    for fused, explicit in zip(*results):
        torch.testing.assert_close(fused, explicit, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device, precision", [("cpu", "fp32"), ("cpu", "bf16"),
                                               pytest.param("cuda", "fp16", marks=needs_cuda),
                                               pytest.param("cuda", "bf16", marks=needs_cuda)])
def test_bench_model_reports_throughput_memory_and_flops_for_every_model(device, precision):
    result = run_script(["tools/bench_model.py", "--all", "configs/Synthetic", "--random-weights", "--device", device,
                         "--amp", precision, "--batch", "8", "--iters", "1", "--warmup", "0", "--threads", "1",
                         *SMALL])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    rows = report["results"]
    assert [row["arch"] for row in rows] == ["CLIP_SVPR_ReID", "CLIP_baseline", "CLIP_ReID", "ViT", "TransReID", "VDT",
                                             "SeCap"]
    for row in rows:
        assert row["precision"] == precision
        assert row["train_img_per_s"] > 0 and row["infer_img_per_s"] > 0
        # Matrix products are counted: a training step (forward and backward) does about three times the
        # FLOPs of inference.
        assert row["train_gflop_per_step"] > 2 * row["infer_gflop_per_step"] > 0
        assert row["train_tflops"] > 0 and row["infer_tflops"] > 0
        assert row["train_share_of_peak"] == pytest.approx(row["train_tflops"] / row["peak_tflops"], rel=1e-2, abs=1e-4)
        if device == "cuda":
            assert row["train_peak_mib"] > row["infer_peak_mib"] > 0
        else:
            assert row["train_peak_mib"] is None
    assert "train img/s" in result.stdout and "of peak" in result.stdout


def trainer_step(device, **keys):
    """Loss terms and weights after one trainer step of a tiny CLIP baseline (same seed, same batch)."""
    cfg = tiny_cfg("CLIP_baseline", **{"MODEL.DEVICE": device, **keys})
    torch.manual_seed(0)
    model = build_model(cfg, 4, 1, 1).to(device)
    before = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    trainer = Trainer(cfg, model, build_criterion(cfg, model, 4).to(device), None, None, torch.device(device), {},
                      hooks=[])
    generator = torch.Generator().manual_seed(1)
    batch = {"images": torch.randn(8, 3, 64, 32, generator=generator).to(device),
             "pids": torch.arange(4).repeat_interleave(2).to(device)}
    trainer.train_model.train()
    _, terms = trainer.run_step(batch)
    after = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {k: v.detach().float().cpu() for k, v in terms.items()}, before, after, trainer


@pytest.mark.parametrize("device, dtype", [("cpu", "bfloat16"), pytest.param("cuda", "float16", marks=needs_cuda),
                                           pytest.param("cuda", "bfloat16", marks=needs_cuda)])
def test_mixed_precision_training_step_is_close_to_fp32(device, dtype):
    """SOLVER.AMP: autocast (fp16 with the gradient scaler) gives losses near fp32's and an applied step."""
    fp32_terms, before, _, _ = trainer_step(device, **{"SOLVER.AMP": False})
    terms, _, after, trainer = trainer_step(device, **{"SOLVER.AMP": True, "SOLVER.AMP_DTYPE": dtype})
    for name, value in terms.items():
        assert torch.isfinite(value), name
        torch.testing.assert_close(value, fp32_terms[name], atol=0.05, rtol=0.05)
    assert trainer.scaler.is_enabled() == (dtype == "float16")
    if trainer.scaler.is_enabled():
        assert math.isfinite(trainer.scaler.get_scale()) and trainer.scaler.get_scale() > 0
    moved = [name for name, weight in after.items() if not torch.equal(weight, before[name])]
    assert len(moved) > 10  # not skipped as an overflow step


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_training_step_equals_the_eager_step(device):
    """SOLVER.COMPILE: the trainer's step through torch.compile (TorchInductor) gives the eager step's loss
    terms and updated weights (up to float rounding)."""
    eager_terms, before, eager_weights, _ = trainer_step(device, **{"SOLVER.AMP": False})
    compiled_terms, _, compiled_weights, _ = trainer_step(device, **{"SOLVER.AMP": False, "SOLVER.COMPILE": True})
    assert eager_terms.keys() == compiled_terms.keys() == {"id", "triplet"}
    for name in eager_terms:
        torch.testing.assert_close(compiled_terms[name], eager_terms[name], atol=1e-5, rtol=1e-5)
    for name, weight in eager_weights.items():
        torch.testing.assert_close(compiled_weights[name], weight, atol=1e-5, rtol=1e-4, msg=name)
    moved = [name for name, weight in eager_weights.items() if not torch.equal(weight, before[name])]
    assert len(moved) > 10  # the step did update the weights that are compared

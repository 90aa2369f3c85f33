"""Distributed training equals single-process training: with SOLVER.SYNC_BN and SOLVER.GLOBAL_TRIPLET a real
2-process ``torchrun`` step on a P x K = 8 x 2 batch split between the processes gives the loss, the gradients
and the BatchNorm statistics of one process holding all 16 images: on the CPU with gloo, and on two GPUs with
NCCL when the machine has them (``tools/gpu_check.sh``)."""

import pytest
import torch

from tests.fixtures import BASELINE, REPO_ROOT, check_ok, free_port, run_script, tiny

pytestmark = pytest.mark.slow

STEP = """
import gc
import os
import sys
import torch
from torch.nn.parallel import DistributedDataParallel
from configs import load_config
from loss import build_criterion
from model import build_model
from model.sync_batchnorm import convert_sync_batchnorm
from utils.distributed import all_reduce_with_grad, get_rank, get_world_size, init_distributed

device = torch.device("cpu")
if os.environ.get("STEP_DEVICE") == "cuda":  # one GPU per process; fp32 convolutions as on the CPU
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    torch.backends.cudnn.allow_tf32 = False
init_distributed(device)
cfg = load_config(sys.argv[1], sys.argv[3:])
torch.manual_seed(0)
model = build_model(cfg, num_classes=8, num_cameras=2, num_views=2).to(device)
criterion = build_criterion(cfg, model, 8).to(device)
generator = torch.Generator().manual_seed(1)
images = torch.randn(16, 3, 64, 32, generator=generator).to(device)
batch = {"pids": torch.arange(8).repeat_interleave(2), "camids": torch.arange(16) % 2,
         "viewids": (torch.arange(16) // 2) % 2}
batch = {key: value.to(device) for key, value in batch.items()}
world, rank = get_world_size(), get_rank()
share = slice(rank * 16 // world, (rank + 1) * 16 // world)
local = {key: value[share] for key, value in batch.items()}
net = model
if world > 1:
    model = convert_sync_batchnorm(model, device)
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=True)
model.train()
outputs = net(images[share], **model.forward_inputs(local))
terms = criterion(outputs, local)
loss = sum(terms.values())
loss.backward()
mean_loss = all_reduce_with_grad(loss.detach()) / world
mean_terms = {k: all_reduce_with_grad(v.detach()) / world for k, v in terms.items()}
if rank == 0:
    torch.save({"loss": mean_loss.cpu(), "terms": {k: v.cpu() for k, v in mean_terms.items()},
                "grads": {n: p.grad.cpu() for n, p in model.named_parameters() if p.grad is not None},
                "buffers": {n: b.cpu() for n, b in model.named_buffers()}}, sys.argv[2])
if world > 1:
    # Release DDP's reducer before the process group: a reducer outliving the group can abort the process
    # at interpreter exit ("terminate called without an active exception").
    torch.distributed.barrier()
    del net, outputs, terms, loss
    gc.collect()
    torch.distributed.destroy_process_group()
"""


def one_and_two_processes(tmp_path, extra, device="cpu"):
    """The step script's results ``(one process, two torchrun processes)`` with the overrides ``extra``, on the
    CPU (gloo) or on GPUs (NCCL)."""
    script = tmp_path / "step.py"
    script.write_text(STEP)
    opts = tiny(str(tmp_path), str(tmp_path / "out"), extra=extra + ["MODEL.DEVICE", device])
    single, double = str(tmp_path / "single.pt"), str(tmp_path / "double.pt")
    env = {"PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1", "STEP_DEVICE": device}
    check_ok(run_script([str(script), BASELINE, single, *opts], env=env))
    check_ok(run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
                         str(script), BASELINE, double, *opts], env=env))
    return torch.load(single, weights_only=True), torch.load(double, weights_only=True)


@pytest.mark.parametrize("backend", ["gloo", pytest.param("nccl", marks=pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA GPUs"))])
def test_two_process_step_equals_one_process_step(tmp_path, backend):
    one, two = one_and_two_processes(tmp_path, ["SOLVER.SYNC_BN", "True", "SOLVER.GLOBAL_TRIPLET", "True"],
                                     "cuda" if backend == "nccl" else "cpu")
    assert set(one["terms"]) == {"id", "triplet"}
    torch.testing.assert_close(two["loss"], one["loss"], rtol=0, atol=1e-5)
    for name in one["terms"]:
        torch.testing.assert_close(two["terms"][name], one["terms"][name], rtol=0, atol=1e-5)
    assert one["grads"].keys() == two["grads"].keys() and len(one["grads"]) > 10
    worst = max((two["grads"][n] - g).abs().max().item() for n, g in one["grads"].items())
    assert worst <= 1e-5, worst
    for name, buffer in one["buffers"].items():
        torch.testing.assert_close(two["buffers"][name], buffer, rtol=0, atol=1e-5, msg=name)


def test_without_global_mining_the_processes_differ_from_one(tmp_path):
    """The control: per-process mining (the plain DDP recipe) does not give the single-process triplet loss."""
    one, two = one_and_two_processes(tmp_path, ["SOLVER.GLOBAL_TRIPLET", "False"])
    assert (two["terms"]["triplet"] - one["terms"]["triplet"]).abs().item() > 1e-4

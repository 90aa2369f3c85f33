"""Optimisers and learning-rate schedules: parameter groups, the reference schedules' values, and exact resumption
through real checkpoint files."""
import glob
import math
import os
import warnings

import pytest
import torch
from timm.scheduler import CosineLRScheduler
from torch import nn

from configs import get_cfg_defaults, read_config
from loss.center_loss import CenterTerm
from model import MODELS
from model.clip_reid import PromptLearning
from processor.hooks import HookBase
from processor.trainer import Trainer
from solver import WarmupCosineLR, WarmupMultiStepLR, make_optimizer, make_scheduler
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import ConfigError
from tests.fixtures import REPO_ROOT


class _Prompts(nn.Module):
    """What prompt learning's optimiser reads of a CLIP-ReID model: its prompt parameters."""

    def __init__(self, params):
        super().__init__()
        self.params = list(params)

    def prompt_parameters(self):
        return self.params


def make_stage1_optimizer(cfg, params):
    return PromptLearning(cfg, _Prompts(params), None, torch.device("cpu")).make_optimizer()


def make_stage1_scheduler(cfg, optimizer):
    return PromptLearning(cfg, None, None, torch.device("cpu")).make_scheduler(optimizer)


def make_cfg(opts=()):
    cfg = get_cfg_defaults()
    cfg.merge_from_list(list(opts))
    cfg.freeze()
    return cfg


class TinyReID(nn.Module):
    """Names like the real models: attention in_proj_bias, norms, a frozen part and a classifier."""

    def __init__(self, num_classes=5):
        super().__init__()
        self.embed = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2)
        self.norm = nn.LayerNorm(8)
        self.frozen = nn.Linear(8, 8)
        self.frozen.requires_grad_(False)
        self.classifier = nn.Linear(8, num_classes)

    def forward(self, x):
        tokens = self.norm(self.embed(x)).unsqueeze(1)  # (B, 1, 8)
        tokens = self.attn(tokens, tokens, tokens)[0].squeeze(1)
        return self.classifier(self.frozen(tokens))


def group_of(optimizer, param):
    matches = [g for g in optimizer.param_groups if any(p is param for p in g["params"])]
    assert len(matches) == 1
    return matches[0]


# ---------------------------------------------------------------------------------------------------------
# Optimisers
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("large_fc", [False, True])
def test_parameter_groups_follow_the_bias_and_classifier_rules(large_fc):
    cfg = make_cfg(["SOLVER.BASE_LR", 0.01, "SOLVER.BIAS_LR_FACTOR", 3, "SOLVER.WEIGHT_DECAY", 0.05,
                    "SOLVER.WEIGHT_DECAY_BIAS", 0.001, "SOLVER.LARGE_FC_LR", large_fc])
    model = TinyReID()
    optimizer = make_optimizer(cfg, model)

    trainable = {name: p for name, p in model.named_parameters() if p.requires_grad}
    grouped = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(grouped) == len(trainable) and {id(p) for p in grouped} == {id(p) for p in trainable.values()}
    assert not any(p is model.frozen.weight or p is model.frozen.bias for p in grouped)
    assert len(optimizer.param_groups) == (4 if large_fc else 2)  # grouped, not one group per parameter

    for name, param in trainable.items():
        group = group_of(optimizer, param)
        is_bias = "bias" in name  # includes attn.in_proj_bias and norm.bias
        if large_fc and name.startswith("classifier"):
            expected_lr = 0.02
        else:
            expected_lr = 0.03 if is_bias else 0.01
        assert group["lr"] == pytest.approx(expected_lr), name
        assert group["weight_decay"] == (0.001 if is_bias else 0.05), name


@pytest.mark.parametrize("name, cls", [("SGD", torch.optim.SGD), ("Adam", torch.optim.Adam),
                                       ("AdamW", torch.optim.AdamW), ("RMSprop", torch.optim.RMSprop)])
def test_optimiser_is_chosen_by_name(name, cls):
    cfg = make_cfg(["SOLVER.OPTIMIZER_NAME", name, "SOLVER.MOMENTUM", 0.8])
    optimizer = make_optimizer(cfg, TinyReID())
    assert type(optimizer) is cls
    if cls is torch.optim.SGD:
        assert all(g["momentum"] == 0.8 for g in optimizer.param_groups)


@pytest.mark.parametrize("name", ["SGD", "Adam", "AdamW"])
def test_fused_optimiser_makes_the_per_operation_updates_up_to_rounding(name):
    """SOLVER.FUSED_OPTIMIZER: PyTorch's fused kernel, the same update rule as the per-operation loop (two steps,
    so that the moment buffers are used; over many steps a rounding difference grows as any does)."""
    results = []
    for fused in (False, True):
        torch.manual_seed(0)
        model = TinyReID()
        cfg = make_cfg(["SOLVER.OPTIMIZER_NAME", name, "SOLVER.FUSED_OPTIMIZER", fused, "SOLVER.BASE_LR", 0.01,
                        "SOLVER.WEIGHT_DECAY", 0.05])
        optimizer = make_optimizer(cfg, model)
        assert bool(optimizer.defaults.get("fused")) is fused
        generator = torch.Generator().manual_seed(1)
        for _ in range(2):
            optimizer.zero_grad()
            model(torch.randn(4, 6, generator=generator)).square().sum().backward()
            optimizer.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for loop, fused in zip(*results):
        torch.testing.assert_close(fused, loop, atol=1e-6, rtol=1e-5)
    torch.manual_seed(0)
    initial = [p.detach() for p in TinyReID().parameters()]
    moved = sum(not torch.equal(a, b) for a, b in zip(initial, results[0]))
    assert moved >= 4  # the steps did change the weights compared


@pytest.mark.parametrize("name", ["Adamm", "lr_scheduler", "Optimizer"])
def test_unknown_optimiser_is_a_one_line_config_error(name):
    with pytest.raises(ConfigError, match="SOLVER.OPTIMIZER_NAME") as info:
        make_optimizer(make_cfg(["SOLVER.OPTIMIZER_NAME", name]), TinyReID())
    assert "\n" not in str(info.value) and name in str(info.value)


def test_fully_frozen_model_is_a_config_error():
    model = TinyReID().requires_grad_(False)
    with pytest.raises(ConfigError, match="no trainable parameters"):
        make_optimizer(make_cfg(), model)


def test_center_term_trains_its_centres_with_its_own_sgd():
    cfg = make_cfg(["SOLVER.CENTER_LR", 0.3, "SOLVER.CENTER_LOSS_WEIGHT", 0.25, "MODEL.IF_WITH_CENTER", "yes"])
    assert CenterTerm.spec_from_config(cfg) == (0.25, {})
    assert CenterTerm.spec_from_config(make_cfg()) is None
    term = CenterTerm(cfg, 5, 8)
    center_optimizer = term.make_optimizer(cfg)
    assert type(center_optimizer) is torch.optim.SGD
    assert center_optimizer.param_groups[0]["lr"] == 0.3
    assert center_optimizer.param_groups[0]["params"] == [term.center_loss.centers]
    # The loss weight scaled the centres' gradient; the term undoes it before its optimiser steps.
    term.center_loss.centers.grad = torch.full((5, 8), 0.5)
    term.prepare_gradients()
    assert torch.equal(term.center_loss.centers.grad, torch.full((5, 8), 2.0))


def test_stage1_optimiser_uses_stage1_keys():
    cfg = make_cfg(["SOLVER.STAGE1.OPTIMIZER_NAME", "SGD", "SOLVER.STAGE1.BASE_LR", 0.004,
                    "SOLVER.STAGE1.WEIGHT_DECAY", 0.02, "SOLVER.STAGE1.MOMENTUM", 0.7])
    prompts = nn.Parameter(torch.zeros(5, 4, 8))
    optimizer = make_stage1_optimizer(cfg, [prompts])
    assert type(optimizer) is torch.optim.SGD
    (group,) = optimizer.param_groups
    assert group["params"] == [prompts]
    assert (group["lr"], group["weight_decay"], group["momentum"]) == (0.004, 0.02, 0.7)
    with pytest.raises(ConfigError, match="SOLVER.STAGE1.OPTIMIZER_NAME"):
        make_stage1_optimizer(make_cfg(["SOLVER.STAGE1.OPTIMIZER_NAME", "Nope"]), [prompts])


# ---------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------
SVPR_SOLVER = ["SOLVER.BASE_LR", 5e-6, "SOLVER.WARMUP_ITERS", 10, "SOLVER.WARMUP_FACTOR", 0.1,
               "SOLVER.GAMMA", 0.1, "SOLVER.WARMUP_METHOD", "linear", "SOLVER.BIAS_LR_FACTOR", 2]


def lrs_per_epoch(optimizer, scheduler, epochs, train_step=None):
    """The learning rates each epoch (1-based) trains with, stepping the scheduler at each epoch's end."""
    history = []
    for _ in range(epochs):
        history.append([g["lr"] for g in optimizer.param_groups])
        if train_step is not None:
            train_step()
        optimizer.step()
        scheduler.step()
    return history


def spec_svpr_lr(epoch):
    """The reference's warm-up multi-step schedule for base 5e-6, W = 10, factor 0.1, steps [30, 50, 80]."""
    if epoch <= 10:
        return 5e-6 * (0.1 + 0.09 * (epoch - 1))
    if epoch <= 30:
        return 5e-6
    if epoch <= 50:
        return 5e-7
    if epoch <= 80:
        return 5e-8
    return 5e-9


def test_warmup_multistep_matches_spec_values():
    cfg = make_cfg(SVPR_SOLVER + ["SOLVER.STEPS", (30, 50, 80)])
    optimizer = make_optimizer(cfg, TinyReID())
    scheduler = make_scheduler(cfg, optimizer)
    assert isinstance(scheduler, WarmupMultiStepLR)
    history = lrs_per_epoch(optimizer, scheduler, 120)
    names = [g["name"] for g in optimizer.param_groups]
    weight, bias = names.index("weight"), names.index("bias")
    assert history[0][weight] == pytest.approx(5.0e-7, rel=1e-12)
    assert history[9][weight] == pytest.approx(4.55e-6, rel=1e-12)
    for epoch, lrs in enumerate(history, start=1):
        assert lrs[weight] == pytest.approx(spec_svpr_lr(epoch), rel=1e-12), epoch
        assert lrs[bias] == pytest.approx(2 * spec_svpr_lr(epoch), rel=1e-12), epoch
    assert scheduler.get_last_lr()[weight] == pytest.approx(5e-9, rel=1e-12)


def test_constant_warmup_and_unsorted_steps():
    cfg = make_cfg(SVPR_SOLVER + ["SOLVER.WARMUP_METHOD", "constant", "SOLVER.STEPS", (12,)])
    optimizer = make_optimizer(cfg, TinyReID())
    history = [lrs[0] for lrs in lrs_per_epoch(optimizer, make_scheduler(cfg, optimizer), 14)]
    expected = [5e-7] * 10 + [5e-6] * 2 + [5e-7] * 2
    assert history == pytest.approx(expected, rel=1e-12)

    with pytest.raises(ConfigError, match="SOLVER.STEPS"):
        make_scheduler(make_cfg(["SOLVER.STEPS", (70, 40)]), optimizer)
    with pytest.raises(ValueError, match="milestones"):
        WarmupMultiStepLR(optimizer, [5, 2])


STAGE1 = ["SOLVER.STAGE1.BASE_LR", 3.5e-4, "SOLVER.STAGE1.WARMUP_LR_INIT", 1e-5, "SOLVER.STAGE1.LR_MIN", 1e-6,
          "SOLVER.STAGE1.WARMUP_EPOCHS", 5, "SOLVER.STAGE1.MAX_EPOCHS", 30]


def test_stage1_cosine_matches_timm_stepped_like_the_reference():
    """The reference builds timm's CosineLRScheduler and calls step(epoch) at the start of epoch 1, 2, ..."""
    cfg = make_cfg(STAGE1)
    prompts = nn.Parameter(torch.zeros(3, 4))
    optimizer = make_stage1_optimizer(cfg, [prompts])
    scheduler = make_stage1_scheduler(cfg, optimizer)
    assert isinstance(scheduler, WarmupCosineLR)
    ours = [lrs[0] for lrs in lrs_per_epoch(optimizer, scheduler, 34)]

    timm_optimizer = torch.optim.Adam([nn.Parameter(torch.zeros(1))], lr=3.5e-4)
    timm_scheduler = CosineLRScheduler(timm_optimizer, t_initial=30, lr_min=1e-6, cycle_decay=0.1,
                                       warmup_lr_init=1e-5, warmup_t=5, cycle_limit=1, t_in_epochs=True)
    reference = []
    for epoch in range(1, 35):
        timm_scheduler.step(epoch)
        reference.append(timm_optimizer.param_groups[0]["lr"])
    assert ours == pytest.approx(reference, rel=1e-12)
    assert ours[0] == pytest.approx(1e-5 + (3.5e-4 - 1e-5) / 5, rel=1e-12)
    assert ours[9] == pytest.approx(1e-6 + 0.5 * (3.5e-4 - 1e-6) * (1 + math.cos(math.pi * 10 / 30)), rel=1e-12)
    assert ours[29:] == [1e-6] * 5


# ---------------------------------------------------------------------------------------------------------
# Resumption through checkpoint files
# ---------------------------------------------------------------------------------------------------------
def run_and_maybe_resume(tmp_path, cfg, build, total_epochs, stop_at=None):
    """Train a tiny model; with ``stop_at``, save after that many epochs, rebuild everything from the
    config, load the checkpoint (weights_only) and carry on. Returns the lr history and final weights."""
    torch.manual_seed(0)
    data = torch.randn(10, 6)
    targets = torch.arange(10) % 5
    model, optimizer, scheduler = build(cfg)

    def train_step():
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(data), targets).backward()

    history = lrs_per_epoch(optimizer, scheduler, stop_at or total_epochs, train_step)
    if stop_at is not None:
        path = str(tmp_path / "checkpoint.pth")
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "scheduler": scheduler.state_dict(), "epoch": stop_at}, path)
        del model, optimizer, scheduler
        state = load_checkpoint(path)
        model, optimizer, scheduler = build(cfg)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history += lrs_per_epoch(optimizer, scheduler, total_epochs - state["epoch"], train_step)
    return history, model.state_dict()


def build_stage2(cfg):
    torch.manual_seed(1)
    model = TinyReID()
    optimizer = make_optimizer(cfg, model)
    return model, optimizer, make_scheduler(cfg, optimizer)


def build_stage1(cfg):
    torch.manual_seed(1)
    model = TinyReID()
    optimizer = make_stage1_optimizer(cfg, model.parameters())
    return model, optimizer, make_stage1_scheduler(cfg, optimizer)


@pytest.mark.parametrize("build, opts, stop_at", [
    (build_stage2, SVPR_SOLVER + ["SOLVER.STEPS", (12, 16), "SOLVER.OPTIMIZER_NAME", "Adam"], 7),
    (build_stage2, SVPR_SOLVER + ["SOLVER.STEPS", (12, 16), "SOLVER.OPTIMIZER_NAME", "SGD"], 13),
    (build_stage1, STAGE1 + ["SOLVER.STAGE1.MAX_EPOCHS", 15], 4),
], ids=["stage2-adam-warmup", "stage2-sgd-decayed", "stage1-cosine"])
def test_resume_from_checkpoint_reproduces_the_run(tmp_path, build, opts, stop_at):
    cfg = make_cfg(opts)
    straight, straight_weights = run_and_maybe_resume(tmp_path, cfg, build, 20)
    resumed, resumed_weights = run_and_maybe_resume(tmp_path, cfg, build, 20, stop_at=stop_at)
    assert resumed == straight  # exactly the same learning rates, epoch by epoch
    assert len(set(lrs[0] for lrs in straight)) > 3
    for key, value in straight_weights.items():
        torch.testing.assert_close(resumed_weights[key], value, rtol=0, atol=0)


def test_scheduler_state_holds_only_plain_values(tmp_path):
    cfg = make_cfg(SVPR_SOLVER)
    _, optimizer, scheduler = build_stage2(cfg)
    path = str(tmp_path / "sched.pth")
    save_checkpoint(scheduler.state_dict(), path)
    state = torch.load(path, weights_only=True)
    assert state["last_epoch"] == 0 and state["lr_lambdas"] == [None] * len(optimizer.param_groups)


# ---------------------------------------------------------------------------------------------------------
# The learning rate of every epoch of every shipped schedule, as the training loop steps it
# ---------------------------------------------------------------------------------------------------------
SHIPPED = sorted(path for path in glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yml"), recursive=True)
                 if not os.path.basename(path).startswith("Base-"))


def authors_lr(solver, epoch, step_at_start):
    """The authors' WarmupMultiStepLR during 1-based ``epoch``: their CLIP-ReID stage 2 steps it before each
    epoch (epoch e at t = e), their other loops after (t = e - 1); lr = BASE_LR * warm-up(t) * GAMMA ** (number
    of STEPS <= t), warm-up(t) = FACTOR * (1 - t / ITERS) + t / ITERS (linear) or FACTOR (constant) for t < ITERS."""
    t = epoch if step_at_start else epoch - 1
    warmup = 1.0
    if t < solver.WARMUP_ITERS:
        alpha = t / solver.WARMUP_ITERS
        warmup = solver.WARMUP_FACTOR if solver.WARMUP_METHOD == "constant" else \
            solver.WARMUP_FACTOR * (1 - alpha) + alpha
    return solver.BASE_LR * warmup * solver.GAMMA ** sum(1 for step in solver.STEPS if step <= t)


class _NoTerms(nn.Module):
    """A criterion without loss terms (the loop below trains on no batch)."""

    terms = {}


class _RecordLR(HookBase):
    def __init__(self):
        self.lrs = []

    def before_epoch(self, epoch):
        self.lrs.append({group["name"]: group["lr"] for group in self.trainer.optimizer.param_groups})


def test_every_model_declares_where_its_main_loop_steps_the_schedule():
    # Only the authors' CLIP-ReID stage-2 loop steps before the epoch (processor_clipreid_stage2.py).
    assert {name: MODELS.get(name).lr_step_at_epoch_start for name in MODELS.names()} == \
        {name: name == "CLIP_ReID" for name in MODELS.names()}


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: os.path.relpath(p, os.path.join(REPO_ROOT, "configs")))
def test_training_loop_lr_of_every_epoch_of_every_shipped_config(tmp_path, path):
    cfg, _ = read_config(path, ["OUTPUT_DIR", str(tmp_path), "MODEL.DEVICE", "cpu"])
    step_at_start = MODELS.get(cfg.MODEL.ARCH_NAME).lr_step_at_epoch_start
    model = TinyReID()
    model.lr_step_at_epoch_start = step_at_start
    record = _RecordLR()
    trainer = Trainer(cfg, model, _NoTerms(), [], None, torch.device("cpu"), {}, hooks=[record])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the scheduler steps although no batch stepped the optimiser
        trainer.fit()
    solver = cfg.SOLVER
    assert len(record.lrs) == solver.MAX_EPOCHS
    for epoch, lrs in enumerate(record.lrs, start=1):
        base = authors_lr(solver, epoch, step_at_start)
        assert lrs["weight"] == pytest.approx(base, rel=1e-12), epoch
        assert lrs["bias"] == pytest.approx(base * solver.BIAS_LR_FACTOR, rel=1e-12), epoch
        classifier = "classifier_weight" if solver.LARGE_FC_LR else "weight"
        assert lrs[classifier] == pytest.approx(base * (2 if solver.LARGE_FC_LR else 1), rel=1e-12), epoch


@pytest.mark.parametrize("path", [p for p in SHIPPED if "clipreid" in os.path.basename(p)],
                         ids=lambda p: os.path.relpath(p, os.path.join(REPO_ROOT, "configs")))
def test_prompt_learning_lr_of_every_epoch_of_every_shipped_clipreid_config(path):
    # The authors' stage 1: timm's cosine schedule with warm-up stepped with the epoch number before each epoch.
    cfg, _ = read_config(path)
    stage1 = cfg.SOLVER.STAGE1
    optimizer = make_stage1_optimizer(cfg, [nn.Parameter(torch.zeros(2, 3))])
    ours = [lrs[0] for lrs in lrs_per_epoch(optimizer, make_stage1_scheduler(cfg, optimizer), stage1.MAX_EPOCHS)]
    for epoch, lr in enumerate(ours, start=1):
        if epoch < stage1.WARMUP_EPOCHS:
            expected = stage1.WARMUP_LR_INIT + epoch * (stage1.BASE_LR - stage1.WARMUP_LR_INIT) / stage1.WARMUP_EPOCHS
        elif epoch < stage1.MAX_EPOCHS:
            expected = stage1.LR_MIN + 0.5 * (stage1.BASE_LR - stage1.LR_MIN) * (
                1 + math.cos(math.pi * epoch / stage1.MAX_EPOCHS))
        else:
            expected = stage1.LR_MIN
        assert lr == pytest.approx(expected, rel=1e-12), epoch

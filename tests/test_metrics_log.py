"""MetricsLogHook driven by a stand-in trainer: metrics.csv rows, curves.png, TensorBoard scalars, resume
without duplicates, optional dependencies missing, rank > 0 and file permissions."""
import logging
import os
import stat
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import processor.metrics_log as metrics_log
from configs import get_cfg_defaults, load_config
from datasets import make_dataloaders
from datasets.synthetic import SynthConfig, generate_synthag
from evaluation.protocols import EvaluationProtocol, protocol_of_bundle
from loss import build_criterion
from processor.hooks import CheckpointHook, EvalHook
from processor.metrics_log import COLUMNS, MetricsLogHook, read_metrics
from processor.model_io import build_from_args, model_args_from_dataset
from processor.trainer import Trainer
from tests.fixtures import BASELINE, tiny

ITERATIONS = 4


class FakeTrainer:
    """What the hook reads from ``processor.trainer.Trainer``."""

    def __init__(self, output_dir, start_epoch=1, tensorboard=True):
        self.cfg = get_cfg_defaults()
        self.cfg.SOLVER.TENSORBOARD = tensorboard
        self.output_dir = output_dir
        self.start_epoch = start_epoch
        self.last_eval = (None, None)
        self.eval_data = EvaluationProtocol("SynthAG_ALL", "SynthAG", None, 10, 20, "mix")
        self.train_loader = list(range(ITERATIONS))


def loss_at(epoch, iteration):
    return 3.0 / (epoch + iteration / ITERATIONS)


def metrics_at(epoch):
    return {"mAP": 0.1 * epoch, "cmc": np.linspace(0.2 * epoch, 1.0, 50), "mINP": 0.05 * epoch}


def train(hook, trainer, epochs, eval_every=1):
    """Call the hook as ``Trainer.fit`` does: after_log at iterations 2 and 4, an evaluation every epoch."""
    hook.trainer = trainer
    hook.before_train()
    for epoch in epochs:
        for iteration in (2, 4):
            loss = loss_at(epoch, iteration)
            hook.after_log({"epoch": epoch, "iteration": iteration, "num_iterations": ITERATIONS,
                            "losses": {"id": 0.75 * loss, "triplet": 0.25 * loss}, "loss": loss,
                            "accuracy": 0.1 * epoch, "lr": 1e-3 / epoch, "images_per_second": 100.0 + epoch})
        if epoch % eval_every == 0:
            trainer.last_eval = (epoch, metrics_at(epoch))
        hook.after_epoch(epoch)
    hook.after_train()


def expected_rows(epochs, eval_every=1):
    rows = []
    for epoch in epochs:
        for iteration in (2, 4):
            loss = loss_at(epoch, iteration)
            step = (epoch - 1) * ITERATIONS + iteration
            for name, value in (("loss/id", 0.75 * loss), ("loss/triplet", 0.25 * loss), ("loss", loss),
                                ("accuracy", 0.1 * epoch), ("lr", 1e-3 / epoch),
                                ("images_per_second", 100.0 + epoch)):
                rows.append(("train", epoch, iteration, step, name, value))
        if epoch % eval_every == 0:
            m = metrics_at(epoch)
            for name, value in (("mAP", m["mAP"]), ("R1", m["cmc"][0]), ("R5", m["cmc"][4]),
                                ("R10", m["cmc"][9]), ("mINP", m["mINP"])):
                rows.append(("eval", epoch, ITERATIONS, epoch * ITERATIONS, f"SynthAG_ALL/{name}", 100 * value))
    return rows


def as_tuples(rows):
    return [(r["kind"], r["epoch"], r["iteration"], r["step"], r["name"], r["value"]) for r in rows]


def assert_rows(path, expected):
    with open(path) as stream:
        assert stream.readline().strip() == ",".join(COLUMNS)
    actual = as_tuples(read_metrics(path))
    assert [row[:5] for row in actual] == [row[:5] for row in expected]
    np.testing.assert_allclose([row[5] for row in actual], [row[5] for row in expected], rtol=1e-12)


def assert_picture(path):
    image = np.asarray(Image.open(path).convert("RGB"))
    assert image.shape[0] > 200 and image.shape[1] > 200
    # Not blank: many distinct colours (lines, text, axes), plenty of non-white pixels.
    assert len(np.unique(image.reshape(-1, 3), axis=0)) > 20
    assert (image.min(axis=2) < 200).mean() > 0.01


def scalars(log_dir):
    # setup.sh installs tensorboard (requirements-dev.txt): a broken install fails here instead of skipping.
    from tensorboard.backend.event_processing import event_accumulator

    events = event_accumulator.EventAccumulator(log_dir)
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_writes_csv_png_and_tensorboard(tmp_path, umask_022):
    out = str(tmp_path)
    train(MetricsLogHook(), FakeTrainer(out), range(1, 4))
    csv_path = os.path.join(out, "metrics.csv")
    assert_rows(csv_path, expected_rows(range(1, 4)))
    assert stat.S_IMODE(os.stat(csv_path).st_mode) == 0o644
    assert_picture(os.path.join(out, "curves.png"))
    assert stat.S_IMODE(os.stat(os.path.join(out, "curves.png")).st_mode) == 0o644
    logged = scalars(os.path.join(out, "tensorboard"))
    assert [step for step, _ in logged["train/loss"]] == [2, 4, 6, 8, 10, 12]
    np.testing.assert_allclose([v for _, v in logged["train/loss"]],
                               [loss_at(e, i) for e in (1, 2, 3) for i in (2, 4)], rtol=1e-6)
    assert logged["eval/SynthAG_ALL/mAP"] == [(4, pytest.approx(10.0)), (8, pytest.approx(20.0)),
                                              (12, pytest.approx(30.0))]
    assert "train/loss/triplet" in logged and "train/images_per_second" in logged


def test_resume_drops_the_epochs_trained_again(tmp_path):
    out = str(tmp_path)
    # First run: epochs 1-3 then interrupted; its last checkpoint holds 2 finished epochs.
    train(MetricsLogHook(), FakeTrainer(out), range(1, 4), eval_every=2)
    train(MetricsLogHook(), FakeTrainer(out, start_epoch=3), range(3, 5), eval_every=2)
    assert_rows(os.path.join(out, "metrics.csv"), expected_rows(range(1, 5), eval_every=2))
    logged = scalars(os.path.join(out, "tensorboard"))
    assert [step for step, _ in logged["train/loss"]] == [2, 4, 6, 8, 10, 12, 14, 16]
    assert [step for step, _ in logged["eval/SynthAG_ALL/R1"]] == [8, 16]


def test_without_matplotlib_and_tensorboard_logs_once_and_writes_the_csv(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    out = str(tmp_path)
    with caplog.at_level(logging.INFO, logger="processor.metrics_log"):
        train(MetricsLogHook(), FakeTrainer(out), range(1, 3))
    assert_rows(os.path.join(out, "metrics.csv"), expected_rows(range(1, 3)))
    assert sorted(os.listdir(out)) == ["metrics.csv"]
    messages = [r.getMessage() for r in caplog.records]
    assert sum("matplotlib is not installed" in m for m in messages) == 1
    assert sum("tensorboard package is not installed" in m for m in messages) == 1


def test_tensorboard_switched_off(tmp_path):
    out = str(tmp_path)
    train(MetricsLogHook(), FakeTrainer(out, tensorboard=False), range(1, 2))
    assert not os.path.exists(os.path.join(out, "tensorboard"))
    assert os.path.isfile(os.path.join(out, "metrics.csv"))


def test_only_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics_log, "is_main_process", lambda: False)
    out = str(tmp_path / "run")
    train(MetricsLogHook(), FakeTrainer(out), range(1, 3))
    assert not os.path.exists(out)


def test_with_the_real_trainer(tmp_path, single_thread):
    """Two tiny epochs of the real training loop with the default hooks plus this one."""
    root, out = str(tmp_path / "data"), str(tmp_path / "run")
    generate_synthag(root, SynthConfig(num_ids=16, images_per_id=12, height=64, width=32, seed=0), num_workers=1)
    cfg = load_config(BASELINE, tiny(root, out, epochs=2))
    bundle = make_dataloaders(cfg)
    model_args = model_args_from_dataset(bundle.dataset)
    torch.manual_seed(0)
    model = build_from_args(cfg, model_args, torch.device("cpu"))
    criterion = build_criterion(cfg, model, model_args["num_classes"])
    eval_data = protocol_of_bundle(bundle)
    trainer = Trainer(cfg, model, criterion, bundle.train_loader, eval_data, torch.device("cpu"), model_args)
    assert [type(hook) for hook in trainer.hooks][-3:] == [EvalHook, MetricsLogHook, CheckpointHook]
    trainer.fit()
    rows = read_metrics(os.path.join(out, "metrics.csv"))
    train_losses = [r for r in rows if r["name"] == "loss"]
    # The identity sampler's number of batches differs between epochs: steps count the real ones.
    lengths = {e: max(r["iteration"] for r in train_losses if r["epoch"] == e) for e in (1, 2)}
    assert [(r["epoch"], r["iteration"], r["step"]) for r in train_losses] == [
        (e, i, i + (lengths[1] if e == 2 else 0)) for e in (1, 2) for i in range(1, lengths[e] + 1)
        if i % 2 == 0 or i == lengths[e]]
    assert {r["name"] for r in rows if r["kind"] == "train"} == {
        "loss/id", "loss/triplet", "loss", "accuracy", "lr", "images_per_second"}
    eval_rows = {(r["epoch"], r["name"]): r["value"] for r in rows if r["kind"] == "eval"}
    assert sorted({epoch for epoch, _ in eval_rows}) == [1, 2]
    assert eval_rows[(2, "SynthAG_ALL/mAP")] == pytest.approx(100 * trainer.last_eval[1]["mAP"])
    assert_picture(os.path.join(out, "curves.png"))


def test_curves_are_redrawn_after_evaluations_at_most_once_a_minute_between_and_at_the_end(tmp_path, monkeypatch):
    """Five epochs, an evaluation after epoch 4, a clock at 40 s an epoch: drawn after epoch 1 (the first),
    epoch 3 (80 s after the last), epoch 4 (evaluated) and at the end (epoch 5's rows not yet shown)."""
    clock = {"now": 0.0}
    monkeypatch.setattr(metrics_log.time, "monotonic", lambda: clock["now"])
    drawn = []
    real_plot = metrics_log.plot_curves

    def plot(rows, path):
        drawn.append(max(row["epoch"] for row in rows))
        return real_plot(rows, path)

    monkeypatch.setattr(metrics_log, "plot_curves", plot)
    out = str(tmp_path)
    hook, trainer = MetricsLogHook(), FakeTrainer(out)
    hook.trainer = trainer
    hook.before_train()
    for epoch in range(1, 6):
        clock["now"] += 40.0
        hook.after_log({"epoch": epoch, "iteration": ITERATIONS, "num_iterations": ITERATIONS,
                        "losses": {"id": 1.0 / epoch}, "loss": 1.0 / epoch, "accuracy": 0.1 * epoch, "lr": 1e-3,
                        "images_per_second": 100.0})
        if epoch == 4:
            trainer.last_eval = (epoch, metrics_at(epoch))
        hook.after_epoch(epoch)
    assert drawn == [1, 3, 4]
    hook.after_train()
    assert drawn == [1, 3, 4, 5]
    assert_picture(os.path.join(out, "curves.png"))
    hook.after_train()  # nothing new to show: not drawn again
    assert drawn == [1, 3, 4, 5]

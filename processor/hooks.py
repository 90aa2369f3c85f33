"""Trainer hooks: code that runs around the training loop at fixed points (detectron2-style).

A hook subclasses ``HookBase`` and overrides any of ``before_train``, ``before_epoch(epoch)``,
``before_step(batch)``, ``after_step(batch, outputs, terms)``, ``after_log(info)``, ``after_epoch(epoch)`` and
``after_train``; ``self.trainer`` is the ``processor.trainer.Trainer`` it is registered with (``trainer.epoch``
and ``trainer.iteration`` say where the loop is). Hooks run in registration order; ``default_hooks`` in
``processor/trainer.py`` is the one place that lists a training run's hooks.
"""
import datetime
import logging
import os
import time

import torch

from processor.faults import fault_point
from processor.inference import evaluate
from processor.run_state import DivergedError
from utils.distributed import get_world_size, unwrap
from utils.threads import rebalance_core_share

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "checkpoint_last.pth"
BEST_CHECKPOINT = "model_best.pth"
FINAL_CHECKPOINT = "model_final.pth"


def weights_file(cfg, model, model_args, epoch, **extra):
    """The content of a weights-only file (model_best/model_final/periodic): enough for test_svpr.py."""
    return {"model": unwrap(model).state_dict(), "model_args": model_args, "epoch": epoch,
            "config": cfg.dump(), **extra}


def format_duration(seconds):
    """``H:MM:SS`` of a number of seconds (for ETAs in the log)."""
    return str(datetime.timedelta(seconds=max(0, int(round(seconds)))))


class HookBase:
    """No-op hook; ``trainer`` is set by ``Trainer.register_hook``."""

    trainer = None

    def before_train(self):
        """Before the first epoch of this run (also after a resume)."""

    def before_epoch(self, epoch):
        """Before the first batch of ``epoch``."""

    def before_step(self, batch):
        """Before the forward pass of one batch (on the device)."""

    def after_step(self, batch, outputs, terms):
        """After the optimiser steps of one batch: its model ``outputs`` and weighted loss ``terms`` ({name:
        scalar tensor}, not detached; reading a value waits for the device)."""

    def after_log(self, info):
        """Every SOLVER.LOG_PERIOD iterations and at the end of an epoch, with ``info``: ``epoch``,
        ``iteration``, ``num_iterations``, ``losses`` ({term: mean since the epoch began}, floats), ``loss``
        (their sum), ``accuracy``, ``lr``, ``images_per_second``."""

    def after_epoch(self, epoch):
        """After ``epoch`` was trained and the learning-rate schedule stepped for the next epoch (before this
        one, for models that step it at the start of every epoch; ``trainer.last_eval`` holds ``(epoch,
        metrics)`` of the latest evaluation)."""

    def after_train(self):
        """After the last epoch."""


class FaultInjectionHook(HookBase):
    """The test suite's deterministic faults (``processor/faults.py``) at the planned iteration of the main
    loop: a signal to this process, or NaN images, whose non-finite loss the divergence check must catch."""

    def before_step(self, batch):
        if fault_point("stage2", self.trainer.epoch, self.trainer.iteration):
            batch["images"].fill_(float("nan"))


class DivergenceHook(HookBase):
    """Stops the run with a one-line ``DivergedError`` naming the epoch, iteration and loss term when a loss
    term is NaN or infinite. Checked every SOLVER.LOG_PERIOD iterations and at the end of each epoch, before
    anything of the epoch is written, so ``checkpoint_last.pth`` keeps the last good state; between checks the
    flags stay on the device (no synchronisation per step)."""

    def before_epoch(self, epoch):
        self.first_bad = None  # (T,) per loss term, the first iteration where it was non-finite; 0 = never

    def after_step(self, batch, outputs, terms):
        trainer = self.trainer
        iteration = trainer.iteration
        flags = torch.stack([~torch.isfinite(value.detach()).all() for value in terms.values()])
        self.first_bad = flags * iteration if self.first_bad is None else \
            torch.where((self.first_bad == 0) & flags, iteration, self.first_bad)
        if iteration % trainer.cfg.SOLVER.LOG_PERIOD and iteration != trainer.num_iterations:
            return
        if not bool(self.first_bad.any()):
            return
        iterations = self.first_bad.tolist()
        first = min(i for i in iterations if i)
        names = [name for name, i in zip(terms, iterations) if i == first]
        raise DivergedError(
            f"loss term {', '.join(names)} is not finite at epoch {trainer.epoch} iteration {first}: training "
            f"stopped; {os.path.join(trainer.output_dir, LAST_CHECKPOINT)} keeps the state after epoch "
            f"{trainer.epoch - 1} (try a lower SOLVER.BASE_LR, or SOLVER.AMP_DTYPE bfloat16)")


class TrainingLogHook(HookBase):
    """Running means of the loss terms and the training accuracy; every SOLVER.LOG_PERIOD iterations and at the
    end of an epoch a log line (losses by term, accuracy, learning rate, images/s, ETA of the epoch and of the
    run) and the ``after_log`` event for the other hooks; one summary line per epoch. Sums stay on the
    device until a line is written."""

    def before_epoch(self, epoch):
        self.sums, self.count, self.correct, self.seen = {}, 0, 0, 0
        self.lr = self.trainer.optimizer.param_groups[0]["lr"]
        self.start = time.time()

    def after_step(self, batch, outputs, terms):
        trainer = self.trainer
        for name, value in terms.items():
            self.sums[name] = self.sums.get(name, 0.0) + value.detach().float()
        self.count += 1
        self.correct = self.correct + (next(iter(outputs.id_logits.values())).argmax(1) == batch["pids"]).sum()
        self.seen += batch["pids"].numel()
        iteration, num_batches = trainer.iteration, trainer.num_iterations
        if iteration % max(1, trainer.cfg.SOLVER.LOG_PERIOD) and iteration != num_batches:
            return
        elapsed = time.time() - self.start
        losses = {name: float(total) / self.count for name, total in self.sums.items()}
        info = {"epoch": trainer.epoch, "iteration": iteration, "num_iterations": num_batches, "losses": losses,
                "loss": sum(losses.values()), "accuracy": float(self.correct) / max(self.seen, 1), "lr": self.lr,
                "images_per_second": self.seen * get_world_size() / max(elapsed, 1e-9)}
        parts = ", ".join(f"{name} {value:.3f}" for name, value in losses.items())
        # ETAs from this epoch's pace (evaluations not included).
        epoch_seconds = elapsed / self.count * num_batches
        epoch_eta = epoch_seconds - elapsed
        run_eta = epoch_eta + epoch_seconds * (trainer.cfg.SOLVER.MAX_EPOCHS - trainer.epoch)
        logger.info("epoch %d iter %d/%d: loss %.3f (%s), acc %.3f, lr %.2e, %.1f img/s, ETA epoch %s, run %s",
                    trainer.epoch, iteration, num_batches, info["loss"], parts, info["accuracy"], self.lr,
                    info["images_per_second"], format_duration(epoch_eta), format_duration(run_eta))
        trainer.call_hooks("after_log", info)

    def after_epoch(self, epoch):
        if self.count:
            elapsed = time.time() - self.start
            logger.info("epoch %d done in %.1f s: loss %.3f, acc %.3f, %.1f img/s", epoch, elapsed,
                        float(sum(self.sums.values())) / self.count, float(self.correct) / max(self.seen, 1),
                        self.seen * get_world_size() / elapsed)


class EvalHook(HookBase):
    """Every ``SOLVER.EVAL_PERIOD`` epochs and after the last one: evaluate the first test protocol, keep the
    best mAP and write its weights to ``model_best.pth``."""

    def after_epoch(self, epoch):
        trainer = self.trainer
        cfg = trainer.cfg
        if epoch % cfg.SOLVER.EVAL_PERIOD and epoch != cfg.SOLVER.MAX_EPOCHS:
            return
        protocol = trainer.eval_data
        name = protocol.name
        # After the last epoch the final evaluation follows with the same weights: its protocols over the same
        # images (e.g. SynthAG_AGAG after SynthAG_ALL) reuse these features instead of embedding them again.
        embedded = [] if epoch == cfg.SOLVER.MAX_EPOCHS else None
        metrics = evaluate(cfg, trainer.model, protocol.loader, protocol.num_query, trainer.device,
                           protocol.view_mode, desc=f"eval {name}", embedded=embedded)
        trainer.last_eval = (epoch, metrics)
        trainer.last_embedded = embedded
        improved = metrics["mAP"] > trainer.best["mAP"]
        if improved:
            trainer.best = {"mAP": metrics["mAP"], "epoch": epoch}
            trainer.save(BEST_CHECKPOINT, weights_file(cfg, trainer.model, trainer.model_args, epoch,
                                                       mAP=metrics["mAP"]))
        logger.info("epoch %d %s: mAP %.2f%%  R1 %.2f%%  R5 %.2f%%  R10 %.2f%%  mINP %.2f%%%s", epoch, name,
                    100 * metrics["mAP"], 100 * metrics["cmc"][0], 100 * metrics["cmc"][4],
                    100 * metrics["cmc"][9], 100 * metrics["mINP"],
                    "  (best so far)" if improved else f"  (best {100 * trainer.best['mAP']:.2f}% at epoch "
                                                       f"{trainer.best['epoch']})")


class CheckpointHook(HookBase):
    """After every epoch: ``checkpoint_last.pth`` (full training state) and, every
    ``SOLVER.CHECKPOINT_PERIOD`` epochs, ``<MODEL.NAME>_<epoch>.pth`` weights.

    Registered after ``EvalHook``: evaluation draws from the RNGs too, and a resumed run must continue from
    the same RNG state as the uninterrupted one.
    """

    def after_epoch(self, epoch):
        trainer = self.trainer
        trainer.save(LAST_CHECKPOINT, trainer.state_dict(epoch))
        if epoch % trainer.cfg.SOLVER.CHECKPOINT_PERIOD == 0:
            trainer.save(f"{trainer.cfg.MODEL.NAME}_{epoch}.pth",
                         weights_file(trainer.cfg, trainer.model, trainer.model_args, epoch))


class CoreShareHook(HookBase):
    """Re-sizes this process's CPU threads before every epoch when other runs on the machine started or
    ended (``utils/threads.py``; a no-op when DIST.CPU_THREADS or OMP_NUM_THREADS fix them)."""

    def before_epoch(self, epoch):
        rebalance_core_share()

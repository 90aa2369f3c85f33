"""The training loop (ReID fine-tuning) with hooks, and exact resume.

``Trainer.fit`` is a plain epoch/batch loop; ``run_step`` is one optimisation step; everything around them
(logging, divergence stop, evaluation, checkpoints, curves, fault injection) is a hook
(``processor/hooks.py``), and ``default_hooks`` is the one place that lists them. ``checkpoint_last.pth``
holds everything needed to continue exactly: model, optimisers, scheduler, gradient scaler, epoch, best
score, every rank's RNG states and the config. It is written before the first epoch and after every epoch,
so it always holds the state at the start of the epoch in progress: after any interruption (Ctrl-C,
SIGTERM, SIGKILL, a crash) ``--resume`` restarts that epoch from its beginning, and the epoch's batches and
augmentations depend only on (seed, epoch, rank), so the result is bit-identical to an uninterrupted run.
"""
import logging
import os

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from processor.faults import fault_injection_planned
from processor.hooks import (LAST_CHECKPOINT, CheckpointHook, CoreShareHook, DivergenceHook, EvalHook,
                             FaultInjectionHook, TrainingLogHook)
from processor.metrics_log import MetricsLogHook
from processor.run_state import restore_rng, rng_states
from solver import make_optimizer, make_scheduler
from utils.amp import fp32_loss, make_grad_scaler, precision_context, training_precision
from utils.checkpoint import load_newest_intact, previous_checkpoint, save_checkpoint
from utils.device import to_device
from utils.distributed import barrier, get_rank, is_initialized, is_main_process, unwrap
from utils.errors import CheckpointError
from utils.logger import show_progress

logger = logging.getLogger(__name__)


def default_hooks(cfg):
    """The hooks of a training run, in the order they must run: faults (tests only) and the divergence check
    before anything reads the step's losses, evaluation before the checkpoint (it draws from the RNGs that
    the checkpoint saves), curves after the evaluation they plot and before the checkpoint (a run killed between
    the two trains the epoch again and rewrites its rows, instead of missing them)."""
    hooks = [FaultInjectionHook()] if fault_injection_planned() else []
    return hooks + [CoreShareHook(), DivergenceHook(), TrainingLogHook(), EvalHook(), MetricsLogHook(),
                    CheckpointHook()]


class Trainer:
    """Trains ``model`` with ``criterion`` on ``train_loader``; ``eval_data`` is the
    ``evaluation.protocols.EvaluationProtocol`` of the periodic evaluation. ``hooks`` default to
    ``default_hooks(cfg)``. Loss terms with parameters of their own (``loss.LossTerm.make_optimizer``) get
    their own optimiser, stepped after the model's."""

    def __init__(self, cfg, model, criterion, train_loader, eval_data, device, model_args, hooks=None):
        self.cfg = cfg
        self.device = device
        self.model_args = model_args
        self.model = model
        self.criterion = criterion
        self.train_loader = train_loader
        self.eval_data = eval_data
        self.optimizer = make_optimizer(cfg, model)
        self.term_optimizers = {name: optimizer for name, term in criterion.terms.items()
                                if (optimizer := getattr(term, "make_optimizer", lambda cfg: None)(cfg))}
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.scaler = make_grad_scaler(cfg, device)
        self.precision = training_precision(cfg, device)
        self.loss_in_fp32 = fp32_loss(cfg, device)
        self.skipped_steps = 0  # steps of the current epoch the gradient scaler skipped (inf/NaN fp16 gradients)
        self.start_epoch = 1
        self.epoch = self.iteration = self.num_iterations = 0
        self._rng_to_restore = None  # RNG states of a resumed checkpoint, restored when fit() starts
        self.best = {"mAP": -1.0, "epoch": 0}
        self.last_eval = (None, None)  # (epoch, metrics) of the latest evaluation on the first test protocol
        self.last_embedded = None  # its features after the last epoch (see EvalHook), for the final evaluation
        self.training_data = None  # fingerprint of the training set (processor.run_state), stored in checkpoints
        self.output_dir = cfg.OUTPUT_DIR
        self.hooks = []
        for hook in (hooks if hooks is not None else default_hooks(cfg)):
            self.register_hook(hook)
        self.train_model = model
        if is_initialized():
            # Some parameters get no gradient in a given configuration (e.g. CLIP's unused projection).
            self.train_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)
        if cfg.SOLVER.COMPILE:
            # Only the training forward: checkpoints read ``model`` itself, evaluation calls it eagerly.
            self.train_model = torch.compile(self.train_model)

    def register_hook(self, hook):
        """Add ``hook`` (a ``processor.hooks.HookBase``) after the existing ones."""
        hook.trainer = self
        self.hooks.append(hook)

    def call_hooks(self, stage, *args):
        """Call ``stage`` (e.g. ``"after_log"``) of every hook, in order."""
        for hook in self.hooks:
            getattr(hook, stage)(*args)

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch):
        """Everything needed to continue after ``epoch`` completed epochs (call it on every rank)."""
        return {
            "model": unwrap(self.model).state_dict(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "term_optimizers": {name: optimizer.state_dict() for name, optimizer in self.term_optimizers.items()},
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best": dict(self.best),
            "rng": rng_states(),
            "config": self.cfg.dump(),
            "model_args": self.model_args,
            "training_data": self.training_data,
        }

    def resume(self, path):
        """Restore the state saved in ``path`` (a checkpoint_last.pth), or in its previous version when ``path``
        is missing or damaged; the next epoch is restarted from it."""
        state, path = load_newest_intact([path, previous_checkpoint(path)], map_location=self.device, set_aside=True)
        try:
            unwrap(self.model).load_state_dict(state["model"])
            self.criterion.load_state_dict(state["criterion"])
            self.optimizer.load_state_dict(state["optimizer"])
            # Checkpoints of earlier versions stored the center loss's optimiser alone.
            saved = state.get("term_optimizers") or {"center": state.get("center_optimizer")}
            for name, optimizer in self.term_optimizers.items():
                if saved.get(name):
                    optimizer.load_state_dict(saved[name])
            self.scheduler.load_state_dict(state["scheduler"])
            self.scaler.load_state_dict(state["scaler"])
            self.best = {"mAP": float(state["best"]["mAP"]), "epoch": int(state["best"]["epoch"])}
            self.start_epoch = int(state["epoch"]) + 1
            self._rng_to_restore = state["rng"]
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            reason = " ".join(str(exc).split())[:200]
            raise CheckpointError(f"cannot resume from {path}: it does not fit this model and config ({reason})") \
                from None
        logger.info("resumed from %s: %d epochs done, best mAP %.2f%% at epoch %d", path, state["epoch"],
                    100 * max(self.best["mAP"], 0), self.best["epoch"])

    def save(self, name, content):
        """Write ``content`` atomically to ``OUTPUT_DIR/name`` (rank 0 only); the previous checkpoint_last.pth is
        kept as checkpoint_prev.pth."""
        if is_main_process():
            path = os.path.join(self.output_dir, name)
            save_checkpoint(content, path, previous=previous_checkpoint(path) if name == LAST_CHECKPOINT else None)

    # ------------------------------------------------------------------ loop
    def _seed_epoch(self, epoch):
        """Make the epoch's sample order and worker augmentation seeds depend only on (seed, epoch, rank).

        The interrupted and the uninterrupted run then see identical batches, which makes resume exact.
        """
        for sampler in (getattr(self.train_loader, "sampler", None), getattr(self.train_loader, "batch_sampler", None)):
            if hasattr(sampler, "set_epoch"):
                sampler.set_epoch(epoch)
        generator = getattr(self.train_loader, "generator", None)
        if generator is not None:
            generator.manual_seed(self.cfg.SOLVER.SEED * 100003 + epoch * 1009 + get_rank())

    def fit(self):
        """Train from ``start_epoch`` to ``SOLVER.MAX_EPOCHS``; return the number of the last epoch."""
        max_epochs = self.cfg.SOLVER.MAX_EPOCHS
        if self._rng_to_restore is not None:
            restore_rng(self._rng_to_restore)
            self._rng_to_restore = None
        elif self.start_epoch == 1:
            # The state before epoch 1, so that even an interruption in the first epoch can be resumed.
            self.save(LAST_CHECKPOINT, self.state_dict(0))
        # The model says when the schedule steps (ReIDModel.lr_step_at_epoch_start); either way the checkpoint
        # after epoch e holds the schedule as it was after that epoch, so a resume steps exactly as a full run.
        step_first = getattr(unwrap(self.model), "lr_step_at_epoch_start", False)
        self.call_hooks("before_train")
        for epoch in range(self.start_epoch, max_epochs + 1):
            self._seed_epoch(epoch)
            if step_first:
                self.scheduler.step()
            try:
                self.train_one_epoch(epoch)
            except (KeyboardInterrupt, SystemExit):
                logger.warning("interrupted in epoch %d: %s holds the state after epoch %d; --resume restarts "
                               "epoch %d from there", epoch, LAST_CHECKPOINT, epoch - 1, epoch)
                raise
            if not step_first:
                self.scheduler.step()
            self.call_hooks("after_epoch", epoch)
            barrier()
        self.call_hooks("after_train")
        return max_epochs

    def train_one_epoch(self, epoch):
        """One pass over the training loader."""
        self.epoch, self.num_iterations = epoch, len(self.train_loader)
        self.skipped_steps = 0
        self.train_model.train()
        self.call_hooks("before_epoch", epoch)
        bar = tqdm(total=self.num_iterations, desc=f"epoch {epoch}", leave=False,
                   disable=not show_progress(get_rank()))
        for self.iteration, batch in enumerate(self.train_loader, start=1):
            batch = to_device(batch, self.device)
            self.call_hooks("before_step", batch)
            outputs, terms = self.run_step(batch)
            self.call_hooks("after_step", batch, outputs, terms)
            bar.update(1)
        bar.close()
        if self.skipped_steps:
            logger.warning("epoch %d: the gradient scaler skipped %d of %d steps (fp16 gradients overflowed); "
                           "scale now %g", epoch, self.skipped_steps, self.num_iterations, self.scaler.get_scale())

    def run_step(self, batch):
        """Forward, weighted loss terms, backward and optimiser steps on one batch; ``(outputs, terms)``."""
        self.optimizer.zero_grad(set_to_none=True)
        for optimizer in self.term_optimizers.values():
            optimizer.zero_grad(set_to_none=True)
        with precision_context(self.precision, self.device):
            outputs = self.train_model(batch["images"], **unwrap(self.model).forward_inputs(batch))
            if not self.loss_in_fp32:
                terms = self.criterion(outputs, batch)
        if self.loss_in_fp32:  # bf16: every loss term in fp32, outside autocast (utils/amp.py)
            terms = self.criterion(outputs.float(), batch)
        loss = sum(terms.values())
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        for name, optimizer in self.term_optimizers.items():
            self.scaler.unscale_(optimizer)
            self.criterion.terms[name].prepare_gradients()
            self.scaler.step(optimizer)
        if self.scaler.is_enabled():
            # scaler.step has already synchronised to read the overflow flags, so reading the scale costs nothing.
            scale = self.scaler.get_scale()
            self.scaler.update()
            self.skipped_steps += self.scaler.get_scale() < scale
        else:
            self.scaler.update()
        return outputs, terms

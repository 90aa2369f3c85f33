"""The training loop (ReID fine-tuning) with hooks for evaluation and checkpoints, and exact resume.

``Trainer.fit`` is a plain epoch/batch loop; what happens around it is a list of hooks
(``processor/hooks.py``): by default ``EvalHook`` (periodic evaluation, best weights) and
``CheckpointHook`` (``checkpoint_last.pth`` after every epoch, periodic weights). ``checkpoint_last.pth``
holds everything needed to continue exactly: model, optimisers, scheduler, gradient scaler, epoch, best
score, every rank's RNG states and the config. It is written before the first epoch and after every
epoch, so it always holds the state at the start of the epoch in progress: after any interruption
(Ctrl-C, SIGTERM, SIGKILL, a crash) ``--resume`` restarts that epoch from its beginning, and the epoch's
batches and augmentations depend only on (seed, epoch, rank), so the result is bit-identical to an
uninterrupted run. A non-finite loss stops the run before anything of that epoch is written.
"""
import datetime
import logging
import os
import time

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from processor.common import autocast, make_grad_scaler, show_progress, to_device, unwrap
from processor.faults import fault_point
from processor.hooks import LAST_CHECKPOINT, CheckpointHook, EvalHook
from solver import make_optimizer, make_scheduler
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.distributed import (all_gather_object, barrier, get_rank, get_world_size, is_initialized,
                               is_main_process)
from utils.errors import CheckpointError, UserError
from utils.seed import get_rng_state, set_rng_state

logger = logging.getLogger(__name__)


def format_duration(seconds):
    """``H:MM:SS`` of a number of seconds (for ETAs in the log)."""
    return str(datetime.timedelta(seconds=max(0, int(round(seconds)))))


class DivergedError(UserError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def rng_states():
    """Every rank's RNG states, in rank order (a collective under torchrun: call it on every rank)."""
    return all_gather_object(get_rng_state())


def restore_rng(states):
    """Restore this rank's entry of :func:`rng_states` (a single state dict is accepted too)."""
    if isinstance(states, (list, tuple)):
        states = states[get_rank() % len(states)]
    set_rng_state(states)


class Trainer:
    """Trains ``model`` with ``criterion`` on ``train_loader``; ``eval_data`` is the
    ``evaluation.protocols.EvaluationProtocol`` of the periodic evaluation. ``hooks`` default to evaluation +
    checkpoints."""

    def __init__(self, cfg, model, criterion, train_loader, eval_data, device, model_args, hooks=None):
        self.cfg = cfg
        self.device = device
        self.model_args = model_args
        self.model = model
        self.criterion = criterion
        self.train_loader = train_loader
        self.eval_data = eval_data
        self.optimizer, self.center_optimizer = make_optimizer(cfg, model, criterion.center_loss)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.scaler = make_grad_scaler(cfg, device)
        self.start_epoch = 1
        self._rng_to_restore = None  # RNG states of a resumed checkpoint, restored when fit() starts
        self.best = {"mAP": -1.0, "epoch": 0}
        self.last_eval = (None, None)  # (epoch, metrics) of the latest evaluation on the first test protocol
        self.output_dir = cfg.OUTPUT_DIR
        self.hooks = []
        for hook in (hooks if hooks is not None else [EvalHook(), CheckpointHook()]):
            self.register_hook(hook)
        self.train_model = model
        if is_initialized():
            # Some parameters get no gradient in a given configuration (e.g. CLIP's unused projection).
            self.train_model = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=True)

    def register_hook(self, hook):
        """Add ``hook`` (a ``processor.hooks.HookBase``) after the existing ones."""
        hook.trainer = self
        self.hooks.append(hook)

    def _call_hooks(self, stage, *args):
        for hook in self.hooks:
            getattr(hook, stage)(*args)

    # ------------------------------------------------------------------ state
    def state_dict(self, epoch):
        """Everything needed to continue after ``epoch`` completed epochs (call it on every rank)."""
        return {
            "model": unwrap(self.model).state_dict(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "center_optimizer": self.center_optimizer.state_dict() if self.center_optimizer else None,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "best": dict(self.best),
            "rng": rng_states(),
            "config": self.cfg.dump(),
            "model_args": self.model_args,
        }

    def resume(self, path):
        """Restore the state saved in ``path`` (a checkpoint_last.pth); the next epoch is restarted from it."""
        state = load_checkpoint(path, map_location=self.device)
        try:
            unwrap(self.model).load_state_dict(state["model"])
            self.criterion.load_state_dict(state["criterion"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.center_optimizer and state["center_optimizer"]:
                self.center_optimizer.load_state_dict(state["center_optimizer"])
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
        """Write ``content`` atomically to ``OUTPUT_DIR/name`` (rank 0 only)."""
        if is_main_process():
            save_checkpoint(content, os.path.join(self.output_dir, name))

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
        self._call_hooks("before_train")
        for epoch in range(self.start_epoch, max_epochs + 1):
            self._seed_epoch(epoch)
            try:
                self.train_one_epoch(epoch)
            except (KeyboardInterrupt, SystemExit):
                logger.warning("interrupted in epoch %d: %s holds the state after epoch %d; --resume restarts "
                               "epoch %d from there", epoch, LAST_CHECKPOINT, epoch - 1, epoch)
                raise
            self.scheduler.step()
            self._call_hooks("after_epoch", epoch)
            barrier()
        self._call_hooks("after_train")
        return max_epochs

    def _check_finite(self, epoch, names, first_bad):
        """Raise ``DivergedError`` when a loss term was non-finite (``first_bad``: (T,) first iteration, 0 = never)."""
        if first_bad is None or not bool(first_bad.any()):
            return
        iterations = first_bad.tolist()
        iteration = min(i for i in iterations if i)
        terms = [name for name, i in zip(names, iterations) if i == iteration]
        raise DivergedError(
            f"loss term {', '.join(terms)} is not finite at epoch {epoch} iteration {iteration}: training stopped; "
            f"{os.path.join(self.output_dir, LAST_CHECKPOINT)} keeps the state after epoch {epoch - 1} (try a "
            "lower SOLVER.BASE_LR, or SOLVER.AMP_DTYPE bfloat16)")

    def train_one_epoch(self, epoch):
        """One pass over the training loader."""
        cfg = self.cfg
        self.train_model.train()
        num_batches = len(self.train_loader)
        log_period = max(1, cfg.SOLVER.LOG_PERIOD)
        lr = self.optimizer.param_groups[0]["lr"]
        sums, count, correct, seen = {}, 0, 0, 0
        start = time.time()
        first_bad = None  # (T,) per loss term, the first iteration where it was non-finite; stays on the device
        bar = tqdm(total=num_batches, desc=f"epoch {epoch}", leave=False, disable=not show_progress(get_rank()))
        for iteration, batch in enumerate(self.train_loader, start=1):
            batch = to_device(batch, self.device)
            self.optimizer.zero_grad(set_to_none=True)
            if self.center_optimizer:
                self.center_optimizer.zero_grad(set_to_none=True)
            with autocast(cfg, self.device):
                outputs = self.train_model(batch["images"], **unwrap(self.model).forward_inputs(batch))
                terms = self.criterion(outputs, batch)
                if fault_point("stage2", epoch, iteration):
                    name = next(iter(terms))
                    terms[name] = terms[name] * float("nan")
                loss = sum(terms.values())
            flags = torch.stack([~torch.isfinite(value.detach()).all() for value in terms.values()])
            first_bad = flags * iteration if first_bad is None else \
                torch.where((first_bad == 0) & flags, iteration, first_bad)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            if self.center_optimizer:
                # The center loss weight scales its gradient; undo it so centres move at CENTER_LR.
                self.scaler.unscale_(self.center_optimizer)
                for param in self.criterion.center_loss.parameters():
                    if param.grad is not None:
                        param.grad.mul_(1.0 / cfg.SOLVER.CENTER_LOSS_WEIGHT)
                self.scaler.step(self.center_optimizer)
            self.scaler.update()

            # Running sums stay on the device: reading them (a GPU sync) happens only when logging.
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            count += 1
            correct = correct + (next(iter(outputs.id_logits.values())).argmax(1) == batch["pids"]).sum()
            seen += batch["pids"].numel()
            bar.update(1)
            if iteration % log_period == 0 or iteration == num_batches:
                self._check_finite(epoch, list(terms), first_bad)
                elapsed = time.time() - start
                losses = {name: float(total) / count for name, total in sums.items()}
                info = {"epoch": epoch, "iteration": iteration, "num_iterations": num_batches, "losses": losses,
                        "loss": sum(losses.values()), "accuracy": float(correct) / max(seen, 1), "lr": lr,
                        "images_per_second": seen * get_world_size() / max(elapsed, 1e-9)}
                parts = ", ".join(f"{name} {value:.3f}" for name, value in losses.items())
                # ETAs from this epoch's pace (evaluations not included).
                epoch_seconds = elapsed / count * num_batches
                epoch_eta = epoch_seconds - elapsed
                run_eta = epoch_eta + epoch_seconds * (self.cfg.SOLVER.MAX_EPOCHS - epoch)
                logger.info("epoch %d iter %d/%d: loss %.3f (%s), acc %.3f, lr %.2e, %.1f img/s, ETA epoch %s, "
                            "run %s", epoch, iteration, num_batches, info["loss"], parts, info["accuracy"], lr,
                            info["images_per_second"], format_duration(epoch_eta), format_duration(run_eta))
                self._call_hooks("after_log", info)
        bar.close()
        if count:
            elapsed = time.time() - start
            logger.info("epoch %d done in %.1f s: loss %.3f, acc %.3f, %.1f img/s", epoch, elapsed,
                        float(sum(sums.values())) / count, float(correct) / max(seen, 1),
                        seen * get_world_size() / elapsed)

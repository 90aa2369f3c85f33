"""The engine side of a model's extra training phases (``model.contract.TrainingPhase``, e.g. CLIP-ReID's
prompt learning): epochs, optimiser steps with the config's gradient scaler, a checkpoint after every epoch
with exact resume, divergence stop, fault-injection points and log lines. What is trained, on which data, with
which optimiser and schedule is the phase's own business."""
import logging
import math
import os
import time

from processor.faults import fault_point
from processor.run_state import DivergedError, restore_rng, rng_states
from utils.amp import make_grad_scaler
from utils.checkpoint import load_newest_intact, previous_checkpoint, save_checkpoint
from utils.distributed import is_main_process
from utils.errors import CheckpointError

logger = logging.getLogger(__name__)


def run_phases(cfg, model, dataset, device, resume=False, training_data=None):
    """Run every phase ``model`` lists in ``training_phases`` on the training ``dataset``, in order
    (``training_data``: its fingerprint, stored in the phases' checkpoints)."""
    for phase_class in model.training_phases:
        run_phase(cfg, phase_class(cfg, model, dataset, device), resume, training_data)


def run_phase(cfg, phase, resume=False, training_data=None):
    """Train ``phase`` (or, when this run does not train it, obtain its result), then ``phase.finish()``.

    With ``resume``, a finished phase's saved state is loaded instead of training again, and an interrupted
    one continues after its last saved epoch with the same result as an uninterrupted run. Its checkpoint
    keeps its previous version (``stage1_prev.pth``), the fallback when the newer one is damaged.
    """
    path = os.path.join(cfg.OUTPUT_DIR, phase.checkpoint_name)
    candidates = [path, previous_checkpoint(path)]
    state = None
    if resume and any(os.path.isfile(candidate) for candidate in candidates):
        state, path = load_newest_intact(candidates, map_location=phase.device, set_aside=True)
    if state is not None and state.get("complete"):
        phase.load_state_dict(state, path)
        restore_rng(state["rng"])
        logger.info("%s: loaded this run's result from %s", phase.title, path)
    elif phase.trains():
        _train(cfg, phase, candidates[0], state, training_data)
    else:
        phase.load_result()
    phase.finish()


def _train(cfg, phase, path, state, training_data):
    phase.setup()
    optimizer = phase.make_optimizer()
    scheduler = phase.make_scheduler(optimizer)
    scaler = make_grad_scaler(cfg, phase.device)
    first_epoch = 1
    if state is not None:
        phase.load_state_dict(state, path)
        try:
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            scaler.load_state_dict(state["scaler"])
            restore_rng(state["rng"])
            first_epoch = int(state["epoch"]) + 1
        except (KeyError, TypeError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot resume {phase.title} from {path}: "
                                  f"{' '.join(str(exc).split())[:200]}") from None
        logger.info("%s: resumed from %s after epoch %d", phase.title, path, first_epoch - 1)

    def save(epoch):
        content = {**phase.state_dict(), "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                   "scaler": scaler.state_dict(), "rng": rng_states(), "epoch": epoch,
                   "complete": epoch == phase.max_epochs, "config": cfg.dump(), "training_data": training_data}
        if is_main_process():
            save_checkpoint(content, path, previous=previous_checkpoint(path))

    if state is None:
        save(0)  # an interruption during the first epoch can then be resumed too
    for epoch in range(first_epoch, phase.max_epochs + 1):
        start = time.time()
        total, steps = 0.0, 0
        for payload in phase.batches(epoch):
            optimizer.zero_grad(set_to_none=True)
            loss = phase.loss(payload)
            steps += 1
            fault_point(phase.name, epoch, steps)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            total += loss.item()
        if not math.isfinite(total):
            raise DivergedError(f"{phase.title} loss is not finite at epoch {epoch}: stopped; {path} keeps the state "
                                f"after epoch {epoch - 1} (try a lower learning rate for this phase)")
        scheduler.step()
        save(epoch)
        if epoch % phase.log_period == 0 or epoch in (1, phase.max_epochs):
            logger.info("%s epoch %d/%d: loss %.4f, lr %.2e, %.1f s", phase.title, epoch, phase.max_epochs,
                        total / max(steps, 1), optimizer.param_groups[0]["lr"], time.time() - start)

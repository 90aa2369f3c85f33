"""The training loop (ReID fine-tuning) with hooks for evaluation and checkpoints, and exact resume.

``Trainer.fit`` is a plain epoch/batch loop; what happens around it is a list of hooks
(``processor/hooks.py``): by default ``EvalHook`` (periodic evaluation, best weights) and
``CheckpointHook`` (``checkpoint_last.pth`` after every epoch, periodic weights). ``checkpoint_last.pth``
holds everything needed to continue exactly: model, optimisers, scheduler, gradient scaler, epoch, best
score, RNG states and the config. Ctrl-C saves the state of the epoch in progress first; resuming then
continues with the next batch.
"""
import logging
import os
import time

from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from processor.common import autocast, make_grad_scaler, show_progress, to_device, unwrap
from processor.hooks import LAST_CHECKPOINT, CheckpointHook, EvalHook
from solver import make_optimizer, make_scheduler
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.distributed import barrier, get_rank, get_world_size, is_initialized, is_main_process
from utils.seed import get_rng_state, set_rng_state

logger = logging.getLogger(__name__)


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
        self.skip_iterations = 0
        self._rng_to_restore = None  # RNG state of a resumed checkpoint, restored where the run stopped
        self._iteration = 0  # batches trained in the current epoch (saved on Ctrl-C)
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
    def state_dict(self, epoch, iteration=0):
        """Everything needed to continue: ``epoch`` completed epochs plus ``iteration`` batches of the next."""
        return {
            "model": unwrap(self.model).state_dict(),
            "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "center_optimizer": self.center_optimizer.state_dict() if self.center_optimizer else None,
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": epoch,
            "iteration": iteration,
            "best": dict(self.best),
            "rng": get_rng_state(),
            "config": self.cfg.dump(),
            "model_args": self.model_args,
        }

    def resume(self, path):
        """Restore the state saved in ``path`` (a checkpoint_last.pth)."""
        state = load_checkpoint(path, map_location=self.device)
        unwrap(self.model).load_state_dict(state["model"])
        self.criterion.load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.center_optimizer and state["center_optimizer"]:
            self.center_optimizer.load_state_dict(state["center_optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        self.best = dict(state["best"])
        self.start_epoch = state["epoch"] + 1
        self.skip_iterations = state["iteration"]
        self._rng_to_restore = state["rng"]
        logger.info("resumed from %s: %d epochs done%s, best mAP %.2f%% at epoch %d", path, state["epoch"],
                    f" + {self.skip_iterations} batches" if self.skip_iterations else "",
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
        cfg = self.cfg
        max_epochs = cfg.SOLVER.MAX_EPOCHS
        rng_state = self._rng_to_restore
        if rng_state is not None and not self.skip_iterations:
            set_rng_state(rng_state)
            rng_state = None
        self._call_hooks("before_train")
        for epoch in range(self.start_epoch, max_epochs + 1):
            self._seed_epoch(epoch)
            epoch_done = False
            try:
                self.train_one_epoch(epoch, rng_state)
                epoch_done = True
                rng_state = None
                self.skip_iterations = 0
                self.scheduler.step()
                self._call_hooks("after_epoch", epoch)
            except KeyboardInterrupt:
                logger.warning("interrupted: saving %s before exiting", LAST_CHECKPOINT)
                state = self.state_dict(epoch) if epoch_done else self.state_dict(epoch - 1, self._iteration)
                self.save(LAST_CHECKPOINT, state)
                raise
            barrier()
        self._call_hooks("after_train")
        return max_epochs

    def train_one_epoch(self, epoch, rng_state=None):
        cfg = self.cfg
        self.train_model.train()
        num_batches = len(self.train_loader)
        log_period = max(1, cfg.SOLVER.LOG_PERIOD)
        lr = self.optimizer.param_groups[0]["lr"]
        sums, count, correct, seen = {}, 0, 0, 0
        start = time.time()
        self._iteration = 0
        bar = tqdm(total=num_batches, desc=f"epoch {epoch}", leave=False, disable=not show_progress(get_rank()))
        for iteration, batch in enumerate(self.train_loader, start=1):
            if iteration <= self.skip_iterations:
                # Replays the interrupted epoch's batches without training on them; the RNG state saved at
                # the interruption is restored after the last skipped batch.
                bar.update(1)
                if iteration == self.skip_iterations and rng_state is not None:
                    set_rng_state(rng_state)
                self._iteration = iteration
                continue
            batch = to_device(batch, self.device)
            self.optimizer.zero_grad(set_to_none=True)
            if self.center_optimizer:
                self.center_optimizer.zero_grad(set_to_none=True)
            with autocast(cfg, self.device):
                outputs = self.train_model(batch["images"], **unwrap(self.model).forward_inputs(batch))
                terms = self.criterion(outputs, batch)
                loss = sum(terms.values())
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
            self._iteration = iteration

            # Running sums stay on the device: reading them (a GPU sync) happens only when logging.
            for name, value in terms.items():
                sums[name] = sums.get(name, 0.0) + value.detach().float()
            count += 1
            correct = correct + (next(iter(outputs.id_logits.values())).argmax(1) == batch["pids"]).sum()
            seen += batch["pids"].numel()
            bar.update(1)
            if iteration % log_period == 0 or iteration == num_batches:
                elapsed = time.time() - start
                losses = {name: float(total) / count for name, total in sums.items()}
                info = {"epoch": epoch, "iteration": iteration, "num_iterations": num_batches, "losses": losses,
                        "loss": sum(losses.values()), "accuracy": float(correct) / max(seen, 1), "lr": lr,
                        "images_per_second": seen * get_world_size() / max(elapsed, 1e-9)}
                parts = ", ".join(f"{name} {value:.3f}" for name, value in losses.items())
                logger.info("epoch %d iter %d/%d: loss %.3f (%s), acc %.3f, lr %.2e, %.1f img/s", epoch,
                            iteration, num_batches, info["loss"], parts, info["accuracy"], lr,
                            info["images_per_second"])
                self._call_hooks("after_log", info)
        bar.close()
        if count:
            elapsed = time.time() - start
            logger.info("epoch %d done in %.1f s: loss %.3f, acc %.3f, %.1f img/s", epoch, elapsed,
                        float(sum(sums.values())) / count, float(correct) / max(seen, 1),
                        seen * get_world_size() / elapsed)

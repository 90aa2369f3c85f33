"""Trainer hooks: code that runs around the training loop at fixed points (detectron2-style).

A hook subclasses ``HookBase`` and overrides any of ``before_train``, ``after_log(info)``,
``after_epoch(epoch)`` and ``after_train``; ``self.trainer`` is the ``processor.trainer.Trainer`` it is
registered with. Hooks run in registration order.
"""
import logging

from processor.common import unwrap
from processor.inference import evaluate

logger = logging.getLogger(__name__)

LAST_CHECKPOINT = "checkpoint_last.pth"
BEST_CHECKPOINT = "model_best.pth"
FINAL_CHECKPOINT = "model_final.pth"


def weights_file(cfg, model, model_args, epoch, **extra):
    """The content of a weights-only file (model_best/model_final/periodic): enough for test_svpr.py."""
    return {"model": unwrap(model).state_dict(), "model_args": model_args, "epoch": epoch,
            "config": cfg.dump(), **extra}


class HookBase:
    """No-op hook; ``trainer`` is set by ``Trainer.register_hook``."""

    trainer = None

    def before_train(self):
        """Before the first epoch of this run (also after a resume)."""

    def after_log(self, info):
        """Every SOLVER.LOG_PERIOD iterations and at the end of an epoch, with ``info``: ``epoch``,
        ``iteration``, ``num_iterations``, ``losses`` ({term: mean since the epoch began}, floats), ``loss``
        (their sum), ``accuracy``, ``lr``, ``images_per_second``."""

    def after_epoch(self, epoch):
        """After ``epoch`` was trained and the learning rate stepped (``trainer.last_eval`` holds
        ``(epoch, metrics)`` of the latest evaluation)."""

    def after_train(self):
        """After the last epoch."""


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
        metrics = evaluate(cfg, trainer.model, protocol.loader, protocol.num_query, trainer.device,
                           protocol.view_mode, desc=f"eval {name}")
        trainer.last_eval = (epoch, metrics)
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

"""The engine: training phases (e.g. CLIP-ReID's prompt learning), the training loop with its hooks, and
inference over the test protocols.

``run_training`` and ``run_testing`` are what ``train_svpr.py`` and ``test_svpr.py`` call.
"""
import logging
import os

from datasets import make_dataloaders
from loss import build_criterion
from processor.hooks import BEST_CHECKPOINT, FINAL_CHECKPOINT, LAST_CHECKPOINT, weights_file
from processor.inference import evaluate
from processor.model_io import build_from_args, load_trained_model, model_args_from_dataset
from processor.phases import PHASES
from processor.preflight import check_data
from processor.trainer import Trainer
from utils.checkpoint import save_checkpoint
from utils.distributed import barrier, is_main_process
from utils.errors import ConfigError
from utils.report import format_table, write_results

logger = logging.getLogger(__name__)


def _eval_data(cfg, name, bundle=None):
    """(query+gallery loader, number of queries, view mode) of protocol ``name`` (reusing ``bundle``'s)."""
    if bundle is None or bundle.dataset.name != name:
        bundle = make_dataloaders(cfg, name)
    return bundle.val_loader, bundle.num_query, bundle.dataset.view_mode


def evaluate_protocols(cfg, model, device, train_bundle=None, known=None):
    """Evaluate ``model`` on every protocol of ``DATASETS.TESTS``; return ``{name: metrics}``.

    ``known`` maps protocols already evaluated with these exact weights to their metrics.
    """
    known, results = known or {}, {}
    for name in cfg.DATASETS.TESTS:
        if name in known:
            results[name] = known[name]
            continue
        loader, num_query, view_mode = _eval_data(cfg, name, train_bundle)
        results[name] = evaluate(cfg, model, loader, num_query, device, view_mode, desc=f"test {name}")
    return results


def _report(cfg, results, checkpoint, config_file, epoch):
    if is_main_process():
        logger.info("results (%s, epoch %s):\n%s", checkpoint, epoch, format_table(results))
        write_results(cfg.OUTPUT_DIR, checkpoint, config_file, epoch, results)
        logger.info("wrote %s and results.csv", os.path.join(cfg.OUTPUT_DIR, "results.json"))


def run_training(cfg, device, resume=False, config_file=None):
    """Train ``cfg``'s model, then evaluate the final weights on every test protocol."""
    bundle = make_dataloaders(cfg)
    check_data(cfg, bundle.dataset)
    model_args = model_args_from_dataset(bundle.dataset)
    model = build_from_args(cfg, model_args, device)
    last_path = os.path.join(cfg.OUTPUT_DIR, LAST_CHECKPOINT)
    for phase in model.training_phases:
        PHASES.get(phase)(cfg, model, bundle, device).run(resume)
    criterion = build_criterion(cfg, model, model_args["num_classes"]).to(device)
    first_test = cfg.DATASETS.TESTS[0]
    trainer = Trainer(cfg, model, criterion, bundle.train_loader, (*_eval_data(cfg, first_test, bundle), first_test),
                      device, model_args)
    if resume and os.path.isfile(last_path):  # (resuming in stage 1 has no stage-2 checkpoint yet)
        trainer.resume(last_path)
    last_epoch = trainer.fit()
    final_path = os.path.join(cfg.OUTPUT_DIR, FINAL_CHECKPOINT)
    if is_main_process():
        save_checkpoint(weights_file(cfg, model, model_args, last_epoch), final_path)
    barrier()
    logger.info("best %s mAP during training: %.2f%% at epoch %d (%s); final results use the last epoch's "
                "weights (%s)", first_test, 100 * trainer.best["mAP"], trainer.best["epoch"], BEST_CHECKPOINT,
                FINAL_CHECKPOINT)
    eval_epoch, metrics = trainer.last_eval
    known = {first_test: metrics} if eval_epoch == last_epoch else None
    results = evaluate_protocols(cfg, model, device, bundle, known)
    _report(cfg, results, final_path, config_file, last_epoch)
    return results


def run_testing(cfg, device, config_file=None):
    """Evaluate ``TEST.WEIGHT`` (a training checkpoint or a bare state dict) on ``DATASETS.TESTS``."""
    if not cfg.TEST.WEIGHT:
        raise ConfigError("TEST.WEIGHT is empty: pass the checkpoint to evaluate, e.g. "
                          "TEST.WEIGHT outputs/<run>/model_final.pth")
    model, epoch = load_trained_model(cfg, cfg.TEST.WEIGHT, device)
    results = evaluate_protocols(cfg, model, device)
    _report(cfg, results, cfg.TEST.WEIGHT, config_file, epoch)
    return results


__all__ = ["run_training", "run_testing", "evaluate_protocols"]

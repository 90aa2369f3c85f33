"""The engine: training phases (e.g. CLIP-ReID's prompt learning), the training loop with its hooks, and
inference over the test protocols.

``run_training`` and ``run_testing`` are what ``train_svpr.py`` and ``test_svpr.py`` call.
"""
import glob
import logging
import os

from datasets import make_dataloaders
from loss import build_criterion
from processor.hooks import BEST_CHECKPOINT, FINAL_CHECKPOINT, LAST_CHECKPOINT, weights_file
from processor.inference import RANK_LIST_FOLDER, evaluate
from processor.metrics_log import CURVES_FILE
from processor.model_io import build_training_model, load_trained_model, model_args_from_dataset
from processor.phase_runner import run_phases
from processor.preflight import check_data, check_disk_space, check_resume_data, resume_checkpoint
from processor.run_state import training_data_fingerprint
from processor.trainer import Trainer
from utils.checkpoint import previous_checkpoint, save_checkpoint
from model.sync_batchnorm import convert_sync_batchnorm
from utils.distributed import barrier, get_world_size, is_main_process
from utils.errors import ConfigError
from evaluation.protocols import average_trials, build_evaluation_protocol, protocol_of_bundle
from evaluation.html_report import write_html_report
from evaluation.per_query import name_attributes
from evaluation.report import evaluation_settings, format_table, write_results
from utils.amp import precision_settings, test_precision, training_precision

logger = logging.getLogger(__name__)


def evaluate_protocols(cfg, model, device, protocols=None, known=None, embedded=None):
    """Evaluate ``model`` on every protocol of ``DATASETS.TESTS``; return ``{name: metrics}``.

    ``protocols`` maps names to protocols already built (the others are built here, reading only their
    query and gallery); ``known`` maps protocols already evaluated with these exact weights to their metrics,
    and ``embedded`` holds features already computed with them (see ``processor.inference.evaluate``).
    Each result carries the ``benchmark`` it was measured on (cross-dataset tests name another one than
    training).
    """
    known, results, protocols = known or {}, {}, protocols or {}
    # (embedding_key, features): protocols over the same images and batches embed them once.
    embedded = [] if embedded is None else embedded
    for name in cfg.DATASETS.TESTS:
        protocol = protocols.get(name) or build_evaluation_protocol(cfg, name)
        # Known metrics come without features: protocols whose features are saved or drawn are embedded again.
        if name in known and not cfg.TEST.SAVE_FEATURES and cfg.TEST.VISUALIZE_TOPK <= 0 and protocol.num_trials == 1:
            trials = [known[name]]
        else:
            trials = []
            for trial, (loader, num_query) in enumerate(protocol.trials(cfg)):
                suffix = f" trial {trial + 1}/{protocol.num_trials}" if protocol.num_trials > 1 else ""
                trials.append(evaluate(cfg, model, loader, num_query, device, protocol.view_mode,
                                       desc=f"test {name}{suffix}", name=name if not trial else None,
                                       embedded=embedded))
        # One per-query table per trial, its attribute columns named after the dataset's attributes.
        tables = [name_attributes(trial["per_query"], protocol.dataset.attributes) for trial in trials]
        results[name] = dict(average_trials(trials), per_query=tables, benchmark=protocol.benchmark)
    return results


def _report(cfg, results, checkpoint, config_file, epoch, trained_on=None, initial_weights=None, precision=None):
    if is_main_process():
        logger.info("results (%s, epoch %s):\n%s", checkpoint, epoch, format_table(results))
        document = write_results(cfg.OUTPUT_DIR, checkpoint, config_file, epoch, results,
                                 evaluation_settings(cfg, trained_on, initial_weights, precision))
        # A test run (test_svpr.py) shows the curves of the training run its checkpoint comes from.
        curves = next((path for path in (os.path.join(cfg.OUTPUT_DIR, CURVES_FILE),
                                         os.path.join(os.path.dirname(os.path.abspath(checkpoint)), CURVES_FILE))
                       if os.path.isfile(path)), None)
        grids = sorted(glob.glob(os.path.join(cfg.OUTPUT_DIR, RANK_LIST_FOLDER, "*_grid.png")))
        page = write_html_report(cfg.OUTPUT_DIR, document, curves, grids)
        logger.info("wrote %s", page)
        logger.info("wrote %s and results.csv", os.path.join(cfg.OUTPUT_DIR, "results.json"))


def run_training(cfg, device, resume=False, config_file=None):
    """Train ``cfg``'s model, then evaluate the final weights on every test protocol."""
    bundle = make_dataloaders(cfg)
    datasets = check_data(cfg, bundle.dataset)  # every dataset of the run, read once
    training_data = training_data_fingerprint(bundle.dataset.train, cfg.DATASETS.ROOT_DIR)
    if resume:
        check_resume_data(cfg, resume_checkpoint(cfg.OUTPUT_DIR), training_data)
    model_args = model_args_from_dataset(bundle.dataset)
    model, initial_weights = build_training_model(cfg, model_args, device)
    check_disk_space(cfg, model)
    precision = precision_settings(cfg, device)
    logger.info("precision: training %s; test features %s", training_precision(cfg, device).describe(),
                test_precision(cfg, device).describe())
    last_path = os.path.join(cfg.OUTPUT_DIR, LAST_CHECKPOINT)
    run_phases(cfg, model, bundle.dataset, device, resume, training_data)
    criterion = build_criterion(cfg, model, model_args["num_classes"]).to(device)
    if cfg.SOLVER.SYNC_BN and get_world_size() > 1:
        model = convert_sync_batchnorm(model, device)
    protocols = {name: protocol_of_bundle(bundle) if name == bundle.dataset.name else
                 build_evaluation_protocol(cfg, name, datasets[name]) for name in cfg.DATASETS.TESTS}
    first_test = protocols[cfg.DATASETS.TESTS[0]]
    trainer = Trainer(cfg, model, criterion, bundle.train_loader, first_test, device, model_args)
    trainer.training_data = training_data
    # (Resuming in stage 1 has no stage-2 checkpoint yet.)
    if resume and any(os.path.isfile(path) for path in (last_path, previous_checkpoint(last_path))):
        trainer.resume(last_path)
    last_epoch = trainer.fit()
    final_path = os.path.join(cfg.OUTPUT_DIR, FINAL_CHECKPOINT)
    if is_main_process():
        save_checkpoint(weights_file(cfg, model, model_args, last_epoch, training_precision=precision["training"]),
                        final_path)
    barrier()
    logger.info("best %s mAP during training: %.2f%% at epoch %d (%s); final results use the last epoch's "
                "weights (%s)", first_test.name, 100 * trainer.best["mAP"], trainer.best["epoch"], BEST_CHECKPOINT,
                FINAL_CHECKPOINT)
    eval_epoch, metrics = trainer.last_eval
    final = eval_epoch == last_epoch
    results = evaluate_protocols(cfg, model, device, protocols, {first_test.name: metrics} if final else None,
                                 trainer.last_embedded if final else None)
    _report(cfg, results, final_path, config_file, last_epoch, trained_on=cfg.DATASETS.NAMES,
            initial_weights=initial_weights, precision=precision)
    return results


def run_testing(cfg, device, config_file=None, state=None):
    """Evaluate ``TEST.WEIGHT`` (a training checkpoint or a bare state dict; ``state``: its content, already
    read) on ``DATASETS.TESTS``. Only the test protocols' query and gallery images are read."""
    if not cfg.TEST.WEIGHT:
        raise ConfigError("TEST.WEIGHT is empty: pass the checkpoint to evaluate, e.g. "
                          "TEST.WEIGHT outputs/<run>/model_final.pth")
    model, epoch = load_trained_model(cfg, cfg.TEST.WEIGHT, device, state=state)
    features = test_precision(cfg, device)
    logger.info("precision: test features %s", features.describe())
    # The training precision as the training run recorded it in its final checkpoint (None: not recorded).
    trained = (state or {}).get("training_precision") if isinstance(state, dict) else None
    precision = {"training": trained if trained in ("fp32", "bf16", "fp16") else None, "test_features": features.name}
    results = evaluate_protocols(cfg, model, device)
    _report(cfg, results, cfg.TEST.WEIGHT, config_file, epoch, trained_on=cfg.DATASETS.NAMES, precision=precision)
    return results


__all__ = ["run_training", "run_testing", "evaluate_protocols"]

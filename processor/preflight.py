"""Checks that run before any training, so that a mistake stops the run at startup with one line instead
of after hours: the output folder (no silent overwrite, no silent fresh start, resumable only with the
same config), the images of every split, and every test protocol's query/gallery validity."""
import logging
import os

import numpy as np
import yaml

from configs import get_cfg_defaults, stored_config
from datasets.loader import check_image_files, load_dataset
from model import MODELS
from processor.hooks import LAST_CHECKPOINT
from utils.errors import CheckpointError, ConfigError, DataError
from utils.io import TEMP_PREFIX
from evaluation.ranking import removal_mask

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"


def training_run_files():
    """Files whose presence means OUTPUT_DIR holds a training run: the resumable checkpoints (the main loop's,
    then those of every registered model's extra phases), then the results."""
    phases = {phase.checkpoint_name for name in MODELS.names() for phase in MODELS.get(name).training_phases}
    return (LAST_CHECKPOINT, *sorted(phases), RESULTS_FILE)
# Keys that may change when a run is resumed: run length, logging/evaluation cadence, where things are,
# how data is loaded and how the result is evaluated. Any other difference makes the resume a new run.
# (A model's extra phases add their own keys: ``TrainingPhase.resume_may_change``.)
RESUME_MAY_CHANGE = ("SOLVER.MAX_EPOCHS", "SOLVER.LOG_PERIOD", "SOLVER.EVAL_PERIOD", "SOLVER.CHECKPOINT_PERIOD",
                     "OUTPUT_DIR", "MODEL.DEVICE", "MODEL.PRETRAIN_PATH", "DATASETS.ROOT_DIR",
                     "DATASETS.AUTO_GENERATE", "DATASETS.TESTS", "DATALOADER.NUM_WORKERS", "DATALOADER.CHECK_IMAGES",
                     "DATALOADER.CACHE_IMAGES",
                     "DIST.", "TEST.")


def check_output_dir(output_dir, run_files, resume, overwrite):
    """Decide what a run may do with ``output_dir``; return the checkpoint to resume from (or None).

    Without ``resume``, a folder holding any of ``run_files`` needs ``overwrite`` (which removes them).
    With ``resume`` a checkpoint must exist. Raises a one-line ``ConfigError`` otherwise.
    """
    present = [name for name in run_files if os.path.isfile(os.path.join(output_dir, name))]
    if resume:
        checkpoints = [name for name in run_files if name != RESULTS_FILE]
        for name in checkpoints:
            if name in present:
                return os.path.join(output_dir, name)
        raise ConfigError(f"--resume: OUTPUT_DIR '{output_dir}' holds no {' or '.join(checkpoints)} to resume "
                          "from; drop --resume to start a new run")
    if present and not overwrite:
        raise ConfigError(f"OUTPUT_DIR '{output_dir}' already holds a run ({', '.join(present)}): pass --resume to "
                          "continue it, --overwrite to replace it, or choose another OUTPUT_DIR")
    return None


def remove_run_files(output_dir, run_files):
    """Delete ``run_files`` of a previous run in ``output_dir`` (``--overwrite``), so that nothing of it can be
    resumed or mistaken for the new run's output."""
    for name in run_files:
        path = os.path.join(output_dir, name)
        if os.path.isfile(path):
            os.remove(path)
            logger.info("--overwrite: removed %s of the previous run", path)


def remove_stale_temporaries(output_dir):
    """Delete temporary files of atomic writes that a killed process (SIGKILL, power loss) left behind."""
    for name in os.listdir(output_dir):
        if name.startswith(TEMP_PREFIX):
            os.remove(os.path.join(output_dir, name))
            logger.info("removed %s, left by an interrupted write", os.path.join(output_dir, name))


def check_writable(output_dir):
    """Create ``output_dir`` and check that files can be written there; a one-line ``ConfigError`` otherwise."""
    probe = os.path.join(output_dir, f".write-test-{os.getpid()}")
    try:
        os.makedirs(output_dir, exist_ok=True)
        with open(probe, "w", encoding="utf-8") as handle:
            handle.write("ok")
        os.remove(probe)
    except OSError as exc:
        raise ConfigError(f"OUTPUT_DIR '{output_dir}' is not writable: {exc.strerror or exc}") from None


def _flatten(node, prefix=""):
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = list(value) if isinstance(value, tuple) else value
    return flat


def check_resume_config(cfg, path):
    """The config stored in ``path`` equals ``cfg`` except for :data:`RESUME_MAY_CHANGE`; a one-line
    ``ConfigError`` naming the differing keys otherwise."""
    try:
        stored = yaml.safe_load(stored_config(path))
    except (ConfigError, yaml.YAMLError):
        stored = None
    if not isinstance(stored, dict):
        raise CheckpointError(f"checkpoint {path} holds no readable config; it cannot be resumed")
    stored, current = _flatten(stored), _flatten(yaml.safe_load(cfg.dump()))
    # A key added to the framework after the checkpoint was written counts as unchanged at its default.
    defaults = _flatten(yaml.safe_load(get_cfg_defaults().dump()))
    for key in set(current) - set(stored):
        if key in defaults and current[key] == defaults[key]:
            stored[key] = current[key]
    may_change = RESUME_MAY_CHANGE + tuple(key for name in MODELS.names() for phase in MODELS.get(name).training_phases
                                           for key in phase.resume_may_change)
    differing = sorted(key for key in set(stored) | set(current)
                       if not key.startswith(may_change) and key not in may_change
                       and stored.get(key, "<absent>") != current.get(key, "<absent>"))
    if differing:
        shown = ", ".join(f"{key} ({stored.get(key, '<absent>')!r} -> {current.get(key, '<absent>')!r})"
                          for key in differing[:4])
        more = f" and {len(differing) - 4} more" if len(differing) > 4 else ""
        raise ConfigError(f"--resume: the config differs from the one {path} was trained with: {shown}{more}; "
                          "resume with the same config or start a new run (another OUTPUT_DIR or --overwrite)")


def _label_arrays(samples):
    """``{"pids": (N,), "camids": ..., "viewids": ..., "timeids": ...}`` of a list of samples."""
    return {f"{field}s": np.array([getattr(s, field) for s in samples], dtype=np.int64)
            for field in ("pid", "camid", "viewid", "timeid")}


def count_valid_queries(query, gallery, view_mode, time_mode, chunk=1024):
    """How many queries have at least one true match left in the gallery after the evaluation's removal
    rules (same identity and camera; ``view_mode``/``time_mode`` filters): labels only, no features."""
    query, gallery = _label_arrays(query), _label_arrays(gallery)
    valid = 0
    for start in range(0, len(query["pids"]), chunk):
        rows = {name: values[start:start + chunk] for name, values in query.items()}
        matches, removed = removal_mask(rows, gallery, view_mode, time_mode)  # (chunk, G) each
        valid += int((matches & ~removed).any(axis=1).sum())
    return valid


def check_data(cfg, train_dataset):
    """Read every ``DATASETS.TESTS`` dataset (query and gallery only, unless it is the training set), check that
    each has a valid query, and that every image of every split exists (decodes, with
    ``DATALOADER.CHECK_IMAGES``); one-line errors otherwise. Returns ``{name: dataset}`` of the datasets read,
    for the run to reuse."""
    datasets = {train_dataset.name: train_dataset}
    for name in cfg.DATASETS.TESTS:
        dataset = datasets.get(name) or load_dataset(cfg, name, load_train=False)
        datasets[name] = dataset
        valid = count_valid_queries(dataset.query, dataset.gallery, dataset.view_mode, cfg.TEST.TIME_MODE)
        if not valid:
            raise DataError(f"test protocol {name}: none of its {len(dataset.query)} queries has a true match in its "
                            f"{len(dataset.gallery)} gallery images (view mode {dataset.view_mode}, TEST.TIME_MODE "
                            f"{cfg.TEST.TIME_MODE}); it cannot be evaluated")
    paths = [s.path for dataset in datasets.values() for split in (dataset.train, dataset.query, dataset.gallery)
             for s in split]
    check_image_files(paths, decode=cfg.DATALOADER.CHECK_IMAGES, workers=max(1, cfg.DATALOADER.NUM_WORKERS))
    logger.info("checked %d images of %d datasets%s and %d test protocols before training", len(set(paths)),
                len(datasets), " (decoded)" if cfg.DATALOADER.CHECK_IMAGES else "", len(cfg.DATASETS.TESTS))
    return datasets

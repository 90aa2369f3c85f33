"""Checks that run before any training, so that a mistake stops the run at startup with one line instead
of after hours: the output folder (no silent overwrite, no silent fresh start, resumable only from an intact
checkpoint with the same config and the same training data), its free space, the images of every split, and
every test protocol's query/gallery validity."""
import logging
import os

import numpy as np
import torch
import yaml

from configs import get_cfg_defaults, stored_config
from datasets.loader import check_image_files, load_dataset
from model import MODELS
from processor.hooks import BEST_CHECKPOINT, FINAL_CHECKPOINT, LAST_CHECKPOINT
from processor.run_state import describe_data_change
from utils.checkpoint import load_checkpoint, load_newest_intact, previous_checkpoint
from utils.errors import CheckpointError, ConfigError, DataError
from utils.distributed import is_main_process
from utils.io import TEMP_PREFIX, DiskFullError, format_bytes, free_bytes
from evaluation.ranking import removal_mask

logger = logging.getLogger(__name__)

RESULTS_FILE = "results.json"
#: Present in OUTPUT_DIR while test_svpr.py writes its results: results found next to it are those of an
#: evaluation that was killed, which the next run replaces without --overwrite.
EVALUATION_IN_PROGRESS = ".evaluation-in-progress"


def training_run_files():
    """Files whose presence means OUTPUT_DIR holds a training run: the resumable checkpoints, each followed by
    its previous version (the main loop's, then those of every registered model's extra phases), then the
    results."""
    phases = {phase.checkpoint_name for name in MODELS.names() for phase in MODELS.get(name).training_phases}
    checkpoints = (LAST_CHECKPOINT, *sorted(phases))
    return (*(name for checkpoint in checkpoints for name in (checkpoint, previous_checkpoint(checkpoint))),
            RESULTS_FILE)
# Keys that may change when a run is resumed: run length, logging/evaluation cadence, where things are,
# how data is loaded and how the result is evaluated. Any other difference makes the resume a new run.
# (A model's extra phases add their own keys: ``TrainingPhase.resume_may_change``.)
RESUME_MAY_CHANGE = ("SOLVER.MAX_EPOCHS", "SOLVER.LOG_PERIOD", "SOLVER.EVAL_PERIOD", "SOLVER.CHECKPOINT_PERIOD",
                     "OUTPUT_DIR", "MODEL.DEVICE", "MODEL.PRETRAIN_PATH", "DATASETS.ROOT_DIR",
                     "DATASETS.AUTO_GENERATE", "DATASETS.TESTS", "DATALOADER.NUM_WORKERS", "DATALOADER.CHECK_IMAGES",
                     "DATALOADER.CACHE_IMAGES", "SOLVER.RESUME_ALLOW_DATA_CHANGE",
                     "DIST.", "TEST.")
# Keys that may change on resume, but whose change makes the result differ from an uninterrupted run's.
RESUME_INEXACT = {"DATALOADER.NUM_WORKERS": "each loader worker draws the augmentations of its own batches from "
                                            "its own random stream, so the epochs trained from here on will see "
                                            "other augmentations than the uninterrupted run (keep the number for a "
                                            "bit-identical result)"}


def check_output_dir(output_dir, run_files, resume, overwrite):
    """Decide what a run may do with ``output_dir``; return the checkpoint to resume from (or None).

    Without ``resume``, a folder holding any of ``run_files`` needs ``overwrite`` (which removes them); results
    of an evaluation that was killed (:data:`EVALUATION_IN_PROGRESS`) do not count. With ``resume`` the newest
    intact checkpoint of ``run_files`` (in their order) is chosen: a damaged one (truncated, or failing its
    checksum) is passed over, and when none is intact the error names them all. Raises a one-line
    ``ConfigError``/``CheckpointError`` otherwise.
    """
    present = [name for name in run_files if os.path.isfile(os.path.join(output_dir, name))]
    if os.path.isfile(os.path.join(output_dir, EVALUATION_IN_PROGRESS)):
        present = [name for name in present if name != RESULTS_FILE]
    if resume:
        checkpoints = [name for name in run_files if name != RESULTS_FILE]
        if not any(name in present for name in checkpoints):
            raise ConfigError(f"--resume: OUTPUT_DIR '{output_dir}' holds no {' or '.join(checkpoints)} to resume "
                              "from; drop --resume to start a new run")
        return load_newest_intact([os.path.join(output_dir, name) for name in checkpoints], log=False, mmap=True)[1]
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


def remove_stale_temporaries(output_dir, depth=2):
    """Delete temporary files of atomic writes that a killed process (SIGKILL, power loss) left behind in
    ``output_dir`` and its sub-folders down to ``depth`` levels (e.g. rank_lists/<protocol>/). Call it only
    while holding the folder's lock: a live run's temporary files are not stale."""
    for folder, subfolders, names in os.walk(output_dir):
        relative = os.path.relpath(folder, output_dir)
        if (0 if relative == os.curdir else relative.count(os.sep) + 1) >= depth:
            subfolders.clear()
        for name in names:
            if name.startswith(TEMP_PREFIX):
                os.remove(os.path.join(folder, name))
                logger.info("removed %s, left by an interrupted write", os.path.join(folder, name))


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
    ``ConfigError`` naming the differing keys otherwise. Returns warnings (text) for the changes of
    :data:`RESUME_INEXACT` keys."""
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
    return [f"--resume with {key} {current.get(key)!r} instead of {stored.get(key)!r}: {why}"
            for key, why in RESUME_INEXACT.items() if stored.get(key, current.get(key)) != current.get(key)]


def resume_checkpoint(output_dir):
    """The checkpoint a ``--resume`` into ``output_dir`` continues from (see :func:`check_output_dir`)."""
    return check_output_dir(output_dir, training_run_files(), resume=True, overwrite=False)


def check_resume_data(cfg, path, training_data):
    """The training data fingerprint stored in checkpoint ``path`` (``processor.run_state``) matches this run's
    ``training_data``; otherwise a one-line ``DataError`` saying what changed, unless
    SOLVER.RESUME_ALLOW_DATA_CHANGE (then a warning, as long as the number of identities, and so the classifier,
    is the same). Checkpoints written before fingerprints were stored are not checked."""
    stored = load_checkpoint(path, mmap=True).get("training_data")
    if not isinstance(stored, dict) or not all(isinstance(stored.get(key), torch.Tensor)
                                               for key in ("paths", "records", "labels")):
        logger.info("%s records no fingerprint of its training data: not compared with the data now", path)
        return
    change = describe_data_change(stored, training_data)
    if not change:
        return
    stored_ids, current_ids = (len(set(data["labels"].tolist())) for data in (stored, training_data))
    if not cfg.SOLVER.RESUME_ALLOW_DATA_CHANGE:
        raise DataError(f"--resume: the training data differ from those {path} was trained on ({change}): the "
                        f"resumed run could not give the result of an uninterrupted one. Restore the data, start a "
                        f"new run (--overwrite or another OUTPUT_DIR), or set SOLVER.RESUME_ALLOW_DATA_CHANGE True "
                        f"to continue on the new data")
    if stored_ids != current_ids:
        raise DataError(f"--resume with SOLVER.RESUME_ALLOW_DATA_CHANGE: the training data differ from those {path} "
                        f"was trained on ({change}), and a resumed model needs the same number of identities for "
                        f"its classifier ({stored_ids}); restore them or start a new run")
    logger.warning("resuming on changed training data (%s; SOLVER.RESUME_ALLOW_DATA_CHANGE): the result will "
                   "differ from that of an uninterrupted run", change)


#: Room kept free beyond the checkpoints' estimate: logs, metrics, pictures, results and pickle overheads.
DISK_MARGIN_BYTES = 16 * 2 ** 20
DISK_MARGIN_FRACTION = 0.1


def checkpoint_files(cfg):
    """Names of the checkpoint files a training run writes into OUTPUT_DIR (see :func:`checkpoint_space`)."""
    period = cfg.SOLVER.CHECKPOINT_PERIOD
    return (LAST_CHECKPOINT, previous_checkpoint(LAST_CHECKPOINT), BEST_CHECKPOINT, FINAL_CHECKPOINT,
            *(f"{cfg.MODEL.NAME}_{epoch}.pth" for epoch in range(period, cfg.SOLVER.MAX_EPOCHS + 1, period)))


def checkpoint_space(cfg, model):
    """``(bytes, explanation)``: the most disk space the checkpoints of a training run of ``model`` take at once.

    The full training state S (model state plus optimiser state, estimated as two values per trainable
    parameter, as Adam and AdamW keep; SGD with momentum keeps one) is kept twice (``checkpoint_last.pth``
    and ``checkpoint_prev.pth``) plus once more while the next one is written; the weights W (the model
    state) are in ``model_best.pth``, ``model_final.pth`` and each periodic ``<MODEL.NAME>_<epoch>.pth``.
    Total 3 S + (2 + periodic files) W, plus DISK_MARGIN_FRACTION and DISK_MARGIN_BYTES. (A model's extra
    phases, e.g. CLIP-ReID's prompt learning, write small states that the margin covers.)
    """
    weights = sum(value.numel() * value.element_size() for value in model.state_dict().values())
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    state = weights + 2 * trainable
    periodic = len(checkpoint_files(cfg)) - 4
    total = 3 * state + (2 + periodic) * weights
    explanation = (f"3 x {format_bytes(state)} of training state ({LAST_CHECKPOINT}, "
                   f"{previous_checkpoint(LAST_CHECKPOINT)}, one being written) + {2 + periodic} x "
                   f"{format_bytes(weights)} of weights ({BEST_CHECKPOINT}, {FINAL_CHECKPOINT}, {periodic} periodic)")
    return int(total * (1 + DISK_MARGIN_FRACTION)) + DISK_MARGIN_BYTES, explanation


def check_disk_space(cfg, model):
    """Refuse, with one line saying how much is needed and free, an OUTPUT_DIR whose file system has no room
    for the checkpoints of this run (:func:`checkpoint_space`; those of them already there, from an
    interrupted run or one being replaced, count as room). Rank 0 only: it alone writes them."""
    if not is_main_process():
        return
    needed, explanation = checkpoint_space(cfg, model)
    paths = [os.path.join(cfg.OUTPUT_DIR, name) for name in checkpoint_files(cfg)]
    there = sum(os.path.getsize(path) for path in paths if os.path.isfile(path))
    free = free_bytes(cfg.OUTPUT_DIR)
    if free is not None and free + there < needed:
        replaced = f", less {format_bytes(there)} of checkpoints already there" if there else ""
        raise DiskFullError(f"not enough disk space in OUTPUT_DIR '{cfg.OUTPUT_DIR}': this run needs about "
                            f"{format_bytes(needed - there)} for its checkpoints ({explanation}, plus "
                            f"{100 * DISK_MARGIN_FRACTION:.0f}% and {format_bytes(DISK_MARGIN_BYTES)} of margin"
                            f"{replaced}), and {format_bytes(free)} are free; free space or choose another "
                            f"OUTPUT_DIR")
    logger.info("disk space: the checkpoints need about %s, %s free in %s", format_bytes(max(needed - there, 0)),
                format_bytes(free) if free is not None else "an unknown amount", cfg.OUTPUT_DIR)


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

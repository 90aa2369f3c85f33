"""Configuration: documented YACS defaults (``defaults.py``) and the YAML files of each benchmark.

``load_config(config_file, opts)`` merges a YAML file and ``KEY VALUE`` overrides into the defaults,
checks the values, and returns a frozen config; any mistake raises a one-line ``ConfigError``.
"""
import os

import yaml

from configs.defaults import get_cfg_defaults
from utils.errors import ConfigError

# Keys whose value must be one of a fixed set.
_CHOICES = {
    "MODEL.DEVICE": None,  # checked by _check_device: auto, cpu, cuda or cuda:N
    "MODEL.IF_LABELSMOOTH": ("on", "off"),
    "MODEL.IF_WITH_CENTER": ("yes", "no"),
    "MODEL.METRIC_LOSS_TYPE": ("triplet", "triplet_center"),
    "MODEL.TEXT_TYPE": ("attribute", "captions"),
    "DATALOADER.SAMPLER": ("softmax_triplet", "softmax"),
    "DATALOADER.SAMPLER_NAME": ("RandomIdentitySampler",),
    "SOLVER.WARMUP_METHOD": ("linear", "constant"),
    "SOLVER.AMP_DTYPE": ("float16", "bfloat16"),
    "TEST.FEAT_NORM": ("yes", "no"),
    "TEST.DIST_METRIC": ("euclidean", "cosine"),
    "TEST.TIME_MODE": ("mix", "cross", "same"),
}


def config_value(cfg, dotted):
    """The value of the dotted key ``dotted`` (e.g. ``"MODEL.SIE_CAMERA"``) in ``cfg``."""
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _check_values(cfg):
    # Counts that must be at least 1, and counts that may also be 0 (SOLVER.MAX_EPOCHS 0: evaluate only).
    positive = ("DATALOADER.NUM_INSTANCE", "SOLVER.IMS_PER_BATCH", "SOLVER.STAGE1.IMS_PER_BATCH", "TEST.IMS_PER_BATCH",
                "SOLVER.EVAL_PERIOD", "SOLVER.CHECKPOINT_PERIOD", "SOLVER.LOG_PERIOD", "SOLVER.STAGE1.LOG_PERIOD",
                "SOLVER.STAGE1.CHECKPOINT_PERIOD", "TEST.MAX_RANK")
    non_negative = ("SOLVER.MAX_EPOCHS", "SOLVER.STAGE1.MAX_EPOCHS", "DATALOADER.NUM_WORKERS")
    for key in positive + non_negative:
        value, least = config_value(cfg, key), 1 if key in positive else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ConfigError(f"config key {key} = {value!r}: expected an integer >= {least}")
    if not cfg.DIST.TIMEOUT_MINUTES > 0:
        raise ConfigError(f"config key DIST.TIMEOUT_MINUTES = {cfg.DIST.TIMEOUT_MINUTES!r}: expected a positive "
                          "number of minutes")
    if not isinstance(cfg.DATASETS.TESTS, str) and not cfg.DATASETS.TESTS:
        raise ConfigError("config key DATASETS.TESTS is empty: expected at least one protocol to evaluate, "
                          f"e.g. ('{cfg.DATASETS.NAMES}',)")
    for key, allowed in _CHOICES.items():
        value = config_value(cfg, key)
        if allowed is not None and value not in allowed:
            raise ConfigError(f"config key {key} = {value!r}: expected one of {', '.join(allowed)}")
    device = cfg.MODEL.DEVICE
    if not (device in ("auto", "cpu", "cuda") or (device.startswith("cuda:") and device[5:].isdigit())):
        raise ConfigError(f"config key MODEL.DEVICE = {device!r}: expected auto, cpu, cuda or cuda:N")
    for key in ("INPUT.SIZE_TRAIN", "INPUT.SIZE_TEST", "MODEL.STRIDE_SIZE"):
        value = config_value(cfg, key)
        if len(value) != 2 or any(int(v) <= 0 for v in value):
            raise ConfigError(f"config key {key} = {list(value)}: expected two positive integers [height, width]")
    if list(cfg.INPUT.SIZE_TRAIN) != list(cfg.INPUT.SIZE_TEST):
        raise ConfigError(
            f"config keys INPUT.SIZE_TRAIN {list(cfg.INPUT.SIZE_TRAIN)} and INPUT.SIZE_TEST "
            f"{list(cfg.INPUT.SIZE_TEST)} differ: the backbone's patch grid is fixed by the input size, "
            "so they must be equal")
    if cfg.SOLVER.IMS_PER_BATCH % cfg.DATALOADER.NUM_INSTANCE and "triplet" in cfg.DATALOADER.SAMPLER:
        raise ConfigError(
            f"config key SOLVER.IMS_PER_BATCH = {cfg.SOLVER.IMS_PER_BATCH}: expected a multiple of "
            f"DATALOADER.NUM_INSTANCE = {cfg.DATALOADER.NUM_INSTANCE}")
    steps = list(cfg.SOLVER.STEPS)
    if steps != sorted(steps):
        raise ConfigError(f"config key SOLVER.STEPS = {steps}: expected increasing epochs")
    if isinstance(cfg.DATASETS.TESTS, str):
        raise ConfigError(f"config key DATASETS.TESTS = {cfg.DATASETS.TESTS!r}: expected a list of names, "
                          f"e.g. ('{cfg.DATASETS.TESTS}',)")


def _short(exc):
    text = str(exc.args[0]) if getattr(exc, "args", None) else str(exc)
    return " ".join(text.split())


def load_config(config_file=None, opts=(), freeze=True):
    """Merge ``config_file`` and ``opts`` (``[KEY, VALUE, ...]``) into the defaults and check them."""
    cfg = get_cfg_defaults()
    if config_file:
        if not os.path.isfile(config_file):
            raise ConfigError(f"config file not found: {config_file}")
        try:
            cfg.merge_from_file(config_file)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1})" if mark is not None else ""
            raise ConfigError(f"config file {config_file}{where}: not valid YAML: "
                              f"{getattr(exc, 'problem', None) or _short(exc)}") from None
        except KeyError as exc:
            raise ConfigError(f"config file {config_file}: {_short(exc)} (misspelt or unknown key)") from None
        except (ValueError, AssertionError, TypeError) as exc:
            raise ConfigError(f"config file {config_file}: {_short(exc)}") from None
    opts = list(opts or ())
    if len(opts) % 2:
        raise ConfigError(f"command-line overrides must be KEY VALUE pairs; got an odd number: {' '.join(opts)}")
    for key, value in zip(opts[0::2], opts[1::2]):
        try:
            cfg.merge_from_list([key, value])
        except KeyError:
            raise ConfigError(f"command-line override {key}: unknown config key (misspelt?)") from None
        except (ValueError, AssertionError, TypeError) as exc:
            raise ConfigError(f"command-line override {key} {value}: {_short(exc)}") from None
    _check_values(cfg)
    if freeze:
        cfg.freeze()
    return cfg


__all__ = ["config_value", "get_cfg_defaults", "load_config"]

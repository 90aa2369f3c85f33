"""Configuration: the framework's YACS defaults (``defaults.py``), the keys components declare next to their
code (``schema.py``), and the YAML files of each benchmark.

``load_config(config_file, opts)`` merges a YAML file (after the files it inherits from with ``_BASE_``) and
``KEY VALUE`` overrides into the defaults, checks the values, and returns a frozen config; any mistake raises
a one-line ``ConfigError`` (an unknown key names the closest existing ones). Keys of the reference code that
have no effect are ignored with one warning (``configs/compat.py``).
"""
import difflib
import logging
import os

import yaml
from yacs.config import CfgNode
from yacs.config import CfgNode as CN

from configs.compat import REFERENCE_ONLY_KEYS, split_reference_only
from configs.defaults import get_cfg_defaults
from configs.schema import check_choice, check_count, check_declared, config_value, declare_config
from utils.checkpoint import load_checkpoint
from utils.errors import ConfigError

logger = logging.getLogger(__name__)

# Framework keys whose value must be one of a fixed set (components check their own keys).
_CHOICES = {
    "MODEL.PROMPT_SUBJECT": ("person", "vehicle"),
    "DATALOADER.SAMPLER": ("softmax_triplet", "softmax"),
    "SOLVER.WARMUP_METHOD": ("linear", "constant"),
    "SOLVER.AMP_DTYPE": ("float16", "bfloat16"),
    "SOLVER.CPU_AMP": ("float32", "auto", "bfloat16", "float16"),
    "TEST.FEAT_NORM": ("yes", "no"),
    "TEST.DIST_METRIC": ("euclidean", "cosine"),
    "TEST.TIME_MODE": ("mix", "cross", "same"),
    "MODEL.PRETRAIN_CHOICE": ("imagenet", "self", "finetune"),
    "INPUT.IMAGE_BACKEND": ("pil", "tensor"),
}


def _check_values(cfg):
    # Counts that must be at least 1, and counts that may also be 0 (SOLVER.MAX_EPOCHS 0: evaluate only).
    positive = ("DATALOADER.NUM_INSTANCE", "SOLVER.IMS_PER_BATCH", "TEST.IMS_PER_BATCH", "SOLVER.EVAL_PERIOD",
                "SOLVER.CHECKPOINT_PERIOD", "SOLVER.LOG_PERIOD", "TEST.MAX_RANK")
    non_negative = ("SOLVER.MAX_EPOCHS", "DATALOADER.NUM_WORKERS")
    for key in positive + non_negative:
        check_count(cfg, key, 1 if key in positive else 0)
    if not cfg.DIST.TIMEOUT_MINUTES > 0:
        raise ConfigError(f"config key DIST.TIMEOUT_MINUTES = {cfg.DIST.TIMEOUT_MINUTES!r}: expected a positive "
                          "number of minutes")
    if not isinstance(cfg.DATASETS.TESTS, str) and not cfg.DATASETS.TESTS:
        raise ConfigError("config key DATASETS.TESTS is empty: expected at least one protocol to evaluate, "
                          f"e.g. ('{cfg.DATASETS.NAMES}',)")
    for key, allowed in _CHOICES.items():
        check_choice(cfg, key, allowed)
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
    check_declared(cfg)


def _short(exc):
    text = str(exc.args[0]) if getattr(exc, "args", None) else str(exc)
    return " ".join(text.split())


def _all_keys(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, CfgNode):
            yield from _all_keys(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}"


def _unknown_key_message(where, dotted, defaults):
    """One line naming an unknown key and the closest existing keys."""
    known = list(_all_keys(defaults))
    close = difflib.get_close_matches(dotted, known, n=3, cutoff=0.6)
    if not close:  # a misspelt section, or a key under the wrong section: match on the last part
        last = dotted.split(".")[-1]
        close = [key for key in known if key.split(".")[-1] == last][:3] or \
            difflib.get_close_matches(last, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(close)}?" if close else ""
    return f"{where}: unknown config key {dotted}{hint}"


def _find_unknown(data, defaults, prefix=""):
    """The first dotted key of the nested dict ``data`` that the defaults do not define, or None."""
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in defaults:
            return dotted
        if isinstance(value, dict) and isinstance(defaults[key], CfgNode):
            found = _find_unknown(value, defaults[key], dotted + ".")
            if found:
                return found
    return None


def _mapping(data, where):
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of config sections (MODEL:, SOLVER:, ...) at the top level, "
                          f"got a {type(data).__name__}")
    return data


def _read_yaml(config_file):
    """The mapping of a YAML config file (YAML only: a config file never runs code)."""
    if not os.path.isfile(config_file):
        raise ConfigError(f"config file not found: {config_file}")
    if not config_file.lower().endswith((".yml", ".yaml")):
        raise ConfigError(f"config file {config_file}: expected a YAML file (.yml or .yaml); Python config files "
                          f"are not accepted because loading them would run their code")
    try:
        with open(config_file, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise ConfigError(f"config file {config_file}{where}: not valid YAML: "
                          f"{getattr(exc, 'problem', None) or _short(exc)}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {config_file}: cannot be read ({_short(exc)})") from None
    return _mapping(data, f"config file {config_file}")


BASE_KEY = "_BASE_"


def _config_chain(config_file, chain=()):
    """``[(path, mapping), ...]`` of ``config_file`` and the files it inherits from, the root base first.

    A file's ``_BASE_`` names one YAML file, relative to the file's own folder (or absolute); the base may
    have a base of its own, to any depth. The file's keys override its base's (fast-reid / detectron2
    semantics). Bases are read from disk only: a URL is refused, and so is a cycle.
    """
    data = _read_yaml(config_file)
    base = data.pop(BASE_KEY, None)
    if base is None:
        return [(config_file, data)]
    if not isinstance(base, str) or not base.strip():
        raise ConfigError(f"config file {config_file}: {BASE_KEY} = {base!r}: expected the path of a YAML file, "
                          f"relative to this file's folder")
    if "://" in base:
        raise ConfigError(f"config file {config_file}: {BASE_KEY} = {base!r}: expected a local file (configs are "
                          f"never downloaded)")
    path = os.path.normpath(os.path.join(os.path.dirname(config_file), os.path.expanduser(base)))
    if not os.path.isfile(path):
        raise ConfigError(f"config file {config_file}: {BASE_KEY} file {path} not found")
    seen = [os.path.abspath(f) for f in chain + (config_file,)]
    if os.path.abspath(path) in seen:
        raise ConfigError(f"config file {config_file}: {BASE_KEY} {base!r} makes a cycle "
                          f"({' -> '.join(chain + (config_file, path))})")
    return _config_chain(path, chain + (config_file,)) + [(config_file, data)]


def _protect_strings(data, defaults):
    """Quote the string values of string keys in a dumped config: yacs ``literal_eval``s strings on merging,
    which would turn a dumped string such as '0' into an integer. Only for ``cfg.dump()`` output, whose
    strings are plain; hand-written YAML may rely on that evaluation (e.g. ``NAMES: ('CP2108_ALL')``)."""
    protected = {}
    for key, value in data.items():
        default = defaults.get(key) if isinstance(defaults, dict) else None
        if isinstance(value, dict) and isinstance(default, CfgNode):
            protected[key] = _protect_strings(value, default)
        elif isinstance(value, str) and isinstance(default, str):
            protected[key] = repr(value)
        else:
            protected[key] = value
    return protected


def stored_config(path, state=None):
    """The config YAML text a checkpoint written by this framework stores (``state``: the checkpoint ``path``
    already loaded, to read it once; otherwise its tensors are only memory-mapped, not read)."""
    state = load_checkpoint(path, map_location="cpu", mmap=not path.endswith(".safetensors")) \
        if state is None else state
    stored = state.get("config") if isinstance(state, dict) else None
    if not isinstance(stored, str):
        raise ConfigError(f"checkpoint {path} stores no config (a bare state dict?): pass --config_file with the "
                          f"config it was trained with")
    # Merged once here, so that a damaged or foreign config is reported with the name of its file.
    _merge_yaml_text(get_cfg_defaults(), stored, f"the config stored in checkpoint {path}", [])
    return stored


def config_from_checkpoint(path, config_file=None, opts=(), state=None):
    """``(cfg, ignored)`` for evaluating checkpoint ``path``: ``config_file`` when given, else the config the
    checkpoint stores, then ``opts`` (``state``: as for ``stored_config``)."""
    if config_file:
        return read_config(config_file, opts)
    return read_config(None, opts, base_yaml=stored_config(path, state))


def _merge_mapping(cfg, data, where, ignored):
    """Merge a nested dict of config values into ``cfg`` (reference-only keys skipped into ``ignored``)."""
    ignored.extend(split_reference_only(data))
    unknown = _find_unknown(data, cfg)
    if unknown:
        raise ConfigError(_unknown_key_message(where, unknown, cfg))
    try:
        cfg.merge_from_other_cfg(CfgNode(data))
    except (KeyError, ValueError, AssertionError, TypeError) as exc:
        raise ConfigError(f"{where}: {_short(exc)}") from None


def _merge_yaml_text(cfg, text, where, ignored):
    """Merge the YAML ``text`` of a config (e.g. one stored in a checkpoint) into ``cfg``; ``where`` names it in
    the one-line errors."""
    try:
        data = _mapping(yaml.safe_load(text), where)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{where}: not valid YAML: {_short(exc)}") from None
    _merge_mapping(cfg, _protect_strings(data, cfg), where, ignored)


def read_config(config_file=None, opts=(), freeze=True, base_yaml=None):
    """Merge ``config_file`` (or the YAML text ``base_yaml``, e.g. a checkpoint's stored config) and ``opts``
    (``[KEY, VALUE, ...]``) into the defaults and check them.

    Returns ``(cfg, ignored)``: ``ignored`` lists the reference-only keys (``configs/compat.py``) that
    were given and skipped. Any mistake raises a one-line ``ConfigError``.
    """
    cfg = get_cfg_defaults()
    ignored = []
    if config_file:
        for path, data in _config_chain(config_file):
            _merge_mapping(cfg, data, f"config file {path}", ignored)
    elif base_yaml:
        _merge_yaml_text(cfg, base_yaml, "stored config", ignored)
    opts = list(opts or ())
    if len(opts) % 2:
        raise ConfigError(f"command-line overrides must be KEY VALUE pairs; got an odd number: {' '.join(opts)}")
    for key, value in zip(opts[0::2], opts[1::2]):
        if key in REFERENCE_ONLY_KEYS:
            ignored.append(key)
            continue
        try:
            config_value(cfg, key)
        except (KeyError, TypeError):
            raise ConfigError(_unknown_key_message("command-line override", key, cfg)) from None
        try:
            cfg.merge_from_list([key, value])
        except (KeyError, ValueError, AssertionError, TypeError) as exc:
            raise ConfigError(f"command-line override {key} {value}: {_short(exc)}") from None
    _check_values(cfg)
    if freeze:
        cfg.freeze()
    return cfg, ignored


def load_config(config_file=None, opts=(), freeze=True):
    """``read_config`` without the list of ignored keys (logged as one warning instead)."""
    cfg, ignored = read_config(config_file, opts, freeze)
    if ignored:
        logger.warning(ignored_keys_message(ignored))
    return cfg


def ignored_keys_message(ignored):
    """The one warning about reference-only keys that were given."""
    return (f"ignored {len(ignored)} config key(s) of the reference code that have no effect: "
            f"{', '.join(sorted(set(ignored)))} (see configs/compat.py)")


__all__ = ["CN", "check_choice", "check_count", "config_from_checkpoint", "config_value", "declare_config",
           "get_cfg_defaults", "ignored_keys_message", "load_config", "read_config", "stored_config"]

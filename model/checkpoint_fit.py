"""Strict loading of saved model weights, with a one-line diagnosis when they do not fit the model; weights in
the authors' layout recognised and converted."""
import re

from configs import config_value
from utils.errors import CheckpointError

# Parameter-name fragment -> config keys that decide whether (and with which shape) it exists, for the
# parameters every model may have; a model adds its own rows first (``ReIDModel.checkpoint_hints``). The
# first matching row explains a key, so specific fragments come before general ones.
_KEY_HINTS = (
    ("sie_embed", ("MODEL.SIE_CAMERA", "MODEL.SIE_VIEW")),
    ("cv_embed", ("MODEL.SIE_CAMERA", "MODEL.SIE_VIEW")),
    ("classifier", ("DATASETS.NAMES",)),
)
_FALLBACK_HINT = ("MODEL.ARCH_NAME",)
_NAMES_SHOWN = 3


def _strip_prefix(state_dict, prefix="module."):
    return {key[len(prefix):] if key.startswith(prefix) else key: value for key, value in state_dict.items()}


def matches(key, patterns):
    """Whether state-dict name ``key`` fully matches one of the regular expressions ``patterns``."""
    return any(re.fullmatch(pattern, key) for pattern in patterns)


def to_our_layout(model_class, state_dict, cfg):
    """``(state_dict in this framework's layout, whether it came in the authors' layout)`` for a model of
    ``model_class`` (DDP's ``module.`` stripped).

    The authors' layout is recognised by the model's own converter (``from_reference_state_dict``): weights it
    cannot map, or maps to the same names, are taken to be ours already.
    """
    state_dict = _strip_prefix(state_dict)
    try:
        converted = model_class.from_reference_state_dict(state_dict, cfg)
    except (CheckpointError, KeyError, ValueError, IndexError):
        return state_dict, False
    return (converted, True) if set(converted) != set(state_dict) else (state_dict, False)


def _hints_for(keys, model_hints=()):
    hints = []
    for key in keys:
        lowered = key.lower()
        matched = next((config_keys for fragment, config_keys in tuple(model_hints) + _KEY_HINTS
                        if fragment in lowered), _FALLBACK_HINT)
        hints.extend(k for k in matched if k not in hints)
    return hints


def _renamed(missing, unexpected):
    """Keys of either list that appear in the other one under an extra prefix (``visual.x`` vs ``clip.visual.x``)."""
    renamed = set()
    for key in missing:
        for other in unexpected:
            if key.endswith("." + other) or other.endswith("." + key):
                renamed.update((key, other))
    return renamed


def _listing(label, names):
    shown = ", ".join(names[:_NAMES_SHOWN])
    more = f", ... {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
    return f"{len(names)} {label} ({shown}{more})"


def load_model_weights(model, state_dict, cfg, source="checkpoint", optional=()):
    """Load ``state_dict`` into ``model`` strictly (``module.`` prefixes of DDP are stripped); parameters whose
    names match a pattern of ``optional`` may be absent from it (they keep their values).

    Raises ``CheckpointError`` naming the missing, unexpected and differently shaped parameters (first few
    and counts) and the config keys, with their current values, that most likely differ from training.
    """
    state_dict = _strip_prefix(state_dict)
    expected = model.state_dict()
    missing = [key for key in expected if key not in state_dict and not matches(key, optional)]
    unexpected = [key for key in state_dict if key not in expected]
    reshaped = [key for key in expected
                if key in state_dict and tuple(getattr(state_dict[key], "shape", ())) != tuple(expected[key].shape)]
    if missing or unexpected or reshaped:
        parts = []
        if missing:
            parts.append(_listing("missing", missing))
        if unexpected:
            parts.append(_listing("unexpected", unexpected))
        if reshaped:
            parts.append(_listing("with another shape", [
                f"{key} {list(getattr(state_dict[key], 'shape', ()))} vs {list(expected[key].shape)}"
                for key in reshaped]))
        renamed = _renamed(missing, unexpected)
        # Parameters found under another prefix come from another model class; the rest get their own hints.
        hint_keys = ["MODEL.ARCH_NAME"] if renamed else []
        for key in _hints_for([k for k in missing + unexpected if k not in renamed] + reshaped,
                              getattr(model, "checkpoint_hints", ())):
            if key not in hint_keys:
                hint_keys.append(key)
        if (missing or unexpected) and "MODEL.ARCH_NAME" not in hint_keys:
            hint_keys.append("MODEL.ARCH_NAME")
        hints = ", ".join(f"{key}={config_value(cfg, key)!r}" for key in hint_keys)
        raise CheckpointError(f"{source} does not fit the {type(model).__name__} model built from this config: "
                              f"parameters {'; '.join(parts)}; check that these config keys match the ones used "
                              f"for training: {hints}")
    model.load_state_dict(state_dict, strict=not optional)
    return model

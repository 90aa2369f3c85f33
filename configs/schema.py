"""Config keys declared by the components that own them.

``configs/defaults.py`` holds the framework's keys (input, data loading, solver, test, distributed). A model,
dataset, loss term or training phase declares its own keys next to its code, detectron2-style, with a
decorated function that adds them to a config, each key with its default and a comment saying what it
does::

    from configs import CN, declare_config

    def _check(cfg):            # optional value checks, run after every merge
        check_fraction(cfg, "MODEL.SVPR.CVPR_TOPK")

    @declare_config(check=_check)
    def add_svpr_config(cfg):
        cfg.MODEL.SVPR = CN()
        # View-Decoupled Feature Extractor: ...
        cfg.MODEL.SVPR.VDFE = True

The function receives a config holding only the empty top-level sections (and ``MODEL.FIXES``), so it may
only add keys; a key declared twice (by two components, or by a component and the framework) is an error
naming both owners. The full defaults are the framework's keys plus every declaration of the modules of the
component packages, which are imported (found by walking their folders, not from a hand-kept list) the
first time defaults are built.
"""
from dataclasses import dataclass
from typing import Callable, Optional

from yacs.config import CfgNode as CN

from utils.discovery import import_package_modules
from utils.errors import ConfigError
from utils.registry import RegistryError

#: Packages whose modules may declare config keys (and register models, datasets, loss terms).
COMPONENT_PACKAGES = ("datasets", "loss", "model")
#: Sections a declaration may add keys to; they exist (empty) in the config it receives.
SECTIONS = ("MODEL", "MODEL.FIXES", "INPUT", "DATASETS", "DATALOADER", "SOLVER", "TEST", "DIST")


@dataclass(frozen=True)
class ConfigDeclaration:
    """One component's keys: ``add(cfg)`` adds them, ``check(cfg)`` (optional) validates their values."""

    add: Callable
    check: Optional[Callable]
    owner: str

    def keys(self):
        """``{dotted key: default}`` of the keys ``add`` declares."""
        skeleton = _skeleton()
        self.add(skeleton)
        return dict(_leaves(skeleton))


_DECLARATIONS = {}


def declare_config(add=None, *, check=None):
    """Decorator registering ``add(cfg)``, a function adding a component's keys, and its ``check(cfg)``.

    Usable as ``@declare_config`` or ``@declare_config(check=...)``; returns the function unchanged.
    """

    def wrap(function):
        _DECLARATIONS[(function.__module__, function.__qualname__)] = ConfigDeclaration(function, check,
                                                                                          function.__module__)
        return function

    return wrap(add) if add is not None else wrap


def discover_components():
    """Import every module of the component packages once (declarations and registrations run on import)."""
    for package_name in COMPONENT_PACKAGES:
        import_package_modules(package_name)


def declarations():
    """Every registered declaration (the component packages imported first)."""
    discover_components()
    return list(_DECLARATIONS.values())


def declared_names():
    """``(module, function name)`` of every registered declaration (the component packages imported first)."""
    discover_components()
    return list(_DECLARATIONS)


def _skeleton():
    cfg = CN()
    for section in SECTIONS:
        parent, _, name = section.rpartition(".")
        (cfg if not parent else _node(cfg, parent))[name] = CN()
    return cfg


def _node(cfg, dotted):
    for part in dotted.split("."):
        cfg = cfg[part]
    return cfg


def _leaves(node, prefix=""):
    for key, value in node.items():
        if isinstance(value, CN):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def add_declared_keys(cfg, framework_owner="configs.defaults"):
    """Add every declaration's keys to ``cfg`` (the framework defaults); ``RegistryError`` for a key declared
    twice. Returns ``{dotted key: owner module}`` of the added keys."""
    owners = {key: framework_owner for key, _ in _leaves(cfg)}
    for declaration in declarations():
        for key, value in declaration.keys().items():
            if key in owners:
                raise RegistryError(f"config key {key} is declared twice ({owners[key]} and {declaration.owner})")
            owners[key] = declaration.owner
            parent, _, name = key.rpartition(".")
            node = cfg
            for part in parent.split("."):
                if part not in node:
                    node[part] = CN()
                node = node[part]
            node[name] = value
    return owners


def check_declared(cfg):
    """Run every declaration's value checks on the merged ``cfg``."""
    for declaration in declarations():
        if declaration.check is not None:
            declaration.check(cfg)


# ---- value checks shared by declarations and the framework ------------------------------------------------
def config_value(cfg, dotted):
    """The value of the dotted key ``dotted`` (e.g. ``"MODEL.SIE_CAMERA"``) in ``cfg``."""
    return _node(cfg, dotted)


def check_choice(cfg, key, allowed):
    """``ConfigError`` unless the value of ``key`` is one of ``allowed``."""
    value = config_value(cfg, key)
    if value not in allowed:
        raise ConfigError(f"config key {key} = {value!r}: expected one of {', '.join(map(str, allowed))}")


def check_count(cfg, key, least=1):
    """``ConfigError`` unless the value of ``key`` is an integer >= ``least``."""
    value = config_value(cfg, key)
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigError(f"config key {key} = {value!r}: expected an integer >= {least}")

"""Optimisers built from the config, with parameter groups for biases and classifiers."""
import inspect

import torch

from utils.errors import ConfigError


def _optimizer_class(name, key):
    """The ``torch.optim`` optimiser class called ``name``; ``key`` names the config key in errors."""
    cls = getattr(torch.optim, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or cls is torch.optim.Optimizer:
        raise ConfigError(f"{key}: unknown optimiser {name!r}; expected SGD, Adam, AdamW or another "
                          f"torch.optim optimiser class name")
    return cls


def _fused_supported(cls, param_groups):
    """Whether ``cls`` has PyTorch's fused kernel for these parameters (floating point, on CPU or CUDA)."""
    if "fused" not in inspect.signature(cls.__init__).parameters:
        return False
    params = [p for group in param_groups for p in group["params"]]
    return all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params)


def build_optimizer(name, key, param_groups, lr, momentum, fused=False):
    """The ``torch.optim`` optimiser ``name`` over ``param_groups`` (``key``: its config key, for errors); SGD
    gets ``momentum``; ``fused`` runs PyTorch's fused kernel where the optimiser has one (SOLVER.FUSED_OPTIMIZER)."""
    cls = _optimizer_class(name, key)
    options = {"momentum": momentum} if cls is torch.optim.SGD else {}
    if fused and _fused_supported(cls, param_groups):
        options["fused"] = True
    return cls(param_groups, lr=lr, **options)


def _param_groups(cfg, model):
    """Trainable parameters grouped by learning rate and weight decay; the base group comes first so that
    ``scheduler.get_last_lr()[0]`` is the base learning rate."""
    solver = cfg.SOLVER
    groups = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        # "bias" matches every bias-like name (in_proj_bias, norm biases), as in the reference.
        is_bias = "bias" in name
        is_classifier = solver.LARGE_FC_LR and "classifier" in name
        if is_classifier:
            lr = solver.BASE_LR * 2
        elif is_bias:
            lr = solver.BASE_LR * solver.BIAS_LR_FACTOR
        else:
            lr = solver.BASE_LR
        weight_decay = solver.WEIGHT_DECAY_BIAS if is_bias else solver.WEIGHT_DECAY
        group_name = ("classifier_" if is_classifier else "") + ("bias" if is_bias else "weight")
        group = groups.setdefault(group_name, {"params": [], "lr": lr, "weight_decay": weight_decay,
                                               "name": group_name})
        group["params"].append(param)
    order = ("weight", "bias", "classifier_weight", "classifier_bias")
    return [groups[name] for name in order if name in groups]


def make_optimizer(cfg, model):
    """Optimiser for the trainable parameters of ``model`` (SOLVER.*).

    Groups: base lr and SOLVER.WEIGHT_DECAY; names containing "bias": lr × BIAS_LR_FACTOR and
    WEIGHT_DECAY_BIAS; with LARGE_FC_LR, names containing "classifier": lr × 2. (Loss terms with parameters
    of their own, such as the center loss's centres, build their own optimisers.)
    """
    param_groups = _param_groups(cfg, model)
    if not param_groups:
        raise ConfigError("the model has no trainable parameters to optimise (check MODEL.FREEZE_* keys)")
    return build_optimizer(cfg.SOLVER.OPTIMIZER_NAME, "SOLVER.OPTIMIZER_NAME", param_groups, cfg.SOLVER.BASE_LR,
                           cfg.SOLVER.MOMENTUM, fused=cfg.SOLVER.FUSED_OPTIMIZER)

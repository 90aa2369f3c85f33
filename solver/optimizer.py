"""Optimisers built from the config, with parameter groups for biases and classifiers."""
import torch

from utils.errors import ConfigError


def _optimizer_class(name, key):
    """The ``torch.optim`` optimiser class called ``name``; ``key`` names the config key in errors."""
    cls = getattr(torch.optim, name, None) if isinstance(name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)) or cls is torch.optim.Optimizer:
        raise ConfigError(f"{key}: unknown optimiser {name!r}; expected SGD, Adam, AdamW or another "
                          f"torch.optim optimiser class name")
    return cls


def _build_optimizer(name, key, param_groups, lr, momentum):
    cls = _optimizer_class(name, key)
    if cls is torch.optim.SGD:
        return cls(param_groups, lr=lr, momentum=momentum)
    return cls(param_groups, lr=lr)


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


def make_optimizer(cfg, model, center_criterion=None):
    """Optimiser for the trainable parameters of ``model`` (SOLVER.*), and an SGD optimiser with
    SOLVER.CENTER_LR for ``center_criterion``'s centres (None without one).

    Groups: base lr and SOLVER.WEIGHT_DECAY; names containing "bias": lr × BIAS_LR_FACTOR and
    WEIGHT_DECAY_BIAS; with LARGE_FC_LR, names containing "classifier": lr × 2.
    Returns ``(optimizer, center_optimizer_or_None)``.
    """
    param_groups = _param_groups(cfg, model)
    if not param_groups:
        raise ConfigError("the model has no trainable parameters to optimise (check MODEL.FREEZE_* keys)")
    optimizer = _build_optimizer(cfg.SOLVER.OPTIMIZER_NAME, "SOLVER.OPTIMIZER_NAME", param_groups,
                                 cfg.SOLVER.BASE_LR, cfg.SOLVER.MOMENTUM)
    center_optimizer = None
    if center_criterion is not None:
        center_optimizer = torch.optim.SGD(center_criterion.parameters(), lr=cfg.SOLVER.CENTER_LR)
    return optimizer, center_optimizer


def make_stage1_optimizer(cfg, params):
    """Optimiser for CLIP-ReID's stage-1 prompt parameters ``params`` (SOLVER.STAGE1.*: optimiser name,
    base lr, weight decay, SGD momentum)."""
    stage1 = cfg.SOLVER.STAGE1
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("stage 1 has no trainable prompt parameters to optimise")
    group = {"params": params, "lr": stage1.BASE_LR, "weight_decay": stage1.WEIGHT_DECAY, "name": "prompts"}
    return _build_optimizer(stage1.OPTIMIZER_NAME, "SOLVER.STAGE1.OPTIMIZER_NAME", [group], stage1.BASE_LR,
                            stage1.MOMENTUM)

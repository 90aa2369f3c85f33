"""Building a model for a dataset and loading trained weights into it: a checkpoint to evaluate, or the
initial weights of a training run (MODEL.PRETRAIN_CHOICE)."""
import logging

import torch

from datasets.loader import load_dataset
from model import MODELS, build_model
from model.architecture import config_for_weights
from model.checkpoint_fit import load_model_weights, matches, to_our_layout
from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError

logger = logging.getLogger(__name__)


def model_args_from_dataset(dataset):
    """Constructor sizes of a model trained on ``dataset`` (saved in every checkpoint as ``model_args``)."""
    return {"num_classes": dataset.num_train_pids, "num_cameras": dataset.num_train_cams,
            "num_views": dataset.num_train_views, "attributes": [list(item) for item in dataset.attributes]}


# Upper bounds of what a real checkpoint holds; anything larger is a corrupt or crafted file whose sizes
# would otherwise allocate gigabytes before failing.
_MAX_CLASSES = 1_000_000
_MAX_CAMERAS_OR_VIEWS = 100_000
_MAX_ATTRIBUTES = 1_000


def _count(value, low, high):
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def check_model_args(model_args, source):
    """``model_args`` read from ``source`` (a checkpoint): the keys and sane sizes, or a ``CheckpointError``."""
    if not isinstance(model_args, dict):
        raise CheckpointError(f"checkpoint {source}: model_args is a {type(model_args).__name__}, expected a dict")
    limits = {"num_classes": _MAX_CLASSES, "num_cameras": _MAX_CAMERAS_OR_VIEWS, "num_views": _MAX_CAMERAS_OR_VIEWS}
    for key, high in limits.items():
        if not _count(model_args.get(key), 1, high):
            raise CheckpointError(f"checkpoint {source}: model_args {key} = {model_args.get(key)!r:.60}, expected "
                                  f"an integer from 1 to {high}")
    attributes = model_args.get("attributes", [])
    if not isinstance(attributes, (list, tuple)) or len(attributes) > _MAX_ATTRIBUTES or not all(
            isinstance(item, (list, tuple)) and len(item) == 2 and isinstance(item[0], str)
            and _count(item[1], 1, _MAX_CLASSES) for item in attributes):
        raise CheckpointError(f"checkpoint {source}: model_args attributes = {attributes!r:.80}, expected at most "
                              f"{_MAX_ATTRIBUTES} [name, number of classes] pairs")
    unknown = sorted(set(model_args) - set(limits) - {"attributes"})
    if unknown:
        raise CheckpointError(f"checkpoint {source}: unknown model_args {', '.join(map(str, unknown))}")
    return model_args


def build_from_args(cfg, model_args, device):
    """``cfg``'s model with the sizes of ``model_args``, on ``device``; logs its size."""
    args = dict(model_args, attributes=[tuple(item) for item in model_args["attributes"]])
    model = build_model(cfg, **args).to(device)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model %s: %.2f M parameters, %.2f M trainable, retrieval embedding %d-d", cfg.MODEL.ARCH_NAME,
                total / 1e6, trainable / 1e6, model.embedding_dim)
    return model


def read_model_checkpoint(cfg, weight, state=None):
    """``(weights in our layout, model_args or None, epoch or None, whether they came in the authors' layout)``
    of ``weight``: a training checkpoint, a bare state dict of ours, or one of the authors' code (recognised and
    converted; its model sizes are read from its tensors). ``state``: the file's content when already read."""
    state = load_checkpoint(weight, map_location="cpu") if state is None else state
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {weight}: expected a dict of weights, got {type(state).__name__}")
    model_args = state.get("model_args")
    if model_args is not None:
        check_model_args(model_args, weight)
    if not isinstance(state.get("config", ""), str) or not isinstance(state.get("epoch", 0), (int, type(None))):
        raise CheckpointError(f"checkpoint {weight}: its stored config or epoch is malformed")
    weights = state.get("model", state)
    if not isinstance(weights, dict):
        raise CheckpointError(f"checkpoint {weight}: expected a dict of weights under 'model'")
    foreign = [key for key, value in weights.items() if not isinstance(key, str) or not torch.is_tensor(value)]
    if foreign:
        raise CheckpointError(f"checkpoint {weight}: expected tensors by parameter name, but {len(foreign)} of its "
                              f"{len(weights)} weights are not (e.g. {foreign[0]!r:.60}: "
                              f"{type(weights[foreign[0]]).__name__})")
    model_class = MODELS.get(cfg.MODEL.ARCH_NAME)
    weights, converted = to_our_layout(model_class, weights, cfg)
    if converted:
        logger.info("%s is in the authors' layout: converted (%s)", weight, cfg.MODEL.ARCH_NAME)
        if model_args is None:
            model_args = model_class.reference_model_args(state.get("model", state), cfg)
    return weights, model_args, state.get("epoch"), converted


def load_trained_model(cfg, weight, device, state=None):
    """Model of ``cfg`` with the weights of ``weight`` (see :func:`read_model_checkpoint`; ``state``: its content
    when the caller has already read it, so that the file is read once). The backbone is built from the
    checkpoint's tensor shapes: no backbone weight file is read.

    Returns ``(model in eval mode, epoch or None)``. A checkpoint that does not fit the config raises a
    one-line ``CheckpointError`` naming the parameters and the config keys that likely differ.
    """
    weights, model_args, epoch, _ = read_model_checkpoint(cfg, weight, state)
    if model_args is None:
        # A bare state dict does not record the training set's sizes: read them from the training split.
        model_args = model_args_from_dataset(load_dataset(cfg))
    model = build_from_args(config_for_weights(cfg, weights, weight), model_args, device)
    load_model_weights(model, weights, cfg, source=weight)
    logger.info("loaded %s%s", weight, f" (epoch {epoch})" if epoch is not None else "")
    return model.eval(), epoch


def build_training_model(cfg, model_args, device):
    """The model a training run starts from, as MODEL.PRETRAIN_CHOICE says, and a description of where its
    initial weights come from (for the log and results.json).

    "imagenet": the backbone weights of MODEL.PRETRAIN_PATH (or random, MODEL.RANDOM_INIT), the rest
    initialised; "self": every weight of the model checkpoint MODEL.PRETRAIN_PATH (ours or the authors'),
    which must fit ``model_args``; "finetune": the same except the identity classifiers and prompts
    (``identity_parameters``), for a training set with other identities; tensors sized by the cameras, views
    or attributes (``dataset_parameters``) are loaded where they fit and re-initialised otherwise.
    """
    choice, path = cfg.MODEL.PRETRAIN_CHOICE, cfg.MODEL.PRETRAIN_PATH
    if choice == "imagenet":
        model = build_from_args(cfg, model_args, device)
        origin = "random backbone (MODEL.RANDOM_INIT)" if cfg.MODEL.RANDOM_INIT else f"backbone weights {path}"
        logger.info("initial weights: %s", origin)
        return model, origin
    if not path:
        raise CheckpointError(f"MODEL.PRETRAIN_CHOICE {choice} needs MODEL.PRETRAIN_PATH: the model checkpoint "
                              f"to start from")
    weights, _, _, converted = read_model_checkpoint(cfg, path)
    model = build_from_args(config_for_weights(cfg, weights, path), model_args, device)
    layout = "the authors' layout, converted" if converted else "this framework's layout"
    if choice == "self":
        try:
            load_model_weights(model, weights, cfg, source=path)
        except CheckpointError as exc:
            raise CheckpointError(f"{exc} (MODEL.PRETRAIN_CHOICE self; to train on other identities use "
                                  f"finetune)") from None
        origin = f"every weight of {path} ({layout})"
    else:
        own = model.state_dict()
        identity = [key for key in weights if matches(key, model.identity_parameters)]
        unfit = [key for key in weights if matches(key, model.dataset_parameters)
                 and (key not in own or tuple(weights[key].shape) != tuple(own[key].shape))]
        kept = {key: value for key, value in weights.items() if key not in identity and key not in unfit}
        load_model_weights(model, kept, cfg, source=path,
                           optional=tuple(model.identity_parameters) + tuple(model.dataset_parameters))
        fresh = sorted(set(identity) | set(unfit) | {key for key in own if key not in kept})
        origin = (f"every weight of {path} ({layout}) but {len(fresh)} re-initialised for this training set: "
                  f"{', '.join(fresh)}")
    logger.info("initial weights (MODEL.PRETRAIN_CHOICE %s): %s", choice, origin)
    return model.to(device), origin

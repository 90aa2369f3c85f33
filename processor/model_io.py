"""Building a model for a dataset and loading trained weights into it."""
import logging

from datasets.loader import load_dataset
from model import build_model
from model.checkpoint_fit import load_model_weights
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


def load_trained_model(cfg, weight, device, state=None):
    """Model of ``cfg`` with the weights of ``weight`` (a training checkpoint or a bare state dict; ``state``: its
    content when the caller has already read it, so that the file is read once).

    Returns ``(model in eval mode, epoch or None)``. A checkpoint that does not fit the config raises a
    one-line ``CheckpointError`` naming the parameters and the config keys that likely differ.
    """
    state = load_checkpoint(weight, map_location="cpu") if state is None else state
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {weight}: expected a dict of weights, got {type(state).__name__}")
    model_args = state.get("model_args")
    if model_args is not None:
        check_model_args(model_args, weight)
    if not isinstance(state.get("config", ""), str) or not isinstance(state.get("epoch", 0), (int, type(None))):
        raise CheckpointError(f"checkpoint {weight}: its stored config or epoch is malformed")
    if model_args is None:
        # A bare state dict does not record the training set's sizes: read them from the training split.
        model_args = model_args_from_dataset(load_dataset(cfg))
    model = build_from_args(cfg, model_args, device)
    load_model_weights(model, state.get("model", state), cfg)
    epoch = state.get("epoch")
    logger.info("loaded %s%s", weight, f" (epoch {epoch})" if epoch is not None else "")
    return model.eval(), epoch

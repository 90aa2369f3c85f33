"""Building a model for a dataset and loading trained weights into it."""
import logging

from datasets import make_dataloaders
from model import build_model
from model.checkpoint_fit import load_model_weights
from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError

logger = logging.getLogger(__name__)


def model_args_from_dataset(dataset):
    """Constructor sizes of a model trained on ``dataset`` (saved in every checkpoint as ``model_args``)."""
    return {"num_classes": dataset.num_train_pids, "num_cameras": dataset.num_train_cams,
            "num_views": dataset.num_train_views, "attributes": [list(item) for item in dataset.attributes]}


def build_from_args(cfg, model_args, device):
    """``cfg``'s model with the sizes of ``model_args``, on ``device``; logs its size."""
    args = dict(model_args, attributes=[tuple(item) for item in model_args["attributes"]])
    model = build_model(cfg, **args).to(device)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info("model %s: %.2f M parameters, %.2f M trainable, retrieval embedding %d-d", cfg.MODEL.ARCH_NAME,
                total / 1e6, trainable / 1e6, model.embedding_dim)
    return model


def load_trained_model(cfg, weight, device):
    """Model of ``cfg`` with the weights of ``weight`` (a training checkpoint or a bare state dict).

    Returns ``(model in eval mode, epoch or None)``. A checkpoint that does not fit the config raises a
    one-line ``CheckpointError`` naming the parameters and the config keys that likely differ.
    """
    state = load_checkpoint(weight, map_location="cpu")
    if not isinstance(state, dict):
        raise CheckpointError(f"checkpoint {weight}: expected a dict of weights, got {type(state).__name__}")
    model_args = state.get("model_args")
    if model_args is None:
        # A bare state dict does not record the training set's sizes: read them from the training split.
        model_args = model_args_from_dataset(make_dataloaders(cfg).dataset)
    model = build_from_args(cfg, model_args, device)
    load_model_weights(model, state.get("model", state), cfg)
    epoch = state.get("epoch")
    logger.info("loaded %s%s", weight, f" (epoch {epoch})" if epoch is not None else "")
    return model.eval(), epoch

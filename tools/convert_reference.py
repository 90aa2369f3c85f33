"""Convert weights between the authors' code (ahu-xhao/SVPR-ReID) and this project.

    # the authors' state dict (e.g. transformer_120.pth) -> a checkpoint test_svpr.py loads
    python tools/convert_reference.py --reference transformer_120.pth \
        --config_file configs/CP2108/svpr_reid.yml --out outputs/converted.pth
    # one of our checkpoints -> a state dict the authors' load_param accepts
    python tools/convert_reference.py --to-reference outputs/cp2108_svpr_reid/model_best.pth \
        --config_file configs/CP2108/svpr_reid.yml --out transformer_ours.pth

The model class of MODEL.ARCH_NAME does the mapping (``from_reference_state_dict``,
``to_reference_state_dict``, ``reference_model_args``; docs/reference_differences.md). Accepted inputs:
a bare state dict, one under "state_dict" or "model", with or without DDP's ``module.`` prefixes. Any key
that cannot be mapped, or a shape that does not fit the model of the config, stops with exit code 2.
"""
import argparse
import logging

import torch

from configs import load_config
from model import MODELS
from model.architecture import config_for_weights
from model.checkpoint_fit import load_model_weights
from processor.hooks import weights_file
from processor.model_io import build_from_args
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.entrypoint import run_main
from utils.errors import CheckpointError

logger = logging.getLogger(__name__)
DDP_PREFIX = "module."


def read_state_dict(path):
    """The tensors of ``path``: a bare state dict or one under "state_dict"/"model", ``module.`` stripped."""
    state = load_checkpoint(path)
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: expected a state dict of tensors (bare, or under 'state_dict'/'model')")
    return {key[len(DDP_PREFIX):] if key.startswith(DDP_PREFIX) else key: value for key, value in state.items()}


def from_reference(args, cfg):
    """The authors' weights -> our checkpoint dict (as written by training), checked against the model."""
    model_class = MODELS.get(cfg.MODEL.ARCH_NAME)
    reference = read_state_dict(args.reference)
    model_args = model_class.reference_model_args(reference, cfg)
    if args.num_views is not None:
        model_args["num_views"] = args.num_views
    converted = model_class.from_reference_state_dict(reference, cfg)
    # Every weight is in the file: the backbone is built from its shapes, without the backbone weight file.
    model = build_from_args(config_for_weights(cfg, converted, args.reference), model_args, torch.device("cpu"))
    load_model_weights(model, converted, cfg, source=f"{args.reference} (converted)")
    return weights_file(cfg, model, model_args, None)


def to_reference(args, cfg):
    """One of our checkpoints -> the authors' state dict."""
    model_class = MODELS.get(cfg.MODEL.ARCH_NAME)
    return model_class.to_reference_state_dict(read_state_dict(args.to_reference), cfg)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    direction = parser.add_mutually_exclusive_group(required=True)
    direction.add_argument("--reference", metavar="REF.pth", help="a state dict of the authors' code")
    direction.add_argument("--to-reference", dest="to_reference", metavar="OURS.pth",
                           help="one of our checkpoints, to convert to the authors' layout")
    parser.add_argument("--config_file", required=True, help="config of the model (e.g. configs/CP2108/svpr_reid.yml)")
    parser.add_argument("--out", required=True, help="file to write")
    parser.add_argument("--num_views", type=int, default=None,
                        help="number of views of the training set (the authors' checkpoints do not record it)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = load_config(args.config_file, args.opts)
    result = from_reference(args, cfg) if args.reference else to_reference(args, cfg)
    # A state dict for the authors' code holds their tensors only (no checksum entry their loader would read).
    save_checkpoint(result, args.out, checksum=bool(args.reference))
    state = result.get("model", result)
    print(f"wrote {args.out}: {len(state)} tensors ({'ours' if args.reference else 'reference'} layout)")


if __name__ == "__main__":
    run_main(main)

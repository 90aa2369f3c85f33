"""Ranked-list pictures of a trained checkpoint on every test protocol (worst, best and random queries).

    python tools/visualize.py --weights outputs/x/model_final.pth
    python tools/visualize.py --weights x.pth --config_file configs/CP2108/svpr_reid.yml TEST.VISUALIZE_TOPK 5

Uses the config stored in the checkpoint unless ``--config_file`` is given. Writes
``<out>/<protocol>/<kind>_<n>_q<query>.png`` and ``<out>/<protocol>_grid.png`` (default out:
OUTPUT_DIR/rank_lists) with TEST.VISUALIZE_TOPK gallery images per query (10 when it is 0).
"""
import argparse
import logging
import os

import numpy as np
import torch

from datasets import make_dataloaders
from evaluation.visualize import removal_mask, write_rank_lists
from processor.common import autocast, to_device
from processor.model_io import load_trained_model
from tools.export import config_for
from utils.checkpoint import load_checkpoint
from utils.device import resolve_device
from utils.entrypoint import run_main
from utils.logger import setup_logger
from utils.metrics import ReIDEvaluator

logger = logging.getLogger(__name__)
LABELS = ("pids", "camids", "viewids", "timeids")
DEFAULT_TOPK = 10


@torch.no_grad()
def rank_protocol(cfg, model, device, name):
    """``(metrics, distmat (Q, G) numpy, query labels, gallery labels, view mode)`` of protocol ``name``,
    ranked as evaluation ranks it (same distance, normalisation and re-ranking settings)."""
    bundle = make_dataloaders(cfg, name)
    evaluator = ReIDEvaluator(bundle.num_query, cfg)
    collected = {key: [] for key in LABELS + ("index",)}
    paths = []
    for batch in bundle.val_loader:
        batch = to_device(batch, device)
        with autocast(cfg, device):
            features = model(batch["images"], **model.forward_inputs(batch))
        evaluator.update(features.float(), batch["pids"], batch["camids"], batch["viewids"], batch["timeids"],
                         index=batch["index"], paths=batch["paths"])
        for key in collected:
            collected[key].append(batch[key].cpu().numpy())
        paths.extend(batch["paths"])
    view_mode = bundle.dataset.view_mode
    metrics = evaluator.compute(view_mode=view_mode)
    # The evaluator orders samples by dataset index; so do the labels here.
    order = np.argsort(np.concatenate(collected["index"]), kind="stable")
    labels = {key: np.concatenate(collected[key])[order] for key in LABELS}
    labels["paths"] = [paths[i] for i in order]
    split = bundle.num_query
    query = {key: value[:split] for key, value in labels.items()}
    gallery = {key: value[split:] for key, value in labels.items()}
    return metrics, evaluator.distmat.cpu().numpy(), query, gallery, view_mode


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="checkpoint (model_final.pth, .safetensors, ...)")
    parser.add_argument("--config_file", default="", help="training config (default: the one in the checkpoint)")
    parser.add_argument("--out", default="", help="folder for the pictures (default: OUTPUT_DIR/rank_lists)")
    parser.add_argument("--num-each", type=int, default=3, help="worst, best and random queries per protocol")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random queries")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides as KEY VALUE pairs")
    args = parser.parse_args(argv)
    setup_logger()
    cfg = config_for(args.weights, load_checkpoint(args.weights), args.config_file, args.opts)
    device = resolve_device(cfg.MODEL.DEVICE)
    model, _ = load_trained_model(cfg, args.weights, device)
    out = args.out or os.path.join(cfg.OUTPUT_DIR, "rank_lists")
    topk = cfg.TEST.VISUALIZE_TOPK or DEFAULT_TOPK
    for name in cfg.DATASETS.TESTS:
        metrics, distmat, query, gallery, view_mode = rank_protocol(cfg, model, device, name)
        removed = removal_mask(query, gallery, view_mode, cfg.TEST.TIME_MODE)
        written = write_rank_lists(out, name, distmat, query, gallery, removed, topk, args.num_each, args.seed)
        print(f"{name}: mAP {100 * metrics['mAP']:.2f}%  R1 {100 * metrics['cmc'][0]:.2f}%; "
              f"{len(written) - 1} rank lists, grid {written[-1]}")


if __name__ == "__main__":
    run_main(main)

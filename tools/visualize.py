"""Ranked-list pictures of a trained checkpoint on every test protocol (worst, best and random queries).

    python tools/visualize.py --weights outputs/x/model_final.pth
    python tools/visualize.py --weights x.pth --config_file configs/CP2108/svpr_reid.yml TEST.VISUALIZE_TOPK 5

Evaluates the checkpoint like ``test_svpr.py --weights`` (config stored in the checkpoint unless
``--config_file`` is given; results in ``<folder of the checkpoint>/test`` unless OUTPUT_DIR is given) with
TEST.VISUALIZE_TOPK gallery images per query (10 when it is 0) after its relevance map, and writes
``OUTPUT_DIR/rank_lists/<protocol>/<kind>_<n>_q<query>.png``, one grid per protocol and ``report.html``.
"""
import argparse
import os

from configs import config_from_checkpoint
from processor.launch import check_registered_names
from utils.device import resolve_device
from utils.entrypoint import run_main
from utils.logger import setup_logger

DEFAULT_TOPK = 10


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", required=True, help="checkpoint (model_final.pth, .safetensors, ...)")
    parser.add_argument("--config_file", "--config-file", default=None,
                        help="training config (default: the one stored in the checkpoint)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="config overrides as KEY VALUE pairs")
    args = parser.parse_args(argv)
    defaults = ["TEST.WEIGHT", args.weights, "TEST.VISUALIZE_TOPK", str(DEFAULT_TOPK),
                "OUTPUT_DIR", os.path.join(os.path.dirname(os.path.abspath(args.weights)), "test")]
    cfg, _ = config_from_checkpoint(args.weights, args.config_file, defaults + list(args.opts))
    check_registered_names(cfg)
    if cfg.TEST.VISUALIZE_TOPK <= 0:
        cfg.defrost()
        cfg.TEST.VISUALIZE_TOPK = DEFAULT_TOPK
        cfg.freeze()
    setup_logger(cfg.OUTPUT_DIR, "visualize.log")
    from processor import run_testing

    run_testing(cfg, resolve_device(cfg.MODEL.DEVICE), config_file=args.config_file)
    out = cfg.OUTPUT_DIR
    print(f"ranked lists in {os.path.join(out, 'rank_lists')}, page {os.path.join(out, 'report.html')}")


if __name__ == "__main__":
    run_main(main)

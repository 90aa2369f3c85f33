"""Command-line plumbing shared by ``train_svpr.py``, ``test_svpr.py`` and the tools: parse, configure,
check the names the config uses against the registries, set up logging, devices and processes."""
import argparse
import logging
import os
import sys

from configs import ignored_keys_message, read_config
from datasets import DATASETS
from model import MODELS
from utils.device import resolve_device
from utils.distributed import get_rank, init_distributed, is_main_process
from utils.logger import setup_logger
from utils.seed import set_seed

DEFAULT_CONFIG = "configs/Synthetic/svpr_reid.yml"


def build_parser(description):
    """Parser with ``--config_file`` and trailing ``KEY VALUE`` overrides."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config_file", default=DEFAULT_CONFIG,
                        help=f"YAML config merged into configs/defaults.py (default: {DEFAULT_CONFIG})")
    # Accepted for launchers that still pass it (torch.distributed.launch); torchrun uses LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[],
                        help="config overrides as KEY VALUE pairs, e.g. SOLVER.MAX_EPOCHS 10")
    return parser


def check_registered_names(cfg):
    """Every model and dataset the config names exists (a ``ConfigError`` with close matches otherwise)."""
    MODELS.get(cfg.MODEL.ARCH_NAME)
    DATASETS.get(cfg.DATASETS.NAMES, "DATASETS.NAMES")
    for name in cfg.DATASETS.TESTS:
        DATASETS.get(name, "DATASETS.TESTS")


def prepare_run(args, log_file):
    """Config, device, process group, logger, seed and ``OUTPUT_DIR/config.yaml`` for one run."""
    cfg, ignored = read_config(args.config_file, args.opts)
    check_registered_names(cfg)
    device = resolve_device(cfg.MODEL.DEVICE)
    init_distributed(device)
    setup_logger(cfg.OUTPUT_DIR, log_file, rank=get_rank())
    logger = logging.getLogger("svpr")
    logger.info("command: %s", " ".join(sys.argv))
    logger.info("config file: %s", args.config_file)
    if ignored:
        logger.warning(ignored_keys_message(ignored))
    if is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
        with open(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w", encoding="utf-8") as handle:
            handle.write(cfg.dump())
    logger.info("running on %s; merged config saved to %s", device, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    # Each rank gets its own stream so that augmentations differ across ranks; samplers share the seed.
    set_seed(cfg.SOLVER.SEED + get_rank())
    return cfg, device

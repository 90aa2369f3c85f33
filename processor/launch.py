"""Command-line plumbing shared by ``train_svpr.py``, ``test_svpr.py`` and the tools: parse, configure,
check the names the config uses against the registries, set up logging, devices and processes."""
import argparse
import atexit
import glob
import logging
import os
import signal
import sys

from configs import ignored_keys_message, read_config
from datasets import DATASETS
from model import MODELS
from processor.preflight import (RESULTS_FILE, check_output_dir, check_resume_config, check_writable,
                                 remove_run_files, remove_stale_temporaries)
from utils.allocator import retain_freed_cpu_memory
from utils.device import resolve_device
from utils.distributed import get_rank, init_distributed, is_main_process, restart_count
from utils.errors import ConfigError
from utils.interrupts import INTERRUPTS
from utils.io import atomic_write
from utils.logger import setup_logger
from utils.run_lock import claim_folder, lock_folder
from utils.seed import set_seed
from utils.threads import start_core_share

DEFAULT_CONFIG = "configs/Synthetic/svpr_reid.yml"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def shipped_configs():
    """The runnable YAML files under configs/ (not the ``Base-*.yml`` files they inherit from), relative to the
    repository (for ``--help``)."""
    paths = glob.glob(os.path.join(REPO_ROOT, "configs", "*", "*.yml"))
    return sorted(os.path.relpath(path, REPO_ROOT) for path in paths if not os.path.basename(path).startswith("Base-"))


class ConfigArgumentParser(argparse.ArgumentParser):
    """``--options`` and ``KEY VALUE`` overrides in any order; ``opts`` collects the overrides.

    Argparse alone cannot mix them: an override value such as ``-3`` looks like an option to it, and
    everything after the first override would be swallowed. Tokens that are not options of this parser
    (or their values) are overrides.
    """

    def parse_args(self, args=None, namespace=None):
        args = list(sys.argv[1:] if args is None else args)
        options, overrides = [], []
        takes_value = {string: action.nargs != 0 for action in self._actions for string in action.option_strings}
        index = 0
        while index < len(args):
            token = args[index]
            name = token.split("=", 1)[0]
            if name in takes_value:
                options.append(token)
                if takes_value[name] and "=" not in token and index + 1 < len(args):
                    options.append(args[index + 1])
                    index += 1
            else:
                overrides.append(token)
            index += 1
        namespace = super().parse_args(options, namespace)
        namespace.opts = overrides
        return namespace


def build_parser(description):
    """Parser with ``--config_file`` (alias ``--config-file``) and ``KEY VALUE`` overrides in any order."""
    epilog = "shipped configs:\n  " + "\n  ".join(shipped_configs())
    parser = ConfigArgumentParser(description=description, epilog=epilog,
                                  formatter_class=argparse.RawDescriptionHelpFormatter,
                                  usage="%(prog)s [--config_file FILE] [options] [KEY VALUE ...]")
    parser.add_argument("--config_file", "--config-file", default=None,
                        help=f"YAML config merged into configs/defaults.py (default: {DEFAULT_CONFIG})")
    # Accepted for launchers that still pass it (torch.distributed.launch); torchrun uses LOCAL_RANK.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def check_registered_names(cfg):
    """Every model and dataset the config names exists (a ``ConfigError`` with close matches otherwise)."""
    MODELS.get(cfg.MODEL.ARCH_NAME)
    DATASETS.get(cfg.DATASETS.NAMES, "DATASETS.NAMES")
    for name in cfg.DATASETS.TESTS:
        DATASETS.get(name, "DATASETS.TESTS")


def _terminate(signum, frame):
    # SIGTERM (a scheduler, torchrun stopping the other ranks) unwinds like Ctrl-C: cleanup code runs and
    # temporary files are removed; checkpoint_last.pth keeps the start of the interrupted epoch.
    raise SystemExit(128 + signum)


def _ignore_interrupts_at_exit():
    # Registered after logging's own exit handler, so it runs before it: once the work is done and written, a
    # Ctrl-C or SIGTERM would only break the interpreter's teardown with a traceback ("Exception ignored in").
    for signum in INTERRUPTS:
        signal.signal(signum, signal.SIG_IGN)


def prepare_run(args, log_file, run_files=(), base_config=None):
    """Config, device, process group, logger, seed and ``OUTPUT_DIR/config.yaml`` for one run.

    ``base_config`` (YAML text, e.g. the config stored in a checkpoint) replaces the default config file
    when ``--config_file`` is not given. ``run_files``: names whose presence in OUTPUT_DIR means a previous
    run (e.g. ``TRAINING_RUN_FILES``). With them, ``args.resume`` / ``args.overwrite`` (when the parser has
    them) are checked before anything is written: no silent overwrite, no silent fresh start, no resume under
    another config. ``args.resume`` is set to the decision (also True after a torchrun elastic restart that
    has a checkpoint to resume). With ``run_files`` the process (rank 0 under torchrun: one per run) holds
    OUTPUT_DIR's lock (``utils.run_lock``): a run into a folder that a live run uses stops with one line naming
    it, before any other check; a run refused by the checks leaves the folder as it was.
    """
    if args.config_file is None and base_config is None:
        args.config_file = DEFAULT_CONFIG
    cfg, ignored = read_config(args.config_file, args.opts, base_yaml=None if args.config_file else base_config)
    check_registered_names(cfg)
    signal.signal(signal.SIGTERM, _terminate)
    atexit.unregister(_ignore_interrupts_at_exit)  # (once per process, however many runs it prepares)
    atexit.register(_ignore_interrupts_at_exit)
    resume, overwrite = bool(getattr(args, "resume", False)), bool(getattr(args, "overwrite", False))
    # One run per folder: a run into a live run's folder stops here, before any check, having changed nothing.
    lock = bool(run_files) and os.environ.get("RANK", "0") == "0"
    if lock:
        claim_folder(cfg.OUTPUT_DIR)
    if restart_count() > 0:
        # An elastic restart continues its own run, from the last checkpoint if one was written.
        resume = any(os.path.isfile(os.path.join(cfg.OUTPUT_DIR, name)) for name in run_files
                     if name != RESULTS_FILE)
        overwrite = True
    if resume and overwrite and restart_count() == 0:
        raise ConfigError("--resume and --overwrite contradict each other: pass one of them")
    resume_notes = []
    if run_files:
        resume_path = check_output_dir(cfg.OUTPUT_DIR, run_files, resume, overwrite)
        if resume_path:
            resume_notes = check_resume_config(cfg, resume_path)
    if lock and not lock_folder(cfg.OUTPUT_DIR):
        logging.getLogger("svpr").warning("OUTPUT_DIR '%s' cannot be locked (no file locks on its file system): "
                                          "nothing stops a second run from using it at the same time", cfg.OUTPUT_DIR)
    check_writable(cfg.OUTPUT_DIR)
    if hasattr(args, "resume"):
        args.resume = resume
    device = resolve_device(cfg.MODEL.DEVICE)
    init_distributed(device, cfg.DIST.TIMEOUT_MINUTES)
    setup_logger(cfg.OUTPUT_DIR, log_file, rank=get_rank())
    if is_main_process():
        remove_stale_temporaries(cfg.OUTPUT_DIR)
        if overwrite and not resume:
            remove_run_files(cfg.OUTPUT_DIR, run_files)
    logger = logging.getLogger("svpr")
    logger.info("command: %s", " ".join(sys.argv))
    logger.info("config file: %s", args.config_file or "(stored in the checkpoint)")
    if ignored:
        logger.warning(ignored_keys_message(ignored))
    for note in resume_notes:
        logger.warning(note)
    if restart_count() > 0:
        logger.warning("torchrun elastic restart %d: %s", restart_count(),
                       "resuming from the last checkpoint" if resume else "no checkpoint yet, starting again")
    if is_main_process():
        atomic_write(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), cfg.dump())
    logger.info("running on %s; merged config saved to %s", device, os.path.join(cfg.OUTPUT_DIR, "config.yaml"))
    start_core_share(cfg.DIST.CPU_THREADS, cfg.DATALOADER.NUM_WORKERS, device.type)
    if cfg.DIST.KEEP_FREED_CPU_MEMORY:
        retain_freed_cpu_memory()
    # Each rank gets its own stream so that augmentations differ across ranks; samplers share the seed.
    set_seed(cfg.SOLVER.SEED + get_rank())
    return cfg, device

"""Logging to the console and to ``OUTPUT_DIR/<name>.log``."""
import logging
import os
import sys

_FORMAT = "[%(asctime)s %(name)s %(levelname)s] %(message)s"


def setup_logger(output_dir=None, filename="train.log", rank=0, level=logging.INFO):
    """Configure the root logger once per process: console on every rank, a log file on rank 0.

    Every module logs with ``logging.getLogger(__name__)`` and reaches these handlers, so no message is
    lost to an unconfigured logger name.
    """
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level)
    formatter = logging.Formatter(_FORMAT, datefmt="%m/%d %H:%M:%S")
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    console.setLevel(level if rank == 0 else logging.WARNING)
    root.addHandler(console)
    if output_dir and rank == 0:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(output_dir, filename), mode="a", encoding="utf-8")
        file_handler.setFormatter(formatter)
        root.addHandler(file_handler)
    # Third-party libraries' debug chatter stays out of the run log.
    for noisy in ("PIL", "matplotlib", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return logging.getLogger("svpr")


def show_progress(rank):
    """tqdm bars only on rank 0 and only when stderr is a terminal."""
    return rank == 0 and sys.stderr.isatty()

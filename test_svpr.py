"""Evaluate a checkpoint on every protocol of DATASETS.TESTS and write results.json / results.csv.

    python test_svpr.py --weights outputs/cp2108_svpr_reid/model_final.pth            # config from the checkpoint
    python test_svpr.py --weights W.pth DATASETS.TESTS "('CP2108_AG',)" TEST.RE_RANKING True
    python test_svpr.py --config_file configs/CP2108/svpr_reid.yml TEST.WEIGHT W.pth   # explicit config wins

Results go to <folder of the checkpoint>/test/ (or OUTPUT_DIR when given), never over a training run's files.
Every file is written atomically; if the evaluation is killed, the same command run again replaces what it
wrote (OUTPUT_DIR/.evaluation-in-progress marks an evaluation that has not finished).
"""
import logging
import os

from configs import stored_config
from processor.launch import build_parser, prepare_run
from processor.preflight import EVALUATION_IN_PROGRESS, RESULTS_FILE
from utils.checkpoint import load_checkpoint
from utils.distributed import is_main_process
from utils.entrypoint import run_main
from utils.io import atomic_write


def main():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--weights", help="checkpoint to evaluate; its stored config is used unless --config_file "
                                          "is given (same as TEST.WEIGHT)")
    parser.add_argument("--overwrite", action="store_true", help="replace results.json/results.csv in OUTPUT_DIR")
    args = parser.parse_args()
    base, loaded = None, {}
    if args.weights:
        # Read once: its stored config (unless --config_file) and its weights come from this one load.
        loaded[args.weights] = load_checkpoint(args.weights, map_location="cpu")
        if args.config_file is None:
            base = stored_config(args.weights, loaded[args.weights])
        # Before the user's overrides, so that an explicit OUTPUT_DIR still wins.
        args.opts = ["TEST.WEIGHT", args.weights,
                     "OUTPUT_DIR", os.path.join(os.path.dirname(os.path.abspath(args.weights)), "test"), *args.opts]
    cfg, device = prepare_run(args, "test.log", run_files=(RESULTS_FILE,), base_config=base)
    from processor import run_testing

    marker = os.path.join(cfg.OUTPUT_DIR, EVALUATION_IN_PROGRESS)
    if is_main_process():
        if os.path.isfile(marker):
            logging.getLogger("svpr").warning("an earlier evaluation into %s was interrupted: its files are "
                                              "replaced", cfg.OUTPUT_DIR)
        atomic_write(marker, f"pid {os.getpid()}\n")
    run_testing(cfg, device, config_file=args.config_file, state=loaded.get(cfg.TEST.WEIGHT))
    if is_main_process():
        os.remove(marker)


if __name__ == "__main__":
    run_main(main)

"""Evaluate a checkpoint on every protocol of DATASETS.TESTS and write results.json / results.csv.

    python test_svpr.py --config_file configs/CP2108/svpr_reid.yml TEST.WEIGHT outputs/cp2108_svpr/model_best.pth
"""
from processor.launch import build_parser, prepare_run
from processor.preflight import RESULTS_FILE
from utils.entrypoint import run_main


def main():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--overwrite", action="store_true", help="replace results.json/results.csv in OUTPUT_DIR")
    args = parser.parse_args()
    cfg, device = prepare_run(args, "test.log", run_files=(RESULTS_FILE,))
    from processor import run_testing

    run_testing(cfg, device, config_file=args.config_file)


if __name__ == "__main__":
    run_main(main)

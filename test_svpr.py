"""Evaluate a checkpoint on every protocol of DATASETS.TESTS and write results.json / results.csv.

    python test_svpr.py --config_file configs/CP2108/svpr_reid.yml TEST.WEIGHT outputs/cp2108_svpr/model_best.pth
"""
from processor.launch import build_parser, prepare_run
from utils.entrypoint import run_main


def main():
    args = build_parser(__doc__.splitlines()[0]).parse_args()
    cfg, device = prepare_run(args, "test.log")
    from processor import run_testing

    run_testing(cfg, device, config_file=args.config_file)


if __name__ == "__main__":
    run_main(main)

"""Train a ReID model from a YAML config: SVPR-ReID or any baseline of its tables (configs/<benchmark>/<model>.yml).

    python train_svpr.py                                   # SVPR-ReID on the synthetic benchmark
    python train_svpr.py --config_file configs/CP2108/svpr_reid.yml MODEL.PRETRAIN_PATH ViT-B-16.pt
    torchrun --nproc_per_node=4 train_svpr.py --config_file ...
"""
from processor.launch import build_parser, prepare_run
from processor.preflight import training_run_files
from utils.distributed import collective_errors
from utils.entrypoint import run_main


def main():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in OUTPUT_DIR from its last checkpoint (the interrupted epoch restarts)")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the run already in OUTPUT_DIR (its checkpoint_last.pth, stage1.pth and results)")
    args = parser.parse_args()
    cfg, device = prepare_run(args, "train.log", run_files=training_run_files())
    from processor import run_training

    with collective_errors():
        run_training(cfg, device, resume=args.resume, config_file=args.config_file)


if __name__ == "__main__":
    run_main(main)

"""Train a ReID model (SVPR-ReID, CLIP-ReID or the CLIP baseline) from a YAML config.

    python train_svpr.py                                   # SVPR-ReID on the synthetic benchmark
    python train_svpr.py --config_file configs/CP2108/svpr_reid.yml MODEL.PRETRAIN_PATH ViT-B-16.pt
    torchrun --nproc_per_node=4 train_svpr.py --config_file ...
"""
from processor.launch import build_parser, prepare_run
from utils.entrypoint import run_main


def main():
    parser = build_parser(__doc__.splitlines()[0])
    parser.add_argument("--resume", action="store_true",
                        help="continue from OUTPUT_DIR/checkpoint_last.pth if it exists")
    args = parser.parse_args()
    cfg, device = prepare_run(args, "train.log")
    from processor import run_training

    run_training(cfg, device, resume=args.resume, config_file=args.config_file)


if __name__ == "__main__":
    run_main(main)

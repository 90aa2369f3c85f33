"""Print the statistics (identities, images, cameras per split and per view) of dataset protocols.

    python tools/dataset_stats.py --root ./data SynthAG_ALL SynthAG_AG CP2108_AGAG
"""
import argparse


from datasets import DATASETS, build_dataset, format_statistics
from utils.entrypoint import run_main


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", required=True, help="folder holding CP2108/, CARGO/, AGReID/, AGReID.v2/, SynthAG/")
    parser.add_argument("--version", type=int, default=100, help="CP2108 split version")
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"one of: {', '.join(DATASETS.names())}")
    args = parser.parse_args()
    for name in args.names:
        dataset = build_dataset(name, args.root, version=args.version, verbose=False)
        print(f"{name} (view_mode {dataset.view_mode}, {dataset.num_train_pids} training identities)")
        print(format_statistics(dataset))


if __name__ == "__main__":
    run_main(main)

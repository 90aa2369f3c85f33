"""Print the statistics (identities, images, cameras per split and per view) of dataset protocols.

    python tools/dataset_stats.py ./data market1501 msmt17 VehicleID
    python tools/dataset_stats.py --root ./data SynthAG_ALL SynthAG_AG CP2108_AGAG
"""
import argparse

from configs.defaults import get_cfg_defaults
from datasets import DATASETS, build_dataset, format_statistics
from utils.entrypoint import run_main
from utils.errors import ConfigError


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="folder holding the benchmark folders (CP2108/, Market-1501-v15.09.15/, "
                                       "MSMT17/, VeRi/, ...); without it the first positional argument is the root")
    parser.add_argument("--version", type=int, default=100, help="CP2108 split version")
    parser.add_argument("--vehicleid-test-size", type=int, default=800,
                        help="VehicleID test set: 800, 1600 or 2400 (the trial-0 gallery is shown)")
    parser.add_argument("names", nargs="+", metavar="NAME", help=f"[ROOT] then one or more of: "
                                                                   f"{', '.join(DATASETS.names())}")
    args = parser.parse_args()
    root, names = (args.root, args.names) if args.root else (args.names[0], args.names[1:])
    if not names:
        raise ConfigError("no dataset name given: expected ROOT NAME... or --root ROOT NAME...")
    # Dataset-specific options come from the config defaults, as in training, with this tool's overrides.
    cfg = get_cfg_defaults()
    cfg.DATASETS.VEHICLEID_TEST_SIZE = args.vehicleid_test_size
    cfg.DATASETS.VERSION = args.version
    for name in names:
        options = DATASETS.get(name, "NAME").options_from_config(cfg)
        dataset = build_dataset(name, root, verbose=False, **options)
        print(f"{name} (view_mode {dataset.view_mode}, {dataset.num_train_pids} training identities)")
        print(format_statistics(dataset))


if __name__ == "__main__":
    run_main(main)

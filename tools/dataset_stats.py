"""Print the statistics (identities, images, cameras per split and per view) of dataset protocols.

    python tools/dataset_stats.py ./data market1501 msmt17 VehicleID
    python tools/dataset_stats.py --root ./data SynthAG_ALL SynthAG_AG CP2108_AGAG
    python tools/dataset_stats.py --manifest crops/data.csv            # check a Custom manifest
    python tools/dataset_stats.py --manifest crops/data.csv Custom Custom_AG

With --manifest the CSV of the Custom datasets is checked as training reads it (one error line naming the
line of the first problem, exit code 2), its warnings are printed (identities in both training and test
splits, query identities with no gallery image, views with no images), then the statistics of the Custom
protocols named (default: Custom, Custom_AG, Custom_GA, Custom_AGAG); a protocol the data leaves empty is a
warning, not an error.
"""
import argparse

from configs.defaults import get_cfg_defaults
from datasets import DATASETS, build_dataset, format_statistics
from datasets.custom import SPLITS, CustomBase, read_manifest
from utils.entrypoint import run_main
from utils.errors import ConfigError, DataError

MANIFEST_PROTOCOLS = ("Custom", "Custom_AG", "Custom_GA", "Custom_AGAG")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", help="folder holding the benchmark folders (CP2108/, Market-1501-v15.09.15/, "
                                       "MSMT17/, VeRi/, ...); without it the first positional argument is the root")
    parser.add_argument("--version", type=int, default=100, help="CP2108 split version")
    parser.add_argument("--vehicleid-test-size", type=int, default=800,
                        help="VehicleID test set: 800, 1600 or 2400 (the trial-0 gallery is shown)")
    parser.add_argument("--manifest", help="CSV manifest of the Custom datasets (DATASETS.CUSTOM.MANIFEST) to "
                                           "check; then NAME... are Custom protocols (default: "
                                           f"{', '.join(MANIFEST_PROTOCOLS)})")
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"[ROOT] then one or more of: "
                                                                   f"{', '.join(DATASETS.names())}")
    args = parser.parse_args(argv)
    if args.manifest:
        return manifest_report(args.manifest, args.names or MANIFEST_PROTOCOLS)
    root, names = (args.root, args.names) if args.root else (args.names[:1] and args.names[0], args.names[1:])
    if not names:
        raise ConfigError("no dataset name given: expected ROOT NAME... or --root ROOT NAME... (or --manifest CSV)")
    # Dataset-specific options come from the config defaults, as in training, with this tool's overrides.
    cfg = get_cfg_defaults()
    cfg.DATASETS.VEHICLEID_TEST_SIZE = args.vehicleid_test_size
    cfg.DATASETS.VERSION = args.version
    for name in names:
        options = DATASETS.get(name, "NAME").options_from_config(cfg)
        print_statistics(name, build_dataset(name, root, verbose=False, **options))


def print_statistics(name, dataset):
    print(f"{name} (view_mode {dataset.view_mode}, {dataset.num_train_pids} training identities)")
    print(format_statistics(dataset))


def manifest_report(path, names):
    """Check the manifest ``path`` as training reads it, print its warnings and the statistics of the Custom
    protocols ``names`` (one that the data leaves empty is a warning)."""
    manifest = read_manifest(path)
    for split in SPLITS:
        manifest.samples(split)  # every image of every split exists
    for name in names:
        if not issubclass(DATASETS.get(name, "NAME"), CustomBase):
            raise ConfigError(f"--manifest: {name} is not a Custom protocol (expected Custom, Custom_AG, ...)")
    attributes = ", ".join(f"{n} ({c} classes)" for n, c in zip(manifest.attribute_names, manifest.attribute_classes))
    print(f"{manifest.path}: {len(manifest.rows)} images; attributes: {attributes or 'none'}")
    for warning in manifest.warnings():
        print(f"warning: {warning}")
    for name in names:
        try:
            dataset = build_dataset(name, manifest.folder, manifest=manifest.path, verbose=False)
        except DataError as exc:  # the manifest and its images are fine: the protocol keeps no image
            print(f"warning: {name}: {exc}")
            continue
        print_statistics(name, dataset)


if __name__ == "__main__":
    run_main(main)

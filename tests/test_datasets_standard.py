"""Standard ReID benchmarks (Market-1501, DukeMTMC-reID, Occluded-Duke, MSMT17, VeRi-776, VehicleID): real
JPEG trees in each benchmark's naming rule, identities, cameras, relabelling, junk and distractors, every
accepted folder placement, VehicleID's random galleries, the CP2000 aliases, bad trees, and every config."""
import glob
import logging
import os
import sys

import pytest


from configs import load_config
from datasets import DATASETS, build_dataset
from datasets.loader import make_dataloaders
from tests.fixtures import REPO_ROOT, jpeg, make_cp2108_tree, make_vehicleid_tree
from text import prompts
from tools import dataset_stats
from utils.errors import ConfigError, DataError


def rows(samples):
    return sorted((s.pid, s.camid, s.viewid, s.timeid) for s in samples)


# ---- Market-1501 / DukeMTMC-reID / Occluded-Duke / VeRi-776 ---------------------------------------------
# (pid, 1-based camera) per split. -1 is junk (dropped everywhere), 0 a distractor (kept in the gallery).
TRAIN = [(17, 1), (17, 3), (5, 2), (5, 2), (40, 4), (-1, 1)]
QUERY = [(101, 1), (102, 2), (103, 3), (-1, 2)]
GALLERY = [(101, 2), (101, 3), (102, 1), (103, 4), (0, 1), (0, 2), (-1, 3)]

MARKET_SPLITS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
VERI_SPLITS = {"train": "image_train", "query": "image_query", "gallery": "image_test"}


def market_name(pid, camera, i):
    return f"{pid:04d}_c{camera}s{1 + i % 3}_{i * 25:06d}_{i % 2:02d}.jpg" if pid >= 0 else \
        f"-1_c{camera}s1_{i * 25:06d}_00.jpg"


def duke_name(pid, camera, i):
    return f"{pid:04d}_c{camera}_f{i * 97:07d}.jpg" if pid >= 0 else f"-1_c{camera}_f{i:07d}.jpg"


def veri_name(pid, camera, i):
    return f"{pid:04d}_c{camera:03d}_{i * 131:08d}_{i % 2}.jpg" if pid >= 0 else f"-1_c{camera:03d}_{i:08d}_0.jpg"


def make_split_tree(base, splits, name_of):
    """One folder per split under ``base`` with TRAIN/QUERY/GALLERY named by ``name_of``."""
    i = 0
    for split, entries in (("train", TRAIN), ("query", QUERY), ("gallery", GALLERY)):
        for pid, camera in entries:
            jpeg(os.path.join(base, splits[split], name_of(pid, camera, i)), shade=i)
            i += 1
    return base


def expected(entries):
    return sorted((pid, camera - 1, 0, 0) for pid, camera in entries if pid != -1)


BENCHMARKS = {  # name -> (accepted folders in order, split folders, name rule)
    "market1501": (["Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15", "Market-1501", "market1501"],
                   MARKET_SPLITS, market_name),
    "dukemtmc": (["dukemtmcreid/DukeMTMC-reID", "DukeMTMC-reID", "dukemtmc-reid/DukeMTMC-reID"],
                 MARKET_SPLITS, duke_name),
    "occ_duke": (["dukemtmcreid/Occluded_Duke", "Occluded_Duke"], MARKET_SPLITS, duke_name),
    "veri": (["VeRi"], VERI_SPLITS, veri_name),
}
PLACEMENTS = [(name, folder) for name, (folders, _, _) in BENCHMARKS.items() for folder in folders]


@pytest.mark.parametrize("name,folder", PLACEMENTS)
def test_split_folder_benchmarks_identities_cameras_junk_and_distractors(tmp_path, name, folder):
    _, splits, name_of = BENCHMARKS[name]
    make_split_tree(os.path.join(tmp_path, folder), splits, name_of)
    ds = build_dataset(name, tmp_path, verbose=False)
    assert ds.dataset_dir == os.path.join(tmp_path, folder)
    # Train identities 5, 17, 40 numbered as the reference does, by their position in a Python set of the raw
    # ids ({5, 17, 40} in 8 slots iterates 40, 17, 5); junk gone.
    relabel = {40: 0, 17: 1, 5: 2}
    assert rows(ds.train) == sorted((relabel[p], c, v, t) for p, c, v, t in expected(TRAIN))
    assert rows(ds.query) == expected(QUERY)
    assert rows(ds.gallery) == expected(GALLERY)
    assert sum(s.pid == 0 for s in ds.gallery) == 2
    assert (ds.num_train_pids, ds.num_train_cams, ds.num_train_views) == (3, 4, 1)
    assert all(os.path.isfile(s.path) and s.text is None and s.attrs is None for s in ds.train + ds.query)


@pytest.mark.parametrize("name,folder", [("dukemtmc", "DukeMTMC-reID"), ("veri", "VeRi"),
                                         ("market1501", "Market-1501")])
def test_identities_numbered_in_the_order_the_reference_lists_the_training_folder(tmp_path, name, folder):
    # The reference fills a Python set with the raw ids while listing the training folder, unsorted (glob)
    # for DukeMTMC-reID and VeRi-776, sorted for Market-1501, and numbers each id by its position in the
    # set. Ids 3, 11, 19, 27 share a slot of the set's table, so the listing order decides their labels.
    _, splits, name_of = BENCHMARKS[name]
    base = os.path.join(tmp_path, folder)
    for i, pid in enumerate([27, 3, 19, 11, 3, 27, 11, 19]):
        jpeg(os.path.join(base, splits["train"], name_of(pid, 1 + i % 4, i)), shade=i)
    for split, pid in (("query", 101), ("gallery", 101)):
        jpeg(os.path.join(base, splits[split], name_of(pid, 1 if split == "query" else 2, 50)))
    ds = build_dataset(name, tmp_path, verbose=False)
    listing = os.listdir(os.path.join(base, splits["train"]))
    if name == "market1501":
        listing = sorted(listing)
    met = [int(entry.split("_")[0]) for entry in listing]
    expected = {pid: label for label, pid in enumerate(set(met))}
    got = {int(os.path.basename(s.path).split("_")[0]): s.pid for s in ds.train}
    assert got == expected


def test_first_accepted_folder_wins(tmp_path):
    make_split_tree(os.path.join(tmp_path, "Market-1501"), MARKET_SPLITS, market_name)
    make_split_tree(os.path.join(tmp_path, "Market-1501-v15.09.15"), MARKET_SPLITS, market_name)
    assert build_dataset("market1501", tmp_path, verbose=False).dataset_dir == \
        os.path.join(tmp_path, "Market-1501-v15.09.15")


@pytest.mark.parametrize("name,subject", [("market1501", prompts.PERSON), ("veri", prompts.VEHICLE)])
def test_texts_are_the_plain_caption(tmp_path, name, subject):
    folders, splits, name_of = BENCHMARKS[name]
    make_split_tree(os.path.join(tmp_path, folders[0]), splits, name_of)
    ds = build_dataset(name, tmp_path, use_text=True, text_prompt=4, verbose=False)
    caption = f"A photo of a X X X X  {subject}."
    assert {s.text for s in ds.train + ds.query + ds.gallery} == {caption}


@pytest.mark.parametrize("name,folders", [
    *[(name, folders) for name, (folders, _, _) in BENCHMARKS.items()],
    ("msmt17", ["MSMT17", "MSMT17_V2", "MSMT17_V1", "msmt17/MSMT17_V2", "msmt17/MSMT17_V1"]),
    ("VehicleID", ["VehicleID_V1.0/image"]),
])
def test_missing_folder_names_every_folder_tried(tmp_path, name, folders):
    with pytest.raises(DataError) as err:
        build_dataset(name, tmp_path, verbose=False)
    message = str(err.value)
    assert "\n" not in message
    assert all(f in message for f in folders)


def test_missing_split_folder(tmp_path):
    base = make_split_tree(os.path.join(tmp_path, "VeRi"), VERI_SPLITS, veri_name)
    os.rename(os.path.join(base, "image_query"), os.path.join(base, "query"))
    with pytest.raises(DataError, match="image_query"):
        build_dataset("veri", tmp_path, verbose=False)


@pytest.mark.parametrize("name,bad", [
    ("market1501", "0002_c1_f0000001.jpg"),       # a Duke name in Market
    ("market1501", "0002_c7s1_000100_00.jpg"),    # camera 7 of 6
    ("dukemtmc", "0002_c1s1_000100_00.jpg"),      # a Market name in Duke
    ("veri", "car_0002.jpg"),
])
def test_bad_file_name_names_file_and_rule(tmp_path, name, bad):
    folders, splits, name_of = BENCHMARKS[name]
    base = make_split_tree(os.path.join(tmp_path, folders[0]), splits, name_of)
    jpeg(os.path.join(base, splits["gallery"], bad))
    with pytest.raises(DataError) as err:
        build_dataset(name, tmp_path, verbose=False)
    message = str(err.value)
    assert bad in message and "rule" in message and "\n" not in message


def test_empty_split(tmp_path):
    base = make_split_tree(os.path.join(tmp_path, "Occluded_Duke"), MARKET_SPLITS, duke_name)
    for path in glob.glob(os.path.join(base, "query", "*.jpg")):
        os.remove(path)
    with pytest.raises(DataError, match="query split is empty"):
        build_dataset("occ_duke", tmp_path, verbose=False)


# ---- MSMT17 ---------------------------------------------------------------------------------------------
# (list file, pid, camera); val images are train identities with the lists' ids kept.
MSMT_LISTS = {
    "list_train.txt": [(0, 1), (0, 15), (1, 3), (2, 4)],
    "list_val.txt": [(1, 7), (2, 2)],
    "list_query.txt": [(0, 5), (1, 9)],
    "list_gallery.txt": [(0, 6), (1, 10), (1, 11), (2, 12)],
}


def make_msmt17_tree(base, layout="v1", c_names=False):
    """MSMT17 fixture in the V1 (train/ test/) or V2 (mask_train_v2/ mask_test_v2/) layout."""
    train_dir, test_dir = ("train", "test") if layout == "v1" else ("mask_train_v2", "mask_test_v2")
    i = 0
    for list_name, entries in MSMT_LISTS.items():
        folder = train_dir if list_name in ("list_train.txt", "list_val.txt") else test_dir
        lines = []
        for pid, camera in entries:
            name = (f"{pid:04d}_c{camera}_{i:04d}.jpg" if c_names
                    else f"{pid:04d}_{i:03d}_{camera:02d}_0303morning_{i:04d}_0.jpg")
            jpeg(os.path.join(base, folder, f"{pid:04d}", name), shade=i)
            lines.append(f"{pid:04d}/{name} {pid}")
            i += 1
        with open(os.path.join(base, list_name), "w") as f:
            f.write("\n".join(lines) + "\n")
    return base


def _msmt_expected(*lists):
    return sorted((pid, camera - 1, 0, 0) for name in lists for pid, camera in MSMT_LISTS[name])


@pytest.mark.parametrize("folder,layout,c_names", [
    ("MSMT17", "v1", False), ("MSMT17_V2", "v2", False), ("msmt17/MSMT17_V1", "v1", True),
    ("msmt17/MSMT17_V2", "v2", False),
])
def test_msmt17_layouts_merge_val_into_train(tmp_path, folder, layout, c_names):
    make_msmt17_tree(os.path.join(tmp_path, folder), layout, c_names)
    ds = build_dataset("msmt17", tmp_path, verbose=False)
    assert rows(ds.train) == _msmt_expected("list_train.txt", "list_val.txt")
    assert rows(ds.query) == _msmt_expected("list_query.txt")
    assert rows(ds.gallery) == _msmt_expected("list_gallery.txt")
    assert (ds.num_train_pids, ds.num_train_cams) == (3, 15)


def test_msmt17_missing_list_and_bad_lines(tmp_path):
    base = make_msmt17_tree(os.path.join(tmp_path, "MSMT17"))
    os.remove(os.path.join(base, "list_val.txt"))
    with pytest.raises(DataError, match="list_val.txt"):
        build_dataset("msmt17", tmp_path, verbose=False)
    with open(os.path.join(base, "list_val.txt"), "w") as f:
        f.write("0001/missing.jpg 1\n")
    with pytest.raises(DataError, match=r"list_val.txt' line 1: image .*missing.jpg' not found"):
        build_dataset("msmt17", tmp_path, verbose=False)
    jpeg(os.path.join(base, "train", "0001", "0001_frame.jpg"))
    with open(os.path.join(base, "list_val.txt"), "w") as f:
        f.write("0001/0001_frame.jpg 1\n")
    with pytest.raises(DataError, match=r"0001_frame.jpg' does not follow the MSMT17 rule"):
        build_dataset("msmt17", tmp_path, verbose=False)


def test_msmt17_folder_without_image_folders(tmp_path):
    os.makedirs(os.path.join(tmp_path, "MSMT17_V2", "images"))
    with pytest.raises(DataError, match="mask_train_v2"):
        build_dataset("msmt17", tmp_path, verbose=False)


# ---- VehicleID --------------------------------------------------------------------------------------------
def _gallery_paths(ds):
    return sorted(s.path for s in ds.gallery)


def test_vehicleid_random_gallery_per_vehicle(tmp_path):
    make_vehicleid_tree(tmp_path)
    ds = build_dataset("VehicleID", tmp_path, verbose=False)
    assert ds.num_trials == 10 and ds.test_size == 800
    # The reference fills its set with the sorted vehicle ids 8, 30, 1000; 1000 collides with 8 (slot 0 of 8)
    # and takes the next slot, so the set iterates 8, 1000, 30.
    assert rows(ds.train) == sorted([(2, 0, 0, 0)] * 2 + [(0, 0, 0, 0)] * 2 + [(1, 0, 0, 0)])
    for trial in range(ds.num_trials):
        ds.select_trial(trial)
        gallery_pids = [s.pid for s in ds.gallery]
        assert sorted(gallery_pids) == list(range(2000, 2030))  # one image per test vehicle
        assert len(ds.query) == 30 * 3
        assert not {s.path for s in ds.query} & {s.path for s in ds.gallery}
        assert {s.camid for s in ds.query} == {0} and {s.camid for s in ds.gallery} == {1}
        assert {s.viewid for s in ds.query + ds.gallery} == {0}


def test_vehicleid_draws_are_seeded_and_differ_across_trials(tmp_path):
    make_vehicleid_tree(tmp_path)
    ds = build_dataset("VehicleID", tmp_path, num_trials=3, seed=5, verbose=False)
    again = build_dataset("VehicleID", tmp_path, num_trials=3, seed=5, verbose=False)
    other_seed = build_dataset("VehicleID", tmp_path, num_trials=3, seed=6, verbose=False)
    draws = []
    for trial in range(3):
        ds.select_trial(trial)
        again.select_trial(trial)
        assert _gallery_paths(ds) == _gallery_paths(again)
        draws.append(_gallery_paths(ds))
    # 30 vehicles of 4 images: two independent draws coincide with probability 4**-30.
    assert len({tuple(d) for d in draws}) == 3
    other_seed.select_trial(0)
    assert _gallery_paths(other_seed) != draws[0]
    ds.select_trial(0)
    assert _gallery_paths(ds) == draws[0]  # re-selecting a trial gives the same draw
    with pytest.raises(IndexError):
        ds.select_trial(3)


def test_vehicleid_test_size_and_options_from_config(tmp_path):
    make_vehicleid_tree(tmp_path)
    cfg = load_config(None, ["DATASETS.VEHICLEID_TEST_SIZE", "1600", "DATASETS.VEHICLEID_TRIALS", "2",
                             "DATASETS.VEHICLEID_SEED", "9"])
    options = DATASETS.get("VehicleID").options_from_config(cfg)
    assert options == {"test_size": 1600, "num_trials": 2, "seed": 9}
    ds = build_dataset("VehicleID", tmp_path, verbose=False, **options)
    assert sorted({s.pid for s in ds.gallery}) == [5000, 5001] and ds.num_trials == 2
    with pytest.raises(DataError, match="test_list_2400.txt"):
        build_dataset("VehicleID", tmp_path, test_size=2400, verbose=False)
    with pytest.raises(ConfigError, match="DATASETS.VEHICLEID_TRIALS = 0"):
        build_dataset("VehicleID", tmp_path, num_trials=0, verbose=False)


def test_vehicleid_texts_and_bad_list_line(tmp_path):
    base = make_vehicleid_tree(tmp_path, num_test=2)
    ds = build_dataset("VehicleID", tmp_path, use_text=True, text_prompt=2, verbose=False)
    assert {s.text for s in ds.train + ds.query} == {"A photo of a X X  vehicle."}
    ds.select_trial(1)
    assert {s.text for s in ds.query + ds.gallery} == {"A photo of a X X  vehicle."}
    with open(os.path.join(base, "train_test_split", "train_list.txt"), "a") as f:
        f.write("0000099\n")
    with pytest.raises(DataError, match=r"train_list.txt' line 6: '0000099' is not '<image name> <vehicle id>'"):
        build_dataset("VehicleID", tmp_path, verbose=False)


def test_fixed_split_datasets_have_one_trial(tmp_path):
    make_split_tree(os.path.join(tmp_path, "market1501"), MARKET_SPLITS, market_name)
    ds = build_dataset("market1501", tmp_path, verbose=False)
    query = list(ds.query)
    ds.select_trial(0)
    assert ds.num_trials == 1 and ds.query == query
    with pytest.raises(IndexError):
        ds.select_trial(1)


def test_make_dataloaders_passes_the_vehicleid_options(tmp_path):
    make_vehicleid_tree(tmp_path, num_test=3)
    cfg = load_config(None, ["DATASETS.NAMES", "VehicleID", "DATASETS.ROOT_DIR", str(tmp_path),
                             "DATASETS.VEHICLEID_TEST_SIZE", "1600", "DATASETS.VEHICLEID_TRIALS", "4",
                             "DATALOADER.NUM_WORKERS", "0", "SOLVER.IMS_PER_BATCH", "4",
                             "DATALOADER.NUM_INSTANCE", "2", "MODEL.DEVICE", "cpu"])
    bundle = make_dataloaders(cfg)
    assert bundle.dataset.test_size == 1600 and bundle.dataset.num_trials == 4
    assert bundle.num_gallery == 2


# ---- CP2000 aliases, statistics tool, configs ------------------------------------------------------------
@pytest.mark.parametrize("protocol", ["ALL", "AG", "GA", "AA", "GG", "AGAG", "AAGG"])
def test_cp2000_names_are_aliases_of_cp2108(tmp_path, caplog, protocol):
    make_cp2108_tree(tmp_path, annotations=False)
    new = build_dataset(f"CP2108_{protocol}", tmp_path, verbose=False)
    with caplog.at_level(logging.INFO, logger="datasets.cp2108"):
        old = build_dataset(f"CP2000_{protocol}", tmp_path, verbose=False)
    assert f"CP2000_{protocol} is the old name of CP2108_{protocol}" in caplog.messages
    assert isinstance(old, type(new)) and old.name == f"CP2108_{protocol}"
    assert (old.train, old.query, old.gallery) == (new.train, new.query, new.gallery)


def test_dataset_stats_tool_takes_a_positional_root(tmp_path, monkeypatch, capsys):
    make_split_tree(os.path.join(tmp_path, "Market-1501"), MARKET_SPLITS, market_name)
    make_msmt17_tree(os.path.join(tmp_path, "MSMT17_V2"), "v2")
    make_vehicleid_tree(tmp_path, num_test=3)
    monkeypatch.setattr(sys, "argv", ["dataset_stats.py", str(tmp_path), "market1501", "msmt17", "VehicleID",
                                      "--vehicleid-test-size", "1600"])
    dataset_stats.main()
    lines = capsys.readouterr().out.splitlines()
    assert "market1501 (view_mode mix, 3 training identities)" in lines
    assert "msmt17 (view_mode mix, 3 training identities)" in lines
    # Market gallery: identities 0, 101, 102, 103; 6 images; cameras 1-4. VehicleID 1600: 2 vehicles.
    assert ["gallery", "|", "4", "|", "6", "|", "4"] in [line.split() for line in lines]
    assert ["gallery", "|", "2", "|", "2", "|", "1"] in [line.split() for line in lines]
    monkeypatch.setattr(sys, "argv", ["dataset_stats.py", "--root", str(tmp_path), "veri"])
    with pytest.raises(DataError, match="none of the folders VeRi found"):
        dataset_stats.main()


def test_every_config_file_loads():
    files = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yml"), recursive=True))
    new = {f"configs/{d}/{m}.yml" for d in ("Market1501", "DukeMTMC", "MSMT17", "OccDuke", "VeRi", "VehicleID")
           for m in ("clipreid", "clip_baseline")}
    assert new <= {os.path.relpath(f, REPO_ROOT) for f in files}
    for path in files:
        cfg = load_config(path)
        for name in (cfg.DATASETS.NAMES, *cfg.DATASETS.TESTS):
            assert name in DATASETS, (path, name)

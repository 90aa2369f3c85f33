"""The Custom datasets (a CSV manifest) and tools/make_manifest.py, on a folder of real JPEG files.

A manifest written by make_manifest.py from a folder in a naming scheme of its own trains and evaluates through
train_svpr.py and test_svpr.py; the query and gallery of every protocol, and the queries evaluated with
TEST.TIME_MODE cross, are compared with their definitions written here from the CSV rows. Every shipped model
takes a training step on Custom data; each bad manifest stops with one error line naming the CSV and the line.
"""
import csv
import os

import numpy as np
import pytest
import torch
from PIL import Image

from datasets import build_dataset, make_dataloaders
from datasets.custom import parse_manifest, read_manifest
from loss import build_criterion
from model import MODELS
from processor.model_io import build_from_args, model_args_from_dataset
from processor.phase_runner import run_phases
from solver import make_optimizer
from tests.fixtures import REPO_ROOT, SVPR, check_ok, run_entry_point, run_script, tiny, tiny_cfg
from tools import dataset_stats, make_manifest
from utils.errors import ConfigError

GROUND_CAMERAS, AERIAL_CAMERAS = (1, 2), (7, 8)
PATTERN = r"(?P<viewid>drone|cctv)/id(?P<pid>\d+)_c(?P<camid>\d+)_(?P<timeid>day|night)_"
PROTOCOLS = ("Custom", "Custom_AG", "Custom_GA", "Custom_AGAG")


def image(path, pid, camid, index):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (16, 32), ((pid * 37) % 256, (camid * 29) % 256, (index * 53) % 256)).save(path, quality=90)


def make_folder(root):
    """Crops named ``<drone|cctv>/id<pid>_c<camera>_<day|night>_<n>.jpg``: 12 identities seen by two ground
    and two aerial cameras, two images each, except identities 3 and 9 (only ever by day), 4 (aerial cameras
    only) and 11 (one camera only)."""
    index = 0
    for pid in range(12):
        cameras = AERIAL_CAMERAS if pid == 4 else (GROUND_CAMERAS[:1] if pid == 11 else GROUND_CAMERAS + AERIAL_CAMERAS)
        for camid in cameras:
            for shot in range(2):
                time = "day" if pid in (3, 9) or shot == 0 else "night"
                platform = "drone" if camid in AERIAL_CAMERAS else "cctv"
                image(os.path.join(root, platform, f"id{pid:03d}_c{camid}_{time}_{index:04d}.jpg"), pid, camid, index)
                index += 1
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(str(tmp_path_factory.mktemp("crops")))


def write_manifest(folder, out, seed=0, extra=()):
    make_manifest.main([folder, "--pattern", PATTERN, "--out", out, "--view-word", "drone=aerial",
                        "--view-word", "cctv=ground", "--seed", str(seed), *extra])
    return out


def read_rows(path):
    """The manifest's rows with absolute paths and integer labels (read here, not by the code under test)."""
    with open(path, newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        row["path"] = os.path.normpath(os.path.join(os.path.dirname(path), row["path"]))
        for key in ("pid", "camid", "viewid", "timeid"):
            row[key] = int(row[key])
    return rows


@pytest.fixture(scope="module")
def manifest(folder, tmp_path_factory):
    return write_manifest(folder, str(tmp_path_factory.mktemp("manifest") / "data.csv"))


def expected_protocol(rows, name):
    """``(query rows, gallery rows, view mode)`` of protocol ``name`` by its definition (CP2108's): ``Custom``
    every query whose identity is in the gallery; ``_AG`` aerial queries against the ground gallery, ``_GA``
    the reverse, keeping queries whose identity is in that gallery; ``_AGAG`` every query against the whole
    gallery, camera id replaced by the view id, only cross-view matches counted."""
    query = [r for r in rows if r["split"] == "query"]
    gallery = [r for r in rows if r["split"] == "gallery"]
    if name == "Custom_AGAG":
        return ([dict(r, camid=r["viewid"]) for r in query], [dict(r, camid=r["viewid"]) for r in gallery],
                "cross")
    views = {"Custom": (None, None), "Custom_AG": (1, 0), "Custom_GA": (0, 1)}[name]
    if views[1] is not None:
        gallery = [r for r in gallery if r["viewid"] == views[1]]
        query = [r for r in query if r["viewid"] == views[0]]
    pids = {r["pid"] for r in gallery}
    return [r for r in query if r["pid"] in pids], gallery, "mix"


def evaluable(query, gallery, view_mode, time_mode):
    """Positions of the queries that keep a true match: same identity, another camera, and another view
    (view_mode cross) / another time (time_mode cross)."""
    def kept(q, g):
        return (g["pid"] == q["pid"] and g["camid"] != q["camid"]
                and (view_mode != "cross" or g["viewid"] != q["viewid"])
                and (time_mode != "cross" or g["timeid"] != q["timeid"]))
    return [i for i, q in enumerate(query) if any(kept(q, g) for g in gallery)]


# ---- make_manifest.py -----------------------------------------------------------------------------------
def test_make_manifest_splits_identities_by_seed_and_draws_one_query_per_identity_and_camera(folder, manifest,
                                                                                             tmp_path):
    rows = read_rows(manifest)
    assert len(rows) == len(os.listdir(os.path.join(folder, "drone"))) + len(os.listdir(os.path.join(folder, "cctv")))
    for row in rows:  # labels read back from the file names
        name = os.path.basename(row["path"])
        assert name.startswith(f"id{row['pid']:03d}_c{row['camid']}_")
        assert row["viewid"] == int(row["camid"] in AERIAL_CAMERAS)
        assert row["timeid"] == int("_night_" in name)
    train = {r["pid"] for r in rows if r["split"] == "train"}
    test = {r["pid"] for r in rows if r["split"] != "train"}
    assert not train & test and len(test) == 6 and train | test == set(range(12))
    for pid in test:
        images = [r for r in rows if r["pid"] == pid]
        queries = [r for r in images if r["split"] == "query"]
        gallery = [r for r in images if r["split"] == "gallery"]
        cameras = {r["camid"] for r in images}
        # One query per camera, except that a query needs a gallery image from another camera.
        assert len({r["camid"] for r in queries}) == len(queries)
        assert len(queries) == (len(cameras) if len(cameras) > 1 else 0)
        assert all(any(g["camid"] != q["camid"] for g in gallery) for q in queries)
    again = write_manifest(folder, str(tmp_path / "again.csv"))
    other = write_manifest(folder, str(tmp_path / "other.csv"), seed=1)
    assert read_rows(again) == rows
    assert {r["pid"] for r in read_rows(other) if r["split"] == "train"} != train


def test_make_manifest_refuses_unmatched_files_and_an_existing_output(tmp_path, capsys):
    stray = os.path.join(str(tmp_path), "crops")
    make_folder(stray)
    image(os.path.join(stray, "cctv", "notes_scan.jpg"), 0, 0, 0)
    out = str(tmp_path / "data.csv")
    words = ["--view-word", "drone=aerial", "--view-word", "cctv=ground"]
    for argv, needle in (([stray, "--pattern", PATTERN, "--out", out, *words], "1 of 87 images"),
                         ([stray, "--pattern", PATTERN, "--out", out], "the group viewid matched 'cctv'"),
                         ([stray, "--pattern", r"(?P<pid>\d+)", "--out", out], "no named group 'camid'"),
                         ([stray, "--pattern", r"id(?P<pid>\d+)_c(?P<camid>\d+)_(?P<viewid>day|night)",
                           "--out", out], "viewid matched 'day'")):
        code, _, lines = run_entry_point(make_manifest.main, argv, capsys)
        assert code == 2 and len(lines) == 1 and needle in lines[0], lines
    write_manifest(stray, out, extra=["--skip-unmatched"])
    assert "notes_scan.jpg" not in open(out).read()
    code, _, lines = run_entry_point(make_manifest.main, [stray, "--pattern", PATTERN, "--out", out, *words], capsys)
    assert code == 2 and "exists; pass --overwrite" in lines[0]


# ---- train_svpr.py and test_svpr.py on the manifest ---------------------------------------------------------
@pytest.mark.slow
def test_manifest_trains_and_evaluates_every_protocol_as_defined(manifest, tmp_path):
    rows = read_rows(manifest)
    train_dir, test_dir = str(tmp_path / "train"), str(tmp_path / "test")
    tests = "(" + ", ".join(f"'{name}'" for name in PROTOCOLS) + ")"
    custom = ["DATASETS.NAMES", "Custom", "DATASETS.TESTS", tests, "DATASETS.CUSTOM.MANIFEST", manifest,
              "SOLVER.IMS_PER_BATCH", "8", "DATALOADER.NUM_INSTANCE", "2"]
    check_ok(run_script(["train_svpr.py", "--config_file", SVPR,
                         *tiny(str(tmp_path), train_dir, epochs=1), *custom]))
    check_ok(run_script(["test_svpr.py", "--weights", os.path.join(train_dir, "model_final.pth"), "OUTPUT_DIR",
                         test_dir, "TEST.TIME_MODE", "cross", "TEST.SAVE_FEATURES", "True"]))
    left_out = 0
    for name in PROTOCOLS:
        query, gallery, view_mode = expected_protocol(rows, name)
        saved = np.load(os.path.join(test_dir, f"features_{name}.npz"))
        for side, expected in (("query", query), ("gallery", gallery)):
            assert list(saved[f"{side}_paths"]) == [r["path"] for r in expected], (name, side)
            for label in ("pid", "camid", "viewid", "timeid"):
                assert saved[f"{side}_{label}s"].tolist() == [r[label] for r in expected], (name, side, label)
        with open(os.path.join(test_dir, f"per_query_{name}.csv"), newline="") as handle:
            evaluated = [int(r["index"]) for r in csv.DictReader(handle)]
        assert evaluated == evaluable(query, gallery, view_mode, "cross"), name
        left_out += len([r for r in rows if r["split"] == "query"]) - len(query)
    # The fixture exercises both rules: queries left out by a protocol, and queries the time mode leaves
    # without a match (identities seen only by day).
    assert left_out > 0
    assert any(len(evaluable(*expected_protocol(rows, n)[:2], "mix", "mix"))
               > len(evaluable(*expected_protocol(rows, n)[:2], "mix", "cross")) for n in PROTOCOLS)


# ---- every model trains on Custom data --------------------------------------------------------------------
ATTRIBUTES = {"upper": 3, "bag": 2}


def with_attributes(manifest, out):
    """``manifest`` with two attribute columns (classes from the identity) and views and times as words."""
    with open(manifest, newline="") as handle:
        rows = list(csv.DictReader(handle))
    with open(out, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["path", "pid", "camid", "split", "viewid", "timeid", "attr:upper", "attr:bag"])
        for i, row in enumerate(rows):
            view = ("ground", "aerial")[int(row["viewid"])] if i % 2 else row["viewid"]
            time = ("Day", "NIGHT")[int(row["timeid"])] if i % 3 else row["timeid"]
            writer.writerow([os.path.join(os.path.dirname(manifest), row["path"]), row["pid"], row["camid"],
                             row["split"], view, time, int(row["pid"]) % 3, int(row["pid"]) % 2])
    return out


BUILT_IN = sorted(name for name in MODELS.names() if MODELS.get(name).__module__.startswith("model."))
SYNTHETIC = {"CLIP_baseline": "clip_baseline", "CLIP_ReID": "clipreid", "CLIP_SVPR_ReID": "svpr_reid",
             "ViT": "vit", "TransReID": "transreid", "VDT": "vdt", "SeCap": "secap"}


def test_the_seven_shipped_models_are_the_registered_ones():
    assert sorted(SYNTHETIC) == BUILT_IN


@pytest.mark.usefixtures("single_thread")
@pytest.mark.parametrize("name,attributes", [(name, False) for name in sorted(SYNTHETIC)]
                         + [("CLIP_SVPR_ReID", True)])
def test_every_model_trains_on_custom_data(name, attributes, manifest, tmp_path):
    path = with_attributes(manifest, str(tmp_path / "attrs.csv")) if attributes else manifest
    cfg = tiny_cfg(name, os.path.join(REPO_ROOT, "configs", "Synthetic", f"{SYNTHETIC[name]}.yml"),
                   opts=["DATASETS.NAMES", "Custom", "DATASETS.CUSTOM.MANIFEST", path, "DATALOADER.NUM_WORKERS", "0",
                         "DATALOADER.CACHE_IMAGES", "False", "SOLVER.IMS_PER_BATCH", "8",
                         "DATALOADER.NUM_INSTANCE", "2", "SOLVER.STAGE1.MAX_EPOCHS", "1",
                         "SOLVER.STAGE1.IMS_PER_BATCH", "16", "SOLVER.AMP", "False", "OUTPUT_DIR", str(tmp_path)],
                   frozen=True)
    bundle = make_dataloaders(cfg)
    dataset = bundle.dataset
    # Training identities relabelled 0..N-1, one label per raw identity.
    raw = {r["path"]: r["pid"] for r in read_rows(manifest)}
    labels = {}
    for sample in dataset.train:
        labels.setdefault(raw[sample.path], set()).add(sample.pid)
    assert all(len(v) == 1 for v in labels.values())
    assert sorted(min(v) for v in labels.values()) == list(range(len(labels)))

    model_args = model_args_from_dataset(dataset)
    torch.manual_seed(0)
    model = build_from_args(cfg, model_args, torch.device("cpu"))
    run_phases(cfg, model, dataset, torch.device("cpu"))
    batch = next(iter(bundle.train_loader))
    if name == "CLIP_SVPR_ReID":
        # Captions and ASMOE need attribute columns; without them the model trains without both.
        assert (model.asmoe is not None) == attributes
        assert (batch["text_tokens"] is not None) == attributes
        assert dataset.attributes == (tuple(ATTRIBUTES.items()) if attributes else ())
        if attributes:
            rows = {r["path"]: r for r in read_rows(manifest)}
            paths = [dataset.train[i].path for i in batch["index"]]
            expected = [[rows[p]["pid"] % 3, rows[p]["pid"] % 2] for p in paths]
            assert batch["attrs"].tolist() == expected
    criterion = build_criterion(cfg, model, model_args["num_classes"])
    optimizer = make_optimizer(cfg, model)
    model.train()
    before = {key: value.clone() for key, value in model.state_dict().items()}
    terms = criterion(model(batch["images"], **model.forward_inputs(batch)), batch)
    assert terms and all(torch.isfinite(value) for value in terms.values())
    sum(terms.values()).backward()
    optimizer.step()
    assert any(not torch.equal(before[key], value) for key, value in model.state_dict().items())
    model.eval()
    with torch.no_grad():
        test_batch = next(iter(bundle.val_loader))
        assert model(test_batch["images"], **model.forward_inputs(test_batch)).shape[1] == model.embedding_dim


def test_views_and_times_are_read_as_numbers_or_words(manifest, tmp_path):
    path = with_attributes(manifest, str(tmp_path / "words.csv"))
    rows = {r["path"]: r for r in read_rows(manifest)}
    parsed = parse_manifest(path)
    assert [(r.viewid, r.timeid) for r in parsed.rows] == [(rows[r.path]["viewid"], rows[r.path]["timeid"])
                                                           for r in parsed.rows]
    assert parsed.attribute_names == tuple(ATTRIBUTES) and parsed.attribute_classes == tuple(ATTRIBUTES.values())


# ---- bad input -------------------------------------------------------------------------------------------
GOOD = ["path,pid,camid,split,viewid", "a.jpg,1,0,train,0", "b.jpg,1,1,train,aerial", "c.jpg,2,0,query,1",
        "d.jpg,2,1,gallery,ground", "e.jpg,3,1,gallery,0"]
BAD = {
    "missing image": (["path,pid,camid,split", "a.jpg,1,0,train", "gone.jpg,1,1,train", "c.jpg,2,0,query",
                       "d.jpg,2,1,gallery"], 3, "image '", "gone.jpg' not found"),
    "unknown split": (GOOD[:3] + ["c.jpg,2,0,test,1"] + GOOD[4:], 4, "split 'test' is not one of train, query, "
                      "gallery"),
    "non-integer id": (GOOD[:2] + ["b.jpg,1x,1,train,1"] + GOOD[3:], 3, "pid '1x' is not a non-negative integer"),
    "non-integer camera": (GOOD[:5] + ["e.jpg,3,-1,gallery,0"], 6, "camid '-1' is not a non-negative integer"),
    "bad view": (GOOD[:2] + ["b.jpg,1,1,train,drone"] + GOOD[3:], 3, "viewid 'drone' is not one of 0, 1 or "
                 "ground, aerial"),
    "duplicate path": (GOOD + ["./a.jpg,4,0,gallery,0"], 7, "image './a.jpg' is listed twice (first on line 2)"),
    "query identity not in the gallery": (GOOD[:3] + ["c.jpg,9,0,query,1"] + GOOD[4:], 4, "none of the query "
                                          "split's identities has an image in the gallery split"),
    "header without a required column": (["path,pid,split,viewid", "a.jpg,1,train,0"], 1, "the header has no "
                                         "column 'camid'"),
    "unknown column": (["path,pid,camid,split,view", "a.jpg,1,0,train,0"], 1, "unknown column 'view'; did you "
                       "mean 'viewid'?"),
    "short row": (GOOD[:2] + ["b.jpg,1,1,train"] + GOOD[3:], 3, "4 fields, but the header has 5"),
    "non-integer attribute": (["path,pid,camid,split,attr:bag", "a.jpg,1,0,train,yes"], 2,
                              "attr:bag 'yes' is not a non-negative integer"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_bad_manifest_is_one_error_line_naming_the_csv_and_line(case, tmp_path, capsys):
    lines, line, *needles = BAD[case]
    for name in "abcde":
        image(str(tmp_path / f"{name}.jpg"), 1, 1, 1)
    path = str(tmp_path / "bad.csv")
    with open(path, "w") as handle:
        handle.write("\n".join(lines) + "\n")
    code, _, errors = run_entry_point(dataset_stats.main, ["--manifest", path], capsys)
    assert code == 2 and len(errors) == 1 and errors[0].startswith("error: manifest "), errors
    assert f"'{path}' line {line}: " in errors[0], errors
    for needle in needles:
        assert needle in errors[0], errors


def test_training_on_a_bad_manifest_stops_with_one_error_line(tmp_path):
    """Through train_svpr.py as a real subprocess: exit code 2, one line, before anything is trained."""
    for name in "abcde":
        image(str(tmp_path / f"{name}.jpg"), 1, 1, 1)
    path = str(tmp_path / "bad.csv")
    with open(path, "w") as handle:
        handle.write("\n".join(GOOD[:3] + ["c.jpg,2,0,test,1"] + GOOD[4:]) + "\n")
    result = run_script(["train_svpr.py", "--config_file", SVPR, *tiny(str(tmp_path), str(tmp_path / "run")),
                         "DATASETS.NAMES", "Custom", "DATASETS.TESTS", "('Custom',)",
                         "DATASETS.CUSTOM.MANIFEST", path])
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert errors == [f"error: manifest '{path}' line 4: split 'test' is not one of train, query, gallery"]
    assert not os.path.exists(tmp_path / "run" / "model_final.pth")


def test_dataset_stats_checks_a_manifest_and_warns(tmp_path, capsys):
    for name in "abcdefg":
        image(str(tmp_path / f"{name}.jpg"), 1, 1, 1)
    path = str(tmp_path / "data.csv")
    rows = ["path,pid,camid,split,viewid", "a.jpg,1,0,train,0", "b.jpg,2,1,train,1", "c.jpg,2,0,query,0",
            "d.jpg,3,0,query,0", "e.jpg,2,1,gallery,1", "f.jpg,4,1,gallery,1", "g.jpg,2,2,gallery,1"]
    with open(path, "w") as handle:
        handle.write("\n".join(rows) + "\n")
    capsys.readouterr()
    dataset_stats.main(["--manifest", path])
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if line.startswith("warning: ")]
    assert any("1 identities are in both the train and a test split (2)" in w for w in warnings), warnings
    assert any("1 of the 2 query identities have no gallery image (3)" in w for w in warnings), warnings
    assert any("the query split has no aerial images" in w for w in warnings), warnings
    assert any("the gallery split has no ground images" in w for w in warnings), warnings
    assert any(w.startswith("warning: Custom_AG: ") for w in warnings), warnings  # no aerial query
    # The statistics of the protocols that keep images: Custom keeps the one query of identity 2.
    custom = build_dataset("Custom", str(tmp_path), manifest=path, verbose=False)
    assert [s.pid for s in custom.query] == [2] and "Custom_GA (view_mode mix, 2 training identities)" in out


def test_an_empty_or_absent_manifest_is_named(tmp_path):
    with pytest.raises(ConfigError, match="DATASETS.CUSTOM.MANIFEST is empty"):
        build_dataset("Custom", str(tmp_path))
    with pytest.raises(ConfigError, match="absent.csv' not found"):
        read_manifest(str(tmp_path / "absent.csv"))

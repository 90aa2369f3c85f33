"""AG-ReID and AG-ReID.v2 loaders: name parsing, protocols, .mat attributes, texts, bad data."""
import os
import sys

import numpy as np
import pytest
import scipy.io
from PIL import Image

from datasets import build_dataset
from datasets.agreid import QUT_ATTRIBUTES
from utils.errors import DataError

# (P, T, A, camera); v1: camera 3 ground, other aerial. v2: 3 CCTV, 2 wearable, other UAV.
TRAIN = [("0002", "04101", "2", 3), ("0002", "04101", "2", 1), ("0001", "00110", "1", 3), ("0001", "00110", "1", 2)]
GALLERY = [("0010", "01100", "0", 3), ("0010", "01100", "0", 2), ("0011", "02200", "1", 1), ("0012", "01101", "1", 3)]
QUERY = [("0010", "01100", "0", 1), ("0011", "02200", "1", 3), ("0011", "02200", "1", 2), ("0099", "01100", "0", 1)]


def pid_of(p, t, a):
    return int(p + t + a)


# The reference numbers training identities by their position in a Python set of the raw ids (an int hashes
# to itself; 8 slots): 2041012 -> slot 4, 1001101 -> slot 5, so label 0 is 2041012, not the smaller id.
TRAIN_SET_ORDER = [pid_of("0002", "04101", "2"), pid_of("0001", "00110", "1")]


def attribute_classes(pid):
    """A class per QUT attribute, different for each identity (some identities get 'unknown')."""
    return [(pid + i) % len(classes) for i, (_, classes) in enumerate(QUT_ATTRIBUTES)]


def qut_columns(pids):
    """88 one-hot columns (raw 2 = applies, 1 = does not) for ``pids``, in QUT order."""
    columns = {}
    for i, (name, classes) in enumerate(QUT_ATTRIBUTES):
        for j, value in enumerate(classes):
            # The last class ('unknown') is never marked: it is implied when no other class is.
            marked = [attribute_classes(p)[i] == j and j < len(classes) - 1 for p in pids]
            columns[f"{name}_{value}"] = np.array([2.0 if m else 1.0 for m in marked])
    return columns


def make_agreid_tree(root, version=1, folder=None, with_mat=True, columns=None):
    """AG-ReID (v1) or AG-ReID.v2 fixture with real JPEGs and a QUT .mat attribute file."""
    folder = folder or ("AGReID" if version == 1 else "AGReID.v2")
    base = os.path.join(root, folder)
    train_dir = "train" if version == 1 else "train_all"
    for split, rows in ((train_dir, TRAIN), ("gallery", GALLERY), ("query", QUERY)):
        for i, (p, t, a, camera) in enumerate(rows):
            sub = os.path.join(base, split) if version == 1 else os.path.join(base, split, f"P{p}")
            os.makedirs(sub, exist_ok=True)
            Image.new("RGB", (16, 32), (int(p) * 9 % 256, camera * 40, i * 20)).save(
                os.path.join(sub, f"P{p}T{t}A{a}C{camera}F{i:05d}.jpg"), quality=90)
    if with_mat:
        train_pids = sorted({pid_of(p, t, a) for p, t, a, _ in TRAIN})
        test_pids = sorted({pid_of(p, t, a) for p, t, a, _ in GALLERY + QUERY})
        train = {"image_index": np.array([str(p) for p in train_pids], dtype=object), **qut_columns(train_pids)}
        test = {"image_index": np.array(test_pids, dtype=float), **(columns or qut_columns(test_pids))}
        name = "qut_attribute_v4_88_attributes.mat" if version == 1 else "qut_attribute_v8.mat"
        scipy.io.savemat(os.path.join(base, name), {"qut_attribute": {"train": train, "test": test}})
    return base


def _raw(rows, views, camera_to_view):
    out = []
    for p, t, a, camera in rows:
        view = camera_to_view(camera)
        if view in views:
            out.append((pid_of(p, t, a), view, view, int(a[-1])))
    return sorted(out)


def _got(samples):
    return sorted((s.pid, s.camid, s.viewid, s.timeid) for s in samples)


def v1_view(camera):
    return 0 if camera == 3 else 1


def v2_view(camera):
    return {3: 0, 2: 1}.get(camera, 2)


@pytest.mark.parametrize("name,qviews,gviews,restrict", [
    ("AGReID", (0, 1), (0, 1), False),
    ("AGReID_AG", (1,), (0,), True),
    ("AGReID_GA", (0,), (1,), True),
])
def test_v1_protocols(tmp_path, name, qviews, gviews, restrict):
    make_agreid_tree(tmp_path, version=1)
    ds = build_dataset(name, tmp_path, verbose=False)
    gallery = _raw(GALLERY, gviews, v1_view)
    assert _got(ds.gallery) == gallery
    pids = {g[0] for g in gallery}
    assert _got(ds.query) == [q for q in _raw(QUERY, qviews, v1_view) if not restrict or q[0] in pids]
    labels = {p: i for i, p in enumerate(TRAIN_SET_ORDER)}
    assert _got(ds.train) == sorted((labels[p], c, v, tm) for p, c, v, tm in _raw(TRAIN, (0, 1), v1_view))
    assert ds.view_mode == "mix" and ds.num_train_views == 2


@pytest.mark.parametrize("name,qviews,gviews", [
    ("AGReIDv2", (0, 1, 2), (0, 1, 2)),
    ("AGReIDv2_AC", (2,), (0,)),
    ("AGReIDv2_CA", (0,), (2,)),
    ("AGReIDv2_AW", (2,), (1,)),
    ("AGReIDv2_WA", (1,), (2,)),
])
@pytest.mark.parametrize("folder", ["AGReID.v2", "AGReIDv2"])
def test_v2_protocols_in_either_folder(tmp_path, name, qviews, gviews, folder):
    make_agreid_tree(tmp_path, version=2, folder=folder)
    ds = build_dataset(name, tmp_path, verbose=False)
    gallery = _raw(GALLERY, gviews, v2_view)
    pids = {g[0] for g in gallery}
    assert _got(ds.gallery) == gallery
    assert _got(ds.query) == [q for q in _raw(QUERY, qviews, v2_view) if name == "AGReIDv2" or q[0] in pids]
    assert ds.num_train_views == 3


def test_attributes_and_texts_from_the_mat_file(tmp_path):
    make_agreid_tree(tmp_path, version=1)
    ds = build_dataset("AGReID_AG", tmp_path, use_text=True, use_attr=True, verbose=False)
    assert ds.attributes == tuple((name, len(classes)) for name, classes in QUT_ATTRIBUTES)
    raw = TRAIN_SET_ORDER
    for sample in ds.train:
        classes = attribute_classes(raw[sample.pid])
        assert sample.attrs == tuple(classes)
        described = ", ".join(f"{n} is {c[k]}" for (n, c), k in zip(QUT_ATTRIBUTES, classes))
        assert sample.text == f"A photo of a X X X X  person with the following attributes: {described}."
    for sample in ds.query + ds.gallery:
        assert sample.attrs is None
        assert sample.text == "A photo of a X X X X  person. Attributes are unknown."


def test_missing_mat_file_only_matters_for_text_or_attributes(tmp_path):
    make_agreid_tree(tmp_path, version=1, with_mat=False)
    assert len(build_dataset("AGReID", tmp_path, verbose=False).train) == len(TRAIN)
    with pytest.raises(DataError, match=r"qut_attribute_v4_88_attributes.mat' not found \(needed for use_text\)"):
        build_dataset("AGReID", tmp_path, use_text=True, verbose=False)


def test_scipy_missing_asks_to_install_it(tmp_path, monkeypatch):
    make_agreid_tree(tmp_path, version=2)
    monkeypatch.setitem(sys.modules, "scipy", None)
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    with pytest.raises(DataError, match="needs scipy: pip install scipy"):
        build_dataset("AGReIDv2", tmp_path, use_attr=True, verbose=False)


def test_mat_file_with_wrong_columns(tmp_path):
    columns = dict(list(qut_columns([1]).items())[:80])
    columns = {k: np.repeat(v, 3) for k, v in columns.items()}
    make_agreid_tree(tmp_path, version=1, columns=columns)
    with pytest.raises(DataError, match="qut_attribute.test has 80 attribute columns, expected 88"):
        build_dataset("AGReID", tmp_path, use_attr=True, verbose=False)


def test_bad_file_name(tmp_path):
    base = make_agreid_tree(tmp_path, version=1, with_mat=False)
    Image.new("RGB", (8, 8)).save(os.path.join(base, "gallery", "person_12.jpg"))
    with pytest.raises(DataError, match=r"person_12.jpg' does not follow the AG-ReID rule P<digits>T<digits>A<digits>"):
        build_dataset("AGReID", tmp_path, verbose=False)


def test_missing_folder(tmp_path):
    with pytest.raises(DataError, match=r"AGReID.v2' not found; expected AGReID.v2 or AGReIDv2/\{train_all,query"):
        build_dataset("AGReIDv2_WA", tmp_path, verbose=False)

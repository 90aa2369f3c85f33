"""CARGO loader: file-name rule, recursive folders, protocols, texts, no attributes, bad data."""
import os

import pytest
from PIL import Image

from datasets import build_dataset
from utils.errors import DataError

# (camera, day|night, pid); cameras 1-5 aerial, 6-13 ground. pid 90 only in the query.
TRAIN = [(1, "day", 4), (7, "night", 4), (2, "night", 11), (13, "day", 11), (6, "day", 2)]
GALLERY = [(3, "day", 50), (8, "day", 50), (9, "night", 51), (10, "day", 52)]
QUERY = [(4, "night", 50), (11, "day", 50), (5, "day", 51), (12, "night", 52), (2, "day", 90)]


def make_cargo_tree(root):
    """CARGO fixture: images in camera sub-folders of each split."""
    base = os.path.join(root, "CARGO")
    for split, rows in (("train", TRAIN), ("gallery", GALLERY), ("query", QUERY)):
        for i, (camera, time, pid) in enumerate(rows):
            folder = os.path.join(base, split, f"Cam{camera}")
            os.makedirs(folder, exist_ok=True)
            Image.new("RGB", (16, 32), (camera * 10, pid, 40)).save(
                os.path.join(folder, f"Cam{camera}_{time}_{pid:04d}_{i:03d}.jpg"), quality=90)
    return base


def _raw(rows, views=(0, 1)):
    out = []
    for camera, time, pid in rows:
        view = 1 if camera <= 5 else 0
        if view in views:
            out.append((pid, camera - 1, view, 1 if time == "day" else 0))
    return sorted(out)


def _got(samples):
    return sorted((s.pid, s.camid, s.viewid, s.timeid) for s in samples)


@pytest.fixture
def cargo(tmp_path):
    make_cargo_tree(tmp_path)
    return tmp_path


@pytest.mark.parametrize("name,qviews,gviews,restrict,mode", [
    ("CARGO", (0, 1), (0, 1), False, "mix"),
    ("CARGO_AG", (1,), (0,), True, "mix"),
    ("CARGO_GA", (0,), (1,), True, "mix"),
    ("CARGO_AA", (1,), (1,), True, "mix"),
    ("CARGO_GG", (0,), (0,), True, "mix"),
    ("CARGO_AAGG", (0, 1), (0, 1), False, "same"),
])
def test_protocols(cargo, name, qviews, gviews, restrict, mode):
    ds = build_dataset(name, cargo, verbose=False)
    gallery = _raw(GALLERY, gviews)
    pids = {g[0] for g in gallery}
    assert _got(ds.gallery) == gallery
    assert _got(ds.query) == [q for q in _raw(QUERY, qviews) if not restrict or q[0] in pids]
    assert ds.view_mode == mode
    # The reference's numbering: position in a Python set of the raw ids ({4, 11, 2} in 8 slots: 2, 11, 4).
    labels = {2: 0, 11: 1, 4: 2}
    assert _got(ds.train) == sorted((labels[p], c, v, t) for p, c, v, t in _raw(TRAIN))


def test_agag_remaps_cameras(cargo):
    ds = build_dataset("CARGO_AGAG", cargo, verbose=False)
    assert _got(ds.query) == sorted((p, v, v, t) for p, _, v, t in _raw(QUERY))
    assert ds.view_mode == "cross"


def test_texts_and_no_attributes(cargo):
    ds = build_dataset("CARGO_AG", cargo, use_text=True, use_attr=True, text_prompt=2, verbose=False)
    assert ds.attributes == ()
    for sample in ds.train + ds.query + ds.gallery:
        assert sample.text == "A photo of a X X  person. Attributes are not available."
        assert sample.attrs is None


def test_bad_file_name(cargo):
    Image.new("RGB", (8, 8)).save(os.path.join(cargo, "CARGO", "query", "Cam4", "Cam4_dusk_0050_009.jpg"))
    with pytest.raises(DataError, match=r"Cam4_dusk_0050_009.jpg' does not follow the CARGO rule Cam<N>_<day\|night>"):
        build_dataset("CARGO", cargo, verbose=False)


def test_missing_split_folder(cargo):
    os.rename(os.path.join(cargo, "CARGO", "gallery"), os.path.join(cargo, "CARGO", "gal"))
    with pytest.raises(DataError, match=r"CARGO/gallery' not found; expected CARGO/\{train,query,gallery\}"):
        build_dataset("CARGO", cargo, verbose=False)

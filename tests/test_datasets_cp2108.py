"""CP2108 loader: layouts, file-name rules, every protocol, annotations and bad data."""
import json
import os

import pytest
from PIL import Image

from datasets import build_dataset
from datasets.cp2108 import ATTRIBUTE_NAMES
from tests.fixtures import GALLERY, QUERY, TRAIN, VALUES, entry, make_cp2108_tree, name_of
from utils.errors import DataError

@pytest.fixture
def cp2108(tmp_path):
    make_cp2108_tree(tmp_path)
    return tmp_path


# The reference numbers identities by their position in a Python set of the raw ids (CPython: an int
# hashes to itself, slot = id mod table size, 8 slots for a few ids): {3, 7, 10} iterates 10, 3, 7.
SET_ORDER = [10, 3, 7]


def test_train_relabelled_in_the_references_set_order_and_junk_dropped(cp2108):
    ds = build_dataset("CP2108_ALL", cp2108, verbose=False)
    raw = SET_ORDER
    assert sorted(raw) == sorted({p for p, _, _ in TRAIN if p != -1})
    assert len(ds.train) == sum(p != -1 for p, _, _ in TRAIN)
    for sample in ds.train:
        pid, camera, time = (int(v) for v in os.path.basename(sample.path).split("_")[:3])
        assert sample.pid == raw.index(pid)
        assert sample.camid == camera - 1
        assert sample.viewid == int(camera >= 23)
        assert sample.timeid == time
        assert os.path.isabs(sample.path) and os.path.isfile(sample.path)
        assert sample.text is None and sample.attrs is None
    assert ds.num_train_pids == len(raw)
    assert ds.attributes == ()
    assert ds.view_mode == "mix"


def test_labels_follow_the_set_not_ascending_order(tmp_path):
    # The example of the reference's numbering: {100, 101, 104, 105} iterates 104, 105, 100, 101.
    base = os.path.join(tmp_path, "CP2108")
    os.makedirs(os.path.join(base, "images"))
    lines = {"train": [], "query": [], "gallery": []}
    for index, (split, pid, camera) in enumerate([("train", p, c) for p in (100, 101, 104, 105) for c in (1, 23)]
                                                 + [("query", 7, 1), ("gallery", 7, 23)]):
        name = name_of(pid, camera, 1, index)
        Image.new("RGB", (8, 16), (pid, camera, 0)).save(os.path.join(base, "images", name))
        lines[split].append(name)
    for split, names in lines.items():
        with open(os.path.join(base, f"{split}.txt"), "w") as f:
            f.write("\n".join(names) + "\n")
    ds = build_dataset("CP2108_ALL", tmp_path, verbose=False)
    labels = {int(os.path.basename(s.path).split("_")[0]): s.pid for s in ds.train}
    assert labels == {104: 0, 105: 1, 100: 2, 101: 3}


def _raw(rows, views=(0, 1)):
    return [(p, c - 1, int(c >= 23), t) for p, c, t in rows if int(c >= 23) in views]


def _got(samples):
    return sorted((s.pid, s.camid, s.viewid, s.timeid) for s in samples)


@pytest.mark.parametrize("name,qviews,gviews,restrict,mode", [
    ("CP2108_ALL", (0, 1), (0, 1), True, "mix"),
    ("CP2108_AG", (1,), (0,), True, "mix"),
    ("CP2108_GA", (0,), (1,), True, "mix"),
    ("CP2108_AA", (1,), (1,), True, "mix"),
    ("CP2108_GG", (0,), (0,), True, "mix"),
    ("CP2108_AAGG", (0, 1), (0, 1), True, "same"),
])
def test_protocol_views_and_query_restriction(cp2108, name, qviews, gviews, restrict, mode):
    ds = build_dataset(name, cp2108, verbose=False)
    gallery = _raw(GALLERY, gviews)
    gallery_pids = {r[0] for r in gallery}
    query = [r for r in _raw(QUERY, qviews) if not restrict or r[0] in gallery_pids]
    assert _got(ds.gallery) == sorted(gallery)
    assert _got(ds.query) == sorted(query)
    assert 300 not in {s.pid for s in ds.query}
    assert ds.view_mode == mode
    assert len(ds.train) == 7


def test_agag_remaps_camera_to_view_and_keeps_unmatched_queries(cp2108):
    ds = build_dataset("CP2108_AGAG", cp2108, verbose=False)
    assert ds.view_mode == "cross"
    assert _got(ds.query) == sorted((p, v, v, t) for p, _, v, t in _raw(QUERY))
    assert _got(ds.gallery) == sorted((p, v, v, t) for p, _, v, t in _raw(GALLERY))
    assert 300 in {s.pid for s in ds.query}
    # Training keeps the real cameras.
    assert {s.camid for s in ds.train} == {c - 1 for p, c, _ in TRAIN if p != -1}


def test_released_layout_with_prefixed_lines(tmp_path):
    make_cp2108_tree(tmp_path, layout="released")
    ds = build_dataset("CP2108_ALL", tmp_path, verbose=False)
    assert len(ds.train) == 7 and len(ds.gallery) == len(GALLERY)


def _expected_values(pid, view, time):
    values = entry(pid, view, time)
    return {name: values.get(name, "unknown") for name in sorted(ATTRIBUTE_NAMES)}


def test_attributes_and_texts_use_each_images_own_annotation(cp2108):
    ds = build_dataset("CP2108_AG", cp2108, use_text=True, use_attr=True, text_prompt=3, verbose=False,
                       annotation_per_image=True)
    names = sorted(VALUES)
    assert ds.attributes == tuple((n, len(VALUES[n])) for n in names)
    raw_of = dict(enumerate(SET_ORDER))
    for sample in ds.train:
        values = _expected_values(raw_of[sample.pid], sample.viewid, sample.timeid)
        assert sample.attrs == tuple(VALUES[n].index(values[n]) for n in names)
        described = ", ".join(f"{n.replace(' ', '_')} is {values[n]}" for n in names)
        assert sample.text == f"A photo of a X X X  person with the following attributes: {described}."
    for sample in ds.query + ds.gallery:
        values = _expected_values(sample.pid, sample.viewid, sample.timeid)
        assert sample.attrs == tuple(VALUES[n].index(values[n]) for n in names)
        assert sample.text == "A photo of a X X X  person."
    # Aerial annotations lack "Pose": the unknown class is used.
    aerial = next(s for s in ds.query if s.viewid == 1)
    assert aerial.attrs[names.index("Pose")] == VALUES["Pose"].index("unknown")


def test_missing_annotation_falls_back_by_the_repair_rules(tmp_path):
    # Identity 3 has (view 1, time 0) and (view 1, time 1); drop (1, 0) -> uses (1, 1).
    # Identity 10 has (0, 1) and (1, 1); drop (1, 1) -> uses the other view (0, 1).
    make_cp2108_tree(tmp_path, missing_keys={(3, 1, 0), (10, 1, 1)})
    ds = build_dataset("CP2108_ALL", tmp_path, use_attr=True, verbose=False, annotation_per_image=True)
    names = sorted(VALUES)
    labels = {(SET_ORDER[s.pid], s.viewid, s.timeid): s.attrs for s in ds.train}
    expect = lambda p, v, t: tuple(VALUES[n].index(_expected_values(p, v, t)[n]) for n in names)  # noqa: E731
    assert labels[(3, 1, 0)] == expect(3, 1, 1)
    assert labels[(10, 1, 1)] == expect(10, 0, 1)
    assert labels[(3, 0, 0)] == expect(3, 0, 0)


@pytest.mark.parametrize("per_image", [False, True])
def test_captions_text_type(cp2108, per_image):
    ds = build_dataset("CP2108_ALL", cp2108, use_text=True, text_type="captions", verbose=False,
                       annotation_per_image=per_image)
    sample = next(s for s in ds.train if "_23_" in s.path)  # identity 10, aerial (view 1), time 1
    caption = "caption 10 1 1" if per_image else "caption 10 0 1"
    assert sample.text == f"A photo of a X X X X  person with the following attributes: {caption}"
    assert ds.attributes == () and sample.attrs is None


def test_by_default_every_image_reads_its_identitys_ground_time1_entry_as_the_reference(cp2108):
    ds = build_dataset("CP2108_ALL", cp2108, use_text=True, use_attr=True, verbose=False)
    names = sorted(VALUES)
    raw_of = dict(enumerate(SET_ORDER))
    # Identity 3 has no (view 0, time 1) entry: the reference repairs it from (view 0, time 0).
    entry_of = {10: (10, 0, 1), 7: (7, 0, 1), 3: (3, 0, 0), 100: (100, 0, 1), 101: (101, 0, 1), 102: (102, 0, 1),
                300: (300, 0, 1)}
    for sample in ds.train:
        values = _expected_values(*entry_of[raw_of[sample.pid]])
        assert sample.attrs == tuple(VALUES[n].index(values[n]) for n in names)
        described = ", ".join(f"{n.replace(' ', '_')} is {values[n]}" for n in names)
        assert sample.text.endswith(f"attributes: {described}.")
    for sample in ds.query + ds.gallery:
        values = _expected_values(*entry_of[sample.pid])
        assert sample.attrs == tuple(VALUES[n].index(values[n]) for n in names)
    # Images of one identity in different views and times share one label vector.
    assert len({s.attrs for s in ds.train if s.pid == 0}) == 1


def test_missing_dataset_folder_names_path_and_layout(tmp_path):
    with pytest.raises(DataError, match=r"CP2108.*not found.*split_v100"):
        build_dataset("CP2108_ALL", tmp_path, verbose=False)


def test_missing_split_file(cp2108):
    os.remove(os.path.join(cp2108, "CP2108", "split_v100", "query_v100.txt"))
    with pytest.raises(DataError, match="query_v100.txt' not found"):
        build_dataset("CP2108_ALL", cp2108, verbose=False)


def test_bad_file_name_names_file_and_rule(cp2108):
    images = os.path.join(cp2108, "CP2108", "images_v100", "sub")
    Image.new("RGB", (8, 8)).save(os.path.join(images, "person_a.jpg"))
    with open(os.path.join(cp2108, "CP2108", "split_v100", "train_v100.txt"), "a") as f:
        f.write("sub/person_a.jpg\n")
    with pytest.raises(DataError, match=r"person_a\.jpg' does not follow the CP2108 rule <pid>_<camera>"):
        build_dataset("CP2108_ALL", cp2108, verbose=False)


def test_listed_image_missing(cp2108):
    with open(os.path.join(cp2108, "CP2108", "split_v100", "gallery_v100.txt"), "a") as f:
        f.write("sub/0100_01_1_0_999.jpg\n")
    with pytest.raises(DataError, match=r"gallery_v100.txt' line \d+: image .*0100_01_1_0_999.jpg' not found"):
        build_dataset("CP2108_ALL", cp2108, verbose=False)


def test_missing_annotation_file_when_attributes_requested(tmp_path):
    make_cp2108_tree(tmp_path, annotations=False)
    assert build_dataset("CP2108_ALL", tmp_path, verbose=False).attributes == ()
    with pytest.raises(DataError, match=r"attr_translation_idx.json' not found \(needed for use_text"):
        build_dataset("CP2108_ALL", tmp_path, use_text=True, text_type="attribute", verbose=False)
    with pytest.raises(DataError, match=r"attr_translation_idx.json' not found \(needed for use_attr\)"):
        build_dataset("CP2108_ALL", tmp_path, use_attr=True, verbose=False)


def test_value_outside_translation_table(cp2108):
    path = os.path.join(cp2108, "CP2108", "attributes_labeled_qwen.json")
    with open(path) as f:
        labels = json.load(f)
    labels["3_0_0"]["Feet"] = "rollerblades"
    with open(path, "w") as f:
        json.dump(labels, f)
    with pytest.raises(DataError, match="'Feet' has no class for value 'rollerblades'"):
        build_dataset("CP2108_ALL", cp2108, use_attr=True, verbose=False)


def test_empty_split_is_an_error(cp2108):
    with open(os.path.join(cp2108, "CP2108", "split_v100", "query_v100.txt"), "w") as f:
        f.write("\n")
    with pytest.raises(DataError, match="query split is empty"):
        build_dataset("CP2108_ALL", cp2108, verbose=False)

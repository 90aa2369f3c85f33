"""SynthAG generator: determinism, CP2108-format output read by the loader, aerial vs ground images."""
import filecmp
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from configs.defaults import get_cfg_defaults
from datasets import SynthConfig, build_dataset, generate_synthag
from datasets.cp2108 import ATTRIBUTE_NAMES
from datasets.synthag import SynthAGBase
from datasets.synthetic import VOCABULARY
from tests.fixtures import REPO_ROOT, children, run_script, tiny
from utils.errors import DataError

TINY = SynthConfig(num_ids=6, images_per_id=8, height=32, width=16, seed=5)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthag(root, TINY, num_workers=2)
    return root


def _tree(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, files in os.walk(folder) for f in files)


def test_same_seed_gives_identical_files(synth_root, tmp_path):
    generate_synthag(tmp_path, TINY, num_workers=1)
    a, b = os.path.join(synth_root, "SynthAG"), os.path.join(tmp_path, "SynthAG")
    assert _tree(a) == _tree(b)
    match, mismatch, errors = filecmp.cmpfiles(a, b, _tree(a), shallow=False)
    # Images, 3 split files, 3 annotation files and the generator settings (synth_config.json).
    assert not mismatch and not errors and len(match) == TINY.num_ids * TINY.images_per_id + 7


def test_other_seed_gives_other_images(synth_root, tmp_path):
    generate_synthag(tmp_path, SynthConfig(**{**TINY.__dict__, "seed": 6}), num_workers=1)
    first, other = (os.path.join(root, "SynthAG", "images") for root in (synth_root, tmp_path))
    first_image = os.path.join(first, sorted(os.listdir(first))[0])
    other_image = os.path.join(other, sorted(os.listdir(other))[0])
    assert not filecmp.cmp(first_image, other_image, shallow=False)


def test_output_is_read_by_the_cp2108_loader_with_attributes_and_texts(synth_root):
    ds = build_dataset("SynthAG_ALL", synth_root, use_text=True, use_attr=True, verbose=False)
    assert len(ds.train) + len(ds.query) + len(ds.gallery) == TINY.num_ids * TINY.images_per_id
    assert ds.num_train_pids == TINY.num_ids // 2
    assert [n for n, _ in ds.attributes] == sorted(ATTRIBUTE_NAMES)
    assert dict(ds.attributes) == {n: len(v) for n, v in VOCABULARY.items()}
    train_files = {os.path.basename(s.path)[:4] for s in ds.train}
    test_files = {os.path.basename(s.path)[:4] for s in ds.query + ds.gallery}
    assert not train_files & test_files
    assert {s.viewid for s in ds.query} == {0, 1} and {s.viewid for s in ds.gallery} == {0, 1}
    assert all(s.camid < 22 for s in ds.train if s.viewid == 0)
    assert all(s.camid >= 22 for s in ds.train if s.viewid == 1)
    assert all(s.text.startswith("A photo of a X X X X  person with the following attributes: Accessories is ")
               for s in ds.train)
    with open(os.path.join(synth_root, "SynthAG", "attributes_labeled_qwen.json")) as f:
        labels = json.load(f)
    # Aerial annotations hide what cannot be seen from above.
    assert all(v["Feet"] == "unknown" for k, v in labels.items() if k.split("_")[1] == "1")
    assert all(v["Feet"] != "unknown" for k, v in labels.items() if k.split("_")[1] == "0")
    ag = build_dataset("SynthAG_AG", synth_root, verbose=False)
    assert {s.viewid for s in ag.query} == {1} and {s.viewid for s in ag.gallery} == {0}
    assert build_dataset("SynthAG_AGAG", synth_root, verbose=False).view_mode == "cross"


def test_aerial_images_differ_from_ground_images(synth_root):
    ds = build_dataset("SynthAG_ALL", synth_root, verbose=False)
    sizes = {Image.open(s.path).size for s in ds.train}
    assert sizes == {(TINY.width, TINY.height)}

    def sharpness(view):
        # Mean absolute vertical gradient: aerial footage is low-resolution and blurred.
        grads = [np.abs(np.diff(np.asarray(Image.open(s.path).convert("L"), dtype=float), axis=0)).mean()
                 for s in ds.train if s.viewid == view and s.timeid == 1]
        return float(np.mean(grads))

    assert sharpness(1) < sharpness(0)


def test_refuses_to_overwrite_and_checks_sizes(synth_root):
    with pytest.raises(DataError, match="already exists"):
        generate_synthag(synth_root, TINY)
    with pytest.raises(DataError, match="num_ids=2"):
        generate_synthag(synth_root, SynthConfig(num_ids=2), overwrite=True)


def test_prepare_generates_only_when_missing(tmp_path):
    cfg = get_cfg_defaults()
    cfg.DATASETS.SYNTH.NUM_IDS, cfg.DATASETS.SYNTH.IMAGES_PER_ID = 4, 6
    cfg.DATASETS.SYNTH.HEIGHT, cfg.DATASETS.SYNTH.WIDTH = 16, 8
    cfg.DATALOADER.NUM_WORKERS = 1
    cfg.DATASETS.AUTO_GENERATE = False
    SynthAGBase.prepare(str(tmp_path), cfg)
    assert not os.path.exists(tmp_path / "SynthAG")
    cfg.DATASETS.AUTO_GENERATE = True
    SynthAGBase.prepare(str(tmp_path), cfg)
    assert len(os.listdir(tmp_path / "SynthAG" / "images")) == 24


def test_command_line_tools(tmp_path):
    result = run_script(["tools/make_synthetic.py", "--out", str(tmp_path), "--num-ids", "4", "--images-per-id", "6",
                         "--height", "16", "--width", "8", "--workers", "1"])
    assert result.returncode == 0, result.stderr
    assert "wrote 24 images of 4 identities" in result.stdout
    # The second name has no folder: the first table is printed, then one error line and exit code 2.
    stats = run_script(["tools/dataset_stats.py", "--root", str(tmp_path), "SynthAG_AGAG", "CARGO"])
    assert stats.returncode == 2
    assert "SynthAG_AGAG (view_mode cross, 2 training identities)" in stats.stdout
    assert "gallery/aerial" in stats.stdout and "train/ground" in stats.stdout
    assert stats.stderr.startswith("error: ") and "CARGO' not found" in stats.stderr
    assert len(stats.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="finds the rendering processes in /proc (Linux)")
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_rendering_process_that_dies_ends_the_run_with_one_line_and_no_folder(tmp_path, signum):
    """The training entry point generates SynthAG in two forked processes; one of them is killed (SIGTERM from
    a scheduler's stray kill, SIGKILL from the out-of-memory killer). The run ends with one line and exit code
    1, leaving nothing under the data root; it used to wait forever for the lost identities (and a worker that
    ran the entry point's inherited SIGTERM handler inside the pool's locks could hang even a normal finish)."""
    root, out = tmp_path / "data", tmp_path / "run"
    cmd = [sys.executable, "train_svpr.py", *tiny(str(root), str(out), extra=[
        "DATASETS.AUTO_GENERATE", "True", "DATASETS.SYNTH.NUM_IDS", "80", "DATASETS.SYNTH.HEIGHT", "64",
        "DATASETS.SYNTH.WIDTH", "32", "DATALOADER.NUM_WORKERS", "2"])]
    process = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 300
        while len(children(process.pid)) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        workers = children(process.pid)
        assert len(workers) >= 2, "the generator never started its rendering processes"
        os.kill(workers[0], signum)
        stdout, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 1, stderr
    assert stderr.strip().splitlines() == ["error: a SynthAG rendering process died (killed, or out of memory?); "
                                           "nothing was written, generate again"]
    assert os.listdir(root) == []

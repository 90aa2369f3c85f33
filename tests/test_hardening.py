"""Faults of attackers and careless users: files that try to run code, bad values, existing runs, broken
images, diverging losses, full disks, stalled ranks, leftovers of interrupted writes.

Entry points run in this process through ``run_main`` (exit code and stderr as a user sees them) where
no worker process or signal is involved, as real subprocesses otherwise.
"""
import dataclasses
import json
import os
import pickle
import shutil
import stat
import zipfile

import numpy as np
import pytest
import torch

from configs import load_config
from datasets.bases import Sample
from datasets.synthag import SynthAGAll
from datasets.synthetic import SETTINGS_FILE, SynthConfig, generate_synthag
from model.clip.loader import read_state_dict
from processor import faults
from processor.preflight import count_valid_queries
from tests.fixtures import (BASELINE, CLIPREID, REPO_ROOT, assert_one_error_line, current_umask, free_port,
                            run_script, tiny)
from utils.checkpoint import load_checkpoint, save_checkpoint
from utils.errors import CheckpointError, ConfigError
from utils.io import atomic_write
from evaluation.report import write_results

SMALL = SynthConfig(num_ids=16, images_per_id=12, height=64, width=32, seed=0)


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    generate_synthag(root, SMALL, num_workers=1)
    return root


def fake_run(output_dir, config, overrides):
    """An OUTPUT_DIR as a previous run left it: config.yaml and a checkpoint storing that run's config."""
    os.makedirs(output_dir)
    cfg = load_config(config, overrides)
    save_checkpoint({"config": cfg.dump(), "epoch": 1}, os.path.join(output_dir, "checkpoint_last.pth"))
    with open(os.path.join(output_dir, "config.yaml"), "w", encoding="utf-8") as handle:
        handle.write("previous run\n")
    return {name: open(os.path.join(output_dir, name), "rb").read() for name in os.listdir(output_dir)}


def folder_bytes(output_dir):
    return {name: open(os.path.join(output_dir, name), "rb").read() for name in os.listdir(output_dir)}


# ------------------------------------------------------------------------------------------ bad values
@pytest.mark.parametrize("key, value, needle", [
    ("DATALOADER.NUM_INSTANCE", "0", "DATALOADER.NUM_INSTANCE"),
    ("SOLVER.IMS_PER_BATCH", "0", "SOLVER.IMS_PER_BATCH"),
    ("SOLVER.EVAL_PERIOD", "0", "SOLVER.EVAL_PERIOD"),
    ("SOLVER.CHECKPOINT_PERIOD", "-1", "SOLVER.CHECKPOINT_PERIOD"),
    ("SOLVER.MAX_EPOCHS", "-3", "SOLVER.MAX_EPOCHS"),
    ("DATASETS.TESTS", "()", "DATASETS.TESTS"),
    ("DATASETS.TESTS", "('SynthAG_ALL', 'SynthAG_GAX')", "SynthAG_GAX"),
    ("DIST.TIMEOUT_MINUTES", "0", "DIST.TIMEOUT_MINUTES"),
])
def test_bad_value_is_one_line_before_anything_is_written(cli, synth_root, tmp_path, key, value, needle):
    out = str(tmp_path / "out")
    code, lines = cli("train_svpr", ["--config_file", BASELINE, *tiny(synth_root, out, extra=[key, value])])
    assert_one_error_line(code, lines, needle)
    assert not os.path.exists(out)


def test_output_dir_that_cannot_be_created_is_one_line(cli, synth_root, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    out = str(tmp_path / "file" / "run")
    code, lines = cli("train_svpr", ["--config_file", BASELINE, *tiny(synth_root, out)])
    assert_one_error_line(code, lines, out, "Not a directory")


# -------------------------------------------------------------------------- existing runs and --resume
def test_existing_run_is_not_overwritten_without_a_flag(cli, synth_root, tmp_path):
    out = str(tmp_path / "run")
    before = fake_run(out, BASELINE, tiny(synth_root, out))
    code, lines = cli("train_svpr", ["--config_file", BASELINE, *tiny(synth_root, out)])
    assert_one_error_line(code, lines, out, "checkpoint_last.pth", "--overwrite")
    assert folder_bytes(out) == before


def test_resume_without_a_checkpoint_is_one_line(cli, synth_root, tmp_path):
    out = str(tmp_path / "empty")
    code, lines = cli("train_svpr", ["--config_file", BASELINE, "--resume", *tiny(synth_root, out)])
    assert_one_error_line(code, lines, "--resume", "checkpoint_last.pth")
    assert not os.path.exists(out)


def test_resume_under_another_architecture_names_the_differing_keys(cli, synth_root, tmp_path):
    out = str(tmp_path / "run")
    before = fake_run(out, CLIPREID, tiny(synth_root, out))
    # Resuming may lengthen the run and change the worker count; the architecture may not change.
    code, lines = cli("train_svpr", ["--config_file", BASELINE, "--resume",
                                     *tiny(synth_root, out, epochs=5, workers=1)])
    assert_one_error_line(code, lines, "MODEL.ARCH_NAME", "CLIP_ReID")
    assert "SOLVER.MAX_EPOCHS" not in lines[0] and "DATALOADER.NUM_WORKERS" not in lines[0]
    assert folder_bytes(out) == before


def test_test_script_does_not_overwrite_results(cli, synth_root, tmp_path):
    out = str(tmp_path / "tested")
    os.makedirs(out)
    (tmp_path / "tested" / "results.json").write_text("{}")
    code, lines = cli("test_svpr", ["--config_file", BASELINE, *tiny(synth_root, out, extra=["TEST.WEIGHT", "x.pth"])])
    assert_one_error_line(code, lines, "results.json", "--overwrite")
    assert (tmp_path / "tested" / "results.json").read_text() == "{}"


def test_overwrite_replaces_the_run_and_zero_epochs_only_evaluates(cli, synth_root, tmp_path, monkeypatch):
    """--overwrite removes the previous run's resumable state; SOLVER.MAX_EPOCHS 0 evaluates without
    training; every file written gets the umask's mode."""
    out = str(tmp_path / "run")
    fake_run(out, BASELINE, tiny(synth_root, out))
    (tmp_path / "run" / ".tmp-left-by-a-killed-write.pth").write_bytes(b"partial")
    old_mask = os.umask(0o027)
    try:
        code, lines = cli("train_svpr", ["--config_file", BASELINE, "--overwrite", *tiny(synth_root, out, epochs=0)])
    finally:
        os.umask(old_mask)
    assert code == 0, lines
    state = load_checkpoint(os.path.join(out, "checkpoint_last.pth"))
    assert state["epoch"] == 0 and "model" in state
    assert json.loads((tmp_path / "run" / "results.json").read_text())["epoch"] == 0
    for name in ("checkpoint_last.pth", "model_final.pth", "results.json", "results.csv", "config.yaml"):
        assert stat.S_IMODE(os.stat(os.path.join(out, name)).st_mode) == 0o640, name
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]


# ------------------------------------------------------------------------------------------------ data
@pytest.fixture
def data_copy(synth_root, tmp_path):
    root = str(tmp_path / "data")
    shutil.copytree(synth_root, root)
    images = os.path.join(root, "SynthAG", "images")
    splits = {split: open(os.path.join(root, "SynthAG", f"{split}.txt")).read().split()
              for split in ("train", "gallery")}
    return root, images, splits


def test_missing_gallery_image_stops_before_training(cli, data_copy, tmp_path):
    root, images, splits = data_copy
    missing = os.path.join(images, splits["gallery"][-1])
    os.remove(missing)
    out = str(tmp_path / "out")
    code, lines = cli("train_svpr", ["--config_file", BASELINE, *tiny(root, out)])
    assert_one_error_line(code, lines, missing, "not found")
    assert not os.path.exists(os.path.join(out, "checkpoint_last.pth"))


def test_corrupt_image_with_check_images_stops_before_training(cli, data_copy, tmp_path):
    root, images, splits = data_copy
    corrupt = os.path.join(images, splits["train"][3])
    with open(corrupt, "wb") as handle:
        handle.write(b"\x00not a jpeg" * 10)
    out = str(tmp_path / "out")
    code, lines = cli("train_svpr", ["--config_file", BASELINE,
                                     *tiny(root, out, extra=["DATALOADER.CHECK_IMAGES", "True"])])
    assert_one_error_line(code, lines, corrupt, "cannot be read")
    assert not os.path.exists(os.path.join(out, "checkpoint_last.pth"))


@pytest.mark.slow
@pytest.mark.parametrize("cache_images", [False, True])
def test_corrupt_image_in_a_loader_worker_names_the_file(data_copy, tmp_path, cache_images):
    """Read by a loader worker mid-epoch (the run's state before the epoch is kept), or, with
    DATALOADER.CACHE_IMAGES, when the loader decodes its images at startup (before anything is trained)."""
    root, images, splits = data_copy
    corrupt = os.path.join(images, splits["train"][5])
    with open(corrupt, "wb") as handle:
        handle.write(b"\x00not a jpeg" * 10)
    out = str(tmp_path / "out")
    result = run_script(["train_svpr.py", "--config_file", BASELINE, *tiny(root, out, workers=2),
                         "DATALOADER.CACHE_IMAGES", str(cache_images)], env={"OMP_NUM_THREADS": "1"})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert_one_error_line(result.returncode, lines, corrupt)
    assert "worker" not in lines[0]
    if cache_images:
        assert not os.path.exists(os.path.join(out, "checkpoint_last.pth"))
    else:
        assert load_checkpoint(os.path.join(out, "checkpoint_last.pth"))["epoch"] == 0


def _sample(pid, camid, viewid=0, timeid=0):
    return Sample(f"{pid}_{camid}.jpg", pid, camid, viewid, timeid)


def test_valid_queries_follow_the_evaluation_removal_rules():
    rng = np.random.default_rng(0)
    query = [_sample(*(int(v) for v in rng.integers(0, 4, size=4))) for _ in range(40)]
    gallery = [_sample(*(int(v) for v in rng.integers(0, 4, size=4))) for _ in range(60)]
    for view_mode in ("mix", "cross", "same"):
        for time_mode in ("mix", "cross", "same"):
            expected = 0
            for q in query:
                for g in gallery:
                    kept = g.camid != q.camid
                    kept &= {"mix": True, "cross": g.viewid != q.viewid, "same": g.viewid == q.viewid}[view_mode]
                    kept &= {"mix": True, "cross": g.timeid != q.timeid, "same": g.timeid == q.timeid}[time_mode]
                    if g.pid == q.pid and kept:
                        expected += 1
                        break
            assert count_valid_queries(query, gallery, view_mode, time_mode, chunk=7) == expected
    # Every true match shares the query's camera: nothing can be evaluated.
    assert count_valid_queries([_sample(1, 0)], [_sample(1, 0), _sample(2, 1)], "mix", "mix") == 0


def test_absurd_sizes_in_a_checkpoint_are_refused_before_allocation(cli, synth_root, tmp_path):
    weight = str(tmp_path / "model_final.pth")
    save_checkpoint({"model": {}, "model_args": {"num_classes": 10 ** 12, "num_cameras": 2, "num_views": 2,
                                                 "attributes": []}, "epoch": 1}, weight)
    code, lines = cli("test_svpr", ["--config_file", BASELINE,
                                    *tiny(synth_root, str(tmp_path / "out"), extra=["TEST.WEIGHT", weight])])
    assert_one_error_line(code, lines, weight, "num_classes")


# -------------------------------------------------------------------------------------------- NaN loss
def test_nan_loss_stops_naming_epoch_iteration_and_term_and_keeps_the_good_checkpoint(cli, synth_root, tmp_path):
    out = str(tmp_path / "out")
    code, lines = cli("train_svpr", ["--config_file", BASELINE, *tiny(synth_root, out, epochs=3)],
                      interrupt="stage2:epoch=2:iter=2:signal=NAN")
    # The injected fault makes the batch's images NaN, so every term diverges; the first is named first.
    assert_one_error_line(code, lines, "epoch 2 iteration 2", "loss term id, triplet", "checkpoint_last.pth")
    state = load_checkpoint(os.path.join(out, "checkpoint_last.pth"))
    assert state["epoch"] == 1
    assert all(torch.isfinite(value).all() for value in state["model"].values())
    assert not os.path.exists(os.path.join(out, "model_final.pth"))


# ---------------------------------------------------------------------------------- files running code
class _Payload(torch.nn.Module):
    """A module whose TorchScript ``__setstate__`` prints a marker: ``torch.jit.load`` runs it."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.arange(4.0))

    def forward(self, x):
        return x * self.weight

    @torch.jit.export
    def __getstate__(self):
        return (self.weight, self.training)

    @torch.jit.export
    def __setstate__(self, state: tuple[torch.Tensor, bool]):
        self.weight = state[0]
        self.training = state[1]
        print("PAYLOAD-RAN")


def test_torchscript_code_in_pretrained_weights_never_runs(tmp_path, capfd):
    path = str(tmp_path / "ViT-B-16.pt")
    torch.jit.save(torch.jit.script(_Payload()), path)
    capfd.readouterr()
    with pytest.raises(CheckpointError, match="ViT-B-16.pt"):
        read_state_dict(path)
    assert "PAYLOAD-RAN" not in capfd.readouterr().out


class _WritesAFile:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_crafted_archive_pickle_cannot_write_a_file(tmp_path):
    path, target = str(tmp_path / "crafted.pt"), str(tmp_path / "written-by-the-archive")
    module = torch.jit.script(torch.nn.Linear(2, 2))
    torch.jit.save(module, path)
    crafted = str(tmp_path / "crafted-archive.pt")
    with zipfile.ZipFile(path) as source, zipfile.ZipFile(crafted, "w") as sink:
        for item in source.infolist():
            data = source.read(item.filename)
            if item.filename.endswith("/data.pkl"):
                data = pickle.dumps({"weight": _WritesAFile(target)}, protocol=2)
            sink.writestr(item, data)
    with pytest.raises(CheckpointError, match="refusing to load global"):
        read_state_dict(crafted)
    assert not os.path.exists(target)
    # The genuine archive reads as the module's own state dict.
    weights = read_state_dict(path)
    assert weights.keys() == module.state_dict().keys()
    assert all(torch.equal(weights[key], module.state_dict()[key]) for key in weights)


# --------------------------------------------------------------------------------------- atomic writes
def test_atomic_writes_use_the_umask(tmp_path):
    old_mask = os.umask(0o022)
    try:
        save_checkpoint({"x": torch.ones(2)}, str(tmp_path / "a.pth"))
        write_results(str(tmp_path), "a.pth", "cfg.yml", 1, {})
    finally:
        os.umask(old_mask)
    for name in ("a.pth", "results.json", "results.csv"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o644, name


FULL_DISK = """
import resource, signal, sys
from utils.entrypoint import run_main
from utils.io import atomic_write
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))
run_main(lambda: atomic_write(sys.argv[1], b"x" * 1_000_000))
"""


def test_write_past_the_file_size_limit_is_one_line_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "checkpoint_last.pth"
    target.write_bytes(b"previous good state")
    result = run_script(["-c", FULL_DISK, str(target)], env={"PYTHONPATH": REPO_ROOT})
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert_one_error_line(result.returncode, lines, str(target), "File too large")
    assert target.read_bytes() == b"previous good state"
    assert os.listdir(tmp_path) == ["checkpoint_last.pth"]


def test_atomic_write_failure_leaves_no_temporary(tmp_path):
    def fails(handle):
        handle.write(b"half")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(str(tmp_path / "x.json"), fails)
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------- SynthAG
def test_synthag_generation_is_atomic_and_cleans_up(tmp_path, monkeypatch):
    root = str(tmp_path)
    stale = tmp_path / "SynthAG.tmp-999999999"  # a staging folder of a killed generator
    (stale / "images").mkdir(parents=True)
    from datasets import synthetic

    real = synthetic._render_identity

    def render_then_fail(job):
        if job[1] == 3:
            raise KeyboardInterrupt
        return real(job)

    monkeypatch.setattr(synthetic, "_render_identity", render_then_fail)
    with pytest.raises(KeyboardInterrupt):
        generate_synthag(root, SynthConfig(num_ids=4, images_per_id=6, height=32, width=16), num_workers=1)
    assert os.listdir(root) == []


def test_synthag_regenerates_when_its_settings_change(tmp_path):
    root = str(tmp_path)
    overrides = ["DATASETS.SYNTH.NUM_IDS", "6", "DATASETS.SYNTH.IMAGES_PER_ID", "6", "DATASETS.SYNTH.HEIGHT", "32",
                 "DATASETS.SYNTH.WIDTH", "16", "DATALOADER.NUM_WORKERS", "0"]
    settings = os.path.join(root, "SynthAG", SETTINGS_FILE)
    SynthAGAll.prepare(root, load_config(None, overrides))
    first = json.load(open(settings))
    assert first.pop("origin") == "DATASETS.SYNTH"
    mtime = os.stat(settings).st_mtime_ns
    SynthAGAll.prepare(root, load_config(None, overrides))
    assert os.stat(settings).st_mtime_ns == mtime  # same settings: kept
    SynthAGAll.prepare(root, load_config(None, overrides + ["DATASETS.SYNTH.SEED", "7"]))
    second = json.load(open(settings))
    assert second.pop("origin") == "DATASETS.SYNTH"
    assert dataclasses.replace(SynthConfig(**first), seed=7) == SynthConfig(**second)
    assert sorted(os.listdir(root)) == ["SynthAG"]
    # A folder the user generated with the tool is theirs: other settings do not replace it.
    generate_synthag(root, SynthConfig(num_ids=4, images_per_id=6, height=32, width=16), overwrite=True)
    mtime = os.stat(settings).st_mtime_ns
    SynthAGAll.prepare(root, load_config(None, overrides))
    assert os.stat(settings).st_mtime_ns == mtime
    assert os.stat(os.path.join(root, "SynthAG", "images", os.listdir(os.path.join(root, "SynthAG", "images"))[0])
                   ).st_mode & 0o777 == 0o666 & ~current_umask()


# -------------------------------------------------------------------------------------------- torchrun
@pytest.mark.slow
def test_stalled_rank_stops_the_other_within_the_dist_timeout(synth_root, tmp_path):
    out = str(tmp_path / "ddp")
    env = {"PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1",
           faults.ENV_VAR: "stage2:epoch=1:iter=2:signal=STALL:rank=1"}
    result = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port", str(free_port()),
                         "train_svpr.py", "--config_file", BASELINE,
                         *tiny(synth_root, out, extra=["DIST.TIMEOUT_MINUTES", "0.1"])], env=env, timeout=300)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors and "rank 0" in errors[0] and "DIST.TIMEOUT_MINUTES = 0.1" in errors[0], result.stderr[-3000:]


@pytest.mark.slow
def test_elastic_restart_resumes_from_the_last_checkpoint(synth_root, tmp_path):
    out = str(tmp_path / "ddp")
    env = {"PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1",
           faults.ENV_VAR: "stage2:epoch=2:iter=1:signal=SIGKILL:rank=1:restart=0"}
    result = run_script(["-m", "torch.distributed.run", "--nproc_per_node=2", "--max-restarts", "1",
                         "--master_port", str(free_port()), "train_svpr.py", "--config_file", BASELINE,
                         *tiny(synth_root, out, extra=["DIST.TIMEOUT_MINUTES", "0.5"])], env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = open(os.path.join(out, "train.log"), encoding="utf-8").read()
    assert "elastic restart 1: resuming" in log and "resumed from" in log and "1 epochs done" in log
    assert load_checkpoint(os.path.join(out, "model_final.pth"))["epoch"] == 2


def test_resume_config_check_ignores_keys_added_later_at_their_default(synth_root, tmp_path):
    from processor.preflight import check_resume_config

    out = str(tmp_path / "run")
    cfg = load_config(BASELINE, tiny(synth_root, out))
    stored = cfg.clone()
    stored.defrost()
    del stored.MODEL["GRAD_CHECKPOINT"]  # a checkpoint written before this key existed
    path = str(tmp_path / "checkpoint_last.pth")
    save_checkpoint({"config": stored.dump()}, path)
    check_resume_config(cfg, path)
    changed = load_config(BASELINE, tiny(synth_root, out, extra=["MODEL.GRAD_CHECKPOINT", "True"]))
    with pytest.raises(ConfigError, match="MODEL.GRAD_CHECKPOINT"):
        check_resume_config(changed, path)

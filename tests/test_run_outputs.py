"""A run's folder is enough to reproduce it: test from a checkpoint alone, features that equal evaluation's,
and the command-line habits of the scripts."""
import hashlib
import json
import os

import numpy as np
import pytest
import torch

from datasets.synthetic import SynthConfig, generate_synthag
from processor.inference import FeatureExtractor
from tests.fixtures import SVPR, check_ok, run_script, tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny SVPR-ReID run (data, output folder)."""
    root = str(tmp_path_factory.mktemp("data"))
    generate_synthag(root, SynthConfig(num_ids=12, images_per_id=10, height=64, width=32, seed=3), num_workers=1)
    out = str(tmp_path_factory.mktemp("run"))
    check_ok(run_script(["train_svpr.py", "--config_file", SVPR, *tiny(root, out, epochs=1)]))
    return root, out


def _digests(folder):
    return {name: hashlib.sha256(open(os.path.join(folder, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(folder)) if os.path.isfile(os.path.join(folder, name))}


def test_test_script_needs_only_the_checkpoint_and_leaves_the_run_untouched(trained):
    root, out = trained
    before = _digests(out)
    weights = os.path.join(out, "model_final.pth")
    # Options after overrides, the --config-file spelling is not needed: the checkpoint carries the config.
    check_ok(run_script(["test_svpr.py", "DATASETS.TESTS", "('SynthAG_ALL', 'SynthAG_AG')", "--weights", weights,
                         "TEST.SAVE_FEATURES", "True"]))
    assert _digests(out) == before  # nothing of the training run was rewritten
    test_dir = os.path.join(out, "test")
    with open(os.path.join(test_dir, "results.json"), encoding="utf-8") as handle:
        tested = json.load(handle)
    with open(os.path.join(out, "results.json"), encoding="utf-8") as handle:
        trained_results = json.load(handle)
    assert list(tested["protocols"]) == ["SynthAG_ALL", "SynthAG_AG"]
    for name, row in tested["protocols"].items():
        assert row == trained_results["protocols"][name]
    assert tested["settings"]["trained_on"] == "SynthAG_ALL" and tested["checkpoint"] == weights
    assert os.path.isfile(os.path.join(test_dir, "config.yaml")) and os.path.isfile(os.path.join(test_dir, "test.log"))


def test_saved_features_are_the_evaluated_ones_and_the_extractor_reproduces_them(trained):
    root, out = trained
    features = np.load(os.path.join(out, "test", "features_SynthAG_ALL.npz"))
    with open(os.path.join(out, "test", "results.json"), encoding="utf-8") as handle:
        row = json.load(handle)["protocols"]["SynthAG_ALL"]
    assert features["query_features"].shape[0] == row["num_query"] == len(features["query_paths"])
    assert features["gallery_features"].shape[0] == row["num_gallery"] == len(features["gallery_paths"])
    assert set(features["query_viewids"].tolist()) <= {0, 1} and features["query_pids"].dtype == np.int64
    # The extractor embeds in evaluation's batches (queries then gallery), so features are identical.
    extractor = FeatureExtractor.from_checkpoint(os.path.join(out, "model_final.pth"), device="cpu",
                                                 opts=["DATASETS.ROOT_DIR", root])
    paths = list(features["query_paths"]) + list(features["gallery_paths"])
    viewids = features["query_viewids"].tolist() + features["gallery_viewids"].tolist()
    extracted = extractor(paths, viewids)
    expected = torch.from_numpy(np.concatenate([features["query_features"], features["gallery_features"]]))
    torch.testing.assert_close(extracted, expected, rtol=0, atol=1e-6)
    normalized = extractor(paths[:5], viewids[:5], normalize=True)
    torch.testing.assert_close(normalized.norm(dim=1), torch.ones(5))


def test_help_lists_the_shipped_configs():
    result = run_script(["train_svpr.py", "--help"])
    assert result.returncode == 0
    assert "configs/CP2108/svpr_reid.yml" in result.stdout and "configs/Synthetic/clipreid.yml" in result.stdout


def test_test_script_without_stored_config_asks_for_one(tmp_path):
    path = str(tmp_path / "bare.pth")
    torch.save({"head.weight": torch.zeros(2, 2)}, path)
    result = run_script(["test_svpr.py", "--weights", path])
    assert result.returncode == 2 and "--config_file" in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_log_lines_report_progress_with_etas(trained):
    """A non-terminal log gets, every SOLVER.LOG_PERIOD iterations, the epoch, iteration/total, losses, lr,
    images/s and the ETAs of the epoch and of the run."""
    import re

    from processor.hooks import format_duration

    _, out = trained
    log = open(os.path.join(out, "train.log"), encoding="utf-8").read()
    lines = [line for line in log.splitlines() if " iter " in line]
    assert lines, log[-2000:]
    pattern = re.compile(r"epoch 1 iter \d+/\d+: loss [\d.]+ \(id [\d.]+, triplet [\d.]+.*\), acc [\d.]+, "
                         r"lr [\d.e+-]+, [\d.]+ img/s, ETA epoch \d+:\d\d:\d\d, run \d+:\d\d:\d\d")
    assert all(pattern.search(line) for line in lines), lines[0]
    assert format_duration(3725.4) == "1:02:05" and format_duration(-3) == "0:00:00"

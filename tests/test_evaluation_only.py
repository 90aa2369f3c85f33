"""Evaluation needs only what it evaluates: no training split on disk, each dataset and each checkpoint read
once per run."""
import collections
import json
import os
import shutil
import sys

import pytest
import torch

import test_svpr
from configs import load_config
from datasets.bases import ReIDDataset
from datasets.synthetic import SynthConfig, generate_synthag
from processor import run_training
from processor.inference import FeatureExtractor
from tests.fixtures import BASELINE, check_ok, run_script, tiny
from utils.device import resolve_device

pytestmark = pytest.mark.usefixtures("single_thread")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny CLIP baseline trained on SynthAG and tested on SynthAG plus CP2108_AG of a second tree stored as
    CP2108; ``(data root, output dir, construction counts per dataset name, torch.load calls per path)``."""
    root = str(tmp_path_factory.mktemp("data"))
    generate_synthag(root, SynthConfig(num_ids=16, images_per_id=12, height=64, width=32, seed=0), num_workers=1)
    other = str(tmp_path_factory.mktemp("other"))
    generate_synthag(other, SynthConfig(num_ids=16, images_per_id=12, height=64, width=32, seed=5), num_workers=1)
    os.rename(os.path.join(other, "SynthAG"), os.path.join(root, "CP2108"))
    out = str(tmp_path_factory.mktemp("run"))
    cfg = load_config(BASELINE, tiny(root, out, epochs=1, extra=["DATASETS.TESTS", "('SynthAG_ALL', 'CP2108_AG')"]))
    built, loads = collections.Counter(), collections.Counter()
    with pytest.MonkeyPatch.context() as patch:
        original_init, original_load = ReIDDataset.__init__, torch.load

        def counting_init(self, *args, **kwargs):
            built[self.registry_name] += 1
            original_init(self, *args, **kwargs)

        def counting_load(path, *args, **kwargs):
            loads[os.path.basename(str(path))] += 1
            return original_load(path, *args, **kwargs)

        patch.setattr(ReIDDataset, "__init__", counting_init)
        patch.setattr(torch, "load", counting_load)
        torch.manual_seed(0)
        run_training(cfg, resolve_device("cpu"))
    return root, out, built, loads


def test_a_training_run_reads_each_dataset_once(trained):
    _, out, built, _ = trained
    assert built == {"SynthAG_ALL": 1, "CP2108_AG": 1}
    assert set(json.load(open(os.path.join(out, "results.json")))["protocols"]) == {"SynthAG_ALL", "CP2108_AG"}


def _drop_training_splits(root):
    """Delete the training split file (CP2108's released layout) and every image it lists."""
    for folder in ("SynthAG", "CP2108"):
        split = os.path.join(root, folder, "train.txt")
        for name in open(split).read().split():
            os.remove(os.path.join(root, folder, "images", name))
        os.remove(split)


def test_test_script_feature_extractor_and_search_need_no_training_split(trained, tmp_path):
    root, out, _, _ = trained
    data = str(tmp_path / "data")
    shutil.copytree(root, data)
    _drop_training_splits(data)
    weights = os.path.join(out, "model_final.pth")
    result = run_script(["test_svpr.py", "--weights", weights, "DATASETS.ROOT_DIR", data, "OUTPUT_DIR",
                         str(tmp_path / "test")])
    check_ok(result)
    tested = json.load(open(tmp_path / "test" / "results.json"))["protocols"]
    trained_results = json.load(open(os.path.join(out, "results.json")))["protocols"]
    assert {name: row["mAP"] for name, row in tested.items()} == \
        {name: row["mAP"] for name, row in trained_results.items()}
    gallery = os.path.join(data, "SynthAG", "images")
    images = sorted(os.path.join(gallery, name) for name in os.listdir(gallery))[:3]
    features = FeatureExtractor.from_checkpoint(weights, device="cpu")(images)
    assert features.shape[0] == 3 and torch.isfinite(features).all()
    search = run_script(["tools/search.py", "--weights", weights, "--query", images[0], "--gallery", gallery,
                         "--topk", "3", "--out", str(tmp_path / "search")])
    check_ok(search)


def test_test_script_reads_the_checkpoint_once(trained, tmp_path, monkeypatch):
    _, out, _, _ = trained
    weights = os.path.join(out, "model_final.pth")
    loads = collections.Counter()
    original_load = torch.load

    def counting_load(path, *args, **kwargs):
        loads[os.path.abspath(str(path))] += 1
        return original_load(path, *args, **kwargs)

    monkeypatch.setattr(torch, "load", counting_load)
    monkeypatch.setattr(sys, "argv", ["test_svpr.py", "--weights", weights, "OUTPUT_DIR", str(tmp_path / "test")])
    test_svpr.main()
    assert loads[os.path.abspath(weights)] == 1
    assert os.path.isfile(tmp_path / "test" / "results.json")


def test_protocols_over_the_same_images_and_batches_embed_them_once(synth_root, tmp_path, monkeypatch):
    """SynthAG_ALL and SynthAG_AGAG rank the same images in the same batches with different filters: one
    evaluation embeds them once (SVPR-ReID, whose features depend on the batch, included); every metric, and
    what the evaluator is given (features and each protocol's own labels: AGAG's camera ids are views), equal
    a separate evaluation of each protocol."""
    from evaluation import ReIDEvaluator
    from evaluation.protocols import build_evaluation_protocol
    from processor import evaluate_protocols
    from processor.inference import evaluate
    from datasets import make_dataloaders
    from processor.model_io import build_from_args, model_args_from_dataset
    from tests.fixtures import SVPR

    cfg = load_config(SVPR, tiny(synth_root, str(tmp_path), extra=[
        "DATASETS.TESTS", "('SynthAG_ALL', 'SynthAG_AG', 'SynthAG_AGAG')", "TEST.IMS_PER_BATCH", "24"]))
    protocols = {name: build_evaluation_protocol(cfg, name) for name in cfg.DATASETS.TESTS}
    torch.manual_seed(0)
    model = build_from_args(cfg, model_args_from_dataset(make_dataloaders(cfg).dataset), torch.device("cpu")).eval()
    calls, given = [], []
    model.register_forward_pre_hook(lambda module, inputs: calls.append(len(inputs[0])))
    update = ReIDEvaluator.update

    def recording_update(self, features, pids, camids, *args, **kwargs):
        given.append((features.clone(), torch.as_tensor(camids).clone()))
        return update(self, features, pids, camids, *args, **kwargs)

    monkeypatch.setattr(ReIDEvaluator, "update", recording_update)
    shared = evaluate_protocols(cfg, model, torch.device("cpu"), protocols)
    assert sum(calls) == sum(protocols[name].num_query + protocols[name].num_gallery
                             for name in ("SynthAG_ALL", "SynthAG_AG"))
    shared_given, given[:] = list(given), []
    for name, protocol in protocols.items():
        alone = evaluate(cfg, model, protocol.loader, protocol.num_query, torch.device("cpu"), protocol.view_mode)
        assert shared[name]["mAP"] == alone["mAP"] and (shared[name]["cmc"] == alone["cmc"]).all(), name
    assert len(given) == len(shared_given)
    for (features, camids), (alone_features, alone_camids) in zip(shared_given, given):
        assert torch.equal(features, alone_features) and torch.equal(camids, alone_camids)


def test_the_final_evaluation_reuses_the_last_epochs_features(synth_root, tmp_path, monkeypatch):
    """Training evaluates its first protocol (SynthAG_ALL) after the last epoch; the final evaluation that
    follows with the same weights reuses those features for SynthAG_AGAG (the same images and batches) and
    embeds only SynthAG_AG's, and its results equal an evaluation of the final checkpoint from scratch."""
    import processor.inference
    from processor import evaluate_protocols
    from processor.model_io import load_trained_model

    embedded = []
    original = processor.inference._embed

    def counting_embed(cfg, model, val_loader, device, desc):
        embedded.append(desc)
        return original(cfg, model, val_loader, device, desc)

    monkeypatch.setattr(processor.inference, "_embed", counting_embed)
    from tests.fixtures import SVPR

    cfg = load_config(SVPR, tiny(synth_root, str(tmp_path), epochs=2, extra=[
        "DATASETS.TESTS", "('SynthAG_ALL', 'SynthAG_AG', 'SynthAG_AGAG')", "SOLVER.EVAL_PERIOD", "1"]))
    results = run_training(cfg, resolve_device(cfg))
    assert embedded == ["eval SynthAG_ALL", "eval SynthAG_ALL", "test SynthAG_AG"], embedded
    embedded[:] = []
    model, _ = load_trained_model(cfg, os.path.join(cfg.OUTPUT_DIR, "model_final.pth"), resolve_device(cfg))
    again = evaluate_protocols(cfg, model, resolve_device(cfg))
    assert embedded == ["test SynthAG_ALL", "test SynthAG_AG"], embedded
    for name in cfg.DATASETS.TESTS:
        assert again[name]["mAP"] == results[name]["mAP"] and (again[name]["cmc"] == results[name]["cmc"]).all()

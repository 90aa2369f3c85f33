"""Cross-dataset evaluation: train on one benchmark, test on the protocols of another, each with its own
view mode, and the results say which data every row was measured on."""
import json
import os
import shutil

import pytest

from datasets.synthetic import SynthConfig, generate_synthag
from tests.fixtures import BASELINE, check_ok, make_vehicleid_tree, run_script, tiny

pytestmark = pytest.mark.slow


def test_train_on_one_tree_and_test_on_another(tmp_path):
    """SynthAG and a second SynthAG tree (another seed) stored as CP2108: train on the first, test on both."""
    root = str(tmp_path / "data")
    generate_synthag(root, SynthConfig(num_ids=12, images_per_id=10, height=64, width=32, seed=1), num_workers=1)
    other = str(tmp_path / "other")
    generate_synthag(other, SynthConfig(num_ids=12, images_per_id=10, height=64, width=32, seed=2), num_workers=1)
    shutil.move(os.path.join(other, "SynthAG"), os.path.join(root, "CP2108"))
    out = str(tmp_path / "run")
    result = run_script(["train_svpr.py", "--config_file", BASELINE, *tiny(root, out, epochs=1),
                         "DATASETS.TESTS", "('SynthAG_ALL', 'CP2108_AG', 'CP2108_AGAG')"])
    check_ok(result)
    with open(os.path.join(out, "results.json"), encoding="utf-8") as handle:
        document = json.load(handle)
    rows = document["protocols"]
    assert {name: row["benchmark"] for name, row in rows.items()} == {
        "SynthAG_ALL": "SynthAG", "CP2108_AG": "CP2108", "CP2108_AGAG": "CP2108"}
    assert document["settings"]["trained_on"] == "SynthAG_ALL"
    # Aerial queries against a ground gallery of the other tree: fewer queries and gallery images than ALL.
    assert rows["CP2108_AG"]["num_query"] < rows["CP2108_AGAG"]["num_query"]
    assert rows["CP2108_AG"]["num_gallery"] < rows["CP2108_AGAG"]["num_gallery"]
    table = [line for line in result.stdout.splitlines() if line.startswith("CP2108_AG ")]
    assert table and "CP2108" in table[0].split()[1]


def test_vehicleid_is_evaluated_over_its_random_galleries_and_averaged(tmp_path):
    """Each trial draws another gallery image per vehicle; the reported numbers are the trials' mean."""
    import torch

    from configs import load_config
    from evaluation.protocols import build_evaluation_protocol
    from model import build_model
    from processor import evaluate_protocols
    from processor.inference import evaluate

    make_vehicleid_tree(str(tmp_path), num_test=12)
    cfg = load_config(BASELINE, tiny(str(tmp_path), str(tmp_path / "out"), extra=[
        "DATASETS.NAMES", "VehicleID", "DATASETS.TESTS", "('VehicleID',)", "DATASETS.VEHICLEID_TRIALS", "3",
        "DATALOADER.NUM_INSTANCE", "2", "SOLVER.IMS_PER_BATCH", "4"]))
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3).eval()
    device = torch.device("cpu")
    averaged = evaluate_protocols(cfg, model, device)["VehicleID"]
    protocol = build_evaluation_protocol(cfg, "VehicleID")
    per_trial = [evaluate(cfg, model, loader, num_query, device) for loader, num_query in protocol.trials(cfg)]
    assert len(per_trial) == 3 and averaged["trials"] == 3
    assert len({round(r["mAP"], 6) for r in per_trial}) > 1  # the galleries really differ
    assert averaged["mAP"] == pytest.approx(sum(r["mAP"] for r in per_trial) / 3, rel=1e-6)
    assert averaged["cmc"][0] == pytest.approx(sum(r["cmc"][0] for r in per_trial) / 3, rel=1e-6)
    assert averaged["num_gallery"] == 12

"""results.json / results.csv written and read back; rank-list image drawn from real JPEG files."""
import csv
import json

import numpy as np
import pytest
import torch

from evaluation import evaluate_rank
from configs import get_cfg_defaults
from evaluation.report import evaluation_settings, format_table, read_results, write_results


def protocol_result(seed):
    rng = np.random.default_rng(seed)
    result = evaluate_rank(rng.random((20, 60)), rng.integers(0, 4, 20), rng.integers(0, 4, 60),
                           rng.integers(0, 2, 20), rng.integers(0, 2, 60))
    result.update(num_query=20, num_gallery=60)
    return result


def test_results_written_and_read_back(tmp_path):
    protocols = {"CP2108_AG": protocol_result(0), "CP2108_ALL": dict(protocol_result(1), benchmark="CP2108")}
    cfg = get_cfg_defaults()
    settings = evaluation_settings(cfg, trained_on="CP2108_ALL")
    document = write_results(str(tmp_path), "out/model_60.pth", "configs/x.yml", 60, protocols, settings)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == document == read_results(str(tmp_path))
    assert set(on_disk) == {"checkpoint", "config", "epoch", "settings", "protocols"} and on_disk["epoch"] == 60
    recorded = on_disk["settings"]
    assert recorded["trained_on"] == "CP2108_ALL" and recorded["re_ranking"] is False
    assert recorded["time_mode"] == cfg.TEST.TIME_MODE and recorded["image_size"] == list(cfg.INPUT.SIZE_TEST)
    assert recorded["torch"] == torch.__version__ and (recorded["framework_commit"] or "").strip("+dirty") != ""
    assert on_disk["protocols"]["CP2108_ALL"]["benchmark"] == "CP2108"
    row = on_disk["protocols"]["CP2108_AG"]
    expected = protocols["CP2108_AG"]
    assert row["mAP"] == round(expected["mAP"] * 100, 2)
    assert row["rank1"] == round(float(expected["cmc"][0]) * 100, 2)
    assert row["rank10"] == round(float(expected["cmc"][9]) * 100, 2)
    assert row["mINP"] == round(expected["mINP"] * 100, 2)
    assert list(row) == ["mAP", "rank1", "rank5", "rank10", "mINP", "num_query", "num_gallery"]
    with open(tmp_path / "results.csv", newline="") as stream:
        csv_rows = {record["protocol"]: record for record in csv.DictReader(stream)}
    assert list(csv_rows) == ["CP2108_AG", "CP2108_ALL"]
    for name, csv_row in csv_rows.items():
        expected_row = on_disk["protocols"][name]
        assert csv_row["benchmark"] == expected_row.get("benchmark", "")
        assert {k: float(csv_row[k]) for k in expected_row if k != "benchmark"} == {
            k: v for k, v in expected_row.items() if k != "benchmark"}
        assert csv_row["epoch"] == "60" and csv_row["checkpoint"] == "out/model_60.pth"
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp_")]
    table = format_table(protocols)
    assert "CP2108_ALL  CP2108" in table
    assert "CP2108_AG" in table and f"{row['mAP']:.2f}" in table


def test_short_cmc_is_rejected():
    result = protocol_result(2)
    result["cmc"] = result["cmc"][:5]
    with pytest.raises(ValueError, match="TEST.MAX_RANK >= 10"):
        format_table({"P": result})

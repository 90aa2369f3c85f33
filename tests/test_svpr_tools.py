"""SVPR configs load; the ablation table is built from real results.json files; bench_model runs."""
import glob
import json
import os

import pytest

from configs import load_config
from tests.conftest import REPO_ROOT, run_script
from tools.ablation import ROWS, markdown_table, plan_rows, read_results, row_overrides
from utils.errors import DataError

SVPR_CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*", "svpr_reid.yml")))


pytestmark = pytest.mark.usefixtures("single_thread")


def test_there_is_an_svpr_config_per_benchmark():
    folders = {os.path.basename(os.path.dirname(path)) for path in SVPR_CONFIGS}
    assert folders == {"CP2108", "CARGO", "AGReIDv1", "AGReIDv2", "Synthetic"}


@pytest.mark.parametrize("path", SVPR_CONFIGS, ids=lambda p: os.path.basename(os.path.dirname(p)))
def test_svpr_configs_load_with_the_paper_settings(path):
    cfg = load_config(path)
    assert cfg.MODEL.ARCH_NAME == "CLIP_SVPR_ReID"
    assert cfg.DATASETS.NAMES == cfg.DATASETS.TESTS[0]
    if "Synthetic" in path:
        return
    assert (cfg.SOLVER.OPTIMIZER_NAME, cfg.SOLVER.BASE_LR, cfg.SOLVER.WEIGHT_DECAY) == ("Adam", 5e-6, 1e-4)
    assert (cfg.SOLVER.IMS_PER_BATCH, cfg.DATALOADER.NUM_INSTANCE, cfg.SOLVER.MAX_EPOCHS) == (128, 4, 120)
    assert (cfg.SOLVER.WARMUP_ITERS, cfg.SOLVER.WARMUP_FACTOR, cfg.SOLVER.EVAL_PERIOD, cfg.SOLVER.SEED) == (
        10, 0.1, 2, 1111)
    assert (cfg.MODEL.ID_LOSS_WEIGHT, cfg.MODEL.TEXT_LEN, cfg.MODEL.TEXT_PROMPT, cfg.MODEL.VIEW_PROMPT) == (
        0.25, 100, 4, 4)
    assert cfg.MODEL.FREEZE_TEXT and list(cfg.INPUT.PIXEL_MEAN) == [0.5] * 3
    assert cfg.OUTPUT_DIR.endswith("_svpr_reid")
    cargo = "CARGO" in path
    assert cfg.MODEL.USE_ATTR == cfg.MODEL.SVPR.ASMOE == (not cargo)
    assert len(cfg.DATASETS.TESTS) == {"CP2108": 4, "CARGO": 6, "AGReIDv1": 3, "AGReIDv2": 5}[
        os.path.basename(os.path.dirname(path))]


def _write_results(folder, protocols):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"checkpoint": "model_best.pth", "config": "config.yaml", "epoch": 3, "protocols": {
            name: {"mAP": m, "rank1": r, "rank5": r, "rank10": r, "mINP": m / 2, "num_query": 10,
                   "num_gallery": 50} for name, (m, r) in protocols.items()}}, handle)


def test_ablation_rows_switch_components_on_cumulatively():
    assert [name for name, _ in ROWS] == ["baseline", "+VDFE", "+ASMOE", "+CVPR", "+LOCAL"]
    assert row_overrides((), "out/baseline") == ["MODEL.SVPR.VDFE", "False", "MODEL.SVPR.ASMOE", "False",
                                                 "MODEL.SVPR.CVPR", "False", "MODEL.SVPR.LOCAL", "False",
                                                 "OUTPUT_DIR", "out/baseline"]
    assert row_overrides(ROWS[2][1], "x")[:4] == ["MODEL.SVPR.VDFE", "True", "MODEL.SVPR.ASMOE", "True"]
    cargo = plan_rows(load_config(os.path.join(REPO_ROOT, "configs", "CARGO", "svpr_reid.yml")))
    assert [name for name, _ in cargo] == ["baseline", "+VDFE", "+CVPR", "+LOCAL"]
    assert all("ASMOE" not in enabled for _, enabled in cargo)


def test_ablation_table_from_results_files(tmp_path):
    _write_results(tmp_path / "baseline", {"SynthAG_ALL": (40.25, 55.0), "SynthAG_AG": (30.0, 41.04)})
    _write_results(tmp_path / "vdfe", {"SynthAG_ALL": (45.0, 60.5)})
    rows = [("baseline", read_results(tmp_path / "baseline" / "results.json")),
            ("+VDFE", read_results(tmp_path / "vdfe" / "results.json")), ("+ASMOE", None)]
    table = markdown_table(rows).splitlines()
    assert table[0] == "| Variant | SynthAG_ALL mAP | SynthAG_ALL R1 | SynthAG_AG mAP | SynthAG_AG R1 |"
    assert table[1] == "|---|---:|---:|---:|---:|"
    assert table[2] == "| baseline | 40.2 | 55.0 | 30.0 | 41.0 |"
    assert table[3] == "| +VDFE | 45.0 | 60.5 | - | - |"
    assert table[4] == "| +ASMOE | failed | failed | failed | failed |"


def test_ablation_script_prints_the_table_of_existing_runs(tmp_path):
    values = {"baseline": 20.0, "vdfe": 25.0, "asmoe": 30.0, "cvpr": 35.0, "local": 40.0}
    for folder, value in values.items():
        _write_results(tmp_path / folder, {"SynthAG_ALL": (value, value + 10), "SynthAG_GA": (value - 5, value)})
    result = run_script(["tools/ablation.py", "--config_file", "configs/Synthetic/svpr_reid.yml", "--table-only",
                         "--output_dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert lines[-7] == "| Variant | SynthAG_ALL mAP | SynthAG_ALL R1 | SynthAG_GA mAP | SynthAG_GA R1 |"
    assert lines[-1] == "| +LOCAL | 40.0 | 50.0 | 35.0 | 40.0 |"
    assert lines[-3] == "| +ASMOE | 30.0 | 40.0 | 25.0 | 30.0 |"


def test_ablation_reports_a_missing_or_malformed_results_file(tmp_path):
    with pytest.raises(DataError, match="results file not found"):
        read_results(tmp_path / "nothing" / "results.json")
    (tmp_path / "bad.json").write_text('{"protocols": {"X": {"rank1": 3}}}')
    with pytest.raises(DataError, match="bad.json"):
        read_results(tmp_path / "bad.json")
    result = run_script(["tools/ablation.py", "--config_file", "configs/Synthetic/svpr_reid.yml", "--table-only",
                         "--output_dir", str(tmp_path)])
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "results.json" in result.stderr


def test_bench_model_prints_svpr_and_baseline_throughput():
    small = ["MODEL.CLIP.VISION_LAYERS", "2", "MODEL.CLIP.TEXT_LAYERS", "1", "MODEL.TEXT_LEN", "48",
             "INPUT.SIZE_TRAIN", "[64, 32]", "INPUT.SIZE_TEST", "[64, 32]"]
    result = run_script(["tools/bench_model.py", "--config_file", "configs/Synthetic/svpr_reid.yml", "--batch", "4",
                         "--iters", "1", "--warmup", "0", "--threads", "1", *small])
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for key in ("train_img_per_s", "infer_img_per_s", "baseline_train_img_per_s", "baseline_infer_img_per_s"):
        assert report[key] > 0
    assert report["svpr_over_baseline_train_cost"] == pytest.approx(
        report["baseline_train_img_per_s"] / report["train_img_per_s"], rel=0.05)  # rates are rounded

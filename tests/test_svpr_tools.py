"""SVPR configs load; the ablation table is built from real results.json files; bench_model runs."""
import glob
import json
import os

import pytest

from configs import load_config
from tests.fixtures import REPO_ROOT, check_ok, run_script

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


def test_bench_data_compares_backends_and_the_decoded_image_cache():
    result = run_script(["tools/bench_data.py", "--num-images", "40", "--repeats", "1"])
    check_ok(result)
    lines = result.stdout.splitlines()
    assert lines[0].startswith("40 training images of SynthAG_ALL, output 256x128")
    for backend in ("pil", "tensor"):
        assert any(line.startswith(f"INPUT.IMAGE_BACKEND {backend}") and "x the reference" in line
                   and "pixel-identical to it on" in line for line in lines)
        (cached,) = [line for line in lines if line.startswith(f"INPUT.IMAGE_BACKEND {backend} ")
                     and "CACHE_IMAGES" in line]
        assert float(cached.split("images/s")[0].split()[-1]) > 0 and "x decoding every read" in cached

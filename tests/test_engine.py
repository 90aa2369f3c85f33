"""Training and inference engine, end to end on CPU: tiny random-weight CLIP, tiny synthetic benchmark.

The runs go through the real scripts (subprocesses), real DataLoader workers, real checkpoints on disk,
and a real ``torchrun`` with the gloo backend.
"""
import json
import os

import pytest
import torch

from configs import load_config
from datasets import ImageDataset, build_test_transform, make_dataloaders
from datasets.loader import load_dataset
from datasets.synthetic import SynthConfig, generate_synthag
from loss import build_criterion
from model import build_model
from model.clip_reid import PromptLearning
from solver import make_optimizer
from tests.fixtures import (BASELINE, CLIPREID, REPO_ROOT, SVPR, assert_bit_identical, check_ok, final_weights,
                            free_port, run_script, tiny)
from utils.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def synth_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data"))
    generate_synthag(root, SynthConfig(num_ids=16, images_per_id=12, height=64, width=32, seed=0), num_workers=1)
    return root


def read_results(output_dir):
    with open(os.path.join(output_dir, "results.json"), encoding="utf-8") as handle:
        return json.load(handle)


@pytest.fixture(scope="module")
def baseline_run(synth_root, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("baseline"))
    check_ok(run_script(["train_svpr.py", "--config_file", BASELINE, *tiny(synth_root, out, workers=2)]))
    return out


def test_baseline_trains_evaluates_and_writes_everything(baseline_run):
    for name in ("config.yaml", "train.log", "checkpoint_last.pth", "model_best.pth", "model_final.pth",
                 "results.json", "results.csv"):
        assert os.path.isfile(os.path.join(baseline_run, name)), name
    results = read_results(baseline_run)
    assert list(results["protocols"]) == ["SynthAG_ALL", "SynthAG_AG", "SynthAG_GA", "SynthAG_AGAG"]
    for row in results["protocols"].values():
        assert 0 <= row["mAP"] <= 100 and 0 <= row["rank1"] <= row["rank5"] <= row["rank10"] <= 100
    state = load_checkpoint(os.path.join(baseline_run, "checkpoint_last.pth"))
    assert state["epoch"] == 2
    log = open(os.path.join(baseline_run, "train.log"), encoding="utf-8").read()
    assert "epoch 2 iter" in log and "img/s" in log and "triplet" in log


def test_test_script_reproduces_training_numbers(baseline_run, synth_root, tmp_path):
    out = str(tmp_path / "test")
    weight = os.path.join(baseline_run, "model_final.pth")
    check_ok(run_script(["test_svpr.py", "--config_file", BASELINE,
                         *tiny(synth_root, out, extra=["TEST.WEIGHT", weight])]))
    assert read_results(out)["protocols"] == read_results(baseline_run)["protocols"]


def test_wrong_checkpoint_is_one_line_naming_keys(baseline_run, synth_root, tmp_path):
    weight = os.path.join(baseline_run, "model_final.pth")
    result = run_script(["test_svpr.py", "--config_file", BASELINE,
                         *tiny(synth_root, str(tmp_path), extra=["TEST.WEIGHT", weight, "MODEL.SIE_CAMERA", "True"])])
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "MODEL.SIE_CAMERA" in lines[0], result.stderr


@pytest.mark.parametrize("case", ["missing_dataset", "missing_weights", "missing_pretrained", "no_weight"])
def test_bad_inputs_exit_2_with_one_line(case, synth_root, tmp_path):
    out = str(tmp_path / "out")
    if case == "missing_dataset":
        args = ["train_svpr.py", "--config_file", BASELINE,
                *tiny(str(tmp_path / "nowhere"), out)]
        needle = "nowhere"
    elif case == "missing_weights":
        args = ["test_svpr.py", "--config_file", BASELINE,
                *tiny(synth_root, out, extra=["TEST.WEIGHT", str(tmp_path / "missing.pth")])]
        needle = "missing.pth"
    elif case == "missing_pretrained":
        args = ["train_svpr.py", "--config_file", BASELINE,
                *tiny(synth_root, out, extra=["MODEL.RANDOM_INIT", "False", "MODEL.PRETRAIN_PATH",
                                              str(tmp_path / "ViT-B-16.pt")])]
        needle = "ViT-B-16.pt"
    else:
        args = ["test_svpr.py", "--config_file", BASELINE, *tiny(synth_root, out)]
        needle = "TEST.WEIGHT"
    result = run_script(args)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], result.stderr


def test_clip_reid_runs_both_stages(synth_root, tmp_path):
    out = str(tmp_path / "clipreid")
    check_ok(run_script(["train_svpr.py", "--config_file", CLIPREID, *tiny(synth_root, out, epochs=1)]))
    assert os.path.isfile(os.path.join(out, "stage1.pth"))
    log = open(os.path.join(out, "train.log"), encoding="utf-8").read()
    assert "stage 1 epoch 2/2" in log and "i2t" in log
    assert set(read_results(out)["protocols"]) == {"SynthAG_ALL", "SynthAG_AG", "SynthAG_GA", "SynthAG_AGAG"}


def test_quickstart_generates_data_and_trains_svpr(tmp_path):
    """``python train_svpr.py`` with no config file: generates SynthAG, trains SVPR-ReID, reports."""
    out, root = str(tmp_path / "svpr"), str(tmp_path / "fresh_data")
    synth = ["DATASETS.AUTO_GENERATE", "True", "DATASETS.SYNTH.NUM_IDS", "12", "DATASETS.SYNTH.IMAGES_PER_ID", "12",
             "DATASETS.SYNTH.HEIGHT", "64", "DATASETS.SYNTH.WIDTH", "32"]
    check_ok(run_script(["train_svpr.py", *tiny(root, out, epochs=1), *synth]))
    assert os.path.isfile(os.path.join(root, "SynthAG", "train.txt"))
    log = open(os.path.join(out, "train.log"), encoding="utf-8").read()
    assert "configs/Synthetic/svpr_reid.yml" in log and "CLIP_SVPR_ReID" in log
    for term in ("id ", "triplet", "view", "attr"):
        assert term in log, term
    assert set(read_results(out)["protocols"]) == {"SynthAG_ALL", "SynthAG_AG", "SynthAG_GA", "SynthAG_AGAG"}


def test_ablation_tool_trains_every_row(synth_root, tmp_path):
    out = str(tmp_path / "ablation")
    result = run_script(["tools/ablation.py", "--config_file", SVPR, "--epochs", "1", "--output_dir", out,
                         *tiny(synth_root, str(tmp_path / "unused"), extra=["DATASETS.TESTS", "('SynthAG_ALL',)"])])
    check_ok(result)
    means, differences = result.stdout.split("Difference to baseline")
    table = [line for line in means.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table[1:]] == ["baseline", "+VDFE", "+ASMOE", "+CVPR", "+LOCAL"]
    assert "SynthAG_ALL mAP" in table[0] and "failed" not in result.stdout
    # Under it, each row's difference to the baseline with its interval.
    table = [line for line in differences.splitlines() if line.startswith("| ")]
    assert [row.split("|")[1].strip() for row in table[1:]] == ["+VDFE", "+ASMOE", "+CVPR", "+LOCAL"]
    assert "SynthAG_ALL ΔmAP [95% CI]" in table[0] and all(row.count("[") == 2 for row in table[1:])


def test_resume_at_epoch_boundary_reproduces_uninterrupted_run(synth_root, tmp_path):
    """With real loader workers (tests/test_resume.py covers interruptions inside an epoch)."""
    workers = 2
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    check_ok(run_script(["train_svpr.py", "--config_file", SVPR, *tiny(synth_root, straight, 3, workers)]))
    check_ok(run_script(["train_svpr.py", "--config_file", SVPR, *tiny(synth_root, split, 2, workers)]))
    check_ok(run_script(["train_svpr.py", "--config_file", SVPR, "--resume", *tiny(synth_root, split, 3, workers)]))
    assert_bit_identical(final_weights(straight), final_weights(split))
    assert "resumed from" in open(os.path.join(split, "train.log"), encoding="utf-8").read()


@pytest.mark.parametrize("config", [BASELINE, SVPR])
def test_loss_goes_down_on_a_fixed_batch(config, synth_root, tmp_path):
    cfg = load_config(config, tiny(synth_root, str(tmp_path)))
    bundle = make_dataloaders(cfg)
    data = bundle.dataset
    model = build_model(cfg, data.num_train_pids, data.num_train_cams, data.num_train_views, data.attributes)
    criterion = build_criterion(cfg, model, data.num_train_pids)
    optimizer = make_optimizer(cfg, model)
    batch = next(iter(bundle.train_loader))
    model.train()
    losses = []
    for _ in range(12):
        optimizer.zero_grad()
        outputs = model(batch["images"], **model.forward_inputs(batch))
        loss = sum(criterion(outputs, batch).values())
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


def test_stage1_cached_features_equal_recomputed(synth_root, tmp_path):
    """Prompt learning builds its own loader (every training image once, test transform) and caches the image
    features of the whole training split, in split order."""
    cfg = load_config(CLIPREID, tiny(synth_root, str(tmp_path)))
    data = load_dataset(cfg)
    model = build_model(cfg, data.num_train_pids, data.num_train_cams, data.num_train_views, data.attributes)
    phase = PromptLearning(cfg, model, data, torch.device("cpu"))
    phase.setup()
    features, pids = phase.features, phase.pids
    assert features.shape[0] == len(data.train)
    assert torch.equal(pids, torch.tensor([s.pid for s in data.train]))
    dataset = ImageDataset(data.train, build_test_transform(cfg), text_len=cfg.MODEL.TEXT_LEN)
    model.eval()
    with torch.no_grad():
        for index in (0, len(data.train) // 2, len(data.train) - 1):
            image = dataset[index]["image"].unsqueeze(0)
            recomputed = model.encode_image_for_prompts(image)[0]
            torch.testing.assert_close(features[index], recomputed, rtol=1e-5, atol=1e-5)


TORCHRUN_SHARES = """
import json, os, sys
import torch.distributed as dist
from configs import load_config
from datasets import make_dataloaders
from utils.distributed import init_distributed, get_rank
import torch
init_distributed(torch.device("cpu"))
cfg = load_config(sys.argv[1], sys.argv[3:])
bundle = make_dataloaders(cfg)
bundle.train_loader.sampler.set_epoch(1)
batches = [b["index"].tolist() for b in bundle.train_loader]
with open(os.path.join(sys.argv[2], f"rank{get_rank()}.json"), "w") as handle:
    json.dump({"batches": batches, "pids": [b["pids"].tolist() for b in bundle.train_loader]}, handle)
dist.destroy_process_group()
"""


def test_torchrun_gloo_two_processes(synth_root, tmp_path, baseline_run):
    """A real torchrun with 2 CPU processes: disjoint sample shares, then a full training run."""
    script = tmp_path / "shares.py"
    script.write_text(TORCHRUN_SHARES)
    share_dir = tmp_path / "shares"
    share_dir.mkdir()
    env = {"PYTHONPATH": REPO_ROOT, "OMP_NUM_THREADS": "1"}
    torchrun = ["-m", "torch.distributed.run", "--nproc_per_node=2"]
    check_ok(run_script([*torchrun, "--master_port", str(free_port()), str(script), SVPR, str(share_dir),
                         *tiny(synth_root, str(tmp_path / "x"))], env=env))
    shares = [json.loads((share_dir / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert len(shares[0]["batches"]) == len(shares[1]["batches"]) > 0
    for batch0, batch1 in zip(shares[0]["batches"], shares[1]["batches"]):
        assert len(batch0) == len(batch1) == 8 and not set(batch0) & set(batch1)
    out = str(tmp_path / "ddp")
    check_ok(run_script([*torchrun, "--master_port", str(free_port()), "train_svpr.py", "--config_file", BASELINE,
                         *tiny(synth_root, out, epochs=2)], env=env))
    results = read_results(out)["protocols"]
    single = read_results(baseline_run)["protocols"]
    assert set(results) == set(single)
    for name, row in results.items():
        # Evaluation gathered every query and gallery image from both ranks.
        assert (row["num_query"], row["num_gallery"]) == (single[name]["num_query"], single[name]["num_gallery"])


def test_search_tool_ranks_gallery_and_draws(baseline_run, synth_root, tmp_path):
    images = os.path.join(synth_root, "SynthAG", "images")
    query = os.path.join(images, sorted(os.listdir(images))[0])
    out = str(tmp_path / "search")
    weights = os.path.join(baseline_run, "model_final.pth")
    # The config stored in the checkpoint is used; nothing of the training split is read.
    result = run_script(["tools/search.py", "--weights", weights, "--query", query, "--gallery", images,
                         "--topk", "5", "--out", out, "MODEL.DEVICE", "cpu"])
    check_ok(result)
    assert "--weight is now" not in result.stderr
    ranked = [line.split() for line in result.stdout.splitlines() if line.startswith("    ")]
    assert [int(r[0]) for r in ranked] == [1, 2, 3, 4, 5]
    # The query itself is in the gallery folder: it must come first, at distance 0.
    assert ranked[0][2] == query and float(ranked[0][1]) < 1e-4
    assert os.listdir(out) and os.path.getsize(os.path.join(out, os.listdir(out)[0])) > 0
    # The old spelling still works, with a one-line notice.
    old = run_script(["tools/search.py", "--config_file", BASELINE, "--weight", weights, "--query", query,
                      "--gallery", images, "--topk", "5", "--out", str(tmp_path / "old"),
                      *tiny(synth_root, str(tmp_path / "unused"))])
    check_ok(old)
    assert old.stderr.count("--weight is now spelled --weights") == 1
    assert [line.split() for line in old.stdout.splitlines() if line.startswith("    ")] == ranked

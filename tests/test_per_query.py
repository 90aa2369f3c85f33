"""Per-query results, breakdowns and run comparisons on real evaluations.

per_query_<protocol>.csv must reproduce results.json (mean AP = mAP, first-match ranks = CMC) for every
protocol of real training runs and its rows must be the dataset's queries (test_metrics.py checks each AP
against fast-reid's); the breakdowns must be the per-group means; tools/compare.py must agree with a bootstrap and a permutation
test written here, and over seeds with the paired and Welch t-intervals written here from their definitions;
tools/ablation.py's difference rows must be compare.py's.
"""
import csv
import json
import os
import shutil
import statistics

import numpy as np
import pytest
import torch

from configs import load_config
from datasets import make_dataloaders
from evaluation.comparison import compare_runs, load_run
from evaluation.report import write_results
from tests.fixtures import BASELINE, SVPR, check_ok, make_vehicleid_tree, run_script, tiny

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(synth_root, tmp_path_factory):
    """Real runs: the CLIP baseline (trained, then its checkpoint evaluated again with re-ranking) and
    SVPR-ReID (attributes on), each trained 2 epochs."""
    folders = {}
    for name, config in (("baseline", BASELINE), ("svpr", SVPR)):
        folders[name] = str(tmp_path_factory.mktemp(name))
        check_ok(run_script(["train_svpr.py", "--config_file", config, *tiny(synth_root, folders[name])]))
    folders["baseline_rerank"] = str(tmp_path_factory.mktemp("rerank"))
    check_ok(run_script(["test_svpr.py", "--weights", os.path.join(folders["baseline"], "model_final.pth"),
                         "OUTPUT_DIR", folders["baseline_rerank"], "TEST.RE_RANKING", "True"]))
    return folders


def read_rows(folder, protocol):
    with open(os.path.join(folder, f"per_query_{protocol}.csv"), newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def results(folder):
    with open(os.path.join(folder, "results.json"), encoding="utf-8") as handle:
        return json.load(handle)["protocols"]


def test_per_query_files_reproduce_every_protocol(runs, synth_root):
    for name in ("baseline", "baseline_rerank", "svpr"):
        protocols = results(runs[name])
        assert list(protocols) == ["SynthAG_ALL", "SynthAG_AG", "SynthAG_GA", "SynthAG_AGAG"]
        for protocol, row in protocols.items():
            rows = read_rows(runs[name], protocol)
            ap = [float(r["ap"]) for r in rows]
            ranks = np.array([int(r["first_match_rank"]) for r in rows])
            assert 0 < len(rows) <= row["num_query"] and (ranks >= 1).all()
            assert round(float(np.mean(ap)), 2) == row["mAP"], (name, protocol)
            for k, key in ((1, "rank1"), (5, "rank5"), (10, "rank10")):
                assert round(100 * float(np.mean(ranks <= k)), 2) == row[key], (name, protocol, key)
            # Each row is the dataset's query at that index, with its labels.
            cfg = load_config(BASELINE, tiny(synth_root, runs[name]) + ["DATASETS.NAMES", protocol])
            queries = make_dataloaders(cfg).dataset.query
            for r in rows:
                sample = queries[int(r["index"])]
                assert (r["path"], int(r["pid"]), int(r["camid"]), int(r["viewid"]), int(r["timeid"])) == (
                    sample.path, sample.pid, sample.camid, sample.viewid, sample.timeid)


def test_breakdown_is_the_mean_of_each_group(runs, synth_root):
    for name in ("baseline", "svpr"):
        for protocol, row in results(runs[name]).items():
            rows = read_rows(runs[name], protocol)
            labels = ["timeid", "viewid", "camid"] + [k for k in rows[0] if k.startswith("attr:")]
            assert list(row["breakdown"]) == labels
            for label in labels:
                values = sorted({int(r[label]) for r in rows})
                assert list(row["breakdown"][label]) == [str(v) for v in values]
                for value in values:
                    group = [r for r in rows if int(r[label]) == value]
                    expected = {"mAP": round(statistics.mean(float(r["ap"]) for r in group), 2),
                                "rank1": round(100 * sum(r["first_match_rank"] == "1" for r in group) / len(group), 2),
                                "num_query": len(group)}
                    assert row["breakdown"][label][str(value)] == expected, (name, protocol, label, value)
    # SVPR-ReID reads attribute labels: its breakdown names every attribute of the benchmark.
    dataset = make_dataloaders(load_config(SVPR, tiny(synth_root, runs["svpr"]))).dataset
    attributes = [f"attr:{name}" for name, _ in dataset.attributes]
    assert attributes and list(results(runs["svpr"])["SynthAG_ALL"]["breakdown"])[3:] == attributes
    assert not any(k.startswith("attr:") for k in results(runs["baseline"])["SynthAG_ALL"]["breakdown"])


def test_vehicleid_trials_get_a_file_each(tmp_path):
    from model import build_model
    from processor import evaluate_protocols

    make_vehicleid_tree(str(tmp_path), num_test=12)
    out = str(tmp_path / "out")
    cfg = load_config(BASELINE, tiny(str(tmp_path), out, extra=[
        "DATASETS.NAMES", "VehicleID", "DATASETS.TESTS", "('VehicleID',)", "DATASETS.VEHICLEID_TRIALS", "3",
        "DATALOADER.NUM_INSTANCE", "2", "SOLVER.IMS_PER_BATCH", "4"]))
    torch.manual_seed(0)
    model = build_model(cfg, num_classes=3).eval()
    protocols = evaluate_protocols(cfg, model, torch.device("cpu"))
    document = write_results(out, "w.pth", None, 1, protocols)
    assert not os.path.exists(os.path.join(out, "per_query_VehicleID.csv"))
    trial_maps = []
    for trial in (1, 2, 3):
        rows = read_rows(out, f"VehicleID_trial{trial}")
        trial_maps.append(statistics.mean(float(r["ap"]) for r in rows))
    assert len(set(trial_maps)) > 1  # other galleries, other APs
    assert document["protocols"]["VehicleID"]["mAP"] == round(statistics.mean(trial_maps), 2)


# ------------------------------------------------------------------------------------------- compare
def paired_values(folder, protocol):
    return {r["path"]: (float(r["ap"]), 100.0 * (r["first_match_rank"] == "1")) for r in read_rows(folder, protocol)}


def test_compare_agrees_with_a_bootstrap_and_a_permutation_test_written_here(runs, tmp_path):
    out = tmp_path / "comparison.json"
    result = run_script(["tools/compare.py", runs["baseline"], runs["baseline_rerank"], "--vs", runs["svpr"],
                         "--json", str(out)])
    check_ok(result)
    assert "| SynthAG_ALL |" in result.stdout
    document = json.loads(out.read_text())
    assert list(document) == ["SynthAG_ALL", "SynthAG_AG", "SynthAG_GA", "SynthAG_AGAG"]
    rng = np.random.default_rng(2024)
    for protocol, entry in document.items():
        assert list(entry) == ["delta_mAP", "ci95_mAP", "p_mAP", "delta_R1", "ci95_R1", "p_R1"]
        first, second, other = (paired_values(runs[n], protocol) for n in ("baseline", "baseline_rerank", "svpr"))
        assert set(first) == set(second) == set(other)
        for column, metric in ((0, "mAP"), (1, "R1")):
            # Seeds (here: two evaluations of A) are averaged per query, then B - A per query.
            diffs = np.array([other[p][column] - (first[p][column] + second[p][column]) / 2 for p in sorted(first)])
            assert entry[f"delta_{metric}"] == pytest.approx(diffs.mean(), abs=1e-4)
            if np.all(diffs == diffs[0]):
                assert entry[f"ci95_{metric}"] == pytest.approx([diffs[0]] * 2) and entry[f"p_{metric}"] == 1.0
                continue
            means = diffs[rng.integers(0, diffs.size, (20000, diffs.size))].mean(axis=1)
            low, high = np.percentile(means, [2.5, 97.5])
            # Monte-Carlo error, and one step of the lattice that means of discrete values (Rank-1 hits) lie on.
            tolerance = max(0.05 * (high - low), np.diff(np.unique(diffs)).min() / diffs.size + 1e-9)
            assert entry[f"ci95_{metric}"][0] == pytest.approx(low, abs=tolerance), (protocol, metric)
            assert entry[f"ci95_{metric}"][1] == pytest.approx(high, abs=tolerance), (protocol, metric)
            flipped = (diffs * rng.choice([-1.0, 1.0], (100000, diffs.size))).mean(axis=1)
            p_value = np.mean(np.abs(flipped) >= abs(diffs.mean()) - 1e-12)
            # compare.py draws 10,000 flips: its p-value's standard error is at most 0.01.
            assert entry[f"p_{metric}"] == pytest.approx(p_value, abs=0.04), (protocol, metric)


def test_compare_refuses_runs_on_other_queries(runs, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(runs["svpr"], other)
    path = other / "per_query_SynthAG_AG.csv"
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[:-1]) + "\n")  # one query fewer
    result = run_script(["tools/compare.py", runs["baseline"], "--vs", str(other)])
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "different SynthAG_AG queries" in lines[0], result.stderr


def _moved_copy(run, folder, new_root, relabel=None):
    """A copy of ``run`` whose per-query files name their images under ``new_root`` (the same benchmark stored
    elsewhere); ``relabel``: the identity of the first query of every file changed to it."""
    shutil.copytree(run, folder)
    for path in folder.glob("per_query_*.csv"):
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        root = os.path.commonpath([os.path.dirname(row["path"]) for row in rows])
        for row in rows:
            row["path"] = os.path.join(new_root, os.path.relpath(row["path"], root))
        if relabel is not None:
            rows[0]["pid"] = str(relabel)
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def test_compare_pairs_runs_whose_data_lived_elsewhere_by_image_and_identity(runs, tmp_path):
    """Two checkouts with their own data folder evaluate the same queries under other absolute paths: they pair
    by the path below the queries' folder, with the same result as in place; a changed identity does not pair."""
    moved = tmp_path / "moved"
    _moved_copy(runs["svpr"], moved, "/elsewhere/data/SynthAG/images")
    in_place = compare_runs([load_run(runs["baseline"])], [load_run(runs["svpr"])])
    elsewhere = compare_runs([load_run(runs["baseline"])], [load_run(str(moved))])
    assert [(c.protocol, c.num_query, c.mAP.delta, c.mAP.ci95, c.rank1.delta) for c in elsewhere] == \
        [(c.protocol, c.num_query, c.mAP.delta, c.mAP.ci95, c.rank1.delta) for c in in_place]
    relabelled = tmp_path / "relabelled"
    _moved_copy(runs["svpr"], relabelled, "/elsewhere/data/SynthAG/images", relabel=99999)
    result = run_script(["tools/compare.py", runs["baseline"], "--vs", str(relabelled)])
    assert result.returncode == 2 and "different SynthAG_ALL queries" in result.stderr, result.stderr


def test_ablation_reports_each_rows_difference_to_the_first(runs, tmp_path):
    rows = tmp_path / "rows"
    for row, names in (("clip_baseline", ("baseline", "baseline_rerank")), ("svpr_reid", ("svpr", "svpr"))):
        for k, name in enumerate(names):
            shutil.copytree(runs[name], rows / row / f"seed{k}")
    result = run_script(["tools/ablation.py", "--configs", BASELINE, SVPR, "--seeds", "2", "--output_dir", str(rows),
                         "--table-only"])
    check_ok(result)
    queries, seeds = [line for line in result.stdout.splitlines() if line.startswith("| svpr_reid | ") and "[" in line]
    expected = compare_runs([load_run(str(rows / "clip_baseline" / f"seed{k}")) for k in range(2)],
                            [load_run(str(rows / "svpr_reid" / f"seed{k}")) for k in range(2)])
    cells = [cell.strip() for cell in queries.strip("|").split("|")][1:]
    assert cells == [f"{d.delta:+.1f} [{d.ci95[0]:+.1f}, {d.ci95[1]:+.1f}]" for c in expected for d in (c.mAP, c.rank1)]
    cells = [cell.strip() for cell in seeds.strip("|").split("|")][1:]
    assert cells == [f"{d.delta:+.1f} [{d.ci95[0]:+.1f}, {d.ci95[1]:+.1f}] p {d.p_value:.2f}"
                     for c in expected for d in (c.mAP_runs, c.rank1_runs)]


def _seed_copy(run, folder, seed, ap_scale, missed):
    """A copy of ``run`` as if trained with ``seed``: every query's AP times ``ap_scale`` and the first
    ``missed`` queries of each protocol with a correct first match pushed to rank 2."""
    shutil.copytree(run, folder)
    document = json.loads((folder / "results.json").read_text())
    document["settings"]["seed"] = seed
    (folder / "results.json").write_text(json.dumps(document))
    for path in folder.glob("per_query_*.csv"):
        with open(path, encoding="utf-8", newline="") as handle:
            rows = list(csv.DictReader(handle))
        hits = [row for row in rows if row["first_match_rank"] == "1"][:missed]
        for row in rows:
            row["ap"] = repr(float(row["ap"]) * ap_scale)
        for row in hits:
            row["first_match_rank"] = "2"
        with open(path, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)


def _run_metrics(folder, protocol):
    rows = read_rows(folder, protocol)
    return np.mean([float(r["ap"]) for r in rows]), 100.0 * np.mean([r["first_match_rank"] == "1" for r in rows])


def _paired_t(a, b):
    """Mean of b - a, its 95% interval and two-sided p-value: the paired t-test by its definition."""
    from scipy.stats import t

    d = np.asarray(b) - np.asarray(a)
    n, se = d.size, d.std(ddof=1) / np.sqrt(d.size)
    return d.mean(), (d.mean() - t.ppf(0.975, n - 1) * se, d.mean() + t.ppf(0.975, n - 1) * se), \
        2 * t.sf(abs(d.mean()) / se, n - 1)


def _welch_t(a, b):
    """Difference of the means, its 95% interval and two-sided p-value: Welch's t-test by its definition
    (Welch-Satterthwaite degrees of freedom)."""
    from scipy.stats import t

    a, b = np.asarray(a), np.asarray(b)
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    df = (va + vb) ** 2 / (va ** 2 / (a.size - 1) + vb ** 2 / (b.size - 1))
    delta, se = b.mean() - a.mean(), np.sqrt(va + vb)
    return delta, (delta - t.ppf(0.975, df) * se, delta + t.ppf(0.975, df) * se), 2 * t.sf(abs(delta) / se, df)


def test_compare_over_seeds_pairs_runs_by_seed_and_agrees_with_the_t_tests_written_here(runs, tmp_path):
    """Three seeds per side: the runs' own mAP and Rank-1 compared by a paired t-test when both sides hold the
    same seeds (in any order), by Welch's when they do not, and not at all with one run on a side."""
    variants = {"a": [(7, 1.00, 0), (8, 0.90, 3), (9, 1.06, 1)], "b": [(9, 1.10, 0), (7, 0.97, 2), (8, 0.95, 5)]}
    folders = {}
    for side, name in (("a", "baseline"), ("b", "svpr")):
        folders[side] = []
        for seed, scale, missed in variants[side]:
            folders[side].append(tmp_path / f"{side}{seed}")
            _seed_copy(runs[name], folders[side][-1], seed, scale, missed)
    out = tmp_path / "paired.json"
    result = run_script(["tools/compare.py", *map(str, folders["a"]), "--vs", *map(str, folders["b"]), "--json", str(out)])
    check_ok(result)
    assert "Over runs (training seeds)" in result.stdout and "| paired t-test over seeds |" in result.stdout
    document = json.loads(out.read_text())
    for protocol, entry in document.items():
        over = entry["over_runs"]
        assert over["test"] == "paired t-test over seeds"
        by_seed = {side: dict(zip([v[0] for v in variants[side]], [_run_metrics(f, protocol) for f in folders[side]]))
                   for side in ("a", "b")}
        for column, metric in ((0, "mAP"), (1, "R1")):
            a = [by_seed["a"][seed][column] for seed in (7, 8, 9)]
            b = [by_seed["b"][seed][column] for seed in (7, 8, 9)]
            delta, (low, high), p_value = _paired_t(a, b)
            assert over[f"mean_{metric}_a"] == pytest.approx(np.mean(a), abs=1e-4)
            assert over[f"sd_{metric}_b"] == pytest.approx(np.std(b, ddof=1), abs=1e-4)
            assert over[f"delta_{metric}"] == pytest.approx(delta, abs=1e-4), (protocol, metric)
            assert over[f"ci95_{metric}"] == pytest.approx([low, high], abs=1e-4), (protocol, metric)
            assert over[f"p_{metric}"] == pytest.approx(p_value, abs=1e-4), (protocol, metric)
            # Seeds averaged per query first: the first table's difference is the same one.
            assert entry[f"delta_{metric}"] == pytest.approx(delta, abs=1e-4)

    # B's seeds renamed: nothing pairs them with A's, so the sides are independent samples.
    for folder, seed in zip(folders["b"], (21, 22, 23)):
        document = json.loads((folder / "results.json").read_text())
        document["settings"]["seed"] = seed
        (folder / "results.json").write_text(json.dumps(document))
    out = tmp_path / "welch.json"
    check_ok(run_script(["tools/compare.py", *map(str, folders["a"]), "--vs", *map(str, folders["b"]), "--json", str(out)]))
    for protocol, entry in json.loads(out.read_text()).items():
        assert entry["over_runs"]["test"] == "Welch's t-test"
        for column, metric in ((0, "mAP"), (1, "R1")):
            a = [_run_metrics(f, protocol)[column] for f in folders["a"]]
            b = [_run_metrics(f, protocol)[column] for f in folders["b"]]
            delta, (low, high), p_value = _welch_t(a, b)
            assert entry["over_runs"][f"ci95_{metric}"] == pytest.approx([low, high], abs=1e-4), (protocol, metric)
            assert entry["over_runs"][f"p_{metric}"] == pytest.approx(p_value, abs=1e-4), (protocol, metric)

    # One run on a side: the comparison over queries only, and a line saying why.
    out = tmp_path / "one.json"
    result = run_script(["tools/compare.py", *map(str, folders["a"]), "--vs", str(folders["b"][0]), "--json", str(out)])
    check_ok(result)
    assert "No comparison over runs: it needs two or more runs on each side." in result.stdout
    assert all("over_runs" not in entry for entry in json.loads(out.read_text()).values())

"""tools/ablation.py: rows, seeds aggregated as mean ± std, --configs comparison, --table-only."""
import json
import os

import pytest

from tests.fixtures import run_script
from tools.ablation import component_rows, fix_rows, markdown_table, mean_std
from configs import load_config
from model.svpr import CLIPSVPRReID


def write_run(folder, maps, seconds):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"protocols": {p: {"mAP": m, "rank1": m + 10} for p, m in maps.items()}}, handle)
    with open(os.path.join(folder, "run_seconds.txt"), "w", encoding="utf-8") as handle:
        handle.write(f"{seconds}\n")


def test_mean_and_sample_std_over_seeds():
    assert mean_std([10.0]) == "10.0"
    assert mean_std([10.0, 12.0, 14.0]) == "12.0 ± 2.0"
    table = markdown_table([("a", [{"X": {"mAP": 1.0, "rank1": 2.0}}, {"X": {"mAP": 3.0, "rank1": 4.0}}], [60, 180]),
                            ("b", None, [])])
    lines = table.splitlines()
    assert lines[0] == "| Variant | X mAP | X R1 | time / run |"
    assert lines[2] == "| a | 2.0 ± 1.4 | 3.0 ± 1.4 | 2.0 min |"
    assert lines[3] == "| b | failed | failed | - |"


def test_component_rows_add_one_switch_each():
    cfg = load_config("configs/Synthetic/svpr_reid.yml")
    rows = component_rows(cfg)
    assert [name for name, _ in rows] == ["baseline", "+VDFE", "+ASMOE", "+CVPR", "+LOCAL"]
    assert dict(zip(rows[0][1][0::2], rows[0][1][1::2])) == {f"MODEL.SVPR.{c}": "False"
                                                             for c in ("VDFE", "ASMOE", "CVPR", "LOCAL")}
    assert dict(zip(rows[2][1][0::2], rows[2][1][1::2]))["MODEL.SVPR.ASMOE"] == "True"
    last = dict(zip(rows[-1][1][0::2], rows[-1][1][1::2]))
    assert all(value == "True" for value in last.values())
    # CARGO has no attributes: no ASMOE row, and ASMOE stays off in every row.
    cargo = component_rows(load_config("configs/CARGO/svpr_reid.yml"))
    assert [name for name, _ in cargo] == ["baseline", "+VDFE", "+CVPR", "+LOCAL"]
    assert all(dict(zip(o[0::2], o[1::2]))["MODEL.SVPR.ASMOE"] == "False" for _, o in cargo)


@pytest.mark.parametrize("mode", ["configs", "seeds"])
def test_table_only_reads_every_seed_of_every_row(tmp_path, mode):
    out = str(tmp_path / "rows")
    if mode == "configs":
        args = ["--configs", "configs/Synthetic/clip_baseline.yml", "configs/Synthetic/svpr_reid.yml"]
        rows = {"clip_baseline": [20.0, 22.0], "svpr_reid": [30.0, 34.0]}
    else:
        args = ["--config_file", "configs/Synthetic/svpr_reid.yml"]
        rows = {name: [10.0 + i, 12.0 + i] for i, name in enumerate(["baseline", "vdfe", "asmoe", "cvpr", "local"])}
    for row, maps in rows.items():
        for k, value in enumerate(maps):
            write_run(os.path.join(out, row, f"seed{k}"), {"SynthAG_ALL": value}, 120)
    result = run_script(["tools/ablation.py", *args, "--seeds", "2", "--output_dir", out, "--table-only"])
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("| ")]
    if mode == "configs":
        assert lines[1:] == ["| clip_baseline | 21.0 ± 1.4 | 31.0 ± 1.4 | 2.0 min |",
                             "| svpr_reid | 32.0 ± 2.8 | 42.0 ± 2.8 | 2.0 min |"]
    else:
        assert [line.split("|")[1].strip() for line in lines[1:]] == ["baseline", "+VDFE", "+ASMOE", "+CVPR", "+LOCAL"]
        assert lines[1].endswith("| 11.0 ± 1.4 | 21.0 ± 1.4 | 2.0 min |")


def test_missing_results_is_one_line(tmp_path):
    result = run_script(["tools/ablation.py", "--configs", "configs/Synthetic/svpr_reid.yml", "--output_dir",
                         str(tmp_path), "--table-only"])
    assert result.returncode == 2 and "results file not found" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_fix_rows_start_from_the_shipped_reference_and_add_each_fix():
    cfg = load_config("configs/Synthetic/svpr_reid.yml")
    rows = fix_rows(cfg)
    svpr_fixes = CLIPSVPRReID.fixes
    off = sorted(name for name in svpr_fixes if not cfg.MODEL.FIXES[name])
    assert rows[0] == ("reference", []) and rows[-1][0] == "all fixes"
    assert [name for name, _ in rows[1:-1]] == [f"+{fix}" for fix in off] and len(off) == 9
    assert "+TRANSREID_SINGLE_BN" not in dict(rows)  # another model's switch
    assert dict(zip(rows[-1][1][0::2], rows[-1][1][1::2])) == {f"MODEL.FIXES.{fix}": "True" for fix in svpr_fixes}

"""SVPR-ReID component ablation: train the baseline and add VDFE, ASMOE, CVPR and LOCAL in turn.

    python tools/ablation.py --config_file configs/Synthetic/svpr_reid.yml [--epochs N] [KEY VALUE ...]

Each row is one ``train_svpr.py`` run (a subprocess) with ``MODEL.SVPR.*`` switches and
``OUTPUT_DIR <output_dir>/<row>``; its ``results.json`` is read back and the table of mAP / Rank-1 per
protocol is printed in Markdown. ``--table-only`` rebuilds the table from existing results.
"""
import argparse
import json
import os
import subprocess
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from configs import load_config
from utils.entrypoint import run_main
from utils.errors import DataError, UserError

COMPONENTS = ("VDFE", "ASMOE", "CVPR", "LOCAL")
# (row name, components switched on), each row adding one component to the previous.
ROWS = (("baseline", ()),) + tuple((f"+{name}", COMPONENTS[:i + 1]) for i, name in enumerate(COMPONENTS))


def row_overrides(enabled, output_dir):
    """``KEY VALUE`` overrides for one ablation row."""
    opts = []
    for name in COMPONENTS:
        opts += [f"MODEL.SVPR.{name}", str(name in enabled)]
    return opts + ["OUTPUT_DIR", output_dir]


def read_results(path):
    """The ``protocols`` mapping of a run's ``results.json``."""
    try:
        with open(path, encoding="utf-8") as handle:
            results = json.load(handle)
        protocols = results["protocols"]
        for name, metrics in protocols.items():
            float(metrics["mAP"]), float(metrics["rank1"])
    except FileNotFoundError:
        raise DataError(f"{path}: results file not found (did the training run finish?)") from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as exc:
        raise DataError(f"{path}: expected results.json with protocols -> {{mAP, rank1}} ({exc})") from None
    return protocols


def markdown_table(rows):
    """Markdown table of ``rows`` [(name, protocols or None)]: mAP and Rank-1 (percent) per protocol."""
    protocols = []
    for _, results in rows:
        for name in results or {}:
            if name not in protocols:
                protocols.append(name)
    header = ["Variant"] + [f"{p} {metric}" for p in protocols for metric in ("mAP", "R1")]
    lines = ["| " + " | ".join(header) + " |", "|---" + "|---:" * (len(header) - 1) + "|"]
    for name, results in rows:
        cells = []
        for protocol in protocols:
            metrics = (results or {}).get(protocol)
            cells += [f"{metrics['mAP']:.1f}", f"{metrics['rank1']:.1f}"] if metrics else ["failed" if results
                                                                                           is None else "-"] * 2
        lines.append("| " + " | ".join([name] + cells) + " |")
    return "\n".join(lines)


def plan_rows(cfg):
    """Rows that apply to ``cfg``: the +ASMOE row needs attribute labels (MODEL.USE_ATTR)."""
    if cfg.MODEL.USE_ATTR:
        return ROWS
    print("note: MODEL.USE_ATTR is False, so ASMOE cannot be built; the +ASMOE row is left out", flush=True)
    return tuple((name, tuple(c for c in enabled if c != "ASMOE")) for name, enabled in ROWS if name != "+ASMOE")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config_file", required=True)
    parser.add_argument("--epochs", type=int, default=None, help="SOLVER.MAX_EPOCHS of every row")
    parser.add_argument("--output_dir", default=None, help="parent folder of the rows (default: OUTPUT_DIR/ablation)")
    parser.add_argument("--table-only", action="store_true", help="do not train; read the rows' results.json")
    parser.add_argument("opts", nargs=argparse.REMAINDER, default=[], help="extra overrides KEY VALUE for every run")
    args = parser.parse_args()
    extra = list(args.opts) + (["SOLVER.MAX_EPOCHS", str(args.epochs)] if args.epochs is not None else [])
    cfg = load_config(args.config_file, extra)
    output_dir = args.output_dir or os.path.join(cfg.OUTPUT_DIR, "ablation")
    rows, failed = [], []
    for name, enabled in plan_rows(cfg):
        row_dir = os.path.join(output_dir, name.lstrip("+").lower())
        if not args.table_only:
            command = [sys.executable, os.path.join(REPO_ROOT, "train_svpr.py"), "--config_file", args.config_file,
                       *extra, *row_overrides(enabled, row_dir)]
            print(f"== {name}: {' '.join(command[1:])}", flush=True)
            if subprocess.run(command, cwd=REPO_ROOT).returncode != 0:
                failed.append(name)
                rows.append((name, None))
                continue
        rows.append((name, read_results(os.path.join(row_dir, "results.json"))))
    print(markdown_table(rows))
    if failed:
        raise UserError(f"training failed for ablation rows: {', '.join(failed)}")


if __name__ == "__main__":
    run_main(main)

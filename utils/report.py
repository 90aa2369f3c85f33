"""Result tables: per-protocol rows printed, written to ``results.json``/``results.csv`` and read back;
rank-list images for chosen queries."""
import csv
import io
import json
import os

from PIL import Image, ImageDraw, ImageOps

from utils.io import atomic_write

METRIC_COLUMNS = ("mAP", "rank1", "rank5", "rank10", "mINP")
CSV_COLUMNS = ("protocol",) + METRIC_COLUMNS + ("num_query", "num_gallery", "epoch", "checkpoint", "config")


def summarize(result):
    """Row of percentages (2 decimals) + counts from an evaluator result (``cmc``, ``mAP``, ``mINP``,
    ``num_query``, ``num_gallery``)."""
    cmc = result["cmc"]
    if len(cmc) < 10:
        raise ValueError(f"the CMC curve has {len(cmc)} ranks; the report needs rank-10 (TEST.MAX_RANK >= 10)")
    row = {"mAP": result["mAP"], "rank1": cmc[0], "rank5": cmc[4], "rank10": cmc[9], "mINP": result["mINP"]}
    row = {name: round(float(value) * 100, 2) for name, value in row.items()}
    row.update(num_query=int(result["num_query"]), num_gallery=int(result["num_gallery"]))
    return row


def format_table(protocols):
    """Fixed-width text table of ``{protocol: result}``."""
    rows = {name: summarize(result) for name, result in protocols.items()}
    width = max([len("protocol")] + [len(name) for name in rows])
    header = f"{'protocol':<{width}}" + "".join(f"{c:>9}" for c in METRIC_COLUMNS) + f"{'#query':>9}{'#gallery':>10}"
    lines = [header, "-" * len(header)]
    for name, row in rows.items():
        lines.append(f"{name:<{width}}" + "".join(f"{row[c]:>9.2f}" for c in METRIC_COLUMNS)
                     + f"{row['num_query']:>9d}{row['num_gallery']:>10d}")
    return "\n".join(lines)


def _write_atomic(path, text):
    atomic_write(path, text)


def write_results(output_dir, checkpoint, config, epoch, protocols):
    """Write ``results.json`` and ``results.csv`` (atomically) for ``{protocol: result}``; returns the
    JSON document."""
    os.makedirs(output_dir, exist_ok=True)
    document = {"checkpoint": checkpoint, "config": config, "epoch": None if epoch is None else int(epoch),
                "protocols": {name: summarize(result) for name, result in protocols.items()}}
    _write_atomic(os.path.join(output_dir, "results.json"), json.dumps(document, indent=2) + "\n")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    for name, row in document["protocols"].items():
        writer.writerow([name] + [row[c] for c in METRIC_COLUMNS + ("num_query", "num_gallery")]
                        + ["" if epoch is None else int(epoch), checkpoint, config])
    _write_atomic(os.path.join(output_dir, "results.csv"), buffer.getvalue())
    return document


def read_results(output_dir):
    """The ``results.json`` document of ``output_dir``."""
    with open(os.path.join(output_dir, "results.json")) as stream:
        return json.load(stream)


def read_results_csv(output_dir):
    """``{protocol: row}`` from ``results.csv`` with numbers typed (metrics float, counts/epoch int)."""
    rows = {}
    with open(os.path.join(output_dir, "results.csv"), newline="") as stream:
        for record in csv.DictReader(stream):
            row = {c: float(record[c]) for c in METRIC_COLUMNS}
            row.update(num_query=int(record["num_query"]), num_gallery=int(record["num_gallery"]),
                       epoch=int(record["epoch"]) if record["epoch"] else None,
                       checkpoint=record["checkpoint"], config=record["config"])
            rows[record["protocol"]] = row
    return rows


def draw_rank_list(query_path, gallery_paths, matches, out_path, tile=(64, 128), border=4):
    """Save the query and its ranked gallery images side by side; true matches framed green, false red
    (``matches=None``, when the identities are unknown: grey frames)."""
    width, height = tile
    canvas = Image.new("RGB", ((len(gallery_paths) + 1) * (width + 2 * border) + border, height + 2 * border),
                       "white")
    if matches is None:
        colours = ["grey"] * len(gallery_paths)
    else:
        colours = ["green" if match else "red" for match in matches]
    frames = [(query_path, "black")] + list(zip(gallery_paths, colours))
    for slot, (path, colour) in enumerate(frames):
        with Image.open(path) as image:
            thumb = ImageOps.fit(image.convert("RGB"), (width, height))
        left = slot * (width + 2 * border) + (border if slot else 0)
        ImageDraw.Draw(canvas).rectangle([left, 0, left + width + 2 * border - 1, height + 2 * border - 1],
                                         fill=colour)
        canvas.paste(thumb, (left + border, border))
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    canvas.save(out_path)
    return out_path

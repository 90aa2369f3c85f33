"""``report.html``: one self-contained page per evaluation, next to ``results.json``.

It shows the per-protocol results table, the breakdowns of each protocol by query label, the evaluation
settings recorded in the results document, the training curves, the embedding pictures and the ranked-list
grids (with the relevance map of each query). Images are embedded as data URIs and the style is inline, so the
page opens offline, from any folder, in any browser; it has no JavaScript.
"""
import base64
import html
import os

from evaluation.embedding import embedding_file
from utils.io import atomic_write

REPORT_FILE = "report.html"
# (document key, column header) of the results table; counts are integers, the rest percentages.
COLUMNS = (("mAP", "mAP"), ("rank1", "R1"), ("rank5", "R5"), ("rank10", "R10"), ("mINP", "mINP"),
           ("num_query", "#query"), ("num_gallery", "#gallery"))
STYLE = """
body { font-family: sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; margin-bottom: 1.5em; }
th, td { border: 1px solid #bbb; padding: 0.3em 0.7em; }
td.number { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #eee; }
img { max-width: 100%; border: 1px solid #ddd; }
"""


def _data_uri(path):
    with open(path, "rb") as stream:
        return "data:image/png;base64," + base64.b64encode(stream.read()).decode("ascii")


def _cell(value):
    if isinstance(value, float):
        return f'<td class="number">{value:.2f}</td>'
    if isinstance(value, int) and not isinstance(value, bool):
        return f'<td class="number">{value}</td>'
    return f"<td>{html.escape('' if value is None else str(value))}</td>"


def _results_table(protocols):
    extra = [key for key in ("benchmark",) if any(key in row for row in protocols.values())]
    header = "".join(f"<th>{html.escape(title)}</th>" for title in
                     ["protocol"] + extra + [title for _, title in COLUMNS])
    rows = []
    for name, row in protocols.items():
        cells = [_cell(name)] + [_cell(row.get(key)) for key in extra]
        cells += [_cell(row.get(key)) for key, _ in COLUMNS]
        rows.append(f'<tr class="protocol">{"".join(cells)}</tr>')
    return f'<table id="results"><tr>{header}</tr>{"".join(rows)}</table>'


def _breakdown_tables(protocols):
    """One table per protocol with a breakdown: label, value, mAP, R1 and number of queries per row."""
    parts = []
    for name, row in protocols.items():
        breakdown = row.get("breakdown") or {}
        if not breakdown:
            continue
        rows = ["<tr><th>label</th><th>value</th><th>mAP</th><th>R1</th><th>#query</th></tr>"]
        for label, groups in breakdown.items():
            for value, group in groups.items():
                rows.append(f"<tr>{_cell(label)}{_cell(value)}{_cell(float(group['mAP']))}"
                            f"{_cell(float(group['rank1']))}{_cell(int(group['num_query']))}</tr>")
        parts += [f"<h3>{html.escape(name)}</h3>",
                  f'<table class="breakdown" id="breakdown-{html.escape(name)}">{"".join(rows)}</table>']
    return parts


def _settings_table(document):
    """Every entry of the document besides the results (``settings`` entries flattened into it)."""
    items = [(key, value) for key, value in document.items() if key not in ("protocols", "settings")]
    items += list((document.get("settings") or {}).items())
    rows = "".join(f"<tr><th>{html.escape(str(key))}</th>{_cell(value)}</tr>" for key, value in items)
    return f'<table id="settings">{rows}</table>'


def write_html_report(output_dir, results_document, curves_png=None, grid_pngs=(), embedding_pngs=None):
    """Write ``output_dir/report.html`` for ``results_document`` (the ``results.json`` content); embed the
    ``curves_png`` picture, the ``embedding_pngs`` (default: ``embedding_<protocol>.png`` of the document's
    protocols in ``output_dir``) and the ``grid_pngs`` ranked-list grids that exist. Returns the page's path."""
    title = f"Results: {results_document.get('checkpoint') or output_dir}"
    protocols = results_document.get("protocols", {})
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
             f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>", "<h2>Results (%)</h2>", _results_table(protocols)]
    breakdowns = _breakdown_tables(protocols)
    if breakdowns:
        parts += ["<h2>Breakdowns (%)</h2><p>mAP and Rank-1 of the queries of each time, view and camera id "
                  "(and attribute class, where the benchmark has attribute labels), from the per-query "
                  "results (per_query_&lt;protocol&gt;.csv).</p>"] + breakdowns
    parts += ["<h2>Evaluation settings</h2>", _settings_table(results_document)]
    if curves_png and os.path.isfile(curves_png):
        parts += ["<h2>Training curves</h2>",
                  f'<img id="curves" alt="training curves" src="{_data_uri(curves_png)}">']
    if embedding_pngs is None:
        embedding_pngs = [os.path.join(output_dir, embedding_file(name)) for name in protocols]
    embeddings = [path for path in embedding_pngs if os.path.isfile(path)]
    if embeddings:
        parts.append("<h2>Embeddings</h2><p>Query (circles) and gallery (crosses) features of each protocol, "
                     "projected to 2-D by PCA and coloured by view.</p>")
        for path in embeddings:
            name = os.path.splitext(os.path.basename(path))[0]
            parts.append(f'<img class="embedding" alt="{html.escape(name)}" src="{_data_uri(path)}">')
    grids = [path for path in grid_pngs if os.path.isfile(path)]
    if grids:
        parts.append("<h2>Ranked lists</h2><p>Query (black frame), its relevance map where one was drawn (blue "
                     "frame: red = most relevant to the query's feature), then its nearest kept gallery images: "
                     "green frame same identity, red another; under each image the distance and the "
                     "camera/view.</p>")
        for path in grids:
            name = os.path.splitext(os.path.basename(path))[0]
            parts += [f"<h3>{html.escape(name)}</h3>",
                      f'<img class="rank-grid" alt="{html.escape(name)}" src="{_data_uri(path)}">']
    parts.append("</body></html>")
    return atomic_write(os.path.join(output_dir, REPORT_FILE), "\n".join(parts) + "\n")

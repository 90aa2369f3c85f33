"""report.html: its table and settings read back with an HTML parser, and the page rendered by a real
headless Chromium (DOM dump + screenshot), offline, with its embedded pictures visible."""
import shutil
import subprocess
from html.parser import HTMLParser

import numpy as np
import pytest
from PIL import Image

from evaluation.html_report import write_html_report

DOCUMENT = {
    "checkpoint": "outputs/run/model_final.pth", "config": "configs/Synthetic/svpr_reid.yml", "epoch": 12,
    "settings": {"re_ranking": False, "distance": "euclidean", "time_mode": "mix", "image_size": [256, 128]},
    "protocols": {
        "SynthAG_ALL": {"mAP": 71.25, "rank1": 80.5, "rank5": 91.0, "rank10": 95.75, "mINP": 40.12,
                        "num_query": 120, "num_gallery": 640},
        "SynthAG_A->G": {"mAP": 65.5, "rank1": 72.33, "rank5": 88.0, "rank10": 93.1, "mINP": 33.0,
                         "num_query": 60, "num_gallery": 320},
    },
}
EXPECTED_ROWS = [["SynthAG_ALL", "71.25", "80.50", "91.00", "95.75", "40.12", "120", "640"],
                 ["SynthAG_A->G", "65.50", "72.33", "88.00", "93.10", "33.00", "60", "320"]]
CURVES_COLOUR = (255, 0, 255)  # a colour the page itself never uses
GRID_COLOUR = (0, 200, 255)


class Tables(HTMLParser):
    """Text of every table cell, per table id and row."""

    def __init__(self):
        super().__init__()
        self.tables, self.images, self._table, self._row, self._cell = {}, [], None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id"), [])
        elif tag == "tr":
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "img":
            self.images.append(attrs)

    def handle_endtag(self, tag):
        if tag in ("td", "th"):
            self._row.append(self._cell.strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data


def parse(text):
    parser = Tables()
    parser.feed(text)
    return parser


@pytest.fixture
def report(tmp_path):
    curves = tmp_path / "curves.png"
    Image.new("RGB", (300, 200), CURVES_COLOUR).save(curves)
    grid = tmp_path / "rank_lists" / "SynthAG_ALL_grid.png"
    grid.parent.mkdir()
    Image.new("RGB", (400, 150), GRID_COLOUR).save(grid)
    path = write_html_report(str(tmp_path), DOCUMENT, str(curves), [str(grid), str(tmp_path / "missing.png")])
    assert path == str(tmp_path / "report.html")
    return path


def check_page(parsed):
    assert parsed.tables["results"][0] == ["protocol", "mAP", "R1", "R5", "R10", "mINP", "#query", "#gallery"]
    assert parsed.tables["results"][1:] == EXPECTED_ROWS
    settings = {row[0]: row[1] for row in parsed.tables["settings"]}
    assert settings["checkpoint"] == DOCUMENT["checkpoint"] and settings["epoch"] == "12"
    assert settings["distance"] == "euclidean" and settings["image_size"] == "[256, 128]"
    assert [image.get("id") or image.get("class") for image in parsed.images] == ["curves", "rank-grid"]
    # Offline: every picture is embedded.
    assert all(image["src"].startswith("data:image/png;base64,") for image in parsed.images)


def test_page_content(report):
    text = open(report, encoding="utf-8").read()
    check_page(parse(text))
    assert "<script" not in text and "http://" not in text and "https://" not in text


def chromium_binary():
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(chromium_binary() is None, reason="no chromium binary installed (apt-get install chromium)")
def test_rendered_by_headless_chromium(report, tmp_path):
    common = [chromium_binary(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,1400"]
    dom = subprocess.run(common + ["--dump-dom", f"file://{report}"], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    check_page(parse(dom.stdout))

    screenshot = tmp_path / "page.png"
    shot = subprocess.run(common + [f"--screenshot={screenshot}", f"file://{report}"], capture_output=True,
                          text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).reshape(-1, 3)
    assert len(np.unique(pixels, axis=0)) > 50  # text, table borders: not a blank page
    # The embedded pictures were decoded and drawn.
    for colour in (CURVES_COLOUR, GRID_COLOUR):
        assert (np.abs(pixels.astype(int) - colour).max(axis=1) <= 8).sum() > 1000, colour


# ------------------------------------------------------------------------- breakdowns and embeddings
EMBEDDING_COLOUR = (255, 160, 0)
BREAKDOWN = {"viewid": {"0": {"mAP": 75.5, "rank1": 85.0, "num_query": 60},
                        "1": {"mAP": 67.0, "rank1": 76.0, "num_query": 60}},
             "attr:Upper Color": {"3": {"mAP": 70.25, "rank1": 80.5, "num_query": 120}}}


@pytest.fixture
def report_with_breakdown(tmp_path):
    document = {**DOCUMENT, "protocols": {
        "SynthAG_ALL": {**DOCUMENT["protocols"]["SynthAG_ALL"], "breakdown": BREAKDOWN},
        "SynthAG_A->G": DOCUMENT["protocols"]["SynthAG_A->G"]}}
    # The embedding picture next to the page is found by its protocol's name.
    Image.new("RGB", (300, 240), EMBEDDING_COLOUR).save(tmp_path / "embedding_SynthAG_ALL.png")
    return write_html_report(str(tmp_path), document)


def check_breakdown_page(parsed):
    assert parsed.tables["results"][1:] == EXPECTED_ROWS  # the breakdown is no column of the results table
    assert parsed.tables["breakdown-SynthAG_ALL"] == [
        ["label", "value", "mAP", "R1", "#query"], ["viewid", "0", "75.50", "85.00", "60"],
        ["viewid", "1", "67.00", "76.00", "60"], ["attr:Upper Color", "3", "70.25", "80.50", "120"]]
    assert "breakdown-SynthAG_A->G" not in parsed.tables
    assert [image.get("class") for image in parsed.images] == ["embedding"]


def test_breakdown_and_embedding_content(report_with_breakdown):
    check_breakdown_page(parse(open(report_with_breakdown, encoding="utf-8").read()))


@pytest.mark.skipif(chromium_binary() is None, reason="no chromium binary installed (apt-get install chromium)")
def test_breakdown_and_embedding_rendered_by_headless_chromium(report_with_breakdown, tmp_path):
    common = [chromium_binary(), "--headless", "--disable-gpu", "--no-sandbox", "--no-first-run",
              f"--user-data-dir={tmp_path / 'profile'}", "--window-size=1000,2000"]
    dom = subprocess.run(common + ["--dump-dom", f"file://{report_with_breakdown}"], capture_output=True, text=True,
                         timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    check_breakdown_page(parse(dom.stdout))
    screenshot = tmp_path / "page.png"
    shot = subprocess.run(common + [f"--screenshot={screenshot}", f"file://{report_with_breakdown}"],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and screenshot.is_file(), shot.stderr[-2000:]
    pixels = np.asarray(Image.open(screenshot).convert("RGB")).reshape(-1, 3)
    assert (np.abs(pixels.astype(int) - EMBEDDING_COLOUR).max(axis=1) <= 8).sum() > 1000

"""Ranked-list pictures: per-query AP against a direct definition, query selection, and the pixels of the
written PNGs (which gallery image sits in which slot, frame colours) against an independent ranking."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from configs import load_config
from datasets import make_dataloaders
from datasets.synthetic import SynthConfig, generate_synthag
from evaluation import visualize
from evaluation.ranking import removal_mask
from processor.model_io import build_from_args, model_args_from_dataset
from tests.fixtures import BASELINE, REPO_ROOT, tiny
from tools import search
from tools import visualize as visualize_tool
from utils.checkpoint import save_checkpoint
from evaluation import evaluate_rank


def direct_ap(dist_row, match_row, removed_row):
    """AP of one query by its textbook definition: mean over true matches of precision at their rank."""
    kept = [g for g in sorted(range(len(dist_row)), key=lambda g: (dist_row[g], g)) if not removed_row[g]]
    hits, precisions = 0, []
    for rank, g in enumerate(kept, start=1):
        if match_row[g]:
            hits += 1
            precisions.append(hits / rank)
    return float(np.mean(precisions)) if precisions else float("nan")


def labels(rng, count, num_ids):
    return {"pids": rng.integers(0, num_ids, count), "camids": rng.integers(0, 3, count),
            "viewids": rng.integers(0, 2, count), "timeids": rng.integers(0, 2, count)}


@pytest.mark.parametrize("view_mode", ["mix", "cross"])
def test_per_query_ap_matches_direct_definition_and_metrics_map(view_mode):
    rng = np.random.default_rng(3)
    query, gallery = labels(rng, 37, 6), labels(rng, 53, 6)
    # Integer distances make exact ties common: they must be broken by gallery index, as the metrics do.
    distmat = rng.integers(0, 8, (37, 53)).astype(np.float32)
    _, removed = removal_mask(query, gallery, view_mode)
    matches = query["pids"][:, None] == gallery["pids"][None, :]
    ap = visualize.per_query_ap(distmat, matches, removed, chunk_rows=5)
    expected = np.array([direct_ap(distmat[q], matches[q], removed[q]) for q in range(37)])
    np.testing.assert_array_equal(np.isnan(ap), np.isnan(expected))
    np.testing.assert_allclose(ap[~np.isnan(ap)], expected[~np.isnan(expected)], rtol=1e-12)
    reference = evaluate_rank(distmat, query["pids"], gallery["pids"], query["camids"], gallery["camids"],
                              q_viewids=query["viewids"], g_viewids=gallery["viewids"], view_mode=view_mode)
    assert np.nanmean(ap) == pytest.approx(reference["mAP"], abs=1e-6)


def test_select_queries_worst_best_random_distinct_and_seeded():
    ap = np.array([0.5, np.nan, 0.1, 0.9, 0.3, 1.0, 0.7, 0.2, 0.6, 0.4])
    chosen = visualize.select_queries(ap, num_each=2, seed=0)
    assert chosen[:4] == [("worst", 2), ("worst", 7), ("best", 5), ("best", 3)]
    randoms = [q for kind, q in chosen if kind == "random"]
    assert len(randoms) == 2 and not set(randoms) & {1, 2, 7, 5, 3}
    assert visualize.select_queries(ap, 2, seed=0) == chosen
    assert {tuple(visualize.select_queries(ap, 2, seed=s)[4:]) for s in range(10)} != {tuple(chosen[4:])}


def colour_of(index):
    """A distinct solid colour per image, readable back from a thumbnail's centre."""
    return (40 + 13 * (index % 16), 40 + 11 * (index // 16 % 16), 200 - 7 * (index % 20))


@pytest.fixture
def image_set(tmp_path):
    rng = np.random.default_rng(0)
    query, gallery = labels(rng, 12, 4), labels(rng, 30, 4)
    for name, data, offset in (("q", query, 100), ("g", gallery, 0)):
        data["paths"] = []
        for i in range(len(data["pids"])):
            path = str(tmp_path / f"{name}{i}.jpg")
            Image.new("RGB", (32, 64), colour_of(i + offset)).save(path, quality=95)
            data["paths"].append(path)
    distmat = rng.random((12, 30)).astype(np.float32)
    return query, gallery, distmat


def slot_colour(picture, top, position):
    left = visualize.slot_left(position)
    frame = picture.getpixel((left + 1, top + visualize.TITLE_HEIGHT + 1))
    centre = picture.getpixel((left + visualize.BORDER + visualize.TILE[0] // 2,
                               top + visualize.TITLE_HEIGHT + visualize.BORDER + visualize.TILE[1] // 2))
    return frame, centre


def test_write_rank_lists_draws_the_ranked_kept_gallery(tmp_path, image_set):
    query, gallery, distmat = image_set
    _, removed = removal_mask(query, gallery, "mix")
    paths = visualize.write_rank_lists(str(tmp_path / "ranks"), "P1", distmat, query, gallery, removed, topk=5,
                                       num_each=2, seed=1)
    assert len(paths) == 7 and paths[-1] == str(tmp_path / "ranks" / "P1_grid.png")
    assert all(os.path.isfile(p) for p in paths)
    names = [os.path.basename(p) for p in paths[:-1]]
    assert [n.split("_")[0] for n in names] == ["worst", "worst", "best", "best", "random", "random"]

    matches = query["pids"][:, None] == gallery["pids"][None, :]
    aps = {}
    grid = Image.open(paths[-1]).convert("RGB")
    for row, path in enumerate(paths[:-1]):
        q = int(os.path.basename(path).split("_q")[1][:-4])
        aps[names[row]] = direct_ap(distmat[q], matches[q], removed[q])
        # Independent ranking: kept gallery sorted by distance.
        expected = [g for g in np.argsort(distmat[q], kind="stable") if not removed[q, g]][:5]
        picture = Image.open(path).convert("RGB")
        assert picture.size[0] == visualize.slot_left(6)
        for top, image in ((0, picture), (row * picture.size[1], grid)):
            frame, centre = slot_colour(image, top, 0)
            assert frame == visualize.COLOURS["query"]
            assert np.abs(np.subtract(centre, colour_of(q + 100))).max() <= 6
            for position, g in enumerate(expected, start=1):
                frame, centre = slot_colour(image, top, position)
                assert frame == visualize.COLOURS["match" if matches[q, g] else "non-match"]
                assert np.abs(np.subtract(centre, colour_of(g))).max() <= 6, (q, position, g)
        # Captions (distance, camera/view) are drawn under the thumbnails.
        caption = np.asarray(picture)[visualize.TITLE_HEIGHT + visualize.TILE[1] + 2 * visualize.BORDER:]
        assert (caption < 128).any()
    assert max(aps[n] for n in names[:2]) <= min(aps[n] for n in names[2:4])


def test_write_rank_lists_is_deterministic(tmp_path, image_set):
    query, gallery, distmat = image_set
    _, removed = removal_mask(query, gallery, "mix")
    first = visualize.write_rank_lists(str(tmp_path / "a"), "P", distmat, query, gallery, removed, 3, 1, seed=4)
    second = visualize.write_rank_lists(str(tmp_path / "b"), "P", distmat, query, gallery, removed, 3, 1, seed=4)
    assert [os.path.basename(p) for p in first] == [os.path.basename(p) for p in second]
    for a, b in zip(first, second):
        assert open(a, "rb").read() == open(b, "rb").read()


# ---------------------------------------------------------------------------------------- the tools
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny synthetic benchmark and a random-weight CLIP_baseline weights file storing its config."""
    root = str(tmp_path_factory.mktemp("data"))
    generate_synthag(root, SynthConfig(num_ids=16, images_per_id=12, height=64, width=32, seed=0), num_workers=1)
    out = str(tmp_path_factory.mktemp("run"))
    cfg = load_config(BASELINE, tiny(root, out) + ["DATASETS.TESTS", "('SynthAG_ALL', 'SynthAG_AG')"])
    args = model_args_from_dataset(make_dataloaders(cfg).dataset)
    torch.manual_seed(0)
    model = build_from_args(cfg, args, torch.device("cpu"))
    path = os.path.join(out, "model_final.pth")
    save_checkpoint({"model": model.state_dict(), "model_args": args, "epoch": 1, "config": cfg.dump()}, path)
    return root, out, path


def test_visualize_tool_writes_rank_lists_of_every_protocol(checkpoint, tmp_path, single_thread):
    _, _, weights = checkpoint
    out = str(tmp_path / "test")
    visualize_tool.main(["--weights", weights, "OUTPUT_DIR", out, "TEST.VISUALIZE_TOPK", "4"])
    pictures = os.path.join(out, "rank_lists")
    for protocol in ("SynthAG_ALL", "SynthAG_AG"):
        names = sorted(os.listdir(os.path.join(pictures, protocol)))
        assert [n.split("_")[0] for n in names] == ["best"] * 3 + ["random"] * 3 + ["worst"] * 3
        grid = Image.open(os.path.join(pictures, f"{protocol}_grid.png"))
        single = Image.open(os.path.join(pictures, protocol, names[0])).convert("RGB")
        # Query, its relevance map (blue frame), then 4 gallery images.
        assert grid.size == (visualize.slot_left(6), 9 * single.size[1])
        assert slot_colour(single, 0, 1)[0] == visualize.COLOURS["relevance"]
        assert os.path.isfile(os.path.join(out, f"embedding_{protocol}.png"))
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    assert page.count('class="rank-grid"') == 2 and page.count('class="embedding"') == 2 and "SynthAG_AG" in page


def test_search_tool_draws_the_same_strips(checkpoint, tmp_path, capsys, single_thread):
    root, _, weights = checkpoint
    images = os.path.join(root, "SynthAG", "images")
    gallery = sorted(os.path.join(images, name) for name in os.listdir(images))
    out = str(tmp_path / "search")
    search.main(["--config_file", os.path.join(REPO_ROOT, BASELINE), "--weight", weights, "--query", gallery[3],
                 "--gallery", images, "--topk", "4", "--out", out, *tiny(root, str(tmp_path / "unused"))])
    ranked = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("    ")]
    assert ranked[0][2] == gallery[3] and float(ranked[0][1]) < 1e-4
    (picture,) = os.listdir(out)
    strip = Image.open(os.path.join(out, picture)).convert("RGB")
    assert strip.size == (visualize.slot_left(5), visualize.TITLE_HEIGHT + visualize.TILE[1]
                          + 2 * visualize.BORDER + visualize.CAPTION_HEIGHT)
    for position in range(1, 5):
        frame, _ = slot_colour(strip, 0, position)
        assert frame == visualize.COLOURS["unknown"]
    # Rank 1 is the query image itself: the same thumbnail as the query's.
    thumbs = [np.asarray(strip.crop((visualize.slot_left(p) + visualize.BORDER,
                                     visualize.TITLE_HEIGHT + visualize.BORDER,
                                     visualize.slot_left(p) + visualize.BORDER + visualize.TILE[0],
                                     visualize.TITLE_HEIGHT + visualize.BORDER + visualize.TILE[1])))
              for p in (0, 1)]
    np.testing.assert_array_equal(thumbs[0], thumbs[1])

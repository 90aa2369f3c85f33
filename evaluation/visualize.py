"""Ranked-list pictures: a query (and, where given, its relevance map) followed by its top-k kept gallery
images, framed green (same identity), red (another identity) or grey (identity unknown), with the distance
and the camera/view under each image.

``write_rank_lists`` picks the worst, best (by per-query average precision) and some random queries of one
protocol and writes one PNG per query plus one grid PNG stacking them; ``tools/search.py`` draws its
strips with :func:`draw_strip` too, so both show the same ranks, distances and colours.
"""
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from evaluation.ranking import query_metrics
from utils.io import atomic_write

TILE = (64, 128)  # (width, height) of every thumbnail
BORDER = 4  # frame width in pixels
GAP = 6  # white space between the query and the first gallery image
SPACING = 2  # white space between neighbouring frames
TITLE_HEIGHT = 16  # text line above a strip
CAPTION_HEIGHT = 28  # two text lines under every thumbnail
COLOURS = {"match": (0, 160, 0), "non-match": (220, 0, 0), "unknown": (128, 128, 128), "query": (0, 0, 0),
           "relevance": (0, 90, 220)}
KINDS = ("worst", "best", "random")


def kept_order(distances, removed_row):
    """Gallery indices of one query, nearest first, without the removed ones (stable: ties keep gallery
    order, as the metrics do)."""
    distances = np.asarray(distances, dtype=np.float64)
    order = np.argsort(distances, kind="stable")
    return order[~np.asarray(removed_row, dtype=bool)[order]]


def per_query_ap(distmat, matches, removed, chunk_rows=256):
    """Average precision (Q,) of every query; NaN where no true match is kept.

    ``distmat``, ``matches`` (same identity) and ``removed`` (protocol filter) are (Q, G); the ranking
    kernel's :func:`~evaluation.ranking.query_metrics` ranks ``chunk_rows`` queries at a time.
    """
    distmat = np.asarray(distmat)
    matches, removed = np.asarray(matches, dtype=bool), np.asarray(removed, dtype=bool)
    parts = [query_metrics(distmat[rows], matches[rows], removed[rows])[1]
             for rows in (slice(start, start + chunk_rows) for start in range(0, distmat.shape[0], chunk_rows))]
    return np.concatenate(parts) if parts else np.zeros(0)


def select_queries(ap, num_each=3, seed=0):
    """``[(kind, query index)]``: the ``num_each`` lowest-AP, highest-AP and random (seeded) queries among
    those with a kept true match; a query appears once (worst first, then best, then random)."""
    valid = np.flatnonzero(~np.isnan(ap))
    by_ap = valid[np.argsort(ap[valid], kind="stable")]
    chosen, seen = [], set()
    for kind, candidates in (("worst", by_ap), ("best", by_ap[::-1])):
        for index in candidates[:num_each]:
            if int(index) not in seen:
                seen.add(int(index))
                chosen.append((kind, int(index)))
    rest = np.array([i for i in valid if int(i) not in seen], dtype=np.int64)
    if rest.size:
        picks = np.random.default_rng(seed).choice(rest, size=min(num_each, rest.size), replace=False)
        chosen.extend(("random", int(index)) for index in picks)
    return chosen


def _thumbnail(image):
    if isinstance(image, Image.Image):
        return ImageOps.fit(image.convert("RGB"), TILE)
    with Image.open(image) as opened:
        return ImageOps.fit(opened.convert("RGB"), TILE)


def draw_strip(query_path, gallery, title="", query_caption="", query_overlay=None):
    """A PIL image: ``title`` above, the query (black frame, ``query_caption`` below), its relevance picture
    ``query_overlay`` (a PIL image, blue frame) when given, then ``gallery``, a list of ``(path,
    colour_name, caption)`` with ``colour_name`` a key of ``COLOURS`` and up to two caption lines
    ("\\n"-separated) under each image."""
    font = ImageFont.load_default()
    frames = [(query_path, "query", query_caption)]
    if query_overlay is not None:
        frames.append((query_overlay, "relevance", "relevance"))
    frames += list(gallery)
    width = slot_left(len(frames))
    height = TITLE_HEIGHT + TILE[1] + 2 * BORDER + CAPTION_HEIGHT
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((2, 2), title, fill="black", font=font)
    for position, (path, colour, caption) in enumerate(frames):
        left = slot_left(position)
        draw.rectangle([left, TITLE_HEIGHT, left + TILE[0] + 2 * BORDER - 1, TITLE_HEIGHT + TILE[1] + 2 * BORDER - 1],
                       fill=COLOURS[colour])
        canvas.paste(_thumbnail(path), (left + BORDER, TITLE_HEIGHT + BORDER))
        for line_number, line in enumerate(caption.split("\n")[:2]):
            draw.text((left + 1, TITLE_HEIGHT + TILE[1] + 2 * BORDER + 1 + 13 * line_number), line, fill="black",
                      font=font)
    return canvas


def slot_left(position):
    """x of the left edge of the frame of image ``position`` (0 = query) in a :func:`draw_strip` picture."""
    return position * (TILE[0] + 2 * BORDER + SPACING) + (GAP if position else 0)


def stack(strips):
    """The strips one under the other on a white canvas as wide as the widest."""
    canvas = Image.new("RGB", (max(s.width for s in strips), sum(s.height for s in strips)), "white")
    top = 0
    for strip in strips:
        canvas.paste(strip, (0, top))
        top += strip.height
    return canvas


def _label(labels, name, index):
    values = labels.get(name)
    return None if values is None else int(np.asarray(values)[index])


def _where(labels, index):
    camera, view = _label(labels, "camids", index), _label(labels, "viewids", index)
    return " ".join(part for part in (f"cam {camera}" if camera is not None else "",
                                      f"view {view}" if view is not None else "") if part)


def write_rank_lists(out_dir, protocol, distmat, query, gallery, removed, topk=10, num_each=3, seed=0,
                     query_overlay=None):
    """Write the rank lists of ``protocol``; return the written paths (per-query PNGs, then the grid).

    ``distmat`` (Q, G); ``query``/``gallery``: dicts with ``pids``, ``camids``, ``viewids`` (arrays) and
    ``paths`` (lists); ``removed`` (Q, G) bool: the protocol's removal mask; ``query_overlay``: optional
    function of a query index giving the picture of its relevance map, drawn next to the query. Files:
    ``out_dir/<protocol>/<kind>_<n>_q<query index>.png`` and ``out_dir/<protocol>_grid.png``.
    """
    distmat = np.asarray(distmat)
    removed = np.asarray(removed, dtype=bool)
    q_pids, g_pids = np.asarray(query["pids"]), np.asarray(gallery["pids"])
    matches = q_pids[:, None] == g_pids[None, :]  # (Q, G)
    ap = per_query_ap(distmat, matches, removed)
    folder = os.path.join(out_dir, protocol)
    os.makedirs(folder, exist_ok=True)
    written, strips, counts = [], [], dict.fromkeys(KINDS, 0)
    for kind, q in select_queries(ap, num_each, seed):
        counts[kind] += 1
        order = kept_order(distmat[q], removed[q])[:topk]
        items = [(gallery["paths"][g], "match" if matches[q, g] else "non-match",
                  f"{float(distmat[q, g]):.4f}\n{_where(gallery, g)}") for g in order]
        title = f"{protocol} {kind} #{counts[kind]}: query {q}, AP {100 * ap[q]:.1f}%"
        overlay = query_overlay(q) if query_overlay is not None else None
        strip = draw_strip(query["paths"][q], items, title, f"query\n{_where(query, q)}", overlay)
        path = os.path.join(folder, f"{kind}_{counts[kind]}_q{q}.png")
        atomic_write(path, lambda handle, picture=strip: picture.save(handle, format="PNG"))
        written.append(path)
        strips.append(strip)
    if strips:
        grid = os.path.join(out_dir, f"{protocol}_grid.png")
        atomic_write(grid, lambda handle: stack(strips).save(handle, format="PNG"))
        written.append(grid)
    return written

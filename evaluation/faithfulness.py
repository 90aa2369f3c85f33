"""Faithfulness of relevance maps: do they show what the feature rests on, better than maps that merely look alike?

Cells. Every map is averaged over the cells of the model's patch grid (cells of the patch stride, from the
top-left corner; with overlapping patches a cell is the part of the image a patch moves on by, so the cells tile
the image like the tokens do). A map is then an order of the cells: most relevant first (ties in random order).

Curves (RISE's deletion and insertion metrics, Petsiuk et al. 2018, over cells instead of pixels). The measured
score is the cosine similarity of the perturbed image's test feature with a fixed target direction: the image's
own clean feature (the map explains the feature), or another image's (the map explains the pair's match).

* deletion: the most relevant cells are set to the mean image (0 after normalisation), a fraction k / S of
  the cells at step k = 0..S; a faithful map makes the score fall fast: its area under the curve is small;
* insertion: the cells are revealed in the same order on the mean image; the score rises fast: large area.

Nulls (``NULLS``), maps with the real map's cell structure that must lose to it. ``random``: uniform random cell
values; ``permuted``: the real map's cell values permuted (the curves depend only on the order, so both are a
random order; the pointing game tells them apart); ``transposed``: the row-major sequence of cells laid out
column by column (a token grid read transposed), ``untransposed``: the inverse; ``shifted``/``shifted_back``: the
row-major sequence moved one cell forward/back (a token off by one, wrapping around); ``flipped``: upside down.
A code bug that transposes or shifts the grid turns the inverse null into the correct map, which then wins.

Scores are shown as a fraction of the way from the mean image's score (0) to the clean image's (1), both
averaged over the images: the cosine similarities of ReID features move little (a blank image's feature is
often within 0.002 of an image's), and this puts every model on one scale without reweighting the images.
For every null the per-image gains are ``area_deletion(null) - area_deletion(map)`` and ``area_insertion(map)
- area_insertion(null)`` (areas over the fraction of cells; random nulls: the mean over ``draws`` draws), with
a 95% paired bootstrap interval over images (``evaluation.comparison.paired_difference``,
``scipy.stats.bootstrap``). The map beats a null when both intervals lie above zero.

Pointing game (energy-based, Wang et al., Score-CAM 2020): given a person mask per image (SynthAG draws it:
``datasets.synthetic.person_mask``), the share of the map's total inside the mask, against the mask's share of
the image (what a uniform map gets); the map points at the person when the interval of the per-image
difference lies above zero and the mean share is at least ``POINTING_RATIO`` times the mean mask share.

Everything runs in float32 with autocast off (``Explainer``), whatever precision the model trained in.
"""
import math
from dataclasses import dataclass, field
from typing import Dict, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from evaluation.comparison import MIN_RESAMPLES, paired_difference
from evaluation.relevance import slice_inputs, token_layout

NULLS = ("random", "permuted", "transposed", "untransposed", "shifted", "shifted_back", "flipped")
#: The nulls a faithful map must beat. ``flipped`` is reported but not required: with persons centred in the
#: image (and aerial ones seen from above, with no up and down) the upside-down map stays on the person, so
#: beating it asks where along the body the feature rests, beyond what the pointing game already asks.
REQUIRED_NULLS = NULLS[:-1]
#: Nulls drawn at random, averaged over several draws per image.
RANDOM_NULLS = ("random", "permuted")
#: Cell size of models without a known patch grid (a model registered from outside the repository).
DEFAULT_CELL = (16, 16)
#: Steps of the curves (at most one step per cell).
STEPS = 8
#: The mean share of a map inside the person mask must be at least this many times the mask's share.
POINTING_RATIO = 1.2


def cell_size(model):
    """(h, w) of the cells of ``model``: its patch stride, or ``DEFAULT_CELL`` for a model without a known grid."""
    layout = token_layout(model)
    return tuple(layout.stride) if layout is not None else DEFAULT_CELL


def cell_means(maps, cell):
    """(B, rows, cols) means over the cells (h, w) of (B, H, W) maps; cells cut by the border average what
    is inside."""
    (height, width), (cell_h, cell_w) = maps.shape[-2:], cell
    rows, cols = math.ceil(height / cell_h), math.ceil(width / cell_w)
    padding = (0, cols * cell_w - width, 0, rows * cell_h - height)
    sums = F.avg_pool2d(F.pad(maps[:, None].double(), padding), cell, stride=cell)  # (B, 1, rows, cols)
    counts = F.avg_pool2d(F.pad(torch.ones_like(maps[:1, None], dtype=torch.float64), padding), cell, stride=cell)
    return (sums / counts)[:, 0].float()


def cells_to_pixels(cells, cell, size):
    """(..., H, W) pixel values of (..., rows, cols) cell values (each pixel takes its cell's)."""
    pixels = cells.repeat_interleave(cell[0], dim=-2).repeat_interleave(cell[1], dim=-1)
    return pixels[..., :size[0], :size[1]]


def null_maps(name, cells, generator):
    """The null ``name`` (one of ``NULLS``) of (B, rows, cols) cell maps."""
    batch, rows, cols = cells.shape
    flat = cells.reshape(batch, rows * cols)
    if name == "random":
        return torch.rand(cells.shape, generator=generator)
    if name == "permuted":
        order = torch.argsort(torch.rand(batch, rows * cols, generator=generator), dim=1)
        return flat.gather(1, order).view_as(cells)
    if name == "transposed":  # cell k of the row-major sequence placed at the k-th cell column by column
        return flat.view(batch, cols, rows).transpose(1, 2).contiguous()
    if name == "untransposed":  # the inverse: the column-by-column sequence placed row by row
        return cells.transpose(1, 2).reshape(batch, rows, cols)
    if name == "shifted":
        return flat.roll(1, dims=1).view_as(cells)
    if name == "shifted_back":
        return flat.roll(-1, dims=1).view_as(cells)
    if name == "flipped":
        return cells.flip(1)
    raise ValueError(f"unknown null {name!r}: expected one of {', '.join(NULLS)}")


def cell_order(cells, generator):
    """(B, rows * cols) cell indices, most relevant first; equal values in random order."""
    flat = cells.reshape(cells.shape[0], -1)
    shuffle = torch.argsort(torch.rand(flat.shape, generator=generator), dim=1)
    ranks = torch.argsort(flat.gather(1, shuffle), dim=1, descending=True, stable=True)
    return shuffle.gather(1, ranks)


@dataclass
class Gain:
    """How far a map beats a null over the images: mean per-image gain (cosine-similarity x fraction of cells;
    positive: the map wins), its 95% bootstrap interval, and the mean areas of the map and the null."""

    mean: float
    interval: Tuple[float, float]
    map_area: float
    null_area: float

    @property
    def significant(self):
        """The interval lies above zero."""
        return self.interval[0] > 0


@dataclass
class Pointing:
    """Energy-based pointing game: mean share of the map inside the person masks, the masks' mean share of
    the image, the 95% interval of the mean per-image difference, and how many maps were empty (counted as
    uniform)."""

    share: float
    mask_share: float
    interval: Tuple[float, float]
    empty_maps: int

    @property
    def ratio(self):
        return self.share / self.mask_share if self.mask_share > 0 else float("nan")

    @property
    def passed(self):
        """The interval lies above zero and the share is at least ``POINTING_RATIO`` times the mask's."""
        return self.interval[0] > 0 and self.ratio >= POINTING_RATIO


@dataclass
class Faithfulness:
    """One map method on a set of images: the mean ``deletion``/``insertion`` curves of the map (S + 1 points
    over the fraction of cells), the ``Gain`` over every null on each curve, and the pointing game (None
    without masks)."""

    images: int
    cells: Tuple[int, int]
    steps: int
    deletion: np.ndarray
    insertion: np.ndarray
    score_range: Tuple[float, float]
    deletion_gain: Dict[str, Gain] = field(default_factory=dict)
    insertion_gain: Dict[str, Gain] = field(default_factory=dict)
    pointing: Optional[Pointing] = None
    #: Per image: areas of the map and of every null (random nulls: mean over the draws), {"map"|null: (B,)}.
    deletion_areas: Dict[str, np.ndarray] = field(default_factory=dict)
    insertion_areas: Dict[str, np.ndarray] = field(default_factory=dict)

    def beaten(self, null):
        """Whether the map beats ``null`` on both curves."""
        return self.deletion_gain[null].significant and self.insertion_gain[null].significant

    @property
    def faithful(self):
        """The map beats every required null on both curves, and points at the person where masks were given."""
        return all(self.beaten(null) for null in REQUIRED_NULLS if null in self.deletion_gain) and (
            self.pointing is None or self.pointing.passed)

    def as_dict(self):
        """Plain values for JSON."""
        def gains(table):
            return {null: {"mean": g.mean, "ci95": list(g.interval), "map_area": g.map_area,
                           "null_area": g.null_area} for null, g in table.items()}
        pointing = None
        if self.pointing is not None:
            pointing = {"share": self.pointing.share, "mask_share": self.pointing.mask_share,
                        "ratio": self.pointing.ratio, "ci95_difference": list(self.pointing.interval),
                        "empty_maps": self.pointing.empty_maps, "passed": self.pointing.passed}
        return {"images": self.images, "cells": list(self.cells), "steps": self.steps,
                "cosine_similarity_mean_image_and_clean": list(self.score_range),
                "deletion_curve": self.deletion.tolist(), "insertion_curve": self.insertion.tolist(),
                "deletion_gain": gains(self.deletion_gain), "insertion_gain": gains(self.insertion_gain),
                "pointing": pointing, "faithful": self.faithful}


def _area(curves):
    """Trapezoid areas of (..., S + 1) curves over [0, 1]."""
    return (curves[..., 1:] + curves[..., :-1]).sum(-1) / (2 * (curves.shape[-1] - 1))


class FaithfulnessBenchmark:
    """Deletion/insertion curves against the nulls and the pointing game of an ``evaluation.relevance.Explainer``.

    ``steps``: points of the curves (at most one per cell); ``draws``: draws of each random null per image;
    ``cell``: (h, w) cells (default: the model's patch stride); ``resamples``/``seed``: of the bootstrap and of
    every random choice (the same inputs give the same figures); ``chunk``: images per forward pass.
    """

    def __init__(self, explainer, steps=STEPS, draws=2, cell=None, resamples=MIN_RESAMPLES, seed=0, chunk=128,
                 nulls=NULLS):
        self.explainer = explainer
        self.steps = steps
        self.draws = draws
        self.cell = tuple(cell) if cell is not None else cell_size(explainer.model)
        self.resamples = resamples
        self.seed = seed
        self.chunk = chunk
        self.nulls = tuple(nulls)

    def __call__(self, images, inputs, directions=None, masks=None, maps=None):
        """``Faithfulness`` of the maps of ``images`` (B, 3, H, W) with the model's other ``inputs``, explaining
        each image's own feature or, with ``directions`` (B, E), its similarity to them; ``masks`` (B, H, W)
        bool person masks for the pointing game; ``maps`` (B, H, W) to measure given maps instead of the
        explainer's (a test's broken maps)."""
        images = images.detach().float().cpu()
        if maps is None:
            maps, _ = self.explainer(images, inputs, directions)
        maps = maps.detach().float().cpu().clamp(min=0)
        generator = torch.Generator().manual_seed(self.seed)
        cells = cell_means(maps, self.cell)  # (B, rows, cols)
        batch, rows, cols = cells.shape
        steps = min(self.steps, rows * cols)
        candidates = [("map", cells[:, None])]
        for name in self.nulls:
            draws = self.draws if name in RANDOM_NULLS else 1
            candidates.append((name, torch.stack([null_maps(name, cells, generator) for _ in range(draws)], 1)))
        names = [name for name, stacked in candidates for _ in range(stacked.shape[1])]
        stacked = torch.cat([maps for _, maps in candidates], 1)  # (B, M, rows, cols)
        orders = cell_order(stacked.flatten(0, 1), generator).view(batch, len(names), rows * cols)
        deletion, insertion = self._curves(images, inputs, directions, orders, steps, (rows, cols))  # (B, M, S + 1)

        # Scores as a fraction of the way from the mean image's (0) to the clean image's (1), over all images.
        low, high = deletion[:, :, -1].mean(), deletion[:, :, 0].mean()
        deletion, insertion = ((curves - low) / max(high - low, 1e-12) for curves in (deletion, insertion))
        result = Faithfulness(batch, (rows, cols), steps, deletion[:, 0].mean(0), insertion[:, 0].mean(0),
                              score_range=(float(low), float(high)))
        names = np.array(names)
        map_deletion, map_insertion = _area(deletion[:, 0]), _area(insertion[:, 0])
        result.deletion_areas["map"], result.insertion_areas["map"] = map_deletion, map_insertion
        for null in self.nulls:
            columns = names == null
            null_deletion = _area(deletion[:, columns]).mean(1)
            null_insertion = _area(insertion[:, columns]).mean(1)
            result.deletion_areas[null], result.insertion_areas[null] = null_deletion, null_insertion
            result.deletion_gain[null] = self._gain(map_deletion, null_deletion, lower_is_better=True)
            result.insertion_gain[null] = self._gain(map_insertion, null_insertion, lower_is_better=False)
        if masks is not None:
            result.pointing = self._pointing(maps, masks)
        return result

    def _gain(self, map_areas, null_areas, lower_is_better):
        # paired_difference gives B - A: the gain is null - map for deletion, map - null for insertion.
        first, second = (map_areas, null_areas) if lower_is_better else (null_areas, map_areas)
        difference = paired_difference(first, second, self.resamples, self.seed)
        return Gain(difference.delta, difference.ci95, float(map_areas.mean()), float(null_areas.mean()))

    def _pointing(self, maps, masks):
        masks = torch.as_tensor(masks, dtype=torch.bool)
        if masks.shape != maps.shape:
            raise ValueError(f"person masks {tuple(masks.shape)} do not match the maps {tuple(maps.shape)}")
        totals = maps.flatten(1).sum(1).double()
        inside = (maps * masks).flatten(1).sum(1).double()
        mask_share = masks.flatten(1).double().mean(1)
        empty = totals <= 0
        share = torch.where(empty, mask_share, inside / totals.clamp(min=1e-30))
        difference = paired_difference(mask_share.numpy(), share.numpy(), self.resamples, self.seed)
        return Pointing(float(share.mean()), float(mask_share.mean()), difference.ci95, int(empty.sum()))

    def _curves(self, images, inputs, directions, orders, steps, grid):
        """(B, M, S + 1) deletion and insertion curves of the M cell orders of every image."""
        batch, num_maps, num_cells = orders.shape
        size = images.shape[-2:]
        counts = torch.tensor([round(k * num_cells / steps) for k in range(1, steps)])  # cells removed per step
        # removed[m, k, c]: cell c is among the first counts[k] of order m.
        ranks = torch.empty_like(orders).scatter_(2, orders, torch.arange(num_cells).expand_as(orders))
        deletion = torch.empty(batch, num_maps, steps + 1)
        insertion = torch.empty(batch, num_maps, steps + 1)
        for index in range(batch):
            removed = ranks[index][:, None, :] < counts[None, :, None]  # (M, S - 1, cells)
            keep = cells_to_pixels((~removed).float().view(num_maps, steps - 1, *grid), self.cell, size)
            image = images[index]
            perturbed = torch.cat([image * keep.flatten(0, 1)[:, None],  # deletion
                                   image * (1 - keep.flatten(0, 1))[:, None],  # insertion
                                   image[None], torch.zeros_like(image)[None]])  # clean, mean image
            scores = self._scores(perturbed, slice_inputs(inputs, index, repeat=len(perturbed)),
                                  None if directions is None else directions[index])
            clean, empty = scores[-2], scores[-1]
            middle = num_maps * (steps - 1)
            deletion[index, :, 0], deletion[index, :, -1] = clean, empty
            deletion[index, :, 1:-1] = scores[:middle].view(num_maps, steps - 1)
            insertion[index, :, 0], insertion[index, :, -1] = empty, clean
            insertion[index, :, 1:-1] = scores[middle:2 * middle].view(num_maps, steps - 1)
        return deletion.numpy(), insertion.numpy()

    def _scores(self, images, inputs, direction):
        """Cosine similarity of each image's feature with ``direction`` (default: the clean image's feature,
        the second-to-last of ``images``)."""
        features = self.explainer.features(images, inputs, chunk=self.chunk)
        target = features[-2] if direction is None else torch.as_tensor(direction, dtype=torch.float32)
        return F.cosine_similarity(features, target[None].to(features.device), dim=1).cpu()

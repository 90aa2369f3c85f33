"""The faithfulness benchmark (evaluation/faithfulness.py) on a model whose answer is known: a "model" that reads
only some cells of the image, with a known weight per cell. Its true map must pass; maps with the mistakes
relevance code makes (a random patch-level map, the grid read transposed, the tokens off by one) must fail,
and so must a map on the person against a mask elsewhere."""
import pytest
import torch
from torch import nn

from evaluation.faithfulness import (NULLS, REQUIRED_NULLS, FaithfulnessBenchmark, cell_means, cell_order,
                                     cells_to_pixels, null_maps)
from evaluation.relevance import Explainer

CELL = (4, 4)
GRID = (6, 3)  # rows, cols of 4 x 4 cells on 24 x 12 images
SIZE = (GRID[0] * CELL[0], GRID[1] * CELL[1])


class CellReader(nn.Module):
    """Feature = a constant + each cell's mean pixel times its weight, each cell on its own axis: removing a
    cell moves the feature by its weight, whatever else is removed."""

    def __init__(self, weights):
        super().__init__()
        self.weights = nn.Parameter(torch.as_tensor(weights, dtype=torch.float32).flatten(), requires_grad=False)
        self.constant = nn.Parameter(torch.ones(self.weights.numel()), requires_grad=False)

    def forward(self, images):
        cells = cell_means(images.mean(dim=1), CELL).flatten(1)  # (B, rows * cols)
        return 0.2 * self.constant + cells * self.weights


def known_weights():
    weights = torch.zeros(GRID)
    weights[1:4, 1] = torch.tensor([3.0, 2.0, 1.5])  # a column of the "person" ...
    weights[0, 0], weights[4, 2] = 1.0, 0.5  # ... and two cells beside it
    return weights


def images(count, seed=0):
    return 0.5 + torch.rand(count, 3, *SIZE, generator=torch.Generator().manual_seed(seed))  # positive pixels


def benchmark(maps, masks=None, count=24):
    model = CellReader(known_weights()).eval()
    bench = FaithfulnessBenchmark(Explainer(model), steps=6, draws=2, cell=CELL,
                                  resamples=2000)
    return bench(images(count), {}, masks=masks, maps=maps)


def true_maps(count=24):
    """Each image's true map: a cell's pixels carry its weight times the cell's mean pixel."""
    pixels = images(count).mean(dim=1)
    return cells_to_pixels(known_weights().expand(count, *GRID), CELL, SIZE) * pixels


# ------------------------------------------------------------------------------------------------ pieces
def test_cells_average_their_pixels_and_cover_the_image():
    maps = torch.arange(2 * 5 * 7, dtype=torch.float32).view(2, 5, 7)
    cells = cell_means(maps, (2, 3))  # 3 x 3 cells, the last row and column cut by the border
    assert cells.shape == (2, 3, 3)
    assert cells[0, 0, 0] == maps[0, :2, :3].mean() and cells[1, 2, 2] == maps[1, 4:, 6:].mean()
    assert cells[0, 1, 2] == maps[0, 2:4, 6:].mean()
    pixels = cells_to_pixels(cells, (2, 3), (5, 7))
    assert pixels.shape == maps.shape and pixels[1, 4, 6] == cells[1, 2, 2] and pixels[0, 3, 5] == cells[0, 1, 1]


def test_nulls_keep_the_cell_structure_and_undo_each_other():
    cells = torch.arange(6, dtype=torch.float32).view(1, 3, 2)  # [[0, 1], [2, 3], [4, 5]]
    generator = torch.Generator().manual_seed(0)
    # The row-major sequence 0..5 laid out column by column, and the inverse.
    assert null_maps("transposed", cells, generator).tolist() == [[[0, 3], [1, 4], [2, 5]]]
    assert null_maps("untransposed", cells, generator).tolist() == [[[0, 2], [4, 1], [3, 5]]]
    assert null_maps("shifted", cells, generator).tolist() == [[[5, 0], [1, 2], [3, 4]]]
    assert null_maps("shifted_back", cells, generator).tolist() == [[[1, 2], [3, 4], [5, 0]]]
    assert null_maps("flipped", cells, generator).tolist() == [[[4, 5], [2, 3], [0, 1]]]
    for forward, back in (("transposed", "untransposed"), ("shifted", "shifted_back")):
        assert torch.equal(null_maps(back, null_maps(forward, cells, generator), generator), cells)
    permuted = null_maps("permuted", cells, generator)
    assert sorted(permuted.flatten().tolist()) == list(range(6)) and not torch.equal(permuted, cells)
    assert null_maps("random", cells, generator).shape == cells.shape
    assert set(REQUIRED_NULLS) < set(NULLS)


def test_equal_cells_are_ordered_at_random():
    cells = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]]]).expand(200, 3, 2)
    orders = cell_order(cells, torch.Generator().manual_seed(0))
    assert (orders[:, 0] == 0).all() and (orders[:, 1] == 4).all()  # the two non-zero cells first
    counts = torch.bincount(orders[:, 2], minlength=6)  # the third: any of the four zeros, about equally often
    assert counts[[1, 2, 3, 5]].min() > 30


# -------------------------------------------------------------------------------------------- the verdicts
def test_the_true_map_is_faithful():
    result = benchmark(true_maps())
    assert result.faithful, result.as_dict()
    for null in NULLS:
        assert result.deletion_gain[null].significant and result.insertion_gain[null].significant, null
    assert result.deletion[0] == pytest.approx(1.0) and result.deletion[-1] == pytest.approx(0.0, abs=1e-6)
    assert result.insertion[0] == pytest.approx(0.0, abs=1e-6) and result.insertion[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("mistake", ["random patch-level map", "transposed grid", "token off by one",
                                     "token off by one, backwards"])
def test_maps_with_a_mistake_are_not_faithful(mistake):
    true = cell_means(true_maps(), CELL)
    generator = torch.Generator().manual_seed(5)
    wrong = {"random patch-level map": torch.rand(true.shape, generator=generator),
             "transposed grid": null_maps("transposed", true, generator),
             "token off by one": null_maps("shifted", true, generator),
             "token off by one, backwards": null_maps("shifted_back", true, generator)}[mistake]
    result = benchmark(cells_to_pixels(wrong, CELL, SIZE))
    assert not result.faithful
    assert not all(result.beaten(null) for null in REQUIRED_NULLS)


def test_pointing_game_counts_the_share_inside_the_mask():
    maps = true_maps()
    on_person = cells_to_pixels((known_weights() > 0).expand(24, *GRID).float(), CELL, SIZE).bool()
    result = benchmark(maps, masks=on_person)
    assert result.pointing.share == pytest.approx(1.0) and result.pointing.passed
    assert result.pointing.mask_share == pytest.approx(5 / 18)
    elsewhere = ~on_person
    result = benchmark(maps, masks=elsewhere)
    assert result.pointing.share == pytest.approx(0.0) and not result.pointing.passed and not result.faithful
    empty = torch.zeros_like(maps)
    result = benchmark(empty, masks=on_person)  # no relevance anywhere: counted as a uniform map
    assert result.pointing.empty_maps == 24 and result.pointing.share == pytest.approx(5 / 18)
    assert not result.pointing.passed

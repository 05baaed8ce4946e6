"""Occlusion saliency: one hidden cell at a time, the drop in the answer's log-probability."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from refused_allocation import refuse_batches_above
from tiny_models import FAMILIES, eager_tiny

from medvlm.diagnostics.capture import prepare_example
from medvlm.diagnostics.methods import Context, Shape, get_method
from medvlm.diagnostics.methods.base import MAX_COPIES, copies_per_forward
from medvlm.diagnostics.methods.occlusion import n_forwards, occlusion
from medvlm.eval.batching import BatchRecord


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    return eager_tiny(request.param)


@torch.no_grad()
def _hand_drop(model, processor, family, ex, rows: slice, cols: slice) -> float:
    """log p(answer) minus the same with grid cells rows x cols of the image replaced by the image's
    per-channel mean, by hand: the pixels hidden in the model-resolution image, which the processor
    then rescales, normalises (and patchifies) as it does for any prepared image."""
    image = ex.image.astype(np.float64)
    ph, pw = image.shape[0] // ex.span.grid[0], image.shape[1] // ex.span.grid[1]
    hidden = image.copy()
    hidden[rows.start * ph:rows.stop * ph, cols.start * pw:cols.stop * pw] = image.reshape(-1, 3).mean(0)
    pixels = processor.image_processor([hidden], return_tensors="pt",
                                       **family.processor_kwargs(prepared=True))["pixel_values"]

    def score(pixels):
        logits = model(**{**ex.inputs, "pixel_values": pixels}).logits[0]
        logp = torch.log_softmax(logits[ex.target_positions].float(), -1)
        return float(logp[torch.arange(len(ex.target_ids)), ex.target_ids].sum())
    return score(ex.inputs["pixel_values"]) - score(pixels)


def _image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def test_map_covers_the_grid_and_batching_does_not_change_it(tiny):
    model, processor, family = tiny
    ex = prepare_example(model, processor, family, _image(), "where is the lesion?", "left lung")
    one_by_one = occlusion(model, family, ex, batch_size=1)
    batched = occlusion(model, family, ex, batch_size=7)  # chunks that do not divide the grid
    assert one_by_one.shape == ex.span.grid == (8, 8)
    assert np.allclose(one_by_one, batched, atol=1e-4)
    assert np.abs(one_by_one).max() > 0


def test_a_cell_equals_the_drop_computed_by_hand(tiny):
    model, processor, family = tiny
    ex = prepare_example(model, processor, family, _image(1), "where is the lesion?", "left lung")
    grid = occlusion(model, family, ex)
    assert grid[2, 5] == pytest.approx(_hand_drop(model, processor, family, ex, slice(2, 3), slice(5, 6)), abs=1e-4)


def test_large_grids_hide_blocks_of_cells(tiny):
    model, processor, family = tiny
    ex = prepare_example(model, processor, family, _image(2), "where is the lesion?", "left lung")
    coarse = occlusion(model, family, ex, max_side=4)  # 8x8 grid -> 2x2 blocks, 16 forwards
    assert coarse.shape == (8, 8)
    blocks = coarse.reshape(4, 2, 4, 2)
    assert np.allclose(blocks, blocks[:, :1, :, :1])  # each block's cells share its drop
    block = _hand_drop(model, processor, family, ex, slice(4, 6), slice(2, 4))  # block (2, 1): cells 4-5 x 2-3
    assert coarse[4, 2] == pytest.approx(block, abs=1e-4)


def test_a_uniform_image_has_nothing_to_hide(tiny):
    model, processor, family = tiny
    ex = prepare_example(model, processor, family, np.full((64, 64, 3), 90, np.uint8), "where?")
    assert np.allclose(occlusion(model, family, ex), 0.0, atol=1e-5)


def test_bad_input(tiny):
    model, processor, family = tiny
    ex = prepare_example(model, processor, family, _image(), "where?")
    with pytest.raises(ValueError, match="batch_size"):
        occlusion(model, family, ex, batch_size=0)
    no_pixels = type(ex)(**{**ex.__dict__, "inputs": {k: v for k, v in ex.inputs.items() if k != "pixel_values"}})
    with pytest.raises(KeyError, match="pixel_values"):
        occlusion(model, family, no_pixels)


def test_a_lesion_drawn_in_one_cell_lands_on_that_cell_of_the_map(tiny):
    """A bright square filling the token cell at (5/8, 2/8) of the family grid of a dark image: the map has the grid's shape, hiding
    that cell is exactly hiding the lesion's pixels, and it is the cell whose hiding changes the answer most
    (every other cell is already close to the image mean)."""
    model, processor, family = tiny
    blank = prepare_example(model, processor, family, np.zeros((64, 64, 3), np.uint8), "where is the lesion?",
                            "left lung")
    rows, cols = blank.span.grid  # the family's token grid of a 64-pixel image
    r, c = rows * 5 // 8, cols * 2 // 8
    ch, cw = 64 // rows, 64 // cols
    img = np.zeros((64, 64, 3), np.uint8)
    img[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] = 255
    ex = prepare_example(model, processor, family, img, "where is the lesion?", "left lung")
    grid = occlusion(model, family, ex)
    assert grid.shape == ex.span.grid == (rows, cols)
    assert np.unravel_index(np.abs(grid).argmax(), grid.shape) == (r, c)
    assert grid[r, c] == pytest.approx(_hand_drop(model, processor, family, ex, slice(r, r + 1), slice(c, c + 1)),
                                       abs=1e-4)


def test_the_batch_is_what_fits_the_memory_budget(tiny):
    """Each occluded copy holds one forward pass of the example: the batch is the budget over one
    copy's bytes, at least one, at most MAX_COPIES and the number of forwards; the map is the same."""
    model, processor, family = tiny
    ex = prepare_example(model, processor, family, _image(3), "where is the lesion?", "left lung")
    shape = Shape.of(model, family, ex)
    copy = shape.forward_bytes(batch=1)
    assert shape.forward_bytes(batch=5) == pytest.approx(5 * copy)  # linear in the batch
    n = n_forwards(shape.grid)
    assert n == 64 and n_forwards(shape.grid, max_side=2) == 4
    assert copies_per_forward(shape, int(3.5 * copy), n) == 3
    assert copies_per_forward(shape, int(0.5 * copy), n) == 1  # nothing fits: one copy at a time
    assert copies_per_forward(shape, 10**15, n) == MAX_COPIES
    assert copies_per_forward(shape, 10**15, 4) == 4  # never more copies than forwards
    record = BatchRecord(requested="auto")
    sized = occlusion(model, family, ex, budget_bytes=int(3.5 * copy), record=record)
    assert (record.start, record.used, record.halvings) == (3, 3, [])
    assert record.estimate["copy_mb"] == pytest.approx(copy / 2**20, abs=0.05)
    assert np.allclose(sized, occlusion(model, family, ex, batch_size=1), atol=1e-4)
    # the method's memory declaration is the batch it plans at that budget
    method = get_method("occlusion")
    assert method.memory(shape, budget_bytes=int(3.5 * copy)) == pytest.approx(3 * copy)
    result = method.run(Context(model, processor, family, ex))
    assert result.row["occlusion_batch"] == MAX_COPIES and result.row["occlusion_oom_halvings"] == []


def test_a_refused_allocation_halves_the_batch_and_the_map_stays_the_same(tiny, monkeypatch):
    model, processor, family = tiny
    ex = prepare_example(model, processor, family, _image(4), "where is the lesion?", "left lung")
    expected = occlusion(model, family, ex, batch_size=1)
    sizes = refuse_batches_above(monkeypatch, type(model), "forward", 5)
    record = BatchRecord(requested=12)
    drops = occlusion(model, family, ex, batch_size=12, record=record)
    assert np.allclose(drops, expected, atol=1e-4)
    assert (record.start, record.used, record.halvings) == (12, 3, [12, 6])
    # the unoccluded pass, two refused batches, then 64 cells in batches of three
    assert sizes == [1, 12, 6] + [3] * 21 + [1]

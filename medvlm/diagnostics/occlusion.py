"""Occlusion saliency: how much the answer's log-probability drops when one image cell is hidden.

Zeiler & Fergus 2014 ("Visualizing and understanding convolutional networks", section 4.2) slide
a grey square over the input and record the drop in the class score. Here the square is one cell
of the model's own image-token grid (read from the sequence, as everywhere in this package), the
fill is the image's per-channel mean in the processor's normalised space, and the score is
log p(answer tokens | image, question) summed over the answer positions (or the predicted token
when there is no answer)::

    map[r, c] = score(image) - score(image with cell (r, c) replaced by its mean)

Positive cells support the answer. It needs no attention weights and no gradients, and it is
faithful by construction (it measures the model's output, not an internal proxy), which makes it
the reference the other maps are compared with. Its price is one forward pass per cell:
``batch_size`` cells share one batched forward.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medvlm.diagnostics.capture import Example, _check_pixels, check_length
from medvlm.models.base import ModelFamily


def _answer_score(logits: torch.Tensor, positions: Sequence[int], targets: Sequence[int]) -> torch.Tensor:
    """Summed log-probability of ``targets`` at ``positions`` for each batch row: [B]."""
    logp = torch.log_softmax(logits[:, list(positions)].float(), dim=-1)  # [B, P, V]
    index = torch.tensor(list(targets), device=logp.device)[None, :, None].expand(logp.shape[0], -1, 1)
    return logp.gather(-1, index)[..., 0].sum(-1)


@torch.no_grad()
def occlusion(model: torch.nn.Module, family: ModelFamily, example: Example, *,
              target_ids: Sequence[int] | None = None, positions: Sequence[int] | None = None,
              batch_size: int = 16) -> np.ndarray:
    """Occlusion map (rows, cols) of ``example`` (see the module docstring).

    ``target_ids`` / ``positions`` default to the example's answer tokens and the positions that
    predict them, else the model's predicted token at the last position. ``batch_size`` occluded
    images go through the model at a time (1 = one forward per cell).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}; expected at least 1")
    inputs = example.inputs
    if "pixel_values" not in inputs:
        raise KeyError(f"occlusion needs 'pixel_values' in the inputs; found {sorted(inputs)}")
    check_length(model, int(inputs["input_ids"].shape[-1]))
    _check_pixels(model, inputs)
    rows, cols = (example.span or family.image_span(model, inputs["input_ids"][0])).grid
    positions = list(positions) if positions is not None else example.target_positions
    was_training = model.training
    model.eval()
    try:
        base_logits = model(**inputs, use_cache=False).logits
        if target_ids is None:
            target_ids = example.target_ids or base_logits[0, positions].argmax(-1).tolist()
        base = float(_answer_score(base_logits, positions, target_ids)[0])
        px = inputs["pixel_values"]
        ph, pw = px.shape[-2] // rows, px.shape[-1] // cols
        fill = px.mean(dim=(-2, -1), keepdim=True)  # [1, C, 1, 1]
        cells = [(r, c) for r in range(rows) for c in range(cols)]
        drops = np.zeros(rows * cols)
        for start in range(0, len(cells), batch_size):
            chunk = cells[start:start + batch_size]
            occluded = px.repeat(len(chunk), 1, 1, 1)
            for i, (r, c) in enumerate(chunk):
                occluded[i, :, r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = fill[0]
            batch = {k: (occluded if k == "pixel_values" else v.expand(len(chunk), *v.shape[1:]))
                     for k, v in inputs.items()}
            scores = _answer_score(model(**batch, use_cache=False).logits, positions, target_ids)
            drops[start:start + len(chunk)] = base - scores.double().cpu().numpy()
    finally:
        model.train(was_training)
    return drops.reshape(rows, cols)

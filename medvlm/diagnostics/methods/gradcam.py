"""Grad-CAM on the vision tower (Selvaraju et al. 2017, "Grad-CAM: visual explanations from deep
networks via gradient-based localization").

The activations A [patches, channels] are the output of the vision layer the projector reads,
named by the family (:meth:`~medvlm.models.base.ModelFamily.gradcam_layer`: PaliGemma's last
SigLIP layer, LLaVA-1.5's penultimate CLIP layer, ``vision_feature_layer: -2``), mapped onto the
image's token grid by the family (:meth:`~medvlm.models.base.ModelFamily.gradcam_map`). The score is the summed
log-probability of the target tokens at their positions (the answer tokens when the example holds
an answer, else the model's own prediction at the last position; the caller may pass token ids).
Channel weights α_c = mean over patches of ∂score/∂A_pc; map = ReLU(Σ_c α_c A_pc) on the grid.

A map that ReLU zeroes entirely (no patch raises the score) is returned as
zeros; score it with care (``attention_quality`` rejects all-zero maps).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from medvlm.diagnostics.capture import Example, _first, check_length
from medvlm.diagnostics.methods.base import Context, Method, MethodResult, Shape, register
from medvlm.models.base import ModelFamily


def target_logprob(logits: torch.Tensor, positions: Sequence[int], target_ids: Sequence[int] | None
                   ) -> tuple[torch.Tensor, list[int]]:
    """Summed log p(target | prefix) over positions (batch item 0); None targets = argmax there."""
    logp = torch.log_softmax(logits[0, list(positions)].float(), dim=-1)  # [P, V]
    ids = list(target_ids) if target_ids else logp.argmax(-1).tolist()
    if len(ids) != len(positions):
        raise ValueError(f"{len(ids)} target ids for {len(positions)} positions; pass one id per position")
    return logp[torch.arange(len(ids)), torch.tensor(ids)].sum(), ids


def gradcam(model: torch.nn.Module, family: ModelFamily, example: Example,
            target_ids: Sequence[int] | None = None, positions: Sequence[int] | None = None) -> np.ndarray:
    """Grad-CAM map (rows, cols) for ``example`` (see module docstring).

    ``target_ids`` / ``positions`` default to the example's answer tokens and their predicting
    positions (or the predicted token at the last position when there is no answer). With
    ``positions`` and no ``target_ids``, the targets are the model's predictions there.
    """
    targets = target_ids if target_ids is not None or positions is not None else (example.target_ids or None)
    positions = list(positions) if positions is not None else example.target_positions
    seq_len = int(example.inputs["input_ids"].shape[-1])
    check_length(model, family, seq_len)
    if "pixel_values" not in example.inputs:
        raise KeyError(f"Grad-CAM needs 'pixel_values' in the inputs; found {sorted(example.inputs)}")
    family.check_pixels(model, example.inputs)
    span = family.image_spans(model, example.inputs)[0]
    acts: list[torch.Tensor] = []

    def keep(module, args, output):
        acts.append(_first(output))

    handle = family.gradcam_layer(model).register_forward_hook(keep)
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            # pixels that take grads keep A in the graph even when the tower is frozen (LoRA on the LM)
            inputs = {**example.inputs, "pixel_values": example.inputs["pixel_values"].detach().clone()
                      .to(next(model.parameters()).dtype).requires_grad_(True)}
            # logits at the scored positions only: the unembedding of every position (and its
            # gradient) is the largest tensor of the pass at a large vocabulary
            keep = sorted({p % seq_len for p in positions})
            out = model(**inputs, use_cache=False, logits_to_keep=torch.tensor(keep, dtype=torch.long))
            score, _ = target_logprob(out.logits, [keep.index(p % seq_len) for p in positions], targets)
            (grads,) = torch.autograd.grad(score, acts[-1])
    finally:
        handle.remove()
        model.train(was_training)
    act = acts[-1].detach()
    order = family.gradcam_order(model, example.inputs)
    if order is not None:  # a tower that reorders its patches (window attention): the processor's order
        order = order.to(act.device)
        act, grads = act.index_select(-2, order), grads.index_select(-2, order)
    cam = family.gradcam_map(act, grads, span, example.inputs)
    return cam.double().cpu().numpy()


@register
class GradCAM(Method):
    name = "gradcam"
    title = "Grad-CAM"
    order = 30

    def cost(self, shape: Shape) -> float:
        return 3.0 * shape.forward_flops()  # forward and backward, logits at the scored position

    def memory(self, shape: Shape) -> float:
        return shape.backward_bytes()  # every layer kept for the backward, logits at the scored position

    def run(self, ctx: Context) -> MethodResult:
        return MethodResult(gradcam(ctx.model, ctx.family, ctx.example))

"""The family seam the neuron diagnostics read, for every registered family: the MLP units are the input of
``mlp_down`` (d_mlp wide, mapped back by its weight to the residual stream) and the final norm is a gain
γ times x / rms(x)."""

from __future__ import annotations

import pytest
import torch

from medvlm.models.base import TinySizes, text_config
from medvlm.models.families import FAMILIES, get_family
from medvlm.models.tiny import build_tiny, tiny_tokenizer


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request):
    tok = tiny_tokenizer(request.param, ["where is the lesion in the left lung"] * 4, 300)
    model, _ = build_tiny(request.param, TinySizes(vision_layers=1, text_layers=2, patch_size=8), tok)
    return model.eval(), get_family(request.param)


def test_mlp_down_takes_the_units_and_writes_the_residual_stream(tiny):
    model, family = tiny
    tc = text_config(model)
    for layer in family.decoder_layers(model):
        down = family.mlp_down(layer)
        assert tuple(down.weight.shape) == (tc.hidden_size, tc.intermediate_size)
        seen: list[torch.Size] = []
        handle = down.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0].shape))
        try:
            layer.mlp(torch.randn(1, 3, tc.hidden_size))
        finally:
            handle.remove()
        assert seen == [torch.Size([1, 3, tc.intermediate_size])]


def test_final_norm_is_its_gain_times_x_over_rms(tiny):
    model, family = tiny
    norm = family.final_norm(model)
    with torch.no_grad():  # a gain that is not all ones, so the check can tell gains apart
        next(norm.parameters()).copy_(torch.linspace(-0.5, 0.5, next(norm.parameters()).numel()))
    gain = family.final_norm_gain(model)
    x = torch.randn(5, gain.numel()) * 3
    eps = float(getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6))
    want = gain * x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    with torch.no_grad():
        torch.testing.assert_close(norm(x).float(), want, atol=1e-5, rtol=1e-5)

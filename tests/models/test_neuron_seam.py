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


def test_mlp_output_gain_is_what_the_layer_applies_to_its_mlp_output(tiny):
    """Whatever a decoder layer does to its MLP output m before the residual add is gain ⊙ m times a
    positive factor per position (the factor 1 when the family says None): replace m by v, and the
    layer's output moves by that from its output with m = 0."""
    model, family = tiny
    tc = text_config(model)
    ids = torch.tensor([[2, 5, 6, 7, 8]])
    v = torch.randn(1, ids.shape[1], tc.hidden_size, generator=torch.Generator().manual_seed(0))
    for i, layer in enumerate(family.decoder_layers(model)):
        post = getattr(layer, "post_feedforward_layernorm", None)
        if post is not None:  # a trained-looking gain, so that 1 + w and w differ
            with torch.no_grad():
                post.weight.copy_(torch.linspace(-0.5, 1.5, post.weight.numel()))
        outs = []
        for m in (torch.zeros_like(v), v):
            seen = []
            hooks = [family.mlp_down(layer).register_forward_hook(lambda mod, args, out, m=m: m),
                     layer.register_forward_hook(lambda mod, args, out, seen=seen: seen.append(
                         out[0] if isinstance(out, tuple) else out))]
            try:
                with torch.no_grad():
                    model(input_ids=ids, use_cache=False)
            finally:
                for h in hooks:
                    h.remove()
            outs.append(seen[0])
        gain = family.mlp_output_gain(model, i)
        ratio = (outs[1] - outs[0]) / ((1.0 if gain is None else gain) * v)  # one positive factor per position
        assert (ratio > 0).all()
        torch.testing.assert_close(ratio, ratio[..., :1].expand_as(ratio), atol=1e-4, rtol=1e-3)
        if gain is None:
            torch.testing.assert_close(ratio, torch.ones_like(ratio), atol=1e-5, rtol=1e-5)

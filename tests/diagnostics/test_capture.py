"""The one capture pass: rows equal output_attentions, only requested tensors kept, hooks always removed,
clear errors on bad input. Both families, tiny random models with eager attention."""

from __future__ import annotations

import doctest

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, eager_tiny

import medvlm.diagnostics.capture as capture_module
from medvlm.diagnostics.capture import AttentionNotEagerError, capture, prepare_example


@pytest.fixture(scope="session")
def tiny():
    return {fam: eager_tiny(fam) for fam in FAMILIES}


def image(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (64, 64, 3), dtype=np.uint8)


def example(tiny, fam, answer="left lung"):
    model, processor, family = tiny[fam]
    return model, processor, family, prepare_example(model, processor, family, image(), "where is the lesion?", answer)


def all_hooks(model: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.mark.parametrize("fam", FAMILIES)
def test_attention_rows_equal_output_attentions(tiny, fam):
    model, _, family, ex = example(tiny, fam)
    rows = ex.target_positions
    _, cache = capture(model, family, ex.inputs, layers=[-1], heads=[1, 3], query_positions=rows)
    with torch.no_grad():
        ref = model(**ex.inputs, output_attentions=True).attentions
    got = cache["attn", -1]
    assert got.shape == (1, 2, len(rows), ex.inputs["input_ids"].shape[1])
    torch.testing.assert_close(got, ref[-1][:, [1, 3]][:, :, rows])


@pytest.mark.parametrize("fam", FAMILIES)
def test_only_requested_layers_and_kinds_are_stored(tiny, fam):
    model, _, family, ex = example(tiny, fam)
    _, cache = capture(model, family, ex.inputs, layers=[0], query_positions="last", hidden_states=True)
    assert cache.names == ["blocks.0.attn", "blocks.0.resid_post"]
    assert cache.layers("attn") == [0]
    with pytest.raises(KeyError, match="not captured"):
        cache["attn", 1]
    _, cache = capture(model, family, ex.inputs, hidden_states=True, values=True,
                       names_filter=lambda name: name.endswith("resid_post"))
    assert cache.names == ["blocks.0.resid_post", "blocks.1.resid_post"]
    assert cache["resid_post", -1] is cache["blocks.1.resid_post"]
    assert not cache["resid_post", 0].requires_grad


@pytest.mark.parametrize("fam", FAMILIES)
def test_cache_span_and_grid_come_from_the_sequence(tiny, fam):
    model, _, family, ex = example(tiny, fam)
    _, cache = capture(model, family, ex.inputs, layers=[0], query_positions="image")
    ids = ex.inputs["input_ids"][0]
    image_id = family.image_token_id(model)
    assert cache.grid == (8, 8)
    assert (ids[cache.image_span.start:cache.image_span.end] == image_id).all()
    assert cache.query_positions == list(range(cache.image_span.start, cache.image_span.end))


@pytest.mark.parametrize("fam", FAMILIES)
def test_hidden_states_values_and_head_outputs_are_consistent(tiny, fam):
    model, _, family, ex = example(tiny, fam)
    q = ex.target_positions
    out, cache = capture(model, family, ex.inputs, query_positions=q, hidden_states=True, resid_pre=True,
                         head_outputs=True, values=True)
    # the last residual through the final norm and unembedding gives the model's logits
    logits = family.unembed(model)(family.final_norm(model)(cache["resid_post", -1]))
    torch.testing.assert_close(logits, out.logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(cache["resid_pre", 1], cache["resid_post", 0])
    # each head's output is its attention row times the value vectors
    for layer in (0, 1):
        mixed = torch.einsum("hqs,shd->qhd", cache["attn", layer][0], cache["v", layer][0])
        torch.testing.assert_close(cache["head_out", layer][0], mixed, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("fam", FAMILIES)
def test_hooks_removed_after_an_exception_inside_the_pass(tiny, fam):
    model, _, family, ex = example(tiny, fam)
    before = all_hooks(model)

    def boom(module, args, output):
        raise RuntimeError("boom inside the pass")

    handle = family.final_norm(model).register_forward_hook(boom)
    try:
        with pytest.raises(RuntimeError, match="boom"):
            capture(model, family, ex.inputs, hidden_states=True, head_outputs=True, values=True,
                    resid_pre=True, attention_mean=True)
    finally:
        handle.remove()
    assert all_hooks(model) == before


def test_model_mode_is_restored(tiny):
    model, _, family, ex = example(tiny, "llava")
    model.train()
    try:
        capture(model, family, ex.inputs, layers=[0])
        assert model.training
    finally:
        model.eval()


@pytest.mark.parametrize("fam", FAMILIES)
def test_sdpa_model_gives_a_clear_error(tiny, fam):
    model, _, family, ex = example(tiny, fam)
    model.set_attn_implementation("sdpa")
    try:
        with pytest.raises(AttentionNotEagerError, match="attn_implementation='eager'"):
            capture(model, family, ex.inputs)
    finally:
        model.set_attn_implementation("eager")
    # the hook checks at run time too: an attention module that drops its weights (as sdpa does)
    attn = family.decoder_layers(model)[0].self_attn
    handle = attn.register_forward_hook(lambda m, a, out: (out[0], None))
    try:
        with pytest.raises(AttentionNotEagerError, match="layer 0 returned no attention weights"):
            capture(model, family, ex.inputs)
    finally:
        handle.remove()


@pytest.mark.parametrize("fam", FAMILIES)
def test_every_attention_method_refuses_sdpa_with_the_fix_and_hidden_state_methods_still_run(tiny, fam):
    from medvlm.diagnostics.methods.gradcam import gradcam
    from medvlm.diagnostics.methods.logit_lens import logit_lens
    from medvlm.diagnostics.methods.logprob import logprob_increase
    from medvlm.diagnostics.saliency import attention_rollout, raw_attention

    model, processor, family, ex = example(tiny, fam)
    model.set_attn_implementation("sdpa")
    try:
        for method in (raw_attention, attention_rollout, logprob_increase):
            with pytest.raises(AttentionNotEagerError, match="attn_implementation='eager'"):
                method(model, family, ex)
        assert logit_lens(model, family, ex, processor.tokenizer).top_ids.shape[1] == 64  # needs no weights
        assert gradcam(model, family, ex).shape == (8, 8)
    finally:
        model.set_attn_implementation("eager")


@pytest.mark.parametrize("fam", FAMILIES)
def test_sequence_without_image_tokens_is_rejected(tiny, fam):
    model, processor, family = tiny[fam]
    ids = processor.tokenizer("where is the lesion?", return_tensors="pt")
    with pytest.raises(ValueError, match="no image tokens"):
        capture(model, family, {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]})


@pytest.mark.parametrize("fam", FAMILIES)
def test_wrong_pixel_shape_is_rejected(tiny, fam):
    model, _, family, ex = example(tiny, fam)
    bad = {**ex.inputs, "pixel_values": torch.zeros(1, 3, 32, 32)}
    with pytest.raises(ValueError, match=r"pixel_values has shape \(1, 3, 32, 32\); expected \[") as err:
        capture(model, family, bad)
    assert ", ".join(map(str, ex.inputs["pixel_values"].shape[1:])) in str(err.value)  # the right shape is named


@pytest.mark.parametrize("fam", FAMILIES)
def test_sequence_over_the_maximum_length_names_both_lengths(tiny, fam, monkeypatch):
    model, processor, family = tiny[fam]
    limit = prepare_example(model, processor, family, image(), "where?").inputs["input_ids"].shape[1]
    monkeypatch.setattr(model.config.get_text_config(), "max_position_embeddings", limit)
    with pytest.raises(ValueError, match=rf"has \d+ tokens but .* maximum length .* is {limit}"):
        prepare_example(model, processor, family, image(), "where is the lesion? " * 20)
    ex = prepare_example(model, processor, family, image(), "where?")  # short enough
    assert ex.inputs["input_ids"].shape[1] <= limit


def test_capture_tutorial_docstring_runs():
    result = doctest.testmod(capture_module, optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0

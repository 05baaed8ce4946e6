"""Log-probability increase: per-head contributions add up to the attention output, each delta equals a
direct recomputation (the final norm's RMS held at the last layer's output, or recomputed per vector),
base log-prob equals the model's, both head scores rank heads in order. Both families."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, eager_tiny

from medvlm.diagnostics.capture import capture, prepare_example
from medvlm.diagnostics.methods.logprob import head_contributions, logprob_increase


@pytest.fixture(scope="session")
def setup():
    out = {}
    rng = np.random.default_rng(1)
    for fam in FAMILIES:
        model, processor, family = eager_tiny(fam)
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        question = prepare_example(model, processor, family, img, "where is the lesion?")
        answered = prepare_example(model, processor, family, img, "where is the lesion?", "left lung")
        out[fam] = (model, family, processor.tokenizer, question, answered)
    return out


@pytest.mark.parametrize("fam", FAMILIES)
def test_head_contributions_sum_to_the_attention_output(setup, fam):
    model, family, _, ex, _ = setup[fam]
    q = ex.target_positions[0]
    seq = list(range(ex.inputs["input_ids"].shape[1]))
    _, cache = capture(model, family, ex.inputs, query_positions=[q], values=True, head_outputs=True)
    for layer in range(2):
        c = head_contributions(model, family, cache, layer, q, seq)  # [H, S, D]
        o_proj = family.attention_module(family.decoder_layers(model)[layer]).o_proj
        out = torch.nn.functional.linear(cache["head_out", layer][0, 0].flatten(), o_proj.weight)
        want = family.attention_residual(model, layer, out, out)  # what the layer adds to the residual
        torch.testing.assert_close(c.sum((0, 1)), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("norm", ["frozen", "recompute"])
@pytest.mark.parametrize("fam", FAMILIES)
def test_delta_equals_a_direct_recomputation(setup, fam, norm):
    """delta(l, h, j) = log p(w | h_{l-1} + c) - log p(w | h_{l-1}) with h_{l-1} the residual ENTERING layer
    l (Yu & Ananiadou), read independently from ``output_hidden_states`` (hidden_states[l] is layer l's input).
    "frozen": the final norm divides by the RMS of the last layer's output at q (the authors' get_bsvalues:
    x * rsqrt(mean(final^2) + eps) * gain, written out here); "recompute": the norm module on each vector."""
    model, family, tok, ex, _ = setup[fam]
    res = logprob_increase(model, family, ex, tok, chunk=7, norm=norm)  # a chunk that does not divide the count
    q = ex.target_positions[0]
    assert q == ex.inputs["input_ids"].shape[1] - 1
    with torch.no_grad():
        out = model(**ex.inputs, output_hidden_states=True)
    logits = out.logits[0, q]
    assert res.target_id == int(logits.argmax())  # no answer: the predicted token
    assert res.base_logprob == pytest.approx(float(torch.log_softmax(logits, -1)[res.target_id]), abs=1e-4)
    assert res.delta.shape == (2, 4, 64) and res.positions == res.image_positions

    _, cache = capture(model, family, ex.inputs, query_positions=[q], values=True, hidden_states=True)
    final = cache["resid_post", -1][0, q]  # the last layer's output, before the final norm
    module = family.final_norm(model)
    eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", None)))  # 1e-6; Qwen2.5-VL's tiny: 1e-5
    with torch.no_grad():  # the norm's gain vector (Llama's w, Gemma's 1 + w): norm(ones) = gain / sqrt(1 + eps)
        gain = module(torch.ones_like(final)) * (1 + eps) ** 0.5

    def logp(resid):
        with torch.no_grad():
            if norm == "frozen":
                normed = resid * torch.rsqrt(final.pow(2).mean() + eps) * gain
            else:
                normed = module(resid)
            z = family.unembed(model)(normed)
        return float(torch.log_softmax(z, -1)[res.target_id])

    for layer in (0, 1):
        assert res.layer_base_logprob[layer] == pytest.approx(logp(out.hidden_states[layer][0, q]), abs=1e-5)
    for layer, head, j in [(0, 0, 0), (1, 3, 17), (1, 1, 63)]:
        x = out.hidden_states[layer][0, q]
        c = head_contributions(model, family, cache, layer, q, [res.image_positions[j]])[head, 0]
        assert res.delta[layer, head, j] == pytest.approx(logp(x + c) - logp(x), abs=1e-5)


def test_a_confident_prediction_still_gets_head_attributions(setup):
    """Measured against the final residual (where p(w) is near 1) every delta would be near 0; against each
    layer's input a head that carries w's direction raises log p(w) by a visible amount."""
    model, family, tok, ex, _ = setup["llava"]
    res = logprob_increase(model, family, ex, tok)
    o_proj = family.decoder_layers(model)[1].self_attn.o_proj
    _, cache = capture(model, family, ex.inputs, layers=[1], query_positions=[res.query_position], attention=False,
                       head_outputs=True)
    u = cache["head_out", 1][0, 0, 0]  # head 0's output at q: make it write 30 * unit(w) into the residual
    lm_head = family.unembed(model)
    w = lm_head.weight[res.target_id]
    saved = o_proj.weight.detach().clone(), lm_head.weight.detach().clone()
    try:
        with torch.no_grad():
            o_proj.weight[:, :u.shape[0]] += 30.0 * torch.outer(w / w.norm(), u / u.dot(u))
            lm_head.weight[res.target_id] *= 10.0  # random tiny logits are flat; give w a confident logit
        strong = logprob_increase(model, family, ex, tok, target_id=res.target_id)
    finally:
        with torch.no_grad():
            o_proj.weight.copy_(saved[0])
            lm_head.weight.copy_(saved[1])
    assert np.exp(strong.base_logprob) > 0.99  # the model is now confident: the final residual is saturated
    for scores, top in ((strong.head_scores, strong.top_heads), (strong.image_head_scores, strong.image_top_heads)):
        assert scores[1, 0] > 1.0 and top(1)[0][:2] == (1, 0)
    assert strong.head_scores[1, 0] > 10 * abs(res.head_scores[1, 0])


@pytest.mark.parametrize("fam", FAMILIES)
def test_contributions_include_an_unmerged_lora_adapter(setup, fam):
    """With LoRA on o_proj (unmerged, as during training), the per-head pieces still add up to what o_proj
    outputs (through what the layer adds to the residual): the adapter's B @ A is part of W_O."""
    from peft import LoraConfig, get_peft_model

    model, family, _, ex, _ = setup[fam]
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["o_proj"], init_lora_weights=False))
    try:
        q = ex.target_positions[0]
        seq = list(range(ex.inputs["input_ids"].shape[1]))
        _, cache = capture(peft_model, family, ex.inputs, query_positions=[q], values=True, head_outputs=True)
        o_proj = family.decoder_layers(peft_model)[1].self_attn.o_proj
        c = head_contributions(peft_model, family, cache, 1, q, seq)
        with torch.no_grad():
            out = o_proj(cache["head_out", 1][0, 0].flatten()[None])[0]
            want = family.attention_residual(peft_model, 1, out, out)
            plain = torch.nn.functional.linear(cache["head_out", 1][0, 0].flatten(), o_proj.base_layer.weight)
            plain = family.attention_residual(peft_model, 1, plain, plain)
        torch.testing.assert_close(c.sum((0, 1)), want, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(want, plain, atol=1e-3)  # the adapter changes the output
    finally:
        peft_model.unload()


@pytest.mark.parametrize("fam", FAMILIES)
def test_maps_and_top_heads(setup, fam):
    model, family, tok, _, ex = setup[fam]
    res = logprob_increase(model, family, ex, tok)
    assert res.target_id == ex.target_ids[0] and res.query_position == ex.target_positions[0]
    summed, maxed = res.position_map("sum"), res.position_map("max")
    assert summed.shape == maxed.shape == (8, 8)
    np.testing.assert_allclose(summed.ravel(), res.delta.sum((0, 1)))
    np.testing.assert_allclose(maxed.ravel(), res.delta.max((0, 1)))
    image_top = res.image_top_heads()
    assert len(image_top) == 8  # 2 layers x 4 heads, fewer than 10
    scores = [s for _, _, s in image_top]
    assert scores == sorted(scores, reverse=True)
    layer, head, score = image_top[0]
    assert score == pytest.approx(res.delta[layer, head].sum())  # the image-only score: a sum of deltas
    assert res.image_top_heads(3) == image_top[:3]
    top = res.top_heads()
    assert [s for _, _, s in top] == sorted(res.head_scores.ravel().tolist(), reverse=True)
    assert res.top_heads(3) == top[:3]
    with pytest.raises(ValueError, match="reduce='mean'"):
        res.position_map("mean")


@pytest.mark.parametrize("fam", FAMILIES)
def test_layer_position_and_target_choices(setup, fam):
    model, family, tok, ex, _ = setup[fam]
    full = logprob_increase(model, family, ex, tok)
    one = logprob_increase(model, family, ex, tok, layers=[-1], positions=[0, 1, 2], target_id=5)
    assert one.layers == [1] and one.target_id == 5
    assert set(one.positions) >= {0, 1, 2} | set(one.image_positions)
    alls = logprob_increase(model, family, ex, tok, positions="all")
    assert len(alls.positions) == ex.inputs["input_ids"].shape[1]
    np.testing.assert_allclose(alls.position_map(), full.position_map(), atol=1e-6)
    with pytest.raises(ValueError, match="positions='text'"):
        logprob_increase(model, family, ex, tok, positions="text")


@pytest.mark.parametrize("fam", FAMILIES)
def test_scoring_layers_in_small_groups_gives_the_same_deltas(setup, fam):
    """The memory bound (one layer per readout for a 7B model) does not change the numbers."""
    model, family, _, question, _ = setup[fam]
    together = logprob_increase(model, family, question)
    one_by_one = logprob_increase(model, family, question, memory_mb=1e-6)  # a group of one layer each
    assert np.allclose(together.delta, one_by_one.delta, atol=1e-5)
    assert np.allclose(together.layer_base_logprob, one_by_one.layer_base_logprob, atol=1e-6)


@pytest.mark.parametrize("fam", FAMILIES)
def test_unembedded_chunks_are_not_kept_until_the_end(setup, fam, monkeypatch):
    """The log-prob readout and the logit lens keep, per chunk of unembedded vectors, only the numbers
    they read (a fresh tensor): a column view of a chunk's [chunk, vocab] logits or probabilities would
    keep the whole chunk alive until the final concatenation (at PaliGemma-3B's 257k vocabulary that
    held every chunk at once: 15 GB for one example)."""
    from medvlm.diagnostics.methods.logit_lens import lens_from_cache
    from medvlm.diagnostics.methods.logprob import target_logprobs

    model, family, tok, ex, _ = setup[fam]
    views: list[tuple[int, ...]] = []
    real_cat = torch.cat

    def cat(tensors, *args, **kwargs):
        views.extend(tuple(t._base.shape) for t in tensors if t._base is not None)
        return real_cat(tensors, *args, **kwargs)

    _, cache = capture(model, family, ex.inputs, attention=False, hidden_states=True)
    vectors = cache["resid_post", 0][0]
    with monkeypatch.context() as patch:
        patch.setattr(torch, "cat", cat)
        scores = target_logprobs(model, family, vectors, 3, None, chunk=5)
        lens, grid = lens_from_cache(model, family, cache, tok, target_id=3, chunk=5)
    assert not views, f"{fam}: concatenated views of tensors of shapes {views[:3]}"
    want = torch.log_softmax(family.lens_logits(model, vectors), -1)[:, 3]
    torch.testing.assert_close(scores, want, atol=1e-5, rtol=1e-5)
    assert grid.shape == cache.grid and lens.top_ids.shape[:2] == (len(cache.layers("resid_post")), len(lens.positions))

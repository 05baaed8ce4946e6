"""The paper's head importance (Yu & Ananiadou 2024, eq. 6), the reading of a head, and the comparison of
head rankings across variants: identities against independent recomputations, constructed cases with
known answers, synthetic score matrices, and an end-to-end run on tiny models."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, eager_tiny

from medvlm.diagnostics.capture import capture, prepare_example
from medvlm.diagnostics.head_compare import (
    compare_heads,
    compare_pair,
    compare_scores,
    paired_change,
    rank_correlation,
    topk_overlap,
    variant_pairs,
)
from medvlm.diagnostics.heads import answer_rank, head_importance, reciprocal_rank
from medvlm.diagnostics.methods.logprob import head_outputs, layer_contributions, logprob_increase


@pytest.fixture(scope="module")
def setup():
    out = {}
    rng = np.random.default_rng(3)
    for fam in FAMILIES:
        model, processor, family = eager_tiny(fam)
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        out[fam] = (model, processor, family, prepare_example(model, processor, family, img, "where is the lesion?"))
    return out


# -- the score -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fam", FAMILIES)
def test_a_heads_whole_output_is_its_pieces_summed_over_all_positions(setup, fam):
    """o_lh from the head's input to o_proj at q equals Σ_j a·v·W_O over every source position (within 2e-6)."""
    model, _, family, ex = setup[fam]
    q, seq = ex.target_positions[0], list(range(ex.inputs["input_ids"].shape[1]))
    _, cache = capture(model, family, ex.inputs, query_positions=[q], values=True, head_outputs=True)
    whole = head_outputs(model, family, cache, [0, 1], q)  # [L, H, D]
    pieces = layer_contributions(model, family, cache, [0, 1], q, seq).sum(2)
    assert whole.abs().max() > 1e-3  # not trivially zero
    torch.testing.assert_close(whole, pieces, atol=2e-6, rtol=0)


@pytest.mark.parametrize("fam", FAMILIES)
def test_importance_equals_a_direct_recomputation(setup, fam):
    """importance(l, h) = log p(w | h_{l-1} + o_lh) - log p(w | h_{l-1}), with o_lh computed by running
    o_proj on the head's slice alone (other heads zeroed; for Gemma scaled by the post-attention norm's
    factor at the whole output) and the final norm's RMS held at the last layer's output, written out here."""
    model, processor, family, ex = setup[fam]
    res = head_importance(model, family, ex, processor.tokenizer, read=0)
    q = ex.target_positions[0]
    with torch.no_grad():
        out = model(**ex.inputs, output_hidden_states=True)
    _, cache = capture(model, family, ex.inputs, query_positions=[q], head_outputs=True, hidden_states=True)
    final = cache["resid_post", -1][0, q]
    norm = family.final_norm(model)
    eps = float(getattr(norm, "variance_epsilon", getattr(norm, "eps", None)))  # 1e-6; Qwen2.5-VL's tiny: 1e-5
    gain = norm(torch.ones_like(final)) * (1 + eps) ** 0.5

    def logp(x):
        z = family.unembed(model)(x * torch.rsqrt(final.pow(2).mean() + eps) * gain)
        return float(torch.log_softmax(z, -1)[res.target_id])

    assert res.target_id == res.predicted_id == int(out.logits[0, q].argmax())  # no answer: the prediction
    n_heads, _, d = family.head_layout(model)
    for layer, head in [(0, 0), (1, 3), (1, 1)]:
        z = cache["head_out", layer][0, 0].clone()  # [H, d]
        mask = torch.zeros_like(z)
        mask[head] = 1
        with torch.no_grad():
            o_proj = family.decoder_layers(model)[layer].self_attn.o_proj
            # what the head adds to the residual: its o_proj share, through any norm the layer applies to
            # the whole attention output (Gemma's post_attention_layernorm; tests/diagnostics/test_logprob.py checks
            # that the shares of every head sum to what the layer adds)
            o = family.attention_residual(model, layer, o_proj((z * mask).flatten()[None])[0],
                                          o_proj(z.flatten()[None])[0])
            h = out.hidden_states[layer][0, q]
            assert res.scores[layer, head] == pytest.approx(logp(h + o) - logp(h), abs=1e-5)


@pytest.mark.parametrize("fam", FAMILIES)
def test_the_log_prob_method_carries_the_same_importance(setup, fam):
    model, processor, family, ex = setup[fam]
    lpi = logprob_increase(model, family, ex, processor.tokenizer)
    res = head_importance(model, family, ex, processor.tokenizer, read=0)
    np.testing.assert_allclose(lpi.head_scores, res.scores, atol=1e-6)
    a, b = lpi.top_heads(3), res.top_heads(3)
    assert [(layer, head) for layer, head, _ in a] == [(layer, head) for layer, head, _ in b]
    np.testing.assert_allclose([v for *_, v in a], [v for *_, v in b], atol=1e-6)
    assert not np.allclose(lpi.head_scores, lpi.image_head_scores)  # two different scores


@pytest.mark.parametrize("fam", FAMILIES)
def test_the_frozen_final_norm(setup, fam):
    """Held at a vector's own RMS it is the norm itself; held at any reference it is linear in the vector."""
    model, _, family, _ = setup[fam]
    gen = torch.Generator().manual_seed(0)
    width = family.dimensions(model)["d_model"]
    a, b, ref = (torch.randn(3, width, generator=gen) * s for s in (1.0, 3.0, 7.0))
    with torch.no_grad():
        torch.testing.assert_close(family.frozen_final_norm(model, a, a), family.final_norm(model)(a), atol=1e-6,
                                   rtol=1e-5)
        torch.testing.assert_close(family.frozen_final_norm(model, a + b, ref[0]),
                                   family.frozen_final_norm(model, a, ref[0]) + family.frozen_final_norm(model, b, ref[0]),
                                   atol=1e-5, rtol=1e-5)


def test_a_final_norm_that_is_not_an_rms_norm_is_refused(setup, monkeypatch):
    model, _, family, ex = setup["llava"]
    monkeypatch.setattr(type(family), "final_norm", lambda self, m: torch.nn.LayerNorm(64))
    with pytest.raises(NotImplementedError, match="LayerNorm is not an RMS norm.*override"):
        family.frozen_final_norm(model, torch.ones(64), torch.ones(64))


def test_bad_options_are_refused(setup):
    model, _, family, ex = setup["llava"]
    with pytest.raises(ValueError, match="norm='layer'"):
        head_importance(model, family, ex, norm="layer")
    with pytest.raises(ValueError, match="norm='layer'"):
        logprob_increase(model, family, ex, norm="layer")
    with pytest.raises(ValueError, match="read_positions=0"):
        head_importance(model, family, ex, read_positions=0)
    with pytest.raises(ValueError, match="head 9 out of range"):
        head_importance(model, family, ex, read=[(1, 9)])


# -- the reading ---------------------------------------------------------------------------------
def test_rank_and_reciprocal_rank_by_hand():
    logits = torch.tensor([[0.1, 3.0, 2.0, 3.0], [0.0, 1.0, 5.0, 1.0]])
    assert answer_rank(logits, 2).tolist() == [3, 1]  # two larger / none larger
    assert answer_rank(logits, 1).tolist() == [1, 2]  # a tie counts in the answer's favour
    torch.testing.assert_close(reciprocal_rank(logits, 2), torch.tensor([1 / 3, 1.0]))
    with pytest.raises(ValueError, match="target id 4 outside a vocabulary of 4"):
        answer_rank(logits, 4)


def test_a_head_built_to_write_the_answer_reads_as_the_answer():
    """Head 0 of layer 1 is made to write 30 · unit(W_U[w]) into the residual (its o_proj column block gets
    an outer product with its own output direction), w's unembedding row is scaled up: the head becomes the
    most important one, and its whole output and its most important position's weighted value-output
    vector both project to w first (reciprocal rank 1); the rank does not depend on the norm choice."""
    model, processor, family = eager_tiny("llava")
    ex = prepare_example(model, processor, family, np.full((64, 64, 3), 90, np.uint8), "where is the lesion?")
    q = ex.target_positions[0]
    before = head_importance(model, family, ex, processor.tokenizer, read=[(1, 0)])
    w = before.target_id
    _, cache = capture(model, family, ex.inputs, layers=[1], query_positions=[q], attention=False, head_outputs=True)
    u = cache["head_out", 1][0, 0, 0]
    o_proj, lm_head = family.decoder_layers(model)[1].self_attn.o_proj, family.unembed(model)
    with torch.no_grad():
        row = lm_head.weight[w]
        o_proj.weight[:, :u.shape[0]] += 30.0 * torch.outer(row / row.norm(), u / u.dot(u))
        lm_head.weight[w] *= 10.0
    after = head_importance(model, family, ex, processor.tokenizer, target_id=w, read=3, read_positions=4)
    recomputed = head_importance(model, family, ex, processor.tokenizer, target_id=w, read=3, read_positions=4,
                                 norm="recompute")
    assert after.top_heads(1)[0][:2] == (1, 0) and after.scores[1, 0] > 1.0
    reading = after.readings[0]
    assert (reading.layer, reading.head) == (1, 0) and len(reading.positions) == 4
    assert reading.output_rank == 1 and reading.reciprocal_rank == 1.0
    incs = [p.increase for p in reading.positions]
    assert incs == sorted(incs, reverse=True) and incs[0] > 0
    assert reading.positions[0].top_tokens[0] == processor.tokenizer.decode([w])
    assert before.readings[0].output_rank > 1  # the random head did not write w first before
    assert [p.rank for p in recomputed.readings[0].positions] == [p.rank for p in reading.positions]
    assert [(r.layer, r.head) for r in after.readings] == [(a, b) for a, b, _ in after.top_heads(3)]


# -- comparing rankings (synthetic scores) ---------------------------------------------------------
def test_topk_overlap_and_rank_correlation_on_known_scores():
    a = np.arange(12, dtype=float).reshape(3, 4)  # head 11 best, then 10, 9, ...
    b = a.copy()
    b.flat[[11, 0]] = b.flat[[0, 11]]  # the best and the worst head swap
    assert topk_overlap(a, a, 5) == {"k": 5, "n": 5, "share": 1.0, "chance": 25 / 12}
    assert topk_overlap(a, b, 5)["n"] == 4 and topk_overlap(a, b, 1)["n"] == 0
    assert topk_overlap(a, b, 20)["k"] == 12  # k capped at the number of heads
    assert rank_correlation(a, a)[0] == pytest.approx(1.0) and rank_correlation(a, -a)[0] == pytest.approx(-1.0)
    assert 0 < rank_correlation(a, b)[0] < 1
    assert np.isnan(rank_correlation(a, np.zeros_like(a))[0])
    with pytest.raises(ValueError, match="differ"):
        topk_overlap(a, np.zeros(5), 3)


def test_gained_and_lost_heads_with_paired_statistics():
    rng = np.random.default_rng(0)
    before = rng.normal(0, 0.1, (8, 3, 4))  # 8 examples, 3 layers x 4 heads
    after = before + rng.normal(0, 0.01, before.shape)
    after[:, 1, 2] += 1.0  # head 1.2 gains on every example
    after[:, 0, 0] -= 0.5  # head 0.0 loses on every example
    after[:4, 2, 3] += 0.4  # head 2.3 gains on half of them
    res = compare_pair(before, after, ks=(10, 5), n_changes=3)
    gained, lost = res["gained"], res["lost"]
    assert [(g["layer"], g["head"]) for g in gained[:2]] == [(1, 2), (2, 3)]
    assert (lost[0]["layer"], lost[0]["head"]) == (0, 0)
    top = gained[0]
    assert top["n"] == 8 and top["share_in_direction"] == 1.0 and top["median_change"] == pytest.approx(1.0, abs=0.05)
    assert top["wilcoxon_p"] < 0.01 and top["rank_after"] == 1
    assert gained[1]["share_in_direction"] == 0.5
    assert lost[0]["share_in_direction"] == 1.0 and lost[0]["mean_change"] == pytest.approx(-0.5, abs=0.02)
    assert all(g["mean_change"] > 0 for g in gained) and all(x["mean_change"] < 0 for x in lost)
    assert set(res["overlap"]) == {"10", "5"} and -1 <= res["spearman"] <= 1
    same = compare_pair(before, before)
    assert same["gained"] == [] and same["lost"] == [] and same["spearman"] == pytest.approx(1.0)
    assert np.isnan(paired_change(np.zeros(4), np.ones(4))["wilcoxon_p"])  # n < 5: no test
    with pytest.raises(ValueError, match=r"\[examples, layers, heads\]"):
        compare_pair(before, after[:, :2])


def test_compare_scores_pairs_every_variant_with_the_base_and_its_predecessor():
    rng = np.random.default_rng(1)
    scores = {n: rng.normal(size=(6, 2, 4)) for n in ("base", "stage1", "stage2")}
    out = compare_scores(scores, ks=(3,), n_changes=2, top=4)
    assert [(p["a"], p["b"]) for p in out["pairs"]] == [("base", "stage1"), ("base", "stage2"), ("stage1", "stage2")]
    assert variant_pairs(["a", "b"]) == [("a", "b")]
    mean = scores["stage2"].mean(0)
    best = [(t["layer"], t["head"]) for t in out["top_heads"]["stage2"]]
    assert best[0] == np.unravel_index(mean.argmax(), mean.shape) and len(best) == 4
    assert out["n_examples"] == 6 and np.allclose(out["mean_scores"]["base"], scores["base"].mean(0))
    with pytest.raises(ValueError, match="at least two variants"):
        compare_scores({"base": scores["base"]})


# -- end to end ----------------------------------------------------------------------------------
def test_compare_heads_on_a_tiny_model_and_its_adapter():
    """The base (adapter disabled) against itself under another name (the same ranking) and against a
    random LoRA adapter on o_proj (a different one), on the same examples and answer tokens."""
    from peft import LoraConfig, get_peft_model

    model, processor, family = eager_tiny("llava")
    rng = np.random.default_rng(5)
    examples, targets = [], []
    for i in range(5):
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        answered = prepare_example(model, processor, family, img, "where is the lesion?", "left lung")
        examples.append(prepare_example(model, processor, family, img, "where is the lesion?"))
        examples[-1].meta["id"] = f"ex{i}"
        targets.append(answered.target_ids[0])
    plain = [head_importance(model, family, ex, target_id=t, read=0).scores for ex, t in zip(examples, targets, strict=True)]
    torch.manual_seed(0)
    peft = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["o_proj", "v_proj"],
                                            init_lora_weights=False))
    @contextlib.contextmanager
    def disabled():
        with peft.disable_adapter():
            yield peft

    out = compare_heads([("base", disabled), ("base again", disabled), ("tuned", peft)],
                        family, processor, examples, targets, ks=(5, 3), read_positions=2, progress=False)
    assert out["variants"] == ["base", "base again", "tuned"] and out["examples"] == [f"ex{i}" for i in range(5)]
    np.testing.assert_allclose(out["per_example"]["base"], plain, atol=1e-6)  # disabled adapter = the base
    same = out["pairs"][0]
    assert (same["a"], same["b"]) == ("base", "base again") and same["spearman"] == pytest.approx(1.0)
    assert same["overlap"]["5"]["n"] == 5 and same["gained"] == [] and same["lost"] == []
    tuned = out["pairs"][1]
    assert tuned["b"] == "tuned" and not np.allclose(out["mean_scores"]["tuned"], out["mean_scores"]["base"])
    assert tuned["gained"] and tuned["lost"]
    for name in out["variants"]:
        reads = out["readings"][name]
        assert [(r["layer"], r["head"]) for r in reads] == [(t["layer"], t["head"]) for t in out["top_heads"][name][:5]]
        assert all(0 < r["reciprocal_rank"] <= 1 and 0 < r["output_reciprocal_rank"] <= 1 for r in reads)
        assert out["timing"][name]["importance_ratio"] > 0 and 0 <= out["predicts_answer"][name] <= 1
    with pytest.raises(ValueError, match="names must differ"):
        compare_heads([("a", peft), ("a", peft)], family, processor, examples)

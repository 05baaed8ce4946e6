"""Multimodal and knowledge neurons: the gradient-free score is activation x (W_down^T W_U)[unit, token], the
gradient score is the finite-difference effect of scaling the unit, integrated gradients are complete up to the
Riemann error (tighter with more steps), the edit hooks touch exactly the chosen units, Dai et al.'s threshold
and refinement rules, the paired causal test, and bad input. Both families, tiny random models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import FAMILIES, eager_tiny

from medvlm.diagnostics.capture import prepare_example
from medvlm.diagnostics.neuron_checks import causal_effects, check_verdict, paired_test, random_units
from medvlm.diagnostics.neurons import (
    Attribution,
    UnitEdit,
    answer_probs,
    edit_units,
    ig_batch,
    integrated_gradients,
    kept_units,
    knowledge_neurons,
    multimodal_neurons,
    refine,
    resolve_layers,
)


@pytest.fixture(scope="module")
def setup():
    out = {}
    rng = np.random.default_rng(3)
    for fam in FAMILIES:
        model, processor, family = eager_tiny(fam)
        norm = family.final_norm(model)
        with torch.no_grad():  # a final-norm gain far from 1, so a score that forgot it would differ
            next(norm.parameters()).copy_(torch.linspace(-0.8, 1.5, next(norm.parameters()).numel()))
        img = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        ex = prepare_example(model, processor, family, img, "where is the lesion?")
        target = prepare_example(model, processor, family, img, "where is the lesion?", "left lung").target_ids[0]
        out[fam] = (model, processor, family, ex, target)
    return out


def _mlp_inputs(model, layer_module, ex):
    """The input of ``mlp.down_proj`` of one layer, captured by a hook of the test's own."""
    seen = []
    handle = layer_module.mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
    try:
        with torch.no_grad():
            model(**ex.inputs, use_cache=False)
    finally:
        handle.remove()
    return seen[0]


@pytest.mark.parametrize("fam", FAMILIES)
def test_direct_score_is_activation_times_wdown_t_wu(setup, fam):
    model, processor, family, ex, target = setup[fam]
    ns = multimodal_neurons(model, family, ex, processor.tokenizer, target_id=target, top=4)
    layers = family.decoder_layers(model)
    norm, head = family.final_norm(model), family.unembed(model)
    x = torch.randn(head.weight.shape[1]) + 3.0  # the norm's gain, read as norm(x) * rms(x) / x
    eps = float(getattr(norm, "eps", None) or getattr(norm, "variance_epsilon", 1e-6))
    with torch.no_grad():
        gain = norm(x[None])[0] * torch.sqrt(x.pow(2).mean() + eps) / x
    image = slice(ex.span.start, ex.span.end)
    for li, layer in enumerate(layers):
        a = _mlp_inputs(model, layer, ex)[0, image]  # [N, F]
        w_down = layer.mlp.down_proj.weight.detach()  # [D, F]
        post = family.mlp_output_gain(model, li)  # a norm on the MLP output (tests/models/test_neuron_seam.py)
        w_down = w_down if post is None else post[:, None] * w_down
        m = w_down.T @ (gain * head.weight.detach()[target])  # (W_down^T W_U^T)[:, c], W_U with the gain folded in
        torch.testing.assert_close(torch.from_numpy(ns.scores[li]).float(), (a * m).sum(0), atol=1e-5, rtol=1e-4)
    flat = np.argsort(-ns.scores, axis=None)[:4]
    assert ns.units == [(int(i // ns.scores.shape[1]), int(i % ns.scores.shape[1])) for i in flat]
    assert [len(t) for t in ns.tokens] == [5] * 4 and ns.maps[0].shape == ex.span.grid
    best = ns.units[0]  # its map sums to its score (the contribution per image position)
    assert ns.maps[0].sum() == pytest.approx(ns.scores[best[0], best[1]], rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("fam", FAMILIES)
def test_gradient_score_is_the_effect_of_scaling_the_unit(setup, fam):
    """a · dp/da summed over the image positions = d p(a · (1 + e)) / de at e = 0 (central difference)."""
    model, processor, family, ex, target = setup[fam]
    ns = multimodal_neurons(model, family, ex, processor.tokenizer, target_id=target, method="gradient", top=1)
    (layer, unit), eps = ns.units[0], 1e-2
    pos = tuple(range(ex.span.start, ex.span.end))
    up, down = answer_probs(model, family, ex, target, [[UnitEdit(layer, (unit,), pos, 1 + eps)],
                                                         [UnitEdit(layer, (unit,), pos, 1 - eps)]])
    assert ns.scores[layer, unit] == pytest.approx((up - down) / (2 * eps), rel=2e-2)


@pytest.mark.parametrize("fam", FAMILIES)
def test_integrated_gradients_are_complete_up_to_the_riemann_error(setup, fam):
    model, _, family, ex, target = setup[fam]
    q = ex.target_positions[0]
    coarse = integrated_gradients(model, family, ex, target, steps=4)
    fine = integrated_gradients(model, family, ex, target, steps=64, memory_mb=0.001)  # one step per pass
    width = coarse.attr.shape[1]
    for li in range(2):  # p(baseline) recomputed here: the layer's units at the answer position set to 0
        p0, p = answer_probs(model, family, ex, target, [[UnitEdit(li, tuple(range(width)), (q,), 0.0)], []])
        assert fine.p_baseline[li] == pytest.approx(p0, rel=1e-5) and fine.p == pytest.approx(p, rel=1e-5)
        total = p - p0
        assert abs(fine.completeness_gap()[li]) < abs(coarse.completeness_gap()[li])
        if family.mlp_output_gain(model, li) is None:
            assert abs(fine.attr[li].sum() - total) <= 0.02 * abs(total) + 1e-9
        else:
            # a layer that RMS-normalises its MLP output (Gemma 3's post-feedforward norm) makes p(alpha * a)
            # nearly flat once alpha * rms(MLP output) >> sqrt(eps): the path is steep next to the zero
            # baseline, where the right Riemann sum converges slowly (5-20% off at 64 steps on these tiny
            # models, depending on their weights); more steps still close the gap
            finer = integrated_gradients(model, family, ex, target, steps=512)
            assert abs(finer.completeness_gap()[li]) < abs(fine.completeness_gap()[li])


def test_ig_steps_are_batched_within_the_memory_bound(setup):
    model, _, family, ex, _ = setup["llava"]
    seq = int(ex.inputs["input_ids"].shape[-1])
    assert ig_batch(model, family, seq, 20, memory_mb=1e-6) == 1
    assert ig_batch(model, family, seq, 20, memory_mb=1e6) == 21  # all steps and the baseline at once
    small = ig_batch(model, family, seq, 20, memory_mb=0.5)
    assert 1 <= small <= 21


@pytest.mark.parametrize("fam", FAMILIES)
def test_edits_change_exactly_the_chosen_units(setup, fam):
    model, _, family, ex, _ = setup[fam]
    layer = family.decoder_layers(model)[0]
    seen = []
    units, positions = (3, 17, 40), (ex.span.start + 1, ex.target_positions[0])
    with edit_units(model, family, [[UnitEdit(0, units, positions, 0.0)], [], [UnitEdit(0, units, positions, 2.0)]]):
        handle = family.mlp_down(layer).register_forward_pre_hook(lambda m, a: seen.append(a[0].detach().clone()))
        try:
            with torch.no_grad():
                model(**family.repeat_inputs(ex.inputs, 3), use_cache=False)
        finally:
            handle.remove()
    clean = _mlp_inputs(model, layer, ex)[0]
    got = seen[0]
    torch.testing.assert_close(got[1], clean)  # the row without edits
    for row, factor in ((0, 0.0), (2, 2.0)):
        want = clean.clone()
        idx = (torch.tensor(positions)[:, None], torch.tensor(units)[None, :])
        want[idx] = clean[idx] * factor
        torch.testing.assert_close(got[row], want)
        assert int((got[row] != clean).sum()) == len(units) * len(positions)  # nothing else moved


def test_threshold_and_refinement_follow_dai_et_al():
    a = Attribution([0, 2], np.array([[1.0, 0.2, 0.19, -3.0], [0.5, 0.0, 0.0, 0.21]]), 0.9, np.zeros(2), 20)
    assert kept_units(a) == {(0, 0), (0, 1), (2, 0), (2, 3)}  # >= 0.2 x the maximum over all layers
    assert kept_units(Attribution([0], -np.ones((1, 3)), 0.1, np.zeros(1), 20)) == set()
    sets = [{(0, 1), (1, 2)}, {(0, 1), (1, 2)}, {(0, 1)}, {(0, 1), (2, 2)}]
    assert refine(sets) == [(0, 1)]  # 4 of 4 kept; (1, 2) in 2 < max(0.7 x 4, 3) = 3
    assert refine(sets[:3] + [{(1, 2)}]) == [(0, 1), (1, 2)]  # both in 3 of 4
    five = sets + [{(1, 2)}]
    assert refine(five) == [(0, 1)]  # (1, 2) in 3 < 0.7 x 5 = 3.5
    with pytest.raises(ValueError, match="got 2 prompt.*at least 3"):
        refine(sets[:2])


def test_random_controls_come_from_the_same_layers_and_avoid_the_set():
    units = [(0, 1), (0, 2), (2, 5)]
    rng = np.random.default_rng(0)
    for _ in range(20):
        ctrl = random_units(units, 8, rng)
        assert [layer for layer, _ in ctrl] == [0, 0, 2] and not set(ctrl) & set(units) and len(set(ctrl)) == 3
    with pytest.raises(ValueError, match="no unit left"):
        random_units([(0, 0), (0, 1)], 2, rng)


def test_the_paired_check_passes_only_when_the_set_beats_random():
    n = 8
    good = [{"suppress_top": -0.1 * (i + 1), "suppress_random": -0.01, "amplify_top": 0.05 * (i + 1),
             "amplify_random": 0.001} for i in range(n)]
    v = check_verdict(good)
    assert v["passes"] and v["verdict"] == "passes" and v["n"] == n
    assert v["suppress"]["p_value"] == pytest.approx(1 / 2**n) and v["suppress"]["share_beyond_random"] == 1.0
    assert v["amplify"]["median_top"] == pytest.approx(0.225)
    bad = [{**e, "suppress_top": e["suppress_random"] + 0.05} for e in good]  # suppression helps the answer
    v = check_verdict(bad)
    assert not v["passes"] and "suppression lowers p(answer) no more than random" in v["verdict"]
    few = check_verdict(good[:4])
    assert not few["passes"] and "at least 5" in few["verdict"]
    assert np.isnan(paired_test([0.1] * 6, [0.1] * 6, "less")["p_value"])


@pytest.mark.parametrize("fam", FAMILIES)
def test_causal_effects_compare_the_set_with_random_units(setup, fam):
    model, _, family, ex, target = setup[fam]
    q = ex.target_positions[0]
    units = [(layer, u) for layer in (0, 1) for u in range(0, 96, 2)]  # enough units to move p well above rounding
    eff = causal_effects(model, family, ex, target, units, [q], draws=3, rng=np.random.default_rng(1))
    half = tuple(range(0, 96, 2))
    p0, p_sup, p_amp = answer_probs(model, family, ex, target, [
        [], [UnitEdit(0, half, (q,), 0.0), UnitEdit(1, half, (q,), 0.0)],
        [UnitEdit(0, half, (q,), 2.0), UnitEdit(1, half, (q,), 2.0)]])
    # other batch sizes, other float rounding: equal to 1e-3 of the change
    assert eff["p"] == pytest.approx(p0, rel=1e-5) and eff["suppress_top"] == pytest.approx((p_sup - p0) / p0, rel=1e-3)
    assert eff["amplify_top"] == pytest.approx((p_amp - p0) / p0, rel=1e-3)
    assert len(eff["suppress_random_draws"]) == 3
    assert eff["suppress_random"] == pytest.approx(np.mean(eff["suppress_random_draws"]))


@pytest.mark.parametrize("fam", FAMILIES)
def test_knowledge_neurons_refine_over_the_question_and_its_rewordings(setup, fam):
    model, processor, family, ex, target = setup[fam]
    img = ex.image
    words = ["where is the lesion?", "where is the abnormality?", "in which place is the lesion?",
             "where can the lesion be seen?"]
    exs = [prepare_example(model, processor, family, img, w) for w in words]
    kn = knowledge_neurons(model, family, exs, [target] * 4, processor.tokenizer, steps=3)
    per_prompt = [set(map(tuple, s)) for s in kn.extra["per_prompt"]]
    assert set(kn.units) == {u for u in set().union(*per_prompt) if sum(u in s for s in per_prompt) >= 3}
    assert kn.positions == [exs[0].target_positions[0]] and kn.scores.shape == (2, kn.scores.shape[1])
    with pytest.raises(ValueError, match="at least 3 paraphrases.*got 2 paraphrase"):
        knowledge_neurons(model, family, exs[:3], [target] * 3)


def test_a_neuron_layer_that_does_not_exist_is_named(setup):
    model, processor, family, ex, target = setup["llava"]
    with pytest.raises(ValueError, match=r"neuron layer\(s\) \[5\] do not exist: .* 2 decoder layers"):
        multimodal_neurons(model, family, ex, processor.tokenizer, target_id=target, layers=[0, 5])
    with pytest.raises(ValueError, match=r"\[-3\] do not exist"):
        integrated_gradients(model, family, ex, target, layers=[-3])
    assert resolve_layers(model, family, [-1, 0]) == [0, 1]
    q = ex.target_positions[0]
    with pytest.raises(ValueError, match=r"\[2\] do not exist"):
        causal_effects(model, family, ex, target, [(2, 0)], [q])
    with pytest.raises(ValueError, match=r"unit index\(es\) \[9999\] out of range: each MLP layer has"):
        causal_effects(model, family, ex, target, [(0, 9999)], [q])
    with pytest.raises(ValueError, match="empty"):
        causal_effects(model, family, ex, target, [], [q])
    with pytest.raises(ValueError, match="method='saliency'"):
        multimodal_neurons(model, family, ex, method="saliency")


def test_the_probe_writes_neurons_json_and_the_report_section(tiny_llava, small_phantom, tmp_path):
    import json

    from medvlm.data_curation.phantom import load_phantom
    from medvlm.diagnostics.neuron_checks import run_neurons
    from medvlm.diagnostics.report import _neuron_section
    from medvlm.models.registry import load_model_and_processor
    from medvlm.utils.render import render_markdown

    lm = load_model_and_processor(str(tiny_llava))
    records = load_phantom(small_phantom, kind="qa")
    result = run_neurons(lm.model, lm.processor, lm.family, records, tmp_path, max_examples=5, top=3, steps=2,
                         draws=2)
    on_disk = json.loads((tmp_path / "neurons.json").read_text())
    assert on_disk["n_examples"] == result["n_examples"] == 5 and set(on_disk["checks"]) == {"multimodal", "knowledge"}
    for row in on_disk["examples"]:
        assert len(row["multimodal"]["units"]) == 3 and row["forward_s"] > 0
        assert "check" in row["multimodal"] and ("knowledge" in row or row["errors"])
    mm = on_disk["checks"]["multimodal"]
    assert mm["n"] == 5 and mm["verdict"].startswith(("passes", "fails: "))  # reported either way, with its reason
    assert (tmp_path / on_disk["overlay"]["path"]).is_file()
    text = render_markdown(_neuron_section(tmp_path), tmp_path / "figures")
    assert "Multimodal and knowledge neurons" in text and mm["verdict"] in text and "top_multimodal_neuron" in text
    assert _neuron_section(tmp_path / "nowhere") == []

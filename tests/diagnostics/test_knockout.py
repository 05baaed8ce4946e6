"""Attention knockout (Geva et al. 2023): the window rule, the edited mask against a hand-built one,
eager against sdpa, the family's own mask kept, the per-cell map, the lesion-vs-mirror statistics,
bad input, and the probe's and report's knockout section."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from refused_allocation import refuse_batches_above
from tiny_models import eager_tiny

from medvlm.diagnostics.capture import prepare_example
from medvlm.diagnostics.knockout import (
    EdgeSet,
    Knockout,
    answer_probs,
    base_prediction,
    blocked_attention,
    cell_positions,
    check_window,
    knockout_delta,
    knockout_map,
    last_position,
    layer_sweep,
    named_edge_sets,
    question_positions,
    sweep_window,
    window_layers,
)
from medvlm.diagnostics.knockout_validation import (
    knockout_blocks,
    knockout_validation,
    lesion_cells,
    mean_curves,
    mirrored_cells,
    paired_test,
)
from medvlm.diagnostics.methods import Context, Shape, get_method
from medvlm.eval.batching import BatchRecord
from medvlm.models.families import FAMILIES as REGISTERED
from medvlm.utils.render import render_markdown

FAMILIES = sorted(REGISTERED)


def _example(model, processor, family, seed: int = 0):
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    return prepare_example(model, processor, family, image, "where is the lesion?", "left lung")


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request):
    """(family name, {"eager": model, "sdpa": the same weights under sdpa}, processor, family, example)."""
    model, processor, family = eager_tiny(request.param)
    sdpa, _, _ = eager_tiny(request.param)  # same seed: same weights
    sdpa.set_attn_implementation("sdpa")
    return request.param, {"eager": model, "sdpa": sdpa}, processor, family, _example(model, processor, family)


def _hand_mask(name: str, inputs, edges: EdgeSet) -> torch.Tensor:
    """The 4-D additive mask written from each family's published rule (a test may name families; the
    package may not): causal; PaliGemma's prefix (``token_type_ids`` 0) attends both ways; Gemma 3's
    tokens of one image (``token_type_ids`` 1, one contiguous run per image) attend to each other both
    ways; then the blocked edges."""
    seq = int(inputs["input_ids"].shape[-1])
    allowed = torch.ones(seq, seq, dtype=torch.bool).tril()
    if name == "paligemma":
        prefix = inputs["token_type_ids"][0] == 0
        allowed |= prefix[:, None] & prefix[None, :]
    elif name == "medgemma":
        image = inputs["token_type_ids"][0] == 1
        starts = image & ~torch.cat([torch.zeros(1, dtype=torch.bool), image[:-1]])
        block = torch.where(image, torch.cumsum(starts.long(), 0), torch.full_like(image, -1, dtype=torch.long))
        allowed |= image[:, None] & image[None, :] & (block[:, None] == block[None, :])
    for t in edges.targets:
        for s in edges.sources:
            allowed[t, s] = False
    return torch.zeros(seq, seq).masked_fill(~allowed, torch.finfo(torch.float32).min)[None, None]


# -- the rule ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("centre", "window", "n_layers", "expected"), [
    (0, 9, 48, [0, 1, 2, 3, 4]),                 # clipped at the first layer
    (24, 9, 48, list(range(20, 29))),            # 4 below, the centre, 4 above
    (47, 9, 48, [43, 44, 45, 46, 47]),           # clipped at the last layer
    (10, 10, 48, list(range(5, 15))),            # even window: k // 2 below, the rest above
    (5, 1, 6, [5]),
    (1, 3, 3, [0, 1, 2]),
    (0, 3, 3, [0, 1]),
])
def test_windows_are_centred_and_clipped_as_geva_et_al(centre, window, n_layers, expected):
    assert window_layers(centre, window, n_layers) == expected


def test_the_report_window_is_the_papers_nine_or_half_the_depth():
    assert [sweep_window(n) for n in (1, 3, 4, 17, 18, 32, 48)] == [1, 1, 2, 8, 9, 9, 9]


def test_bad_windows_and_edge_sets_name_the_value_and_the_limit(tiny):
    _, models, _, family, ex = tiny
    model = models["eager"]
    n_layers, seq = len(family.decoder_layers(model)), int(ex.inputs["input_ids"].shape[-1])
    with pytest.raises(ValueError, match=rf"window=9 is wider than the model's {n_layers} decoder layers; use a "
                                         rf"window of at most {n_layers}"):
        layer_sweep(model, family, ex, window=9)
    with pytest.raises(ValueError, match=rf"window={n_layers + 1} is wider than the model's {n_layers} decoder"):
        knockout_validation(model, None, family, [{"id": "r"}], window=n_layers + 1)  # refused before any record
    with pytest.raises(ValueError, match="window=0"):
        check_window(0, n_layers)
    with pytest.raises(ValueError, match=r"edge set 'e' has no sources"):
        knockout_delta(model, family, ex, EdgeSet("e", (), (3,)))
    with pytest.raises(ValueError, match=rf"targets \[{seq}\] outside the sequence of {seq} tokens"):
        knockout_delta(model, family, ex, EdgeSet("e", (0,), (seq,)))
    with pytest.raises(ValueError, match=rf"layers \[{n_layers}\].*0\.\.{n_layers - 1}"):
        knockout_delta(model, family, ex, EdgeSet("e", (0,), (3,)), layers=[n_layers])
    last = last_position(ex)  # every key the last position may read, blocked: its softmax is undefined
    with pytest.raises(ValueError, match=rf"leaves target position\(s\) \[{last}\] with nothing to attend to"):
        knockout_delta(model, family, ex, EdgeSet("all", tuple(range(seq)), (last,)))


def test_question_positions_hold_the_question_and_no_image_bos_or_last_token(tiny):
    _, models, processor, family, ex = tiny
    model = models["eager"]
    question = question_positions(model, family, ex)
    ids = ex.inputs["input_ids"][0]
    text = processor.tokenizer.decode(ids[question])
    assert "where is the lesion?" in text and "left lung" not in text  # the prompt only, not the answer
    assert not any(ex.span.start <= p < ex.span.end for p in question) and last_position(ex) not in question
    assert processor.tokenizer.bos_token_id not in ids[question].tolist()
    sets = named_edge_sets(model, family, ex)
    assert sets["question_to_last"].sources == sets["image_to_question"].targets == tuple(question)


# -- the mask ------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_blocking_edges_in_every_layer_equals_a_hand_masked_forward(tiny, impl):
    name, models, _, family, ex = tiny
    if name == "qwen2_5_vl":
        pytest.skip("Qwen2.5-VL computes its 3-D positions from a 2-D attention_mask, so a hand-written 4-D "
                    "mask cannot be passed to its forward; its mask is checked by the tests below")
    model = models[impl]
    sets = named_edge_sets(model, family, ex)
    base = base_prediction(model, family, ex)
    for edges in sets.values():
        hooked = knockout_delta(model, family, ex, edges, base=base)
        with torch.no_grad():
            inputs = {**ex.inputs, "attention_mask": _hand_mask(name, ex.inputs, edges)}  # used as-is by every layer
            logits = model(**inputs, use_cache=False).logits
        p = float(torch.softmax(logits[0, base.position].float(), -1)[base.token])
        assert hooked == pytest.approx((p - base.p) / base.p * 100, abs=1e-4), edges.name
        assert abs(hooked) > 1e-3, f"{edges.name}: the knockout changed nothing, so the comparison shows nothing"


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_an_empty_edge_set_changes_nothing(tiny, impl):
    _, models, _, family, ex = tiny
    model = models[impl]
    base = base_prediction(model, family, ex)
    every = frozenset(range(len(family.decoder_layers(model))))
    p = answer_probs(model, family, ex.inputs, base.position, base.token, [Knockout(EdgeSet("empty", (), ()), every)])
    assert p[0] == base.p  # delta = 0 exactly


def test_edges_the_family_mask_already_blocks_change_nothing_though_the_hook_runs(tiny):
    _, models, _, family, ex = tiny
    model = models["eager"]
    seq = int(ex.inputs["input_ids"].shape[-1])
    seen = []
    hook = family.attention_module(family.decoder_layers(model)[0]).register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["attention_mask"]), with_kwargs=True)
    answer = tuple(range(last_position(ex) + 1, seq))  # the teacher-forced answer: never read by the prompt
    future = EdgeSet("answer_to_image", answer, tuple(range(ex.span.start, ex.span.end)))
    try:
        delta = knockout_delta(model, family, ex, future)
    finally:
        hook.remove()
    assert delta == 0.0
    assert len(seen) == 2 and seen[0] is not seen[1]  # the plain pass's mask, then the hook's own copy


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_the_family_mask_is_kept_except_the_blocked_edges(tiny, impl):
    name, models, _, family, ex = tiny
    model = models[impl]
    seq = int(ex.inputs["input_ids"].shape[-1])
    layer = family.attention_module(family.decoder_layers(model)[0])
    edges = named_edge_sets(model, family, ex)["image_to_last"]
    seen = []

    def record(module, args, kwargs):
        seen.append(kwargs["attention_mask"])

    with torch.no_grad():
        plain = layer.register_forward_pre_hook(record, with_kwargs=True)
        model(**ex.inputs, use_cache=False)
        plain.remove()
        with blocked_attention(model, family, [Knockout(edges, frozenset({0}))], seq):
            after = layer.register_forward_pre_hook(record, with_kwargs=True)  # runs after the knockout's hook
            try:
                model(**ex.inputs, use_cache=False)
            finally:
                after.remove()
    original, edited = seen
    if original is None:  # sdpa's plain causal case: the kernel's is_causal, written out
        original = torch.ones(seq, seq, dtype=torch.bool).tril()[None, None]
    allowed = original if original.dtype == torch.bool else original == 0
    allowed_after = edited if edited.dtype == torch.bool else edited == 0
    expected = allowed.clone()
    expected[..., list(edges.targets), list(edges.sources)] = False
    assert torch.equal(allowed_after, expected)
    if name == "paligemma":  # the prefix stays bidirectional: the first image token still reads the last
        assert bool(allowed_after[0, 0, ex.span.start, last_position(ex)])


# -- eager and sdpa ------------------------------------------------------------------------------
def test_eager_and_sdpa_agree(tiny):
    _, models, _, family, ex = tiny
    sweeps = {k: layer_sweep(m, family, ex, window=1) for k, m in models.items()}
    for name in sweeps["eager"]["delta"]:
        np.testing.assert_allclose(sweeps["eager"]["delta"][name], sweeps["sdpa"]["delta"][name], atol=1e-4)
    maps = {k: knockout_map(m, family, ex, max_side=4) for k, m in models.items()}
    np.testing.assert_allclose(maps["eager"], maps["sdpa"], atol=1e-4)
    assert np.abs(maps["eager"]).max() > 1e-3


# -- the per-cell map ------------------------------------------------------------------------------
def test_each_block_of_the_map_is_the_drop_of_knocking_out_that_block_alone(tiny):
    _, models, _, family, ex = tiny
    model = models["eager"]
    grid_map = knockout_map(model, family, ex, max_side=4, batch_size=16)  # 2x2 blocks on the 8x8 grid
    assert grid_map.shape == ex.span.grid
    base = base_prediction(model, family, ex)
    for r, c in [(0, 0), (2, 4), (6, 6)]:
        cells = [(r, c), (r, c + 1), (r + 1, c), (r + 1, c + 1)]
        edges = EdgeSet("block", cell_positions(ex.span.start, ex.span.grid, cells), (last_position(ex),))
        drop = -knockout_delta(model, family, ex, edges, base=base)
        assert grid_map[r:r + 2, c:c + 2] == pytest.approx(np.full((2, 2), drop), abs=1e-4)
    assert len(np.unique(grid_map.round(8))) > 1


def test_the_map_is_batched_to_memory_and_a_refused_allocation_halves_the_batch(tiny, monkeypatch):
    """Each knocked-out copy runs a whole forward pass (the vision tower again): the registered method
    takes as many as fit its budget, declares that batch as its memory, and a batch the allocator
    refuses is redone at half the size, giving the same map."""
    _, models, processor, family, ex = tiny
    model = models["eager"]
    method = get_method("knockout")
    shape = Shape.of(model, family, ex)
    copy = shape.forward_bytes(batch=1)
    expected = knockout_map(model, family, ex, batch_size=1)
    small = method.run(Context(model, processor, family, ex), budget_bytes=int(2.5 * copy))
    assert small.row == {"knockout_batch": 2, "knockout_oom_halvings": []}
    np.testing.assert_allclose(small.map, expected, atol=1e-4)
    assert method.memory(shape, budget_bytes=int(2.5 * copy)) == pytest.approx(2 * copy)
    assert method.run(Context(model, processor, family, ex)).row["knockout_batch"] == 16  # the demo's tiny copies

    sizes = refuse_batches_above(monkeypatch, type(model), "forward", 5)
    record = BatchRecord(requested=16)
    halved = knockout_map(model, family, ex, batch_size=16, record=record)
    np.testing.assert_allclose(halved, expected, atol=1e-4)
    assert (record.start, record.used, record.halvings) == (16, 4, [16, 8])
    assert sizes == [1, 16, 8] + [4] * 16  # the unblocked pass, two refused batches, 64 cells by four


# -- the validation ---------------------------------------------------------------------------------
def test_lesion_cells_and_their_mirror_images():
    mask = np.zeros((64, 64), bool)
    mask[20:30, 2:10] = True  # rows 20..29 span cells 2 and 3 of an 8x8 grid, columns 2..9 cells 0 and 1
    cells = lesion_cells(mask, (8, 8))
    assert cells == [(2, 0), (2, 1), (3, 0), (3, 1)]
    assert mirrored_cells(cells, (8, 8)) == [(2, 6), (2, 7), (3, 6), (3, 7)]
    assert mirrored_cells([(0, 1)], (4, 3)) == [(0, 1)]  # the middle column is its own mirror


def test_the_paired_test_asks_whether_the_lesion_lowers_p_more_than_its_mirror():
    lesion = [-40.0, -12.0, -30.0, -8.0, -25.0, -18.0]
    mirror = [-1.0, -2.0, 0.5, -0.3, -1.5, 0.0]
    out = paired_test(lesion, mirror)
    assert out["n"] == 6 and out["passes"] and out["p_value"] == pytest.approx(1 / 64)  # all 6 differences < 0
    assert out["share_lesion_lower"] == 1.0 and out["median_difference"] == pytest.approx(-20.75)
    assert not paired_test(mirror, lesion)["passes"]  # the other direction is not evidence
    few = paired_test(lesion[:4], mirror[:4])
    assert few["passes"] is None and np.isnan(few["p_value"]) and "at least 5" in few["reason"]
    assert paired_test([1.0, float("nan")] * 3, [0.0] * 6)["n"] == 3  # NaN pairs are left out, and counted out


def test_curves_are_averaged_and_medianed_per_window_and_the_table_shows_both():
    rows = [{"delta": {name: [x, 2 * x] for name in ("image_to_last", "image_to_question", "question_to_last")}}
            for x in (-90.0, -1.0, 1.0)]
    assert mean_curves(rows)["image_to_last"] == pytest.approx([-30.0, -60.0])
    assert mean_curves(rows, "median")["question_to_last"] == pytest.approx([-1.0, -2.0])
    result = {"rule": "r", "window": 1, "n_layers": 2, "n_examples": 3, "layers": [[0], [1]],
              "curves": mean_curves(rows), "median_curves": mean_curves(rows, "median"),
              "validation": paired_test([], []), "cost": {}, "skipped": []}
    md = render_markdown(knockout_blocks(result), None)
    assert "| 0 | 0 | -30.00 (-1.00) | -30.00 (-1.00) | -30.00 (-1.00) |" in md
    assert "| 1 | 1 | -60.00 (-2.00) |" in md
    result["validation"] = paired_test([-float(i) for i in range(1, 11)], [0.0] * 10)  # exact p = 1 / 2**10
    assert "| 10 | -5.50 | 0.00 | -5.50 | 1.00 | 0.00098 | yes |" in render_markdown(knockout_blocks(result), None)


def test_probe_writes_the_knockout_section_and_the_report_renders_it(tiny_llava, small_phantom, tmp_path):
    from medvlm.data_curation.phantom import load_phantom
    from medvlm.diagnostics.probe import run_probe
    from medvlm.diagnostics.report import report_blocks
    from medvlm.models.registry import load_model_and_processor

    lm = load_model_and_processor(str(tiny_llava))
    records = load_phantom(small_phantom, kind="qa")
    n_layers = len(lm.family.decoder_layers(lm.model))
    run_probe(lm.model, lm.processor, lm.family, records, tmp_path, methods=["knockout"], max_examples=3,
              sanity_examples=0, geometry=False, knockout=True)
    diag = json.loads((tmp_path / "diagnostics.json").read_text())
    ko = diag["knockout"]
    assert ko["window"] == sweep_window(n_layers) and ko["n_examples"] + len(
        [s for s in ko["skipped"] if "what" not in s]) == 3
    assert set(ko["curves"]) == {"image_to_last", "image_to_question", "question_to_last"}
    assert all(len(c) == n_layers and np.isfinite(c).all() for c in ko["curves"].values())
    assert {k: len(c) for k, c in ko["median_curves"].items()} == {k: n_layers for k in ko["curves"]}
    assert {"knockout", "knockout_validation"} <= set(diag["timings"])  # the map's time and the section's apart
    row = ko["examples"][0]
    assert ("lesion_delta" in row and "mirror_delta" in row) or row["skip"]
    assert ko["validation"]["n"] == sum("lesion_delta" in r for r in ko["examples"])
    assert ko["validation"]["reason"] == f"{ko['validation']['n']} paired examples; the test needs at least 5"
    assert diag["summary"]["knockout"]["n"] + diag["summary"]["knockout"]["n_undefined"] == 3  # the map's ROI
    stage = {"name": "stage2", "path": tmp_path, "metrics": None,
             "points": [{"name": "final", "step": 1, "metrics": None, "diagnostics": diag, "diagnostics_dir": tmp_path}]}
    md = render_markdown(report_blocks({"run_dir": tmp_path, "stages": [stage]}), tmp_path / "figures")
    assert "### Attention knockout (Geva et al. 2023)" in md and "| window centre | layers blocked | image → last" in md
    assert "knockout.png" in md and "Lesion against its mirror image" in md
    assert knockout_blocks(None) == []

"""The explorer's engine (no browser): inputs, one analysis per variant, the views the page's
controls and clicks ask for, the files it offers, and its errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from explorer_fixtures import build_model_with_adapters
from PIL import Image
from scripts import load_script

from medvlm.diagnostics.explorer import (
    BASE,
    ExplorerError,
    analyze,
    compute_method,
    draw_overlay,
    export,
    lens_page,
    load_explorer_model,
    overlays,
    patch_of,
    read_image,
)
from medvlm.diagnostics.explorer_samples import samples
from medvlm.diagnostics.methods import method_names, registered
from medvlm.models.families import FAMILIES
from medvlm.utils.images import read_mask


@pytest.fixture(scope="module", params=list(FAMILIES))
def explorer(request, tmp_path_factory, small_phantom):
    root = tmp_path_factory.mktemp(f"explorer-{request.param}")
    folder, adapters = build_model_with_adapters(root, request.param, small_phantom)
    return load_explorer_model(str(folder), [str(a) for a in adapters]), root


@pytest.fixture(scope="module")
def sample_set(tmp_path_factory):
    return samples(tmp_path_factory.mktemp("samples"))


def test_samples_hold_phantom_cases_with_masks_and_real_dicom(sample_set):
    phantoms = [s for s in sample_set if s.mask]
    assert len(phantoms) == 4 and all(read_mask(s.mask).any() for s in phantoms)
    assert any(s.image.endswith("CT_small.dcm") for s in sample_set)


def test_dicom_window_presets_and_custom_window_change_the_pixels(sample_set):
    ct = next(s.image for s in sample_set if s.image.endswith("CT_small.dcm"))
    lung, bone = np.asarray(read_image(ct, "lung")), np.asarray(read_image(ct, "bone"))
    custom = np.asarray(read_image(ct, "custom", level=-600, width=1500))
    assert lung.shape == bone.shape and lung.shape[-1] == 3
    assert not np.array_equal(lung, bone)
    assert np.array_equal(lung, custom)  # the lung preset is level -600, width 1500
    with pytest.raises(ExplorerError, match="level and a width"):
        read_image(ct, "custom", level=40, width=0)
    with pytest.raises(ExplorerError, match="unknown window"):
        read_image(ct, "liver")


def test_a_file_that_is_not_an_image_gives_a_message_naming_it(tmp_path):
    bad = tmp_path / "scan.png"
    bad.write_text("this is not a PNG")
    with pytest.raises(ExplorerError, match="scan.png is not an image"):
        read_image(bad)
    with pytest.raises(ExplorerError, match="not found"):
        read_image(tmp_path / "missing.png")


def test_patch_of_maps_display_pixels_to_grid_cells():
    assert patch_of(0, 0, (256, 256), (4, 4)) == (0, 0)
    assert patch_of(255, 10, (256, 256), (4, 4)) == (0, 3)
    assert patch_of(100, 200, (256, 256), (4, 4)) == (3, 1)
    assert patch_of(256, 256, (256, 256), (4, 4)) == (3, 3)  # the far edge stays inside


def test_analysis_answers_and_explains_with_every_method(explorer, sample_set):
    em, _ = explorer
    case = next(s for s in sample_set if s.mask)
    a = analyze(em, em.variants[0], read_image(case.image), case.question, mask=read_mask(case.mask))
    assert a.errors == {}
    assert list(a.maps) == method_names()
    for name, grid in a.maps.items():
        assert grid.shape == a.grid == (4, 4), name
        assert np.isfinite(grid).all(), name
    assert a.tokens  # the seeded random model writes a non-empty answer
    # the table holds the answer's tokens (compared decoded together: a random model may write byte tokens
    # that are parts of one character, each shown alone as U+FFFD)
    tok = em.processor.tokenizer
    assert tok.decode([t.id for t in a.tokens]).strip() == tok.decode(
        tok(a.answer, add_special_tokens=False)["input_ids"]).strip()
    assert all(0 < t.prob <= 1 and len(t.top) == 5 for t in a.tokens)
    assert all(t.top[0][1] >= t.prob - 1e-6 for t in a.tokens)  # top-1 is at least the chosen token
    assert len(a.top_heads) == len(a.image_top_heads) == 10
    inc = [h["increase"] for h in a.top_heads]
    assert inc == sorted(inc, reverse=True) and inc == [h["importance"] for h in a.top_heads]  # eq. 6 ranking
    image = [h["image_increase"] for h in a.image_top_heads]  # ... and the image-position sum, kept apart
    assert image == sorted(image, reverse=True) and image == [h["increase"] for h in a.image_top_heads]
    scores = [n["score"] for n in a.top_neurons]  # the top multimodal neurons of the answer's first token
    assert len(scores) == 5 and scores == sorted(scores, reverse=True) and all(len(n["tokens"]) == 5
                                                                                for n in a.top_neurons)
    assert a.numbers()["top_neurons"] == a.top_neurons
    assert "roi_mass" in a.scores["attention"]  # the phantom mask scores every map
    outlined = np.asarray(overlays(a)["attention"])  # ... and is outlined on every overlay
    assert not np.array_equal(outlined, np.asarray(draw_overlay(a.image, a.maps["attention"])))
    assert a.lens is not None and a.lens.top_ids.shape[:2] == (em.n_layers, 16)


def test_within_a_budget_the_costly_maps_are_skipped_and_computed_on_demand(explorer, sample_set):
    em, _ = explorer
    case = next(s for s in sample_set if s.mask)
    image, mask = read_image(case.image), read_mask(case.mask)
    a = analyze(em, em.variants[0], image, case.question, mask=mask, budget_s=0.0)
    assert "attention" in a.maps  # read from the shared pass: no cost beyond it
    assert {"occlusion", "gradcam", "logprob"} <= set(a.skipped) and not set(a.skipped) & set(a.maps)
    assert all("on demand" in why for why in a.skipped.values())
    for name in list(a.skipped):
        compute_method(em, a, name)
    assert a.skipped == {} and list(a.maps) == method_names() and a.top_heads and a.lens is not None
    full = analyze(em, em.variants[0], image, case.question, mask=mask)
    for name in method_names():  # the same maps as without a budget
        np.testing.assert_allclose(a.maps[name], full.maps[name], rtol=1e-5, atol=1e-7, err_msg=name)


def test_an_answer_of_tokens_that_decode_to_nothing_explains_the_next_token(explorer, sample_set, monkeypatch):
    """A model that writes only special tokens (a random real-shape model padded with added tokens)
    gives an empty answer: the token table then holds the predicted next token, one row per explained
    position, so a click on a patch pairs tokens and weights one to one."""
    import medvlm.diagnostics.explorer as explorer_module

    em, _ = explorer
    monkeypatch.setattr(explorer_module, "_generate", lambda *args, **kwargs: "")
    case = next(s for s in sample_set if s.mask)
    a = analyze(em, em.variants[0], read_image(case.image), case.question)
    assert a.answer == "" and len(a.tokens) == len(a.positions) == 1
    assert len(a.patch_to_tokens(0, 0)) == 1


def test_controls_and_clicks_reread_the_cache(explorer, sample_set):
    em, _ = explorer
    case = next(s for s in sample_set if s.mask)
    a = analyze(em, em.variants[0], read_image(case.image), case.question)
    fused = a.attention()
    assert np.allclose(fused, a.maps["attention"])
    one_head = a.attention(layer=em.n_layers - 1, head=1)
    assert one_head.shape == (4, 4) and not np.allclose(one_head, fused)
    assert not np.allclose(a.attention(fusion="max"), fused)
    per_token = [a.attention(token=i) for i in range(len(a.tokens))]
    assert len(per_token) > 1
    assert np.allclose(np.mean(per_token, 0), fused)  # the fused map averages the tokens' rows
    pairs = a.patch_to_tokens(1, 2)
    assert [t for t, _ in pairs] == [t.text for t in a.tokens]
    cell = np.mean([a.attention(token=i)[1, 2] for i in range(len(a.tokens))])
    assert np.isclose(np.mean([w for _, w in pairs]), cell)  # the reverse reading: same numbers
    with pytest.raises(ExplorerError, match="out of range"):
        a.attention(token=len(a.tokens) + 3)


def test_two_adapters_and_the_base_model_differ_on_the_same_input(explorer, sample_set):
    em, _ = explorer
    case = sample_set[0]
    image = read_image(case.image)
    variants = em.variants + [BASE]
    assert len(variants) == 3
    runs = {v: analyze(em, v, image, case.question) for v in variants}
    firsts = {v: a.maps["rollout"] for v, a in runs.items()}
    assert not np.allclose(firsts[variants[0]], firsts[variants[1]])
    assert not np.allclose(firsts[variants[0]], firsts[BASE])
    again = analyze(em, variants[0], image, case.question)  # switching back restores adapter A
    assert again.answer == runs[variants[0]].answer
    assert np.allclose(again.maps["rollout"], firsts[variants[0]])


def test_export_writes_overlays_lens_pages_and_numbers(explorer, sample_set, tmp_path):
    em, _ = explorer
    a = analyze(em, em.variants[1], read_image(sample_set[1].image), "Where is it? <script>alert(1)</script>")
    files = export([a], tmp_path)
    names = {f.name for f in files}
    assert {f"B__stage2_{m}.png" for m in method_names()} <= names
    assert "numbers.json" in names and "B__stage2_logit_lens.html" in names
    numbers = json.loads((tmp_path / "numbers.json").read_text())["analyses"][0]
    assert numbers["answer"] == a.answer and numbers["variant"] == "B: stage2"
    assert np.allclose(numbers["maps"]["logprob"], a.maps["logprob"])
    assert Image.open(tmp_path / "B__stage2_gradcam.png").size == (256, 256)
    page = lens_page(a)
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_without_eager_attention_the_other_methods_still_run(explorer, sample_set):
    em, _ = explorer
    em.model.set_attn_implementation("sdpa")
    try:
        a = analyze(em, em.variants[0], read_image(sample_set[0].image), sample_set[0].question)
    finally:
        em.model.set_attn_implementation("eager")
    # attention, rollout and the log-prob increase read attention weights: each says why it is missing
    assert all("eager" in a.errors[m] for m in ("attention", "rollout", "logprob"))
    # knockout edits sdpa's mask too
    assert set(a.maps) == {m.name for m in registered() if not m.eager} >= {"gradcam", "logit_lens", "occlusion",
                                                                          "knockout"}
    with pytest.raises(ExplorerError, match="eager"):
        a.attention()


def test_bad_requests_give_clear_errors(explorer, tmp_path):
    em, root = explorer
    with pytest.raises(ExplorerError, match="type a question"):
        analyze(em, em.variants[0], np.zeros((64, 64, 3), np.uint8), "   ")
    with pytest.raises(ExplorerError, match="unknown variant"):
        analyze(em, "C: nothing", np.zeros((64, 64, 3), np.uint8), "what?")
    with pytest.raises(ExplorerError, match="cannot load model"):
        load_explorer_model(str(tmp_path / "no-such-model"))
    with pytest.raises(ExplorerError, match="at most two"):
        load_explorer_model("demo:llava", ["a", "b", "c"])
    with pytest.raises(ExplorerError, match="no adapter_config.json"):
        load_explorer_model(str(next(root.glob("demo-arch-*"))), [str(tmp_path)])


def test_the_command_line_finds_a_runs_stages_and_defaults_to_the_demo(tmp_path, monkeypatch):
    explore = load_script("diagnostics/explore.py")
    assert explore.default_sources(tmp_path / "runs") == ("demo:llava", [])
    run = tmp_path / "runs" / "demo-llava-1"
    for stage in ("stage1", "stage2"):
        (run / stage / "adapter").mkdir(parents=True)
        (run / stage / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "x"}))
        (run / stage / "adapter" / "medvlm_adapter.json").write_text(json.dumps({"model_name_or_path": "demo:llava"}))
    assert explore.default_sources(tmp_path / "runs") == ("demo:llava", [])  # unfinished runs are not served
    (run / "stage2" / "manifest.json").write_text("{}")
    base, adapters = explore.default_sources(tmp_path / "runs")
    assert base == "demo:llava" and adapters == [str(run / "stage1" / "adapter"), str(run / "stage2" / "adapter")]
    with pytest.raises(ExplorerError, match="no stage1/adapter"):
        explore.run_sources(tmp_path)
    args = explore.parse_args([])
    assert args.host == "127.0.0.1" and args.port == 7860
    assert explore.main(["--model", str(tmp_path / "nothing-here")]) == 2  # a clear error, no traceback


def test_a_bfloat16_checkpoint_is_explained_by_every_method(explorer, sample_set):
    """Real checkpoints run in bfloat16: every method runs and its map comes back as a float64
    numpy array. (On this CPU-only machine the GPU placement itself is not exercised.)"""
    _, root = explorer
    folder = next(root.glob("demo-arch-*"))
    em = load_explorer_model(str(folder), [str(p) for p in sorted(root.glob("run-*/stage*/adapter"))],
                             dtype="bfloat16")
    case = next(s for s in sample_set if s.mask)
    a = analyze(em, em.variants[1], read_image(case.image), case.question, mask=read_mask(case.mask))
    assert a.errors == {} and list(a.maps) == method_names()
    assert all(m.dtype == np.float64 and np.isfinite(m).all() for m in a.maps.values())

"""The probe: every method's ROI numbers on phantom lesions, geometry, sanity, trust rule, time budget."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from medvlm.diagnostics.capture import prepare_example
from medvlm.diagnostics.methods import method_names
from medvlm.diagnostics.probe import (
    probe_example,
    run_probe,
    select_probe_records,
    trust_verdict,
)
from medvlm.diagnostics.probe_summary import summarize_methods
from medvlm.models.families import FAMILIES


@pytest.fixture(scope="module")
def phantom_records(small_phantom):
    from medvlm.data_curation.phantom import load_phantom

    return load_phantom(small_phantom, kind="qa")


@pytest.fixture(scope="module")
def loaded(tiny_folders):
    from medvlm.models.registry import load_model_and_processor

    return {fam: load_model_and_processor(str(tiny_folders(fam))) for fam in FAMILIES}


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_probe_writes_json_with_every_methods_roi_numbers(loaded, phantom_records, tmp_path, fam):
    lm = loaded[fam]
    result = run_probe(lm.model, lm.processor, lm.family, phantom_records, tmp_path, max_examples=4)
    on_disk = json.loads((tmp_path / "diagnostics.json").read_text())
    assert on_disk["n_examples"] == 4 == len(on_disk["examples"]) and on_disk["methods"] == method_names()
    for name in method_names():
        summary = on_disk["summary"][name]
        for key in ("roi_mass_mean", "roi_chance_mean", "roi_ratio_mean", "pointing_game_rate", "focus_mean"):
            assert key in summary
        if summary["n"] == 0:  # undefined everywhere: NaN and the reason, never a silent 0
            assert np.isnan(summary["roi_mass_mean"]) and summary["nan_reasons"]
        else:
            assert 0 <= summary["roi_mass_mean"] <= 1 and summary["roi_chance_mean"] > 0
        for ex in on_disk["examples"]:
            scores = ex["methods"][name]
            assert np.isfinite(scores["roi_mass"]) or scores["nan_reasons"]
        assert on_disk["trust"][name]["trusted"] in (True, False, None)
        assert on_disk["sanity"]["summary"][name]["n"] == 2
    # geometry: embeddings + one entry per decoder layer, image and text tokens apart, pooled
    geo = on_disk["geometry"]
    n_layers = len(lm.family.decoder_layers(lm.model))
    assert geo["n_layers"] == n_layers + 1 and len(geo["linearity"]) == n_layers
    assert geo["groups"]["image"] == (4 + 24) * 16 and geo["groups"]["text"] > geo["n_layers"]  # 24 extra passes
    assert 1 <= len(on_disk["top_heads"]) <= 10 and sum(on_disk["logit_lens_best_layers"].values()) == 4 * 16
    ex0 = on_disk["examples"][0]
    assert ex0["answer_entropy"] > 0 and isinstance(ex0["predicted_token"], str)
    page = ex0["overlays"].pop("logit_lens_page")  # the interactive logit-lens page of the example
    assert (tmp_path / page).read_text().startswith("<!DOCTYPE html>")
    for rel in ex0["overlays"].values():
        assert (tmp_path / rel).is_file()
        assert min(Image.open(tmp_path / rel).size) >= 256  # the 64-pixel input enlarged to stay readable
    assert "overlays" not in on_disk["examples"][2]  # only the first two examples are drawn
    # the shared-pass maps of the drawn examples, compared across rewordings of the question
    div = ex0["paraphrase_divergence"]
    if div["n_variants"]:
        assert set(div["methods"]) == {"attention", "rollout", "logit_lens"}
        assert all(0.0 <= m["js_distance_mean"] <= 1.0 for m in div["methods"].values())
    else:
        assert div["reason"]
    assert result["timings"]["n_examples"] == 4


def test_attention_map_from_the_shared_pass_equals_raw_attention(loaded, phantom_records):
    from collections import Counter

    from medvlm.diagnostics.saliency import raw_attention

    lm = loaded["llava"]
    rec = select_probe_records(phantom_records, 1)[0][0]
    _, maps, ex, hidden = probe_example(lm.model, lm.processor, lm.family, rec, method_names(), Counter())
    np.testing.assert_allclose(maps["attention"], raw_attention(lm.model, lm.family, ex, fusion="mean"), rtol=1e-5)
    assert len(hidden["layers"]) == len(lm.family.decoder_layers(lm.model)) + 1
    assert hidden["image_mask"].sum() == 16


def test_probe_set_is_fixed_diverse_and_records_missing_masks(phantom_records, tmp_path):
    recs = [dict(r) for r in phantom_records]
    chosen, skipped = select_probe_records(recs, 6)
    assert [r["id"] for r in chosen] == [r["id"] for r in select_probe_records(recs, 6)[0]]
    assert all(r["roi"] for r in chosen) and len({r["image"] for r in chosen}) == 6
    groups = {(r["modality"], r["body_part"]) for r in chosen}
    assert len(groups) == min(6, len({(r["modality"], r["body_part"]) for r in recs if r["roi"]}))
    broken = dict(chosen[0], roi=str(tmp_path / "gone.png"), image="other.png", id="broken")
    _, skipped = select_probe_records([broken, *recs], 6)
    assert skipped == [{"id": "broken", "reason": f"mask {tmp_path / 'gone.png'} does not exist"}]


def _rows(method: str, masses: list[float], chance: float = 0.02) -> list[dict]:
    return [{"methods": {method: {"roi_mass": m, "roi_chance": chance, "roi_mass_ratio": m / chance}}}
            for m in masses]


def test_trust_rule_needs_consistently_better_than_chance_and_a_passed_randomisation_test():
    consistent = summarize_methods(_rows("a", [0.05, 0.04, 0.06, 0.03, 0.05, 0.07]), ["a"])["a"]
    one_lucky = summarize_methods(_rows("b", [0.3, 0.0, 0.0, 0.01, 0.0, 0.0, 0.0]), ["b"])["b"]
    assert one_lucky["roi_ratio_mean"] > 2 and one_lucky["n_above_chance"] == 1  # the mean alone would pass it
    assert consistent["above_chance_p"] < 0.05 < one_lucky["above_chance_p"]
    methods = {"a": consistent, "b": one_lucky, "c": {**consistent}, "d": {"roi_ratio_mean": float("nan")},
               "e": {"roi_ratio_mean": 0.8, "above_chance_p": 0.9},
               "f": summarize_methods(_rows("f", [0.05, 0.04]), ["f"])["f"]}
    sanity = {k: {"passes": k != "c"} for k in "abcdef"}
    verdict = trust_verdict(methods, sanity)
    assert [verdict[k]["trusted"] for k in "abcdef"] == [True, False, False, None, False, None]
    assert "1 of 7 examples" in verdict["b"]["reason"] and "randomised" in verdict["c"]["reason"]
    assert "chance" in verdict["e"]["reason"] and "too few examples" in verdict["f"]["reason"]
    assert trust_verdict({"a": consistent}, None)["a"]["trusted"] is None


@pytest.mark.parametrize("fam", list(FAMILIES))
def test_probe_reads_the_models_own_first_answer_token(loaded, phantom_records, fam):
    """The probe's prediction, entropy and first-token check come from the position that predicts the first
    answer token: the same token and distribution as the first step of greedy generation."""
    import torch

    lm = loaded[fam]
    rec = select_probe_records(phantom_records, 1)[0][0]
    row, _, ex, _ = probe_example(lm.model, lm.processor, lm.family, rec, ["attention"], Counter())
    with torch.no_grad():
        gen = lm.model.generate(**ex.inputs, max_new_tokens=1, do_sample=False, output_scores=True,
                                return_dict_in_generate=True)
    first = gen.scores[0][0].float()
    logp = torch.log_softmax(first, -1)
    assert row["predicted_token_id"] == int(gen.sequences[0, -1]) == int(first.argmax())
    assert row["answer_entropy"] == pytest.approx(float(-(logp.exp() * logp).sum()), abs=1e-4)
    answered = prepare_example(lm.model, lm.processor, lm.family, rec["image"], rec["question"], rec["answer"])
    assert ex.target_positions[0] == answered.target_positions[0]  # same position with and without the answer
    assert row["first_token_correct"] == (row["predicted_token_id"] == answered.target_ids[0])


def test_time_budget_stops_the_probe_and_lists_what_was_skipped(loaded, phantom_records, tmp_path):
    lm = loaded["paligemma"]
    ticks = itertools.count(0.0, 1.0)  # every clock reading advances one "second"
    result = run_probe(lm.model, lm.processor, lm.family, phantom_records, tmp_path, methods=("attention",),
                       max_examples=5, time_budget=3.0, clock=lambda: next(ticks))
    assert result["n_examples"] == 1
    reasons = [s["reason"] for s in result["skipped"] if "id" in s]
    assert len([r for r in reasons if r.startswith("time budget")]) == 4
    assert any(r.startswith("randomisation test skipped") for r in reasons)
    geo_skip = [s for s in result["skipped"] if s.get("what") == "geometry_examples"]
    assert geo_skip and geo_skip[0]["n"] == 23 and geo_skip[0]["reason"].startswith("time budget")
    assert result["sanity"]["examples"] == [] and result["trust"]["attention"]["passes_randomization"] is None


def test_bad_probe_input_is_refused_with_the_fix(loaded, phantom_records, tmp_path):
    lm = loaded["paligemma"]
    with pytest.raises(ValueError, match="unknown diagnostics method"):
        run_probe(lm.model, lm.processor, lm.family, phantom_records, tmp_path, methods=("occlusion_v2",))
    healthy = [dict(r) for r in phantom_records if not r["roi"]]
    with pytest.raises(ValueError, match="no record has a lesion mask"):
        run_probe(lm.model, lm.processor, lm.family, healthy, tmp_path)

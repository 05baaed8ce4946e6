"""The probe: every method's ROI numbers on phantom lesions, geometry, sanity, trust rule, time budget."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from medvlm.diagnostics.probe import (
    METHODS,
    probe_example,
    run_probe,
    select_probe_records,
    trust_verdict,
)


@pytest.fixture(scope="module")
def phantom_records(small_phantom):
    from medvlm.data_curation.phantom import load_phantom

    return load_phantom(small_phantom, kind="qa")


@pytest.fixture(scope="module")
def loaded(tiny_paligemma, tiny_llava):
    from medvlm.models.registry import load_model_and_processor

    return {"paligemma": load_model_and_processor(str(tiny_paligemma)),
            "llava": load_model_and_processor(str(tiny_llava))}


@pytest.mark.parametrize("fam", ["paligemma", "llava"])
def test_probe_writes_json_with_every_methods_roi_numbers(loaded, phantom_records, tmp_path, fam):
    lm = loaded[fam]
    result = run_probe(lm.model, lm.processor, lm.family, phantom_records, tmp_path, max_examples=4)
    on_disk = json.loads((tmp_path / "diagnostics.json").read_text())
    assert on_disk["n_examples"] == 4 == len(on_disk["examples"]) and on_disk["methods"] == list(METHODS)
    for name in METHODS:
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
    for rel in ex0["overlays"].values():
        assert (tmp_path / rel).is_file()
    assert "overlays" not in on_disk["examples"][2]  # only the first two examples are drawn
    assert result["timings"]["n_examples"] == 4


def test_attention_map_from_the_shared_pass_equals_raw_attention(loaded, phantom_records):
    from collections import Counter

    from medvlm.diagnostics.saliency import raw_attention

    lm = loaded["llava"]
    rec = select_probe_records(phantom_records, 1)[0][0]
    _, maps, ex, hidden = probe_example(lm.model, lm.processor, lm.family, rec, METHODS, Counter())
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


def test_trust_rule_needs_better_than_chance_and_a_passed_randomisation_test():
    methods = {"a": {"roi_ratio_mean": 2.0}, "b": {"roi_ratio_mean": 0.8}, "c": {"roi_ratio_mean": 3.0},
               "d": {"roi_ratio_mean": float("nan")}}
    sanity = {"a": {"passes": True}, "b": {"passes": True}, "c": {"passes": False}, "d": {"passes": True}}
    verdict = trust_verdict(methods, sanity)
    assert [verdict[k]["trusted"] for k in "abcd"] == [True, False, False, None]
    assert "chance" in verdict["b"]["reason"] and "randomised" in verdict["c"]["reason"]
    assert trust_verdict({"a": {"roi_ratio_mean": 2.0}}, None)["a"]["trusted"] is None


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
    with pytest.raises(ValueError, match="unknown probe methods"):
        run_probe(lm.model, lm.processor, lm.family, phantom_records, tmp_path, methods=("occlusion",))
    healthy = [dict(r) for r in phantom_records if not r["roi"]]
    with pytest.raises(ValueError, match="no record has a lesion mask"):
        run_probe(lm.model, lm.processor, lm.family, healthy, tmp_path)

"""The head comparison of a two-stage run in the report flow: diagnostics/run_diagnostics.py on a run
folder with stage1/ and stage2/ (tiny LLaVA, random LoRA adapters) writes head_comparison.json (base with
the adapter disabled, stage 1, stage 2 on the same probe examples) and the report shows its tables and
figures."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from scripts import load_script

from medvlm.diagnostics.heads_report import HEADS_FILE


@pytest.fixture(scope="module")
def two_stage_run(tmp_path_factory, tiny_llava, small_phantom):
    from peft import LoraConfig, get_peft_model

    from medvlm.models.registry import load_model_and_processor

    run = tmp_path_factory.mktemp("heads") / "run"
    for seed, stage in enumerate(("stage1", "stage2")):
        torch.manual_seed(seed)
        lm = load_model_and_processor(str(tiny_llava))
        peft = get_peft_model(lm.model, LoraConfig(r=4, lora_alpha=16, target_modules=["o_proj", "v_proj"],
                                                   init_lora_weights=False))
        peft.save_pretrained(str(run / stage / "adapter"))
        (run / stage / "adapter" / "medvlm_adapter.json").write_text(json.dumps(
            {"model_name_or_path": str(tiny_llava), "family": "llava", "merged_into_base": []}))
        (run / stage / "config.yaml").write_text(yaml.safe_dump({
            "model_name_or_path": str(tiny_llava), "dataset": "phantom", "eval_dataset": "phantom",
            "phantom_patients": small_phantom.n_patients, "phantom_seed": small_phantom.seed, "eval_split": "test",
            "stage": stage}))
        (run / stage / "metrics.json").write_text(json.dumps({"closed": {"accuracy": 0.5, "n": 10}}))
    # the stages' own probe results (as run_probe writes them; the probe itself is tested elsewhere), so the
    # report flow goes straight to the head comparison
    heads = [{"layer": 1, "head": 2, "increase": 0.5, "n_examples": 2}]
    (run / "stage2" / "diagnostics").mkdir()
    (run / "stage2" / "diagnostics" / "diagnostics.json").write_text(json.dumps(
        {"status": "ok", "methods": [], "examples": [], "top_heads": heads, "image_top_heads": heads}))
    return run


def test_a_two_stage_run_gets_the_head_comparison_in_its_report(two_stage_run, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    script = load_script("diagnostics/run_diagnostics.py")
    assert script.main([str(two_stage_run), "--head-examples", "5"]) == 0
    heads = json.loads((two_stage_run / HEADS_FILE).read_text())
    assert heads["variants"] == ["base", "stage1", "stage2"]
    assert 2 <= heads["n_examples"] == len(heads["examples"]) <= 5  # the small phantom's lesion images
    assert [(p["a"], p["b"]) for p in heads["pairs"]] == [("base", "stage1"), ("base", "stage2"),
                                                           ("stage1", "stage2")]
    base, s1, s2 = (np.asarray(heads["mean_scores"][n]) for n in heads["variants"])
    assert base.shape == s1.shape == (2, 4) and not np.allclose(base, s1) and not np.allclose(s1, s2)
    assert heads["norm"] == "frozen" and set(heads["timing"]) == {"base", "stage1", "stage2"}
    md = (two_stage_run / "report" / "report.md").read_text()
    page = (two_stage_run / "report" / "report.html").read_text()
    for text in ("Important heads before and after fine-tuning", "Top heads per variant", "How much the ranking moved",
                 "Heads that gained or lost most", "What the top heads write", "Spearman rho"):
        assert text in md and text in page
    assert "heads_heatmap" in md and "heads_scatter" in md
    assert (two_stage_run / "report" / "figures").is_dir()
    # the stage's own probe names each score it shows
    assert "Top heads by head importance (whole head output at the last position)" in md
    assert "Top heads by log-probability increase summed over the image positions" in md
    # a second report reuses the saved comparison unless asked to recompute
    before = (two_stage_run / HEADS_FILE).stat().st_mtime_ns
    assert script.main([str(two_stage_run), "--no-compute"]) == 0
    assert (two_stage_run / HEADS_FILE).stat().st_mtime_ns == before

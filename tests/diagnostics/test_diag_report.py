"""Report (Markdown + self-contained HTML, escaped), indicators, model card with model-index, push only on request."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import yaml
from huggingface_hub import HfApi, ModelCard
from scripts import load_script

from medvlm.diagnostics import model_card as mc
from medvlm.diagnostics.methods import method_names
from medvlm.diagnostics.report import (
    indicators,
    load_run,
    report_blocks,
    write_report,
)
from medvlm.utils.render import render_html, render_markdown

EVIL = "Where is the <script>alert(1)</script> abnormality?"


def _metrics(acc: float, chest_acc: float) -> dict:
    slices = {"body_part": {"chest": {"closed": {"accuracy": chest_acc, "n": 40}},
                            "head": {"closed": {"accuracy": acc + 0.02, "n": 40}}},
              "modality": {"CT": {"closed": {"accuracy": acc, "n": 80}}}}
    return {"closed": {"accuracy": acc, "n": 80}, "open": {"rougeL": 0.4, "bleu": 12.5, "token_f1": 0.5, "n": 20},
            "slices": slices}


@pytest.fixture(scope="module")
def lora_stage(tmp_path_factory, tiny_paligemma, small_phantom):
    """A finished stage folder: config, adapter of a tiny model, two checkpoints, final metrics."""
    from peft import LoraConfig, get_peft_model

    from medvlm.models.registry import load_model_and_processor

    stage = tmp_path_factory.mktemp("run") / "stage2"
    lm = load_model_and_processor(str(tiny_paligemma))
    peft_model = get_peft_model(lm.model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    peft_model.save_pretrained(str(stage / "adapter"))
    (stage / "adapter" / "medvlm_adapter.json").write_text(json.dumps({"model_name_or_path": "google/paligemma-3b-pt-224"}))
    (stage / "config.yaml").write_text(yaml.safe_dump({
        "model_name_or_path": "google/paligemma-3b-pt-224", "dataset": "phantom", "eval_dataset": "phantom",
        "phantom_patients": small_phantom.n_patients, "phantom_seed": small_phantom.seed, "eval_split": "test",
        "stage": "stage2", "lora_r": 4, "learning_rate": 0.001}))
    for step, acc in ((1, 0.6), (2, 0.7)):
        ckpt = stage / f"checkpoint-{step}"
        ckpt.mkdir(parents=True)
        (ckpt / "metrics.json").write_text(json.dumps({**_metrics(acc, acc - 0.2), "global_step": step}))
    final = {**_metrics(0.72, 0.5), "blank_image": {"closed": {"accuracy": 0.5, "n": 80}}, "train": {"steps": 2}}
    (stage / "metrics.json").write_text(json.dumps(final))
    return stage, lm


@pytest.fixture(scope="module")
def probed_stage(lora_stage, small_phantom):
    """The stage with diagnostics in both checkpoints; one probe question holds a <script> tag."""
    from medvlm.data_curation.phantom import load_phantom
    from medvlm.diagnostics.probe import run_probe

    stage, lm = lora_stage
    records = [dict(r) for r in load_phantom(small_phantom, kind="qa")]
    first = next(i for i, r in enumerate(records) if r["roi"] and json.loads(r["meta"])["qtype"] == "location")
    records[first]["question"] = EVIL
    for step in (1, 2):
        run_probe(lm.model, lm.processor, lm.family, records, stage / f"checkpoint-{step}" / "diagnostics",
                  methods=("attention", "rollout", "logit_lens"), max_examples=4, geometry_examples=8,
                  extra={"global_step": step})
    return stage


def test_report_markdown_and_html_with_escaped_text(probed_stage, tmp_path):
    run = load_run(probed_stage)
    assert [p["name"] for p in run["stages"][0]["points"]] == ["checkpoint-1", "checkpoint-2", "final"]
    written = write_report(run, tmp_path / "report")
    md, page = written["markdown"].read_text(), written["html"].read_text()
    for text in (md, page):
        assert "<script>alert(1)</script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
        assert "Which saliency methods can be trusted" in text and "Where the model is likely to fail" in text
    assert "the lesion's area share" in md and "&#x27;" not in md  # Markdown escapes markup, not quotes
    assert "<script" not in page and 'src="data:image/png;base64,' in page and "http" not in page
    png = page.split('src="data:image/png;base64,')[1].split('"')[0]
    assert base64.b64decode(png).startswith(b"\x89PNG")
    # across checkpoints: accuracy and ROI mass per method for each checkpoint
    row2 = next(line for line in md.splitlines() if line.startswith("| checkpoint-2 |"))
    assert "| 0.700 |" in row2 and row2.count("(x") == 3
    for fig in ("accuracy", "roi", "linearity", "overlay_attention"):
        assert list((tmp_path / "report" / "figures").glob(f"*_{fig}.png"))
    assert json.loads(written["indicators"].read_text())["stage2"]
    # the contextualisation measures per layer, image and text apart, next to anisotropy and ID
    ctx = md.split("### Contextualisation per layer")[1].split("###")[0]
    assert "| self-sim. (image) | self-sim. (text) |" in ctx and "| decoder.0 |" in ctx


def test_indicators_flag_groups_likely_to_fail(probed_stage, tmp_path):
    stage = load_run(probed_stage)["stages"][0]
    groups = {(g["field"], g["group"]): g for g in indicators(stage)}
    chest = groups[("body_part", "chest")]
    assert chest["likely_to_fail"] and any("closed accuracy 0.50" in f for f in chest["flags"])
    assert chest["n_eval"] == 40 and chest["flip_rate"] is None  # no paraphrase results in this run
    assert not any("accuracy" in f for f in groups[("body_part", "head")]["flags"])
    # paraphrase results: a group whose answers flip under rewording is flagged
    rows = []
    for i in range(6):
        for variant, part in (("base", "head"), ("1", "head"), ("base", "chest"), ("1", "chest")):
            wrong = part == "chest" and variant == "1" and i % 2 == 0
            rows.append({"id": f"{part}{i}{variant}", "group": f"{part}{i}", "variant": variant, "answer": "yes",
                         "prediction": "no" if wrong else "yes", "answer_type": "closed", "body_part": part})
    (probed_stage / "eval").mkdir(exist_ok=True)
    (probed_stage / "eval" / "predictions_paraphrase.jsonl").write_text("\n".join(map(json.dumps, rows)))
    try:
        groups = {(g["field"], g["group"]): g for g in indicators(load_run(probed_stage)["stages"][0])}
    finally:
        (probed_stage / "eval" / "predictions_paraphrase.jsonl").unlink()
    assert groups[("body_part", "chest")]["flip_rate"] == pytest.approx(0.5)
    assert any("paraphrases flip" in f for f in groups[("body_part", "chest")]["flags"])
    assert groups[("body_part", "head")]["flip_rate"] == 0.0


def test_renderers_escape_every_text():
    blocks = [("h1", "<b>title</b>"), ("p", "a & b"), ("table", ["<th>"], [["x|y <i>"]]),
              ("figures", {"<fig>": b"\x89PNG"})]
    page = render_html(blocks, title="<t>")
    assert "<b>" not in page and "<i>" not in page and "<th>&lt;th&gt;</th>" in page and "&lt;t&gt;" in page
    md = render_markdown(blocks, None)
    assert "&lt;b&gt;title&lt;/b&gt;" in md and "x&#124;y &lt;i&gt;" in md and "a &amp; b" in md


def test_trust_table_shows_each_verdicts_stability_and_unstable_verdicts(tmp_path):
    """A probe where one method is far above chance on every example, one is borderline (p = 0.03) and one is
    far above chance but fails the randomisation test: trusted (1.00), unstable, not trusted (0.00)."""
    from medvlm.diagnostics.probe_summary import stability_settings, summarize_methods, trust_verdict

    diffs = {"far": [0.3, 0.25, 0.4, 0.2, 0.35, 0.3, 0.28, 0.33, 0.4, 0.22],
             "edge": [(-1 if rank in (1, 2, 6) else 1) * rank / 100 for rank in range(1, 11)],
             "frozen": [0.3, 0.25, 0.4, 0.2, 0.35, 0.3, 0.28, 0.33, 0.4, 0.22]}
    examples = [{"id": f"ex{i}", "answer_entropy": 0.5,
                 "methods": {m: {"roi_mass": 0.2 + d[i], "roi_chance": 0.2, "roi_mass_ratio": (0.2 + d[i]) / 0.2}
                             for m, d in diffs.items()}} for i in range(10)]
    summary = summarize_methods(examples, list(diffs))
    sanity = {m: {"passes": m != "frozen", "spearman_mean": 0.1} for m in diffs}
    diag = {"status": "ok", "methods": list(diffs), "examples": examples, "summary": summary,
            "sanity": {"examples": [], "summary": sanity}, "trust": trust_verdict(summary, sanity),
            "trust_stability": stability_settings()}
    (tmp_path / "run" / "diagnostics").mkdir(parents=True)
    (tmp_path / "run" / "diagnostics" / "diagnostics.json").write_text(json.dumps(diag))
    (tmp_path / "run" / "metrics.json").write_text(json.dumps(_metrics(0.8, 0.8)))
    written = write_report(load_run(tmp_path / "run"), tmp_path / "report")
    for md in (written["markdown"].read_text(), written["card_markdown"]):  # the report and the model card body
        header = next(line for line in md.splitlines() if line.startswith("| method |"))
        cells = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in md.splitlines()
                 if line.startswith(("| far ", "| edge ", "| frozen "))}
        stability, verdict = header.split(" | ").index("stability"), header.split(" | ").index("verdict")
        assert [cells[m][verdict] for m in diffs] == ["trusted", "unstable", "not trusted"]
        assert cells["far"][stability] == "1.00" and cells["frozen"][stability] == "0.00"
        assert 0.2 < float(cells["edge"][stability]) < 0.8
    assert "bootstrap resamples" in written["markdown"].read_text()


def test_model_card_has_model_index_and_is_saved_in_the_adapter(probed_stage):
    run = load_run(probed_stage)
    md = render_markdown(report_blocks(run), None, heading_offset=2)
    metrics = json.loads((probed_stage / "metrics.json").read_text())
    card = mc.build_model_card(probed_stage, md, metrics)
    data = card.data
    assert data.base_model == "google/paligemma-3b-pt-224" and data.library_name == "peft"
    assert "medical" in data.tags and "paligemma" in data.tags and data.datasets == ["phantom"]
    results = {r.metric_name: r.metric_value for r in data.eval_results}
    assert results["Closed-question accuracy"] == 0.72 and results["Open-question ROUGE-L"] == 0.4
    assert results["Closed-question accuracy (blank images, control)"] == 0.5
    assert all(r.dataset_split == "test" for r in data.eval_results)
    path = mc.save_model_card(card, probed_stage)
    assert path == probed_stage / "adapter" / "README.md"
    loaded = ModelCard.load(path)
    assert "model-index" in path.read_text() and len(loaded.data.eval_results) == len(data.eval_results)
    assert "## Diagnostic report" in loaded.text and "&lt;script&gt;" in loaded.text
    # a local base is named in the body, not in the metadata
    (probed_stage / "adapter" / "medvlm_adapter.json").write_text(json.dumps({"model_name_or_path": "/models/base"}))
    try:
        local = mc.build_model_card(probed_stage, md, {})
    finally:
        (probed_stage / "adapter" / "medvlm_adapter.json").write_text(
            json.dumps({"model_name_or_path": "google/paligemma-3b-pt-224"}))
    assert local.data.base_model is None and "/models/base" in local.text and not local.data.eval_results


def _no_network(monkeypatch) -> list:
    """Record hub calls instead of making them, as if online with a token (the push checks both first)."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_test_token")
    calls = []
    monkeypatch.setattr(ModelCard, "push_to_hub", lambda self, repo_id, **kw: calls.append(("card", repo_id)) or "url")
    monkeypatch.setattr(HfApi, "create_repo", lambda self, repo_id, **kw: calls.append(("create", repo_id)))
    monkeypatch.setattr(HfApi, "upload_folder", lambda self, **kw: calls.append(("upload", kw["repo_id"])))
    return calls


def test_push_only_when_asked(probed_stage, tmp_path, monkeypatch):
    calls = _no_network(monkeypatch)
    written = mc.run_report(probed_stage, tmp_path / "r1", compute_missing=False)
    assert calls == [] and "pushed" not in written
    assert written["cards"]["stage2"].read_text().startswith("---")
    written = mc.run_report(probed_stage, tmp_path / "r2", push_to_hub="me/adapter", compute_missing=False)
    assert calls == [("create", "me/adapter"), ("upload", "me/adapter"), ("card", "me/adapter")]
    assert "me/adapter" in written["cards"]["stage2"].read_text()


def test_script_probes_the_final_adapter_when_a_run_has_no_diagnostics(lora_stage, tiny_paligemma, tmp_path,
                                                                      monkeypatch):
    import shutil

    calls = _no_network(monkeypatch)
    stage, _ = lora_stage
    run = tmp_path / "fresh"
    shutil.copytree(stage, run / "stage2", ignore=shutil.ignore_patterns("diagnostics"))
    script = load_script("diagnostics/run_diagnostics.py")
    assert script.main([str(run), "--max-examples", "2", "--model-name-or-path", str(tiny_paligemma)]) == 0
    diag = json.loads((run / "stage2" / "diagnostics" / "diagnostics.json").read_text())
    assert diag["status"] == "ok" and diag["n_examples"] == 2 and diag["checkpoint"] == "final adapter"
    assert set(diag["summary"]) == set(method_names())
    assert diag["knockout"]["n_examples"] == 2  # the final probe computes the knockout section
    assert np.isfinite(diag["summary"]["attention"]["roi_mass_mean"])
    assert (run / "report" / "report.html").is_file() and (run / "stage2" / "adapter" / "README.md").is_file()
    assert calls == []
    with pytest.raises(SystemExit):
        script.main([str(tmp_path / "missing")])



def test_the_final_adapter_is_probed_again_only_when_asked(probed_stage, tiny_paligemma, tmp_path, monkeypatch):
    import shutil
    from pathlib import Path

    _no_network(monkeypatch)
    stage = probed_stage
    run = tmp_path / "probed"
    shutil.copytree(stage, run / "stage2", ignore=lambda folder, names: ["diagnostics"] if Path(folder) == stage else [])
    assert list((run / "stage2").glob("checkpoint-*/diagnostics/diagnostics.json"))
    script = load_script("diagnostics/run_diagnostics.py")
    final = run / "stage2" / "diagnostics" / "diagnostics.json"
    assert script.main([str(run), "--model-name-or-path", str(tiny_paligemma)]) == 0
    assert not final.exists()  # the checkpoints' diagnostics are reported as they are
    assert script.main([str(run), "--probe-final", "--max-examples", "1", "--model-name-or-path",
                        str(tiny_paligemma)]) == 0
    data = json.loads(final.read_text())
    assert data["checkpoint"] == "final adapter" and data["n_examples"] == 1

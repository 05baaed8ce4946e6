"""The scaling sweep's parts: the answer loss, run folders read as points, caching, the fit and report
on fake run folders whose losses follow a known law, and the command's arguments."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from scripts import load_script
from tiny_models import FAMILIES, eager_tiny

from medvlm.models.inputs import VLMCollator
from medvlm.training import scaling_sweep as sweep
from medvlm.training.scaling_sweep import SweepPlan, answer_nll, fit_points, format_report, read_point

FAST = dict(exponent_grid=(0.0, 0.5, 1.0), intercept_grid=(1.0,), floor_grid=(0.3, 0.9))
PER_RANK = 11040  # trainable parameters per unit of rank (LoRA's count is linear in the rank)


def _examples(processor, family, n: int, seed: int = 0) -> list[dict]:
    """n 64-pixel images prepared by the family as training prepares them (a dynamic-resolution
    processor has no fixed size to draw them at), with short questions and answers."""
    rng = np.random.default_rng(seed)
    images = family.prepare_images(processor, [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)])
    qa = [("where is the lesion?", "left lung"), ("is it near the liver?", "yes"), ("which organ?", "the kidney")]
    return [{"image": images[i], "question": qa[i % 3][0], "answer": qa[i % 3][1]} for i in range(n)]


@pytest.mark.parametrize("fam", FAMILIES)
def test_answer_nll_is_the_models_own_loss_over_answer_tokens(fam):
    model, processor, family = eager_tiny(fam)
    collator = VLMCollator(family, processor)
    examples = _examples(processor, family, 5)
    labels = ["open", "closed", "open", "open", "closed"]
    got = answer_nll(model, collator, examples, labels, batch_size=2)  # batches of 2, 2, 1
    with torch.no_grad():
        want = model(**collator(examples)).loss  # transformers' shifted mean over labelled tokens
    assert got["loss"] == pytest.approx(float(want), rel=1e-5)
    n_answer = int((collator(examples)["labels"][:, 1:] != -100).sum())
    assert got["n_tokens"] == n_answer and got["n_examples"] == 5
    by = got["by_template"]
    assert set(by) == {"open", "closed"} and by["open"]["n_examples"] == 3
    # the overall loss is the token-weighted mean of the templates' losses
    pooled = sum(v["loss"] * v["n_tokens"] for v in by.values()) / got["n_tokens"]
    assert pooled == pytest.approx(got["loss"], rel=1e-9)
    closed_only = answer_nll(model, collator, [examples[1], examples[4]], ["closed"] * 2)
    assert closed_only["loss"] == pytest.approx(by["closed"]["loss"], rel=1e-5)


def law(rank, D, A=600.0, alpha=0.3, beta=0.4, E=0.1):
    return A * (rank * PER_RANK) ** -alpha * D ** -beta + E


def fake_run(root, D: int, rank: int, noise: float = 0.0, seed: int = 0):
    """A finished run folder as the stage recipe and the sweep leave it, with losses from known laws:
    closed questions follow alpha 0.2 / beta 0.5, open ones alpha 0.5 / beta 0.2 (A chosen so the
    power-law term spans about 0.1 to 10 times E over the grid: every parameter is identified)."""
    rng = np.random.default_rng(seed)
    run = root / f"d{D}-r{rank}"
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump({"lora_r": rank, "lora_alpha": 2 * rank}))
    (run / "manifest.json").write_text(json.dumps({"data": {"train": D}, "trainable_parameters": {
        "language": {"trainable": rank * PER_RANK - 40 * rank, "total": 10 ** 6},
        "vision": {"trainable": 40 * rank, "total": 10 ** 5}}}))
    closed = law(rank, D, 100.0, 0.2, 0.5, 0.05) * np.exp(rng.normal(0, noise))
    open_ = law(rank, D, 2000.0, 0.5, 0.2, 0.3) * np.exp(rng.normal(0, noise))
    (run / sweep.EVAL_FILE).write_text(json.dumps({
        "loss": law(rank, D) * float(np.exp(rng.normal(0, noise))), "n_tokens": 400,
        "by_template": {"closed": {"loss": closed, "n_tokens": 300}, "open": {"loss": open_, "n_tokens": 100}}}))
    return run


def test_read_point_takes_D_rank_and_trainable_parameters_from_the_run_folder(tmp_path):
    point = read_point(fake_run(tmp_path, 500, 4))
    assert point == {"run": "d500-r4", "D": 500, "rank": 4, "trainable": 4 * PER_RANK,
                     "loss": pytest.approx(law(4, 500)), "by_template": pytest.approx(point["by_template"])}
    assert set(point["by_template"]) == {"closed", "open"}
    unfinished = tmp_path / "d1000-r4"
    unfinished.mkdir()
    with pytest.raises(FileNotFoundError, match="d1000-r4 has no manifest.json"):
        read_point(unfinished)


def test_fit_on_fake_runs_writes_the_json_figures_and_predicts_the_held_out_run(tmp_path):
    """Noise-free losses from known laws: the plumbing (folders → points → fits → JSON, figures,
    report) must give the laws back to optimiser precision; recovery under noise is
    tests/diagnostics/test_scaling.py's job."""
    runs = tmp_path / "runs"
    points = [read_point(fake_run(runs, d, r)) for d in (250, 500, 1000, 2000, 4000) for r in (2, 4, 8, 16)]
    holdout = read_point(fake_run(runs, 16000, 16))
    result = fit_points(points, holdout, tmp_path, n_bootstrap=20, **FAST)
    saved = json.loads((tmp_path / "scaling_fit.json").read_text())
    assert saved["fit"]["converged"] and saved["holdout"]["run"] == "d16000-r16"
    for key, value in {"A": 600.0, "alpha": 0.3, "beta": 0.4, "E": 0.1}.items():
        assert saved["fit"][key] == pytest.approx(value, rel=1e-3), key
    assert abs(result["holdout"]["relative_error"]) < 1e-3  # 4x past the largest D
    # per template: the law each template was drawn from
    assert result["by_template"]["closed"]["beta"] == pytest.approx(0.5, rel=1e-3)
    assert result["by_template"]["open"]["beta"] == pytest.approx(0.2, rel=1e-3)
    assert set(result["holdout_by_template"]) == {"closed", "open"}
    # the data-only law per size, one fit per rank; at rank 2 its A absorbs X^-alpha
    assert set(result["data_only"]) == {f"{r * PER_RANK:g}" for r in (2, 4, 8, 16)}
    assert result["data_only"]["22080"]["A"] == pytest.approx(600.0 * 22080 ** -0.3, rel=1e-3)
    for name in ("scaling.png", "scaling_closed.png", "scaling_open.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    text = format_report(result)
    assert "held-out run d16000-r16 (D=16000): predicted" in text and "relative error" in text
    assert "joint fit (20 points): A = " in text and "closed questions (20 points)" in text


def test_fits_that_cannot_be_made_are_reported_not_dropped(tmp_path):
    """Two data sizes: the joint law fits, the data-only law (3 parameters) cannot, and says why."""
    points = [read_point(fake_run(tmp_path / "runs", d, r)) for d in (250, 500) for r in (2, 16)]
    result = fit_points(points, None, tmp_path, n_bootstrap=0, **FAST)
    assert result["fit"]["converged"] and "holdout" not in result
    assert result["data_only"][f"{2 * PER_RANK:g}"] == "not fitted: 2 points for 3 parameters: the D law needs at least 3 points"
    assert "data only, trainable = 22080: not fitted: 2 points for 3 parameters" in format_report(result)
    one_rank = [read_point(fake_run(tmp_path / "one", d, 2)) for d in (250, 500, 1000, 2000)]
    with pytest.raises(ValueError, match="all 4 points have X = 22080"):
        fit_points(one_rank, None, tmp_path, n_bootstrap=0, **FAST)


def test_a_finished_run_is_reused_only_with_its_own_config_and_an_interrupted_one_is_redone(tmp_path, monkeypatch):
    from medvlm.config import to_yaml

    calls = []
    monkeypatch.setattr(sweep, "run_stage", lambda *configs: calls.append(configs[-1].output_dir))
    cfg = tmp_path / "stage2.yaml"
    cfg.write_text(yaml.safe_dump({"model_name_or_path": "demo:llava", "lora_r": 4, "report_to": "none"}))
    finished = tmp_path / "finished"
    finished.mkdir()
    (finished / "config.yaml").write_text(to_yaml(*sweep._stage_config([str(cfg), "--output_dir", str(finished)])))
    (finished / "manifest.json").write_text("{}")
    assert sweep._run([str(cfg)], finished) == finished and calls == []
    with pytest.raises(ValueError, match="finished run made with other settings \\(lora_r: 4 there, 8 now\\)"):
        sweep._run([str(cfg), "--lora_r", "8"], finished)
    interrupted = tmp_path / "interrupted"
    (interrupted / "checkpoint-3").mkdir(parents=True)
    sweep._run([str(cfg)], interrupted)
    assert calls == [str(interrupted)] and not interrupted.exists()  # the stale folder was cleared first


def test_plan_checks_and_command_arguments(tmp_path):
    plan = SweepPlan(out=tmp_path, data_sizes=(100, 200), ranks=(2, 8))
    assert plan.holdout == (800, 8)
    with pytest.raises(ValueError, match="data size 200 must exceed the sweep's largest"):
        SweepPlan(out=tmp_path, data_sizes=(100, 200), holdout=(200, 8))
    with pytest.raises(ValueError, match="size_variable 'params'"):
        SweepPlan(out=tmp_path, size_variable="params")
    with pytest.raises(ValueError, match="positive integers, got \\[0\\]"):
        SweepPlan(out=tmp_path, ranks=(0, 4))
    argv = sweep.point_argv(SweepPlan(out=tmp_path, stage_args=["--learning_rate", "1e-3"]),
                                         tmp_path / "train-500", 8, tmp_path / "adapter")
    assert argv[argv.index("--lora_r") + 1] == "8" and argv[argv.index("--lora_alpha") + 1] == "16"
    assert argv[-2:] == ["--learning_rate", "1e-3"]  # the user's overrides come last and win
    script = load_script("diagnostics/scaling_sweep.py")
    parsed = script.parse(["--out", str(tmp_path), "--data-sizes", "250", "500", "--ranks", "4", "16",
                           "--holdout", "4000", "16", "--", "--learning_rate", "1e-3"])
    assert parsed.data_sizes == (250, 500) and parsed.holdout == (4000, 16)
    assert parsed.stage_args == ["--learning_rate", "1e-3"]
    assert script.main(["--out", str(tmp_path), "--data-sizes", "500", "--holdout", "400", "8"]) == 2


@pytest.fixture
def one_torch_thread():
    """One intra-op thread: a tiny model gains nothing from two, and on shared cores the second
    one's spin-waiting made this test up to 7 times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_tiny_sweep_runs_end_to_end_and_reuses_its_runs(tiny_llava, small_phantom, tmp_path, monkeypatch,
                                                          one_torch_thread):
    """Stage 1, four stage-2 points and a held-out run on a tiny random model, the fit, the report;
    a second call trains nothing (every run folder is finished) and gives the same numbers.
    About 15 s on 2 busy CPU cores."""
    common = {"model_name_or_path": str(tiny_llava), "dataset": "phantom", "phantom_patients": 36,
              "eval_dataset": "phantom", "per_device_train_batch_size": 8, "learning_rate": 1e-3,
              "dataloader_num_workers": 0, "disable_tqdm": True, "report_to": "none", "logging_steps": 1}
    (tmp_path / "s1.yaml").write_text(yaml.safe_dump({**common, "stage": "stage1"}))
    (tmp_path / "s2.yaml").write_text(yaml.safe_dump({**common, "stage": "stage2"}))
    plan = SweepPlan(out=tmp_path / "sweep", config=str(tmp_path / "s2.yaml"), stage1_config=str(tmp_path / "s1.yaml"),
                     stage1_steps=2, data_sizes=(16, 32), ranks=(2, 4), holdout=(64, 4), eval_samples=12,
                     n_bootstrap=10, stage_args=["--max_eval_samples", "4"], fit_options=FAST)
    result = sweep.run_sweep(plan)
    assert [p["run"] for p in result["points"]] == ["d16-r2", "d16-r4", "d32-r2", "d32-r4"]
    assert result["holdout_point"]["D"] == 64 and result["validation"]["n"] == 12
    assert result["points"][1]["trainable"] == 2 * result["points"][0]["trainable"]  # LoRA count is linear in r
    assert all(p["loss"] > 0 and set(p["by_template"]) <= {"closed", "open"} for p in result["points"])
    assert (plan.out / "scaling.png").is_file() and "held-out" in format_report(result)

    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr("medvlm.training.stage.run_stage", no_training)
    again = sweep.run_sweep(plan)
    assert [p["loss"] for p in again["points"]] == [p["loss"] for p in result["points"]]


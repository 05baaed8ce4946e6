"""CheckpointEvalCallback: metrics.json in checkpoint-N, configurable subset/metrics, W&B scalars and table."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from medvlm.training.callbacks import CheckpointEvalCallback, checkpoint_scalars


@pytest.fixture(scope="module")
def setup(tiny_paligemma, small_phantom):
    from medvlm.data_curation.phantom import load_phantom
    from medvlm.models.inputs import prepare_examples
    from medvlm.models.registry import load_model_and_processor

    loaded = load_model_and_processor(str(tiny_paligemma))
    records = load_phantom(small_phantom, kind="qa", split="validation").select(range(10))
    return loaded, records, prepare_examples(records, loaded.processor, loaded.family)


def _save(cb, model, out, step):
    args = SimpleNamespace(output_dir=str(out))
    state = SimpleNamespace(is_world_process_zero=True, global_step=step)
    cb.on_save(args, state, SimpleNamespace(), model=model)
    return out / f"checkpoint-{step}"


class FakeTrainer:
    def __init__(self):
        self.logged: list[dict] = []

    def log(self, logs):
        self.logged.append(dict(logs))


def test_writes_metrics_into_the_checkpoint_with_configured_size_and_metrics(setup, tmp_path):
    loaded, records, examples = setup
    # the positional form stage.py uses stays valid
    cb = CheckpointEvalCallback(loaded.family, loaded.processor, records, examples, max_new_tokens=4,
                                max_samples=6, closed_metrics=["accuracy"], open_metrics=["rougeL"], bootstrap=10)
    cb.trainer = FakeTrainer()
    folder = _save(cb, loaded.model, tmp_path, 3)

    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert metrics["global_step"] == 3 and metrics["counts"]["n_scored"] == 6
    assert metrics["config"]["metrics"] == {"closed": ["accuracy"], "open": ["rougeL"]}
    assert "qtype" in metrics["slices"]
    rows = [json.loads(x) for x in (folder / "eval_predictions.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [r["id"] for r in rows] == list(records["id"][:6])
    (logged,) = cb.trainer.logged  # W&B inactive: the scalars go to the Trainer's loggers
    assert logged["ckpt/closed_accuracy"] == metrics["closed"]["accuracy"]
    assert any(k.startswith("ckpt/qtype/") for k in logged)


def test_checkpoint_scalars_skip_empty_groups():
    metrics = {"config": {"metrics": {"closed": ["accuracy"], "open": ["rougeL"]}},
               "closed": {"accuracy": 0.5}, "open": {"rougeL": None},
               "slices": {"modality": {"CT": {"closed": {"accuracy": 1.0}, "open": {"rougeL": None}}}}}
    assert checkpoint_scalars(metrics) == {"ckpt/closed_accuracy": 0.5, "ckpt/modality/CT/closed_accuracy": 1.0}


def test_logs_scalars_and_a_prediction_table_with_images_to_an_offline_wandb_run(setup, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    loaded, records, examples = setup
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    for var, sub in (("WANDB_DATA_DIR", "data"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_CONFIG_DIR", "config")):
        monkeypatch.setenv(var, str(tmp_path / sub))  # nothing written outside the test's folder
    cb = CheckpointEvalCallback(loaded.family, loaded.processor, records, examples, max_new_tokens=4,
                                max_samples=5, table_rows=4, bootstrap=10)
    cb.trainer = FakeTrainer()
    run = wandb.init(project="medvlm-test", dir=str(tmp_path), settings=wandb.Settings(console="off"))
    try:
        folder = _save(cb, loaded.model, tmp_path / "run", 7)
        summary = dict(run.summary)
    finally:
        wandb.finish()

    assert (folder / "metrics.json").is_file() and cb.trainer.logged == []  # logged to W&B directly
    metrics = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
    assert summary["ckpt/closed_accuracy"] == metrics["closed"]["accuracy"] and summary["train/global_step"] == 7
    (table_file,) = tmp_path.glob("wandb/offline-run-*/files/media/table/ckpt/predictions_*.table.json")
    table = json.loads(table_file.read_text(encoding="utf-8"))
    assert table["columns"][:4] == ["step", "id", "image", "question"] and len(table["data"]) == 4
    assert [row[1] for row in table["data"]] == list(records["id"][:4])
    # the images travel in the run's table artifact (staged until `wandb sync`), as 64x64 PNGs
    staged = [f for f in (tmp_path / "data").rglob("*") if f.is_file()]
    pngs = [f for f in staged if f.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"]
    assert len(pngs) == 4
    tables = [t for f in staged if f.read_bytes()[:1] == b"{" and (t := json.loads(f.read_text()))["_type"] == "table"]
    assert tables and all(len(t["data"]) == 4 for t in tables)
    assert all(row[2]["_type"] == "image-file" for t in tables for row in t["data"])

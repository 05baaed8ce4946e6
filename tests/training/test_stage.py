"""Stage recipes end to end on a tiny random model: run folder, two stages, resume, bad input."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from medvlm.models.families import FAMILIES
from medvlm.training.cli import main, parse_stage_config
from medvlm.training.stage import run_stage

pytestmark = pytest.mark.timeout(600)


def _argv(model, out, *extra):
    return ["--model_name_or_path", str(model), "--output_dir", str(out), "--phantom_patients", "36",
            "--per_device_train_batch_size", "8", "--learning_rate", "1e-3", "--logging_steps", "1",
            "--save_strategy", "steps", "--save_steps", "3", "--max_eval_samples", "16",
            "--checkpoint_eval_samples", "4", "--report_to", "none", "--seed", "3",
            "--dataloader_num_workers", "0", "--disable_tqdm", "true", *extra]


@pytest.fixture(scope="module")
def stage1_run(tiny_paligemma, tmp_path_factory, small_phantom):
    out = tmp_path_factory.mktemp("runs") / "stage1"
    assert main("stage1", _argv(tiny_paligemma, out, "--max_steps", "6", "--diagnostics_examples", "2",
                                "--diagnostics_split", "train", "--checkpoint_closed_metrics", "accuracy,exact_match",
                                "--checkpoint_open_metrics", "rougeL")) == 0
    return out


def test_stage1_run_folder_holds_everything(stage1_run):
    out = stage1_run
    for name in ("config.yaml", "trainer_state.json", "metrics.json", "manifest.json", "predictions.jsonl",
                 "predictions_blank.jsonl", "adapter/adapter_model.safetensors", "adapter/adapter_config.json",
                 "checkpoint-6/metrics.json", "checkpoint-3/optimizer.pt",
                 "checkpoint-3/diagnostics/diagnostics.json"):
        assert (out / name).exists(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["closed"]["n"] > 0 and 0.0 <= metrics["closed"]["accuracy"] <= 1.0
    # the checkpoint subset is scored with the metrics the config chose, the final eval with all
    ckpt = json.loads((out / "checkpoint-6" / "metrics.json").read_text())
    assert {"accuracy", "exact_match"} <= set(ckpt["closed"]) and "substring" not in ckpt["closed"]
    assert "substring" in metrics["closed"]
    if ckpt.get("open", {}).get("n"):
        assert "rougeL" in ckpt["open"] and "bleu" not in ckpt["open"]
    assert "blank_image" in metrics and metrics["train"]["steps"] == 6
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["seed"] == 3 and manifest["data"]["train_hash"] and "torch" in manifest["versions"]
    lines = (out / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == metrics["closed"]["n"] + metrics["open"]["n"]
    # the config saved with the run reproduces it
    saved = (out / "config.yaml").read_text()
    assert "max_steps: 6" in saved and "lora_preset: full" in saved
    record = json.loads((out / "adapter" / "medvlm_adapter.json").read_text())
    assert record["family"] == "paligemma" and record["image_settings"] == {}


@pytest.mark.parametrize("mode", ["continue", "merge"])
def test_stage2_starts_from_the_stage1_adapter(stage1_run, tiny_paligemma, tmp_path, mode):
    mix = tmp_path / "mix.yaml"
    mix.write_text(
        "seed: 0\nstopping_strategy: undersample\nsources:\n"
        "  - {name: generated, source: phantom, options: {n_patients: 36, label_noise: 0.2}}\n"
        "  - {name: clean, source: phantom, options: {n_patients: 36}}\n"
        "phases:\n  - {name: main, size: 40, weights: {generated: 0.8, clean: 0.2}}\n"
        "  - {name: anneal, size: 16, weights: {clean: 1.0}}\n")
    out = tmp_path / "stage2"
    code = main("stage2", _argv(tiny_paligemma, out, "--max_steps", "3", "--dataset", str(mix),
                                "--init_adapter", str(stage1_run / "adapter"), "--adapter_mode", mode))
    assert code == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["adapter_mode"] == mode and manifest["data"]["train"] == 56
    mix_manifest = json.loads((out / "mix-mix" / "manifest.json").read_text())  # built from mix.yaml
    assert mix_manifest["counts_per_phase"]["anneal"] == {"phantom-slake": 16}
    stage1_w = load_file(stage1_run / "adapter" / "adapter_model.safetensors")
    stage2_w = load_file(out / "adapter" / "adapter_model.safetensors")
    if mode == "continue":  # the same adapter, trained further
        assert stage1_w.keys() == stage2_w.keys()
        assert any(not torch.equal(stage1_w[k], stage2_w[k]) for k in stage1_w)
    else:  # a fresh adapter on the merged base, saved concatenated with stage 1's (rank r1 + r2)
        assert any(k.endswith("lora_B.weight") and stage2_w[k].abs().sum() > 0 for k in stage2_w)
        assert all(w.shape[0] == 2 * stage1_w[k].shape[0] for k, w in stage2_w.items() if k.endswith("lora_A.weight"))
    _the_adapter_reproduces_the_run(out, tiny_paligemma, mode)


def _the_adapter_reproduces_the_run(out, base, mode):
    """Evaluation (run_eval's model mode) and plain PEFT on the original base reproduce the stage's own
    predictions and logits; for a merge-mode stage the checkpoint (its adapter alone, on the base
    with stage 1 merged in) gives the same logits as the final adapter (both adapters in one)."""
    from peft import PeftModel

    from medvlm.diagnostics.explorer import load_explorer_model
    from medvlm.eval.evaluate import ModelEvalConfig, evaluate_model
    from medvlm.models.adapters import load_with_adapter

    cfg = ModelEvalConfig(model=str(base), adapter=str(out / "adapter"), output=str(out.parent / f"eval-{mode}"),
                          phantom_patients=36, max_samples=16, max_new_tokens=12, dtype="float32")
    evaluate_model(cfg)
    own = [json.loads(x)["prediction"] for x in (out / "predictions.jsonl").read_text().splitlines()]
    again = [json.loads(x)["prediction"] for x in (out.parent / f"eval-{mode}" / "predictions.jsonl").read_text()
             .splitlines()]
    assert again == own
    final = load_with_adapter(str(base), out / "adapter")
    batch = final.family.model_inputs(final.family.generation_batch(
        final.processor, [torch.full((64, 64, 3), 90, dtype=torch.uint8).numpy()], ["Is there a lesion?"]))
    with torch.no_grad():
        want = final.model(**batch).logits
        plain = PeftModel.from_pretrained(final.family.model_class.from_pretrained(base), out / "adapter").eval()
        torch.testing.assert_close(plain(**batch).logits, want, rtol=1e-4, atol=1e-4)
        em = load_explorer_model(str(base), [str(out)], dtype="float32")  # the explorer takes the stage folder
        with em.use(em.variants[0]) as model:
            torch.testing.assert_close(model(**batch).logits, want, rtol=1e-4, atol=1e-4)
        if mode == "merge":
            ckpt = load_with_adapter(str(base), out / "checkpoint-3")
            torch.testing.assert_close(ckpt.model(**batch).logits, want, rtol=1e-4, atol=1e-4)
            naive = PeftModel.from_pretrained(final.family.model_class.from_pretrained(base), out / "checkpoint-3")
            assert not torch.allclose(naive.eval()(**batch).logits, want, atol=1e-6)  # stage 1 forgotten


def test_a_qwen_stage_keeps_its_image_settings_for_stage2_and_every_loader(tiny_folders, tmp_path):
    """min_pixels / max_pixels reach the processor (the 64-px phantom images are enlarged to 96 px, a 6x6
    token grid), the adapter record keeps them, stage 2 inherits them, and load_with_adapter reuses them."""
    from medvlm.models.adapters import load_with_adapter

    base, settings = tiny_folders("qwen2_5_vl"), {"min_pixels": 96 * 96, "max_pixels": 96 * 96}
    s1, s2 = tmp_path / "stage1", tmp_path / "stage2"
    assert main("stage1", _argv(base, s1, "--max_steps", "2", "--min_pixels", "9216", "--max_pixels", "9216")) == 0
    assert json.loads((s1 / "adapter" / "medvlm_adapter.json").read_text())["image_settings"] == settings
    assert main("stage2", _argv(base, s2, "--max_steps", "1", "--init_adapter", str(s1 / "adapter"))) == 0
    assert json.loads((s2 / "adapter" / "medvlm_adapter.json").read_text())["image_settings"] == settings
    assert json.loads((s2 / "metrics.json").read_text())["closed"]["n"] > 0
    loaded = load_with_adapter(None, s2 / "adapter")
    image = loaded.family.prepare_images(loaded.processor, [torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()])[0]
    assert image.shape == (96, 96, 3)


class StopAt(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt(f"killed at step {self.step}")


def _last_loss(out):
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    return [h["loss"] for h in history if "loss" in h][-1]


def test_resume_after_a_kill_ends_at_the_same_loss(tiny_paligemma, tmp_path, small_phantom):
    full, killed = tmp_path / "full", tmp_path / "killed"
    run_stage(*parse_stage_config(_argv(tiny_paligemma, full, "--max_steps", "6", "--checkpoint_eval_samples",
                                        "0", "--blank_eval", "false"), "stage1"))
    with pytest.raises(KeyboardInterrupt):
        run_stage(*parse_stage_config(_argv(tiny_paligemma, killed, "--max_steps", "6",
                                            "--checkpoint_eval_samples", "0", "--blank_eval", "false"),
                                      "stage1"), callbacks=[StopAt(4)])
    assert (killed / "checkpoint-3").is_dir() and not (killed / "manifest.json").exists()
    # starting again without --resume is refused: the folder holds an unfinished run
    assert main("stage1", _argv(tiny_paligemma, killed, "--max_steps", "6")) == 2
    # a kill during the next save leaves a checkpoint without its trainer_state.json: resume skips it
    (killed / "checkpoint-6").mkdir()
    shutil.copy(killed / "checkpoint-3" / "adapter_config.json", killed / "checkpoint-6")
    run_stage(*parse_stage_config(_argv(tiny_paligemma, killed, "--max_steps", "6", "--checkpoint_eval_samples",
                                        "0", "--blank_eval", "false", "--resume", "true"), "stage1"))
    assert abs(_last_loss(full) - _last_loss(killed)) < 1e-6
    a = load_file(full / "adapter" / "adapter_model.safetensors")
    b = load_file(killed / "adapter" / "adapter_model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_unknown_config_key_is_named_with_a_suggestion(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model_name_or_path: demo:paligemma\nlearning_rat: 0.1\n")
    assert main("stage1", [str(cfg), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'learning_rat'" in err and "Did you mean 'learning_rate'" in err
    assert not (tmp_path / "o").exists()


def test_unknown_checkpoint_metric_is_named_before_training(tiny_paligemma, tmp_path, capsys):
    out = tmp_path / "s1"
    assert main("stage1", _argv(tiny_paligemma, out, "--max_steps", "1",
                                "--checkpoint_closed_metrics", "acuracy")) == 2
    err = capsys.readouterr().err
    assert "checkpoint_closed_metrics" in err and "Did you mean 'accuracy'" in err
    assert not (out / "checkpoint-1").exists()


def test_missing_stage1_adapter(tiny_paligemma, tmp_path, capsys):
    out = tmp_path / "s2"
    assert main("stage2", _argv(tiny_paligemma, out, "--max_steps", "1",
                                "--init_adapter", str(tmp_path / "missing"))) == 2
    err = capsys.readouterr().err
    assert "no adapter_config.json" in err and "init_adapter" in err
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"paligemma"}))
def test_stage2_on_another_base_than_the_adapter(stage1_run, tiny_folders, tmp_path, capsys, family):
    out = tmp_path / "s2"
    assert main("stage2", _argv(tiny_folders(family), out, "--max_steps", "1",
                                "--init_adapter", str(stage1_run / "adapter"))) == 2
    err = capsys.readouterr().err
    assert "was trained on a paligemma model" in err and f"is a {family} model" in err and "model_name_or_path" in err
    assert "Loading weights" not in err  # refused before any weights load
    assert not (out / "manifest.json").exists()


def test_image_settings_on_a_fixed_resolution_family_are_refused_before_the_weights_load(tiny_paligemma, tmp_path,
                                                                                         capsys):
    out = tmp_path / "s1"
    assert main("stage1", _argv(tiny_paligemma, out, "--max_steps", "1", "--max_pixels", "100000")) == 2
    err = capsys.readouterr().err
    assert "max_pixels set, but the paligemma family resizes every image to its fixed input size" in err
    assert "Loading weights" not in err and not (out / "manifest.json").exists()


def test_missing_image_is_named(tiny_paligemma, tmp_path, capsys):
    from medvlm.records import make_record, to_dataset

    rows = [make_record(id=f"r{i}", image=str(tmp_path / f"gone{i}.png"), question="Is there a lesion?",
                        answer="yes", answer_type="closed", source="x", split="train", group_id=f"g{i}")
            for i in range(2)]
    to_dataset(rows).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "run"
    assert main("stage1", _argv(tiny_paligemma, out, "--max_steps", "1", "--dataset", str(tmp_path / "ds"))) == 2
    err = capsys.readouterr().err
    assert "gone0.png does not exist" in err
    assert not (out / "manifest.json").exists()


@pytest.mark.parametrize("config", sorted((__import__("pathlib").Path(__file__).parents[2] / "recipes" / "configs")
                                          .glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_parses(config, tmp_path):
    model_args, data_args, lora_args, args = parse_stage_config([str(config), "--output_dir", str(tmp_path)])
    assert model_args.model_name_or_path and args.stage in ("stage1", "stage2")
    if args.stage == "stage2":
        assert lora_args.init_adapter, "a stage-2 config starts from a stage-1 adapter"

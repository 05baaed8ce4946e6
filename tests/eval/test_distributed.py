"""Two real CPU processes (DDP over gloo): a stage trains and evaluates, ``run_eval.py`` evaluates,
and what they write is what one process writes.

``accelerate launch --multi_gpu --num_processes 2`` starts two processes on a CPU machine
(``--cpu --num_processes 2`` silently starts one). The tiny LLaVA is used because its greedy
answers are non-empty strings (the tiny random PaliGemma answers "" to everything, which would
make "identical" say nothing).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


def _launch(script: str, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", str(ROOT / script), *args]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def test_two_cpu_processes_train_evaluate_and_match_one_process(tiny_llava, tmp_path, small_phantom):
    from peft import PeftModel

    from medvlm.data_curation.phantom import load_phantom
    from medvlm.eval.run import evaluate_examples
    from medvlm.models import load_model_and_processor
    from medvlm.models.inputs import prepare_examples

    out = tmp_path / "ddp"
    _launch("recipes/stage1.py", "--model_name_or_path", str(tiny_llava), "--output_dir", str(out),
            "--phantom_patients", "36", "--max_steps", "3", "--per_device_train_batch_size", "4",
            "--save_strategy", "steps", "--save_steps", "3", "--checkpoint_eval_samples", "5",
            "--max_eval_samples", "8", "--blank_eval", "false", "--report_to", "none", "--disable_tqdm", "true")

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2, "accelerate must start two real processes"
    assert manifest["generation"]["world_size"] == 2 and manifest["generation"]["questions_per_process"] == [4, 4]
    ckpt = json.loads((out / "checkpoint-3" / "metrics.json").read_text())["generation"]
    assert ckpt["world_size"] == 2 and ckpt["questions_per_process"] == [3, 2]

    # one process, the adapter the two wrote, another batch size: the same greedy answers
    loaded = load_model_and_processor(str(tiny_llava))
    model = PeftModel.from_pretrained(loaded.model, str(out / "adapter"))
    assert any("lora_A" in n for n, _ in model.named_parameters())
    records = load_phantom(small_phantom, kind="qa", split="test").select(range(8))
    one = tmp_path / "one"
    one.mkdir()
    metrics = evaluate_examples(model, loaded.processor, loaded.family, records,
                                prepare_examples(records, loaded.processor, loaded.family), one, batch_size=3,
                                max_new_tokens=12, bootstrap=0, progress=False)
    assert metrics["generation"]["world_size"] == 1
    two_rows, one_rows = _rows(out / "predictions.jsonl"), _rows(one / "predictions.jsonl")
    assert [r["id"] for r in two_rows] == [r["id"] for r in one_rows] == list(records["id"])
    predictions = [r["prediction"] for r in one_rows]
    assert [r["prediction"] for r in two_rows] == predictions and any(predictions)
    # the checkpoint at step 3 is the final model: its 5 questions, answered by 2 processes, agree too
    assert [r["prediction"] for r in _rows(out / "checkpoint-3" / "eval_predictions.jsonl")] == predictions[:5]


def test_run_eval_on_two_processes_writes_what_one_process_writes(tiny_llava, tmp_path, small_phantom):
    from scripts import load_script

    common = ["--model", str(tiny_llava), "--phantom-patients", "36", "--max-samples", "7", "--bootstrap", "0",
              "--consistency", "--samples", "3", "--temperature", "1.5", "--quiet"]
    two, one = tmp_path / "two", tmp_path / "one"
    _launch("eval/run_eval.py", *common, "--batch-size", "2", "--output", str(two))
    assert load_script("eval/run_eval.py").main([*common, "--batch-size", "5", "--output", str(one)]) == 0

    rows2, rows1 = _rows(two / "predictions.jsonl"), _rows(one / "predictions.jsonl")
    assert [r["id"] for r in rows2] == [r["id"] for r in rows1] and len(rows1) == 7
    assert [r["prediction"] for r in rows2] == [r["prediction"] for r in rows1]  # greedy
    assert [r["samples"] for r in rows2] == [r["samples"] for r in rows1]        # sampled, seeded per question
    assert any(r["prediction"] for r in rows1) and any(len(set(r["samples"])) > 1 for r in rows1)
    m2, m1 = (json.loads((d / "metrics.json").read_text()) for d in (two, one))
    assert m2["closed"] == m1["closed"] and m2["consistency"] == m1["consistency"]

    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    gen = manifest["generation"]
    assert gen["questions_per_process"] == [4, 3] and gen["batch_size"] == {"greedy": [2, 2], "samples": [2, 2]}
    assert json.loads((one / "manifest.json").read_text())["generation"]["questions_per_process"] == [7]

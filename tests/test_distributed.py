"""Two real CPU processes (DDP over gloo) train a stage, and the adapter they write loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from medvlm.models import load_model_and_processor

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(600)


def test_two_cpu_processes_train_and_the_adapter_loads(tiny_paligemma, tmp_path, small_phantom):
    from peft import PeftModel

    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--main_process_port", "0", str(ROOT / "recipes" / "stage1.py"),
           "--model_name_or_path", str(tiny_paligemma), "--output_dir", str(out), "--phantom_patients", "36",
           "--max_steps", "3", "--per_device_train_batch_size", "4", "--save_strategy", "no",
           "--max_eval_samples", "8", "--blank_eval", "false", "--report_to", "none", "--disable_tqdm", "true"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["world_size"] == 2, "accelerate must start two real processes"
    loaded = load_model_and_processor(str(tiny_paligemma))
    model = PeftModel.from_pretrained(loaded.model, str(out / "adapter"))
    assert any("lora_A" in n for n, _ in model.named_parameters())

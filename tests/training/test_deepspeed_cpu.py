"""DeepSpeed ZeRO-2 on two CPU processes, through the stage's Trainer: it really partitions the
optimizer state, and trains what DDP trains.

Needs ``deepspeed``; skipped without it (CI does not install it). It is an sdist that builds against
the installed torch: ``pip install wheel && pip install --no-build-isolation "deepspeed>=0.19"`` (or
``pip install -e .[deepspeed]`` where build isolation may fetch its own torch). On a CPU machine DeepSpeed picks its CPU accelerator and
gloo, and builds its shared-memory communication op with ninja at the first launch.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install -e .[deepspeed])")

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(900), pytest.mark.slow]


def _stage(config: str, model, out: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled",
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "recipes/accelerate" / config),
           "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", "0",
           str(ROOT / "tests/stage_probe_worker.py"), str(out / "probe.json"),
           "--model_name_or_path", str(model), "--output_dir", str(out / "run"), "--phantom_patients", "36",
           "--max_steps", "3", "--per_device_train_batch_size", "2", "--learning_rate", "1e-3",
           "--save_strategy", "no", "--max_eval_samples", "4", "--blank_eval", "false", "--report_to", "none",
           "--disable_tqdm", "true", "--seed", "3"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=840)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {"probe": json.loads((out / "probe.json").read_text()),
            "metrics": json.loads((out / "run" / "metrics.json").read_text()),
            "adapter": out / "run" / "adapter" / "adapter_model.safetensors"}


def test_zero2_partitions_the_optimizer_and_trains_what_ddp_trains(tiny_paligemma, small_phantom, tmp_path):
    from safetensors.torch import load_file

    zero2 = _stage("deepspeed_zero2.yaml", tiny_paligemma, tmp_path / "zero2")
    ddp = _stage("cpu_2proc.yaml", tiny_paligemma, tmp_path / "ddp")
    probe = zero2["probe"]
    assert probe["distributed_type"] == "DistributedType.DEEPSPEED" and probe["world"] == 2
    assert probe["optimizer"] == "DeepSpeedZeroOptimizer"
    assert probe["fp32_partition"] * 2 == probe["trainable"]  # each rank holds half the optimizer state
    assert ddp["probe"]["distributed_type"] == "DistributedType.MULTI_CPU"
    assert ddp["probe"]["fp32_partition"] is None and ddp["probe"]["trainable"] == probe["trainable"]
    loss = zero2["metrics"]["train"]["loss"], ddp["metrics"]["train"]["loss"]
    assert loss[0] == pytest.approx(loss[1], abs=1e-5)
    a, b = load_file(zero2["adapter"]), load_file(ddp["adapter"])
    assert a.keys() == b.keys() and any(float(t.abs().max()) > 0 for k, t in a.items() if "lora_B" in k)
    for key in a:
        np.testing.assert_allclose(a[key].numpy(), b[key].numpy(), rtol=0, atol=1e-5, err_msg=key)

"""FSDP on two CPU processes (gloo): what accelerate chooses, and what FSDP2 itself does with LoRA.

``recipes/accelerate/fsdp.yaml`` launched on a CPU machine does not shard: accelerate 1.16 selects
FSDP only for accelerator device types, so the ranks run DDP (the first test pins that, so that
the README is corrected when accelerate changes). Torch's FSDP2 (``fully_shard``) does run on a
CPU mesh over gloo: accelerate's own FSDP2 preparation, given the plugin that the launcher built
from ``fsdp.yaml``, shards the tiny LoRA model across the two ranks, and three AdamW steps give the
losses and LoRA weights of one process that averages the two ranks' batches.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]


@pytest.fixture(scope="module")
def fsdp_report(tmp_path_factory) -> dict:
    folder = tmp_path_factory.mktemp("fsdp")
    out = folder / "report.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "recipes/accelerate/fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no",
           "--main_process_port", "0", str(ROOT / "tests/fsdp_cpu_worker.py"), str(out), str(folder / "adapter")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=540)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {**json.loads(out.read_text(encoding="utf-8")), "adapter": folder / "adapter"}


def test_accelerate_does_not_select_fsdp_on_cpu(fsdp_report):
    # fsdp.yaml on a CPU machine: two gloo ranks, but accelerate's state is MULTI_CPU (DDP) and holds
    # no FSDP plugin; a launch of recipes/stage*.py with it trains with DDP
    assert fsdp_report["world"] == 2 and fsdp_report["backend"] == "gloo"
    assert fsdp_report["chosen"] == "DistributedType.MULTI_CPU"
    assert fsdp_report["has_fsdp_plugin"] is False
    # what the launcher made of fsdp.yaml
    assert fsdp_report["plugin"] == {"fsdp_version": 2, "cpu_ram_efficient_loading": True,
                                     "reshard_after_forward": True}


def test_fsdp2_shards_lora_model_on_two_cpu_processes(fsdp_report):
    r = fsdp_report
    assert r["model_type"].startswith("FSDP") and r["param_types"] == ["DTensor"] and r["ddp"] is False
    # every parameter is split across the two ranks: each holds half (dim-0 shards, even sizes here)
    assert r["local_numel"] * 2 == r["numel"]
    lora_numel = sum(len(v) for v in r["final"].values())
    assert r["trainable_local_numel"] * 2 == lora_numel
    # one FSDP unit per transformer block of both towers (the model's _no_split_modules), plus the root
    layers = [u for u in r["units"] if u.endswith(("layers.0", "layers.1"))]
    assert len(layers) == 4 and "" in r["units"]


def test_fsdp2_steps_and_saved_adapter_match_one_process(fsdp_report, tmp_path):
    from fsdp_cpu_worker import run_single
    from safetensors.torch import load_file

    single = run_single(tmp_path / "adapter")
    assert np.allclose(fsdp_report["losses"], single["losses"], rtol=0, atol=1e-5)
    assert single["losses"][-1] < single["losses"][0]
    assert fsdp_report["final"].keys() == single["final"].keys()
    moved = 0.0
    for name, values in single["final"].items():
        np.testing.assert_allclose(fsdp_report["final"][name], values, rtol=0, atol=1e-5, err_msg=name)
        moved = max(moved, float(np.abs(np.subtract(values, single["initial"][name])).max()))
    assert moved > 1e-3  # the steps changed the LoRA weights (the comparison is not of initial values)
    # the stage's save gathers the shards on both ranks: the adapter file is the one process' adapter
    sharded = load_file(fsdp_report["adapter"] / "adapter_model.safetensors")
    one = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert sharded.keys() == one.keys() and any("lora_A" in k for k in one)
    for key, tensor in one.items():
        assert sharded[key].shape == tensor.shape, key
        np.testing.assert_allclose(sharded[key].numpy(), tensor.numpy(), rtol=0, atol=1e-5, err_msg=key)

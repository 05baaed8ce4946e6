"""benchmarks/diagnostics_speed.py prints its figures and nothing of the profiler's own chatter."""

from __future__ import annotations

import os
import subprocess
import sys

from scripts import ROOT


def test_diagnostics_benchmark_prints_its_figures_without_profiler_markers(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "KINETO_LOG_LEVEL"}
    env.update(OMP_NUM_THREADS="1", MEDVLM_HOME=str(tmp_path))  # its phantom data stay out of the user's cache
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "diagnostics_speed.py"), "--family", "llava",
                           "--rounds", "1", "--repeats", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "(a) log-prob / plain forward" in proc.stdout and "peak tensor bytes" in proc.stdout
    assert "profiler_start" not in proc.stderr and "USDT" not in proc.stderr
    peaks = [line for line in proc.stdout.splitlines() if line.startswith("(c)")]
    assert len(peaks) == 2 and all("capture median 0.00" not in line for line in peaks)  # the peaks were measured


def test_knockout_benchmark_prints_each_part_as_a_ratio_to_a_plain_forward(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MEDVLM_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "knockout_cost.py"), "--family", "llava",
                           "--rounds", "1", "--repeats", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("llava: 3 decoder layers, 4x4 grid") and "plain forward median" in lines[0]
    parts = {line.split()[0]: line for line in lines[1:]}
    assert {"layer", "knockout", "lesion", "per"} == set(parts)
    assert "10 passes" in parts["layer"] and "17 passes" in parts["knockout"] and "29 passes" in parts["per"]
    assert all("x a plain forward" in parts[p] for p in ("layer", "knockout", "lesion"))

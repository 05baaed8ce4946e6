"""Evaluation throughput on 2 processes against 1, side by side (``eval/run_eval.py`` model mode).

    python benchmarks/eval_processes.py [--model demo:llava] [--n 512] [--repeats 2]

Runs the same evaluation (the first N phantom test questions, greedy answers and five sampled
answers each) as

1. one process, ``OMP_NUM_THREADS=1`` (the baseline);
2. two processes under ``accelerate launch --multi_gpu --num_processes 2`` (gloo on a CPU machine),
   ``OMP_NUM_THREADS=1`` each;
3. one process with ``OMP_NUM_THREADS=2`` (the same two cores given to one process's threads).

Each run writes its ``metrics.json``, whose ``generation`` section holds each pass's wall time
(from the moment every process is ready to the answers gathered on the main process). Prints
questions/s per pass and configuration, the throughput ratio 2 processes / 1 process, the ratio
2 processes / 1 process with two threads, whether the predictions (greedy and sampled) are
identical, and the end-to-end wall time of each command (model loading and start-up included).
Runs are interleaved and the median of ``--repeats`` is taken. Asserts nothing.

One thread per process for both the 2-process run and its 1-process baseline, so the ratio says
what a second process (a second core) buys; the third line says what the same two cores buy as
threads of one process. On a machine shared with other jobs the second core is not free, and the
ratio shows it: report the load (printed) with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PASSES = ("greedy", "samples")


def run(config: str, args: argparse.Namespace, out: Path) -> tuple[float, dict, list[dict]]:
    """One evaluation of ``config`` ("1p1t", "2p1t", "1p2t"): its wall time, the ``generation``
    section of its metrics and its prediction rows."""
    threads = "2" if config == "1p2t" else "1"
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, "HF_HUB_OFFLINE": "1",
           "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"}
    script = [str(ROOT / "eval" / "run_eval.py"), "--model", args.model, "--max-samples", str(args.n),
              "--consistency", "--samples", "5", "--batch-size", str(args.batch_size), "--bootstrap", "0",
              "--output", str(out), "--quiet"]
    if config == "2p1t":
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", "0", *script]
    else:
        cmd = [sys.executable, *script]
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{config} failed:\n{proc.stderr[-3000:]}")
    generation = json.loads((out / "metrics.json").read_text())["generation"]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines() if line.strip()]
    return wall, generation, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:llava", help="model to evaluate (default demo:llava, built first)")
    parser.add_argument("--n", type=int, default=512, help="questions (default 512)")
    parser.add_argument("--batch-size", default="32", help="questions per generate call (default 32; or auto)")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each configuration (default 2)")
    args = parser.parse_args()

    if args.model.startswith("demo:"):  # built once here: the two processes would not build it
        subprocess.run([sys.executable, "-m", "medvlm.demo", args.model.split(":", 1)[1]], check=True,
                       capture_output=True)
    configs = ("1p1t", "2p1t", "1p2t")
    walls: dict[str, list[float]] = {c: [] for c in configs}
    secs: dict[str, dict[str, list[float]]] = {c: {p: [] for p in PASSES} for c in configs}
    rows: dict[str, list[dict]] = {}
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):
            for c in configs:
                wall, gen, rows[c] = run(c, args, Path(tmp) / c)
                walls[c].append(wall)
                for p in PASSES:
                    secs[c][p].append(gen["passes"][p]["seconds"])
                if c == "2p1t":
                    split = gen["questions_per_process"]
    load = max(load, os.getloadavg()[0])

    med = {c: {p: statistics.median(secs[c][p]) for p in PASSES} for c in configs}
    print(f"model {args.model}, {args.n} questions (greedy, then 5 samples each), batch {args.batch_size}, "
          f"median of {args.repeats}; {os.cpu_count()} cores, load average up to {load:.1f}; "
          f"2 processes answered {split} questions")
    for p in PASSES:
        q = {c: args.n / med[c][p] for c in configs}
        print(f"{p:8s} questions/s: 1 process 1 thread {q['1p1t']:7.2f} | 2 processes 1 thread each "
              f"{q['2p1t']:7.2f} | 1 process 2 threads {q['1p2t']:7.2f} | ratio 2p/1p {q['2p1t'] / q['1p1t']:4.2f}x"
              f" | 2p/(1p, 2 threads) {q['2p1t'] / q['1p2t']:4.2f}x")
    same = {p: [r["prediction" if p == "greedy" else "samples"] for r in rows["2p1t"]]
            == [r["prediction" if p == "greedy" else "samples"] for r in rows["1p1t"]] for p in PASSES}
    print(f"identical predictions, 2 processes vs 1: greedy {same['greedy']}, sampled {same['samples']}")
    print("end-to-end wall time (start-up and model loading included): "
          + " | ".join(f"{c} {statistics.median(walls[c]):.1f} s" for c in configs))


if __name__ == "__main__":
    main()

"""Attention-knockout cost per probe example against a plain forward pass (prints, never asserts).

    OMP_NUM_THREADS=1 python benchmarks/knockout_cost.py                          # both families
    OMP_NUM_THREADS=1 python benchmarks/knockout_cost.py --family llava --rounds 5 --layers 32

The models have the demo's shape (64-pixel images, 16-pixel patches: a 4x4 image grid; 3 decoder
layers unless ``--layers`` says otherwise; the sweep grows with the depth); weights are random,
which does not change the cost of a pass. Per example it times, interleaved in every repeat:

- a plain forward of the teacher-forced example (the baseline);
- the layer sweep (3 edge sets x one window per layer, batched 8 rows per forward, + the unblocked pass);
- the per-cell knockout map (one row per cell, batched 16 per forward, + the unblocked pass);
- the lesion / mirror pair (one forward of 2 rows).

and prints each as a ratio to the plain forward (median and range over the rounds, since the
machine may be shared), with the forward passes each needs.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from datasets.utils.logging import disable_progress_bar

from medvlm.data_curation.phantom import PhantomConfig, load_phantom
from medvlm.diagnostics.capture import prepare_example
from medvlm.diagnostics.knockout import (
    EdgeSet,
    Knockout,
    answer_probs,
    base_prediction,
    knockout_map,
    layer_sweep,
    sweep_window,
)
from medvlm.models.base import TinySizes
from medvlm.models.registry import FAMILIES, get_family
from medvlm.models.tiny import build_tiny, tiny_tokenizer


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def one_round(model, family, ex, repeats: int) -> dict[str, float]:
    n_layers = len(family.decoder_layers(model))
    base = base_prediction(model, family, ex)
    span, last = ex.span, (ex.target_positions[0],)
    pair = [Knockout(EdgeSet("a", (span.start,), last), frozenset(range(n_layers))),
            Knockout(EdgeSet("b", (span.end - 1,), last), frozenset(range(n_layers)))]
    calls = {"plain forward": lambda: model(**ex.inputs, use_cache=False),
             "layer sweep": lambda: layer_sweep(model, family, ex, window=sweep_window(n_layers)),
             "knockout map": lambda: knockout_map(model, family, ex),
             "lesion / mirror": lambda: answer_probs(model, family, ex.inputs, base.position, base.token, pair)}
    with torch.no_grad():
        for fn in calls.values():  # warm-up
            fn()
        return {name: _median_time(fn, repeats) for name, fn in calls.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=sorted(FAMILIES), action="append", help="default: every family")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=3, help="decoder layers (the demo has 3)")
    args = parser.parse_args()
    disable_progress_bar()  # the phantom's save/map bars are not part of the figures
    with tempfile.TemporaryDirectory() as root:
        records = load_phantom(PhantomConfig(n_patients=12), kind="qa", root=root)
        record = next(r for r in records if r["roi"])
        for name in args.family or sorted(FAMILIES):
            tok = tiny_tokenizer(name, [r["question"] + " " + r["answer"] for r in records], 400)
            model, processor = build_tiny(name, TinySizes(image_size=64, text_layers=args.layers), tok)
            model.set_attn_implementation("eager")
            model.eval()
            family = get_family(name)
            ex = prepare_example(model, processor, family, record["image"], record["question"], record["answer"])
            n_cells = ex.span.grid[0] * ex.span.grid[1]
            passes = {"layer sweep": 3 * args.layers + 1, "knockout map": n_cells + 1, "lesion / mirror": 2}
            rounds = [one_round(model, family, ex, args.repeats) for _ in range(args.rounds)]
            print(f"{name}: {args.layers} decoder layers, {ex.span.grid[0]}x{ex.span.grid[1]} grid, "
                  f"{ex.inputs['input_ids'].shape[-1]} tokens; plain forward median "
                  f"{statistics.median(r['plain forward'] for r in rounds) * 1e3:.1f} ms")
            total = []
            for part, n in passes.items():
                ratios = [r[part] / r["plain forward"] for r in rounds]
                print(f"  {part:16s} {n:3d} passes (batched): {statistics.median(ratios):6.1f}x a plain forward "
                      f"(range {min(ratios):.1f}-{max(ratios):.1f})")
            for r in rounds:
                total.append(sum(r[p] for p in passes) / r["plain forward"])
            print(f"  {'per probe example':16s} {sum(passes.values()):3d} passes: {statistics.median(total):6.1f}x "
                  f"(range {min(total):.1f}-{max(total):.1f})")


if __name__ == "__main__":
    main()

"""Diagnostics speed and memory on tiny demo-sized models with a phantom image (prints, never asserts).

    OMP_NUM_THREADS=1 python benchmarks/diagnostics_speed.py                  # both families, 3 rounds
    OMP_NUM_THREADS=1 python benchmarks/diagnostics_speed.py --family llava --rounds 5

The models have the demo's shape (64-pixel images, 16-pixel patches: a 4x4 image grid, 3 decoder
layers); weights are random, which does not change the cost of a pass.

(a) log-probability increase map + top heads (one capture pass + one batched readout) against a
    plain forward: ratio, target <= 3x.
(b) the same against occlusion (one forward per image patch, the patch replaced by the image mean,
    scoring the drop in log p of the predicted token): speed ratio, target >= 10x.
(c) memory of one capture pass (last-position attention rows of every layer) against
    ``output_attentions=True`` on all layers, at the demo grid and at 336 pixels (LLaVA-1.5-336's
    input size; a 21x21 grid with these 16-pixel patches):
    the bytes of the tensors each keeps (exact) and the peak of live tensor bytes allocated during
    the call (torch profiler's allocation records replayed in time order; exact for tensors, blind
    to Python objects). tracemalloc and RSS are not used: the first does not see torch's
    allocations, the second is dominated by allocator noise at these sizes.
Each round times the three calls of (a)/(b) interleaved, ``--repeats`` times after a warm-up, and
keeps each one's median; the ratios of every round are printed with their median and range, since
the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

# The profiler's C++ library (libkineto) prints a "USDT: ... profiler_start/profiler_stop" line to
# stderr around every profiled call, at its highest log level (above ERROR); a threshold above it
# silences them (about 50 lines a run). The measurement is unchanged; KINETO_LOG_LEVEL=0 shows all.
os.environ.setdefault("KINETO_LOG_LEVEL", "6")

import torch
from torch.profiler import ProfilerActivity, profile

from medvlm.data_curation.phantom import PhantomConfig, load_phantom
from medvlm.diagnostics.capture import capture, prepare_example
from medvlm.diagnostics.methods.logprob import logprob_increase
from medvlm.diagnostics.methods.occlusion import occlusion
from medvlm.models.base import TinySizes
from medvlm.models.registry import FAMILIES, get_family
from medvlm.models.tiny import build_tiny, tiny_tokenizer


def peak_tensor_bytes(fn) -> tuple[int, object]:
    """(peak of live tensor bytes allocated during fn, fn's result): the profiler's per-op allocations
    (self_cpu_memory_usage; frees are negative records) summed in time order."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    points = sorted((e.time_range.start, e.self_cpu_memory_usage) for e in prof.events() if e.self_cpu_memory_usage)
    live = peak = 0
    for _, delta in points:
        live += delta
        peak = max(peak, live)
    return peak, result


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def load(family_name: str, records, tok, image_size: int = 64):
    """(model, family, example) of a random tiny model with eager attention, on the first lesion record."""
    model, processor = build_tiny(family_name, TinySizes(image_size=image_size), tok)
    model.set_attn_implementation("eager")
    model.eval()
    family = get_family(family_name)
    record = next(r for r in records if r["roi"])
    return model, family, prepare_example(model, processor, family, record["image"], record["question"])


def speed(model, family, example, tok, repeats: int) -> tuple[float, float, float]:
    """Median seconds of (a plain forward, the log-prob map + top heads, occlusion), the three calls
    interleaved in every repeat so that a load change on a shared machine hits all of them alike."""
    def plain():
        with torch.no_grad():
            return model(**example.inputs)

    def lp():
        res = logprob_increase(model, family, example, tok)
        return res.position_map(), res.top_heads(10)

    calls = [plain, lp, lambda: occlusion(model, family, example, batch_size=1)]  # one forward per patch
    times: list[list[float]] = [[], [], []]
    for fn in calls:  # warm-up
        fn()
    for _ in range(repeats):
        for i, fn in enumerate(calls):
            t0 = time.perf_counter()
            fn()
            times[i].append(time.perf_counter() - t0)
    return tuple(statistics.median(t) for t in times)  # type: ignore[return-value]


def memory(model, family, example) -> tuple[int, int, int, int]:
    """(kept, peak) bytes of a last-position capture pass, then (kept, peak) of output_attentions."""
    def with_capture():
        return capture(model, family, example.inputs, query_positions="last")[1]

    def with_all_attentions():
        with torch.no_grad():
            return model(**example.inputs, output_attentions=True).attentions

    with_capture(), with_all_attentions()  # warm-up
    peak_cap, cache = peak_tensor_bytes(with_capture)
    peak_all, attentions = peak_tensor_bytes(with_all_attentions)
    return tensor_bytes(cache.tensors.values()), peak_cap, tensor_bytes(attentions), peak_all


def spread(values: list[float], fmt: str) -> str:
    return f"median {format(statistics.median(values), fmt)} (range {format(min(values), fmt)}-" \
           f"{format(max(values), fmt)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per call in a round (median)")
    parser.add_argument("--rounds", type=int, default=3, help="independent rounds of every measurement")
    parser.add_argument("--family", choices=(*sorted(FAMILIES), "both"), default="both")
    args = parser.parse_args()
    families = sorted(FAMILIES) if args.family == "both" else [args.family]
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # the phantom's save/map bars are not part of the figures

    with tempfile.TemporaryDirectory() as root:
        records = load_phantom(PhantomConfig(n_patients=12), kind="qa", root=root)
        for name in families:
            tok = tiny_tokenizer(name, phantom_corpus_from(records), 400)
            model, family, example = load(name, records, tok)
            grid = example.span.grid
            print(f"\ntiny {name}: {len(family.decoder_layers(model))} decoder layers, sequence "
                  f"{example.inputs['input_ids'].shape[1]} tokens, grid {grid[0]}x{grid[1]}, "
                  f"torch threads {torch.get_num_threads()}")
            ratios, speedups = [], []
            for r in range(args.rounds):
                t_plain, t_lp, t_occ = speed(model, family, example, tok, args.repeats)
                ratios.append(t_lp / t_plain)
                speedups.append(t_occ / t_lp)
                print(f"  round {r + 1}: plain forward {t_plain * 1e3:.1f} ms | log-prob map + top heads "
                      f"{t_lp * 1e3:.1f} ms | occlusion ({grid[0] * grid[1]} patches) {t_occ * 1e3:.1f} ms")
            print(f"(a) log-prob / plain forward: {spread(ratios, '.2f')}x (target <= 3x)")
            print(f"(b) occlusion / log-prob: {spread(speedups, '.1f')}x faster (target >= 10x)")
            for size in (64, 336):
                m, f, ex = (model, family, example) if size == 64 else load(name, records, tok, image_size=size)
                runs = [memory(m, f, ex) for _ in range(args.rounds)]
                g = ex.span.grid
                print(f"(c) {g[0]}x{g[1]} grid, {ex.inputs['input_ids'].shape[1]} tokens: kept capture "
                      f"{runs[0][0] / 1024:.1f} KiB vs output_attentions {runs[0][2] / 1024:.1f} KiB "
                      f"({runs[0][2] / max(runs[0][0], 1):.0f}x less); peak tensor bytes: capture "
                      f"{spread([r[1] / 2**20 for r in runs], '.2f')} MiB vs output_attentions "
                      f"{spread([r[3] / 2**20 for r in runs], '.2f')} MiB")


def phantom_corpus_from(records) -> list[str]:
    """Questions and answers of the loaded records (the tokenizer's training text)."""
    return list(records["question"]) + list(records["answer"]) + ["answer en caption en"]


if __name__ == "__main__":
    main()

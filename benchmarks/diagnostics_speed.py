"""Diagnostics speed and memory on a tiny PaliGemma with a phantom image (prints, never asserts).

    OMP_NUM_THREADS=1 python benchmarks/diagnostics_speed.py            # 7 repeats
    OMP_NUM_THREADS=1 python benchmarks/diagnostics_speed.py --repeats 3

(a) log-probability increase map + top heads (one capture pass + vectorised candidates) against a
    plain forward: ratio, target <= 3x.
(b) the same against occlusion (one forward per image patch, the patch replaced by the image mean,
    scoring the drop in log p of the predicted token): speed ratio, target >= 10x.
(c) memory of one capture pass (last-position attention rows of every layer) against
    ``output_attentions=True`` on all layers: the bytes of the tensors each keeps (exact), and the
    peak resident-set growth during the call (psutil RSS sampled every 0.5 ms in a thread; at tiny
    sizes this is near the allocator's noise, so read the kept bytes first). tracemalloc is not used:
    it does not see torch's tensor allocations.
Times are medians over repeats in one process, after one warm-up call each.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import tempfile
import threading
import time

import numpy as np
import psutil
import torch

from medvlm.data_curation.phantom import PhantomConfig, load_phantom
from medvlm.diagnostics.capture import capture, prepare_example
from medvlm.diagnostics.logprob import logprob_increase
from medvlm.models.registry import get_family
from medvlm.models.tiny import TinyConfig, build_tiny, build_tokenizer


def median_time(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def occlusion(model, example, grid: tuple[int, int]) -> np.ndarray:
    """Drop in log p(predicted token) when each patch is replaced by the image mean: one forward each."""
    inputs = example.inputs
    q = example.target_positions[0]
    with torch.no_grad():
        base = torch.log_softmax(model(**inputs).logits[0, q], -1)
        target = int(base.argmax())
        px = inputs["pixel_values"]
        ph, pw = px.shape[-2] // grid[0], px.shape[-1] // grid[1]
        mean = px.mean(dim=(-2, -1), keepdim=True)
        out = np.zeros(grid)
        for r in range(grid[0]):
            for c in range(grid[1]):
                occluded = px.clone()
                occluded[..., r * ph:(r + 1) * ph, c * pw:(c + 1) * pw] = mean
                logp = torch.log_softmax(model(**{**inputs, "pixel_values": occluded}).logits[0, q], -1)
                out[r, c] = float(base[target] - logp[target])
    return out


def peak_rss_growth(fn) -> tuple[int, object]:
    """(peak RSS minus RSS before, fn's result), sampling RSS every 0.5 ms while fn runs."""
    proc = psutil.Process()
    gc.collect()
    before = proc.memory_info().rss
    peak = [before]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], proc.memory_info().rss)
            time.sleep(0.0005)

    thread = threading.Thread(target=sample)
    thread.start()
    try:
        result = fn()
    finally:
        done.set()
        thread.join()
    return peak[0] - before, result


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per measurement (median)")
    args = parser.parse_args()

    # Load data and model
    with tempfile.TemporaryDirectory() as root:
        cfg = PhantomConfig(n_patients=12)
        records = load_phantom(cfg, kind="qa", root=root)
        record = next(r for r in records if r["roi"])
        tok = build_tokenizer(phantom_corpus_from(records), 400)
        model, processor = build_tiny(TinyConfig(family="paligemma"), tok)
        model.set_attn_implementation("eager")
        model.eval()
        family = get_family("paligemma")
        example = prepare_example(model, processor, family, record["image"], record["question"])
    grid = example.span.grid
    n_layers = len(family.decoder_layers(model))
    print(f"tiny PaliGemma: {n_layers} decoder layers, sequence {example.inputs['input_ids'].shape[1]} tokens, "
          f"grid {grid[0]}x{grid[1]}, torch threads {torch.get_num_threads()}")

    # (a) log-prob map vs a plain forward
    def plain():
        with torch.no_grad():
            return model(**example.inputs)

    def lp():
        res = logprob_increase(model, family, example, tok)
        return res.position_map(), res.top_heads(10)

    t_plain = median_time(plain, args.repeats)
    t_lp = median_time(lp, args.repeats)
    print(f"(a) plain forward {t_plain * 1e3:.1f} ms | log-prob map + top heads {t_lp * 1e3:.1f} ms | "
          f"ratio {t_lp / t_plain:.2f}x (target <= 3x)")

    # (b) occlusion at the grid
    t_occ = median_time(lambda: occlusion(model, example, grid), max(1, args.repeats // 2))
    print(f"(b) occlusion ({grid[0] * grid[1]} forwards) {t_occ * 1e3:.1f} ms | log-prob map {t_lp * 1e3:.1f} ms "
          f"| speed-up {t_occ / t_lp:.1f}x (target >= 10x)")

    # (c) memory: capture vs output_attentions on all layers
    def with_capture():
        return capture(model, family, example.inputs, query_positions="last")[1]

    def with_all_attentions():
        with torch.no_grad():
            return model(**example.inputs, output_attentions=True).attentions

    rss_cap, cache = peak_rss_growth(with_capture)
    kept_cap = tensor_bytes(cache.tensors.values())
    del cache
    rss_all, attentions = peak_rss_growth(with_all_attentions)
    kept_all = tensor_bytes(attentions)
    del attentions
    print(f"(c) kept tensors: capture {kept_cap / 1024:.1f} KiB vs output_attentions {kept_all / 1024:.1f} KiB "
          f"({kept_all / max(kept_cap, 1):.0f}x less kept); peak RSS growth (psutil): capture "
          f"{rss_cap / 1024:.0f} KiB vs output_attentions {rss_all / 1024:.0f} KiB")


def phantom_corpus_from(records) -> list[str]:
    """Questions and answers of the loaded records (the tokenizer's training text)."""
    return list(records["question"]) + list(records["answer"]) + ["answer en caption en"]


if __name__ == "__main__":
    main()

"""Generation speed: batching and one-call sampling against their naive baselines, side by side.

    MEDVLM_HOME=/tmp/mh HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/generation_speed.py --n 32 \\
        --adapter runs/demo-llava-<t>/stage2/adapter

On the same N phantom test questions and the same model (default ``demo:llava``, the demo's family;
``--adapter`` merges a run's LoRA adapter first, as ``eval/run_eval.py`` does), in one process:

1. greedy answers in batches of 32 (left padding, KV cache) vs one question per ``generate`` call;
2. five sampled answers per question from one ``generate`` (``num_return_sequences=5``) vs five
   separate calls: (a) per question, batch 1, and (b) five batched passes over the whole set.

Prints the median wall time of ``--repeats`` runs of each and the ratios; asserts nothing.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from medvlm.data_curation.phantom import PhantomConfig, load_phantom
from medvlm.demo import ensure_demo_model
from medvlm.eval.generate import generate_answers
from medvlm.models.adapters import load_with_adapter
from medvlm.models.inputs import prepare_examples


def timed(fn, repeats: int) -> tuple[float, object]:
    """Median wall time of ``repeats`` calls of ``fn`` (after one warm-up call) and its last result."""
    fn()
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="demo:llava", help="hub id, folder, demo:llava or demo:paligemma")
    parser.add_argument("--adapter", default=None, help="LoRA adapter folder merged into the model (optional)")
    parser.add_argument("--n", type=int, default=32, help="questions (default 32)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    ensure_demo_model(args.model)
    loaded = load_with_adapter(args.model, args.adapter, merge=True, attn_implementation="sdpa")
    model, processor, family = loaded.model.eval(), loaded.processor, loaded.family
    records = load_phantom(PhantomConfig(), kind="qa", split="test").select(range(args.n))
    ex = prepare_examples(records, processor, family)
    images = ex.images()
    qs = ex.questions
    k, mnt = args.samples, args.max_new_tokens

    def gen(imgs, questions, bs, **kw):
        return generate_answers(model, processor, family, imgs, questions, batch_size=bs, max_new_tokens=mnt,
                                progress=False, **kw)

    sample_kw = dict(do_sample=True, temperature=0.7, seed=0)
    print(f"model {args.model}{' + ' + args.adapter if args.adapter else ''}, {args.n} questions, max_new_tokens {mnt}, torch threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")

    # 1. batched vs one at a time
    t_batch, batched = timed(lambda: gen(images, qs, args.batch_size), args.repeats)
    t_single, single = timed(lambda: gen(images, qs, 1), args.repeats)
    agree = sum(a == b for a, b in zip(batched, single)) / len(qs)
    print(f"greedy  batch {args.batch_size:>3}: {t_batch:7.3f} s | one at a time: {t_single:7.3f} s | "
          f"speed-up {t_single / t_batch:5.2f}x | same answers {agree:.0%}")

    # 2a. per question: one generate with k return sequences vs k generate calls (batch 1)
    def one_call_each():
        return [gen(images[i:i + 1], qs[i:i + 1], 1, num_return_sequences=k, **sample_kw) for i in range(len(qs))]

    def k_calls_each():
        return [[gen(images[i:i + 1], qs[i:i + 1], 1, **{**sample_kw, "seed": s}) for s in range(k)]
                for i in range(len(qs))]

    t_one, _ = timed(one_call_each, args.repeats)
    t_k, _ = timed(k_calls_each, args.repeats)
    print(f"samples per question, {k} in one generate: {t_one:7.3f} s | {k} generate calls: {t_k:7.3f} s | "
          f"speed-up {t_k / t_one:5.2f}x")

    # 2b. whole set: one batched pass with k return sequences vs k batched passes
    t_one_b, _ = timed(lambda: gen(images, qs, args.batch_size, num_return_sequences=k, **sample_kw), args.repeats)
    t_k_b, _ = timed(lambda: [gen(images, qs, args.batch_size, **{**sample_kw, "seed": s}) for s in range(k)],
                     args.repeats)
    print(f"samples, batched, {k} in one generate: {t_one_b:7.3f} s | {k} batched passes: {t_k_b:7.3f} s | "
          f"speed-up {t_k_b / t_one_b:5.2f}x")
    print(f"eval with consistency: batched one-call {t_batch + t_one_b:7.3f} s vs naive (one at a time, "
          f"{k} calls each) {t_single + t_k:7.3f} s | speed-up {(t_single + t_k) / (t_batch + t_one_b):5.2f}x")


if __name__ == "__main__":
    main()

"""Every room at a real checkpoint's shape (its widths, heads, vocabulary and image grid; towers cut to
two layers; random weights; float32 on the CPU): seconds and peak memory per room, and the ratio to a
plain forward pass.

    python benchmarks/real_shape.py --family paligemma --shape paligemma-3b-mix-448
    python benchmarks/real_shape.py --family llava --shape llava-1.5-7b-hf --rooms forward capture logprob

Rooms: ``forward`` (one example, logits at the last position), ``generate`` (4 questions, 8 new
tokens), ``train_step`` (one LoRA step, batch 1), ``checkpoint_eval`` (the per-checkpoint evaluation
of 4 questions), ``capture`` (the probe's shared pass), and every registered diagnostic method
(:mod:`medvlm.diagnostics.methods`). Peak memory is the process's resident set size sampled every
10 ms during the room, minus the resident size before it (what the room held beyond the loaded
model); "estimate" is the method's cost estimate from the shapes, in seconds, calibrated on the
timed forward pass (what the per-checkpoint budget plans with before anything ran).
"""

from __future__ import annotations

import argparse
import gc
import sys
import threading
import time
from collections.abc import Callable

import numpy as np
import psutil
import torch

from medvlm.diagnostics.capture import prepare_example
from medvlm.diagnostics.methods import Context, Shape, registered
from medvlm.models.families import FAMILIES, get_family
from medvlm.models.tiny import tiny_tokenizer

GIB = 2**30


class PeakRSS:
    """Samples this process's resident set size every ``interval`` seconds while inside ``with``."""

    def __init__(self, interval: float = 0.01):
        self.proc, self.interval = psutil.Process(), interval
        self.start = self.peak = 0

    def __enter__(self) -> PeakRSS:
        gc.collect()
        self.start = self.peak = self.proc.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def added_gib(self) -> float:
        return (self.peak - self.start) / GIB


def room(name: str, fn: Callable[[], object], rows: list, forward_s: float | None, estimate: float | None = None):
    with PeakRSS() as mem:
        t = time.perf_counter()
        try:
            fn()
            error = ""
        except (RuntimeError, ValueError, KeyError) as err:
            error = f"{type(err).__name__}: {str(err)[:80]}"
        seconds = time.perf_counter() - t
    ratio = f"{seconds / forward_s:7.1f}x" if forward_s else "      -"
    est = f"{estimate:8.1f}" if estimate is not None else "       -"
    print(f"{name:<16} {seconds:8.1f} s {ratio} {est} s  +{mem.added_gib:5.2f} GiB  peak {mem.peak / GIB:5.2f} GiB"
          f"  {error}", flush=True)
    rows.append({"room": name, "seconds": seconds, "added_gib": mem.added_gib, "peak_gib": mem.peak / GIB,
                 "estimate_s": estimate, "error": error})
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="paligemma", choices=sorted(FAMILIES))
    parser.add_argument("--shape", help="a real checkpoint name of the family (default: its first)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rooms", nargs="*", help="rooms to run (default all)")
    args = parser.parse_args()
    torch.manual_seed(0)
    family = get_family(args.family)
    shape_name = args.shape or next(iter(family.real_shapes))
    tok = tiny_tokenizer(args.family, ["is there a lesion in the left lung? yes no the right upper lobe"] * 8, 300)
    with PeakRSS() as load:
        model, processor = family.real_shape_model(shape_name, tok, layers=args.layers)
        model.set_attn_implementation("eager")
        model.eval()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{args.family} {shape_name}, {args.layers} layers per tower: {n_params / 1e6:.0f}M parameters, "
          f"loaded {load.peak / GIB:.2f} GiB; torch threads {torch.get_num_threads()}")
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)
    question, answer = "Is there a lesion in the left lung?", "yes"
    ex = prepare_example(model, processor, family, image, question)
    shape = Shape.of(model, family, ex)
    print(f"sequence {shape.seq_len} tokens, image grid {shape.grid}, vocabulary {shape.vocab}")
    print(f"{'room':<16} {'time':>10} {'/fwd':>8} {'estimate':>10}  {'memory beyond the model':>24}")
    want = set(args.rooms or [])
    rows: list = []

    def wanted(name: str) -> bool:
        return not want or name in want

    def forward():
        with torch.no_grad():
            model(**ex.inputs, use_cache=False, logits_to_keep=1)

    fwd = room("forward", forward, rows, None)
    per_flop = fwd / shape.forward_flops()
    if wanted("generate"):
        from medvlm.eval.generate import generate_answers

        images = family.prepare_images(processor, [image] * 4)
        room("generate", lambda: generate_answers(model, processor, family, images, [question] * 4, batch_size=4,
                                                  max_new_tokens=8, progress=False), rows, fwd)
    if wanted("train_step"):
        from medvlm.training.arguments import LoraArguments
        from medvlm.training.lora import attach_lora

        def step():
            peft_model = attach_lora(model, family, LoraArguments(lora_r=8, lora_alpha=16), "bench")
            batch = family.model_inputs(family.train_batch(processor, family.prepare_images(processor, [image]),
                                                           [question], [answer], prepared=True))
            peft_model.train()
            peft_model(**batch).loss.backward()
            peft_model.eval()
            peft_model.unload()  # the base model back, without LoRA layers
        room("train_step", step, rows, fwd)
    ctx = Context(model, processor, family, ex, kinds={k for m in registered() for k in m.shared} | {"hidden_states"})
    if wanted("capture"):
        room("capture", lambda: ctx.cache, rows, fwd, shape.forward_flops(logits_at=shape.seq_len) * per_flop)
    for method in registered():
        if wanted(method.name):
            room(method.name, lambda m=method: m.run(ctx), rows, fwd, method.cost(shape) * per_flop)
    return 0


if __name__ == "__main__":
    sys.exit(main())

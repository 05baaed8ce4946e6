"""Every room at a real checkpoint's shape (its widths, heads, vocabulary and image grid; towers cut to
two layers; random weights; float32 on the CPU): seconds and peak memory per room, the ratio to a
plain forward pass, the per-checkpoint budget's estimate and the room's memory bound.

    python benchmarks/real_shape.py --family paligemma --shape paligemma-3b-mix-448
    python benchmarks/real_shape.py --family llava --shape llava-1.5-7b-hf --rooms forward capture logprob

Rooms: ``forward`` (one example, logits at the last position), ``generate`` (``--questions``
questions in one batch, 8 new tokens), ``train_step`` (one LoRA step, batch 1, the Trainer's loss),
``checkpoint_eval`` (the per-checkpoint evaluation of ``--questions`` questions, batch "auto"),
``capture`` (the probe's shared pass), ``geometry`` (one of the probe's hidden-states passes for the
geometry), and every registered diagnostic method
(:mod:`medvlm.diagnostics.methods`). Memory is the process's peak resident set size sampled every
5 ms during the room, minus the resident size before it (what the room held beyond the loaded
model; :class:`medvlm.utils.memory.PeakRSS`). "estimate" is what the per-checkpoint diagnostics
budget plans with at its first save, before anything ran (:func:`medvlm.diagnostics.callback.costs_from_shapes`:
one timed forward pass and each method's operations from the shapes). "bound" is the room's memory
bound from the shapes (a method's ``Method.memory``; the formulas are in ``tests/test_real_shape.py``).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from medvlm.diagnostics.callback import costs_from_shapes
from medvlm.diagnostics.capture import prepare_example
from medvlm.diagnostics.methods import Context, Shape, registered
from medvlm.diagnostics.probe import _EMBED_AND_RESID, hidden_states
from medvlm.models.families import FAMILIES, get_family
from medvlm.models.tiny import tiny_tokenizer
from medvlm.utils.memory import GIB, PeakRSS


def room(name: str, fn: Callable[[], object], rows: list, forward_s: float | None, estimate: float | None = None,
         bound: float | None = None):
    """Run one room: its seconds, the ratio to the forward pass, the budget's estimate, the memory it
    held beyond what was resident before it, and its memory bound from the shapes (bytes)."""
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
    lim = f"{bound / GIB:6.2f}" if bound is not None else "     -"
    print(f"{name:<16} {seconds:8.1f} s {ratio} {est} s  +{mem.added_gib:5.2f} GiB  bound {lim} GiB"
          f"  peak {mem.peak / GIB:5.2f} GiB  {error}", flush=True)
    rows.append({"room": name, "seconds": seconds, "added_gib": mem.added_gib, "peak_gib": mem.peak / GIB,
                 "estimate_s": estimate, "bound_gib": None if bound is None else bound / GIB, "error": error})
    return seconds


def checkpoint_eval(model, processor, family, images, questions) -> None:
    """The per-checkpoint evaluation (:class:`~medvlm.training.callbacks.CheckpointEvalCallback`) of
    ``questions``, written into a temporary folder."""
    import tempfile

    from medvlm.models.inputs import ImageStore, PreparedExamples
    from medvlm.training.callbacks import CheckpointEvalCallback

    n = len(questions)
    records = [{"id": f"q{i}", "question": q, "answer": "yes", "answer_type": "closed"} for i, q in enumerate(questions)]
    examples = PreparedExamples(ImageStore(images=images), np.arange(n), list(questions), ["yes"] * n,
                                [r["id"] for r in records], np.zeros(n, dtype=np.int64), np.ones(n, dtype=np.int64))
    with tempfile.TemporaryDirectory() as folder:
        CheckpointEvalCallback(family, processor, records, examples, max_new_tokens=8, bootstrap=10).evaluate(
            model, Path(folder), 1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="paligemma", choices=sorted(FAMILIES))
    parser.add_argument("--shape", help="a real checkpoint name of the family (default: its first)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rooms", nargs="*", help="rooms to run (default all; forward always runs)")
    parser.add_argument("--questions", type=int, default=4, help="questions of generate and checkpoint_eval")
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
    print(f"{'room':<16} {'time':>10} {'/fwd':>8} {'estimate':>10}  {'memory beyond the model, bound':>32}")
    want = set(args.rooms or [])
    rows: list = []

    def wanted(name: str) -> bool:
        return not want or name in want

    def forward():
        with torch.no_grad():
            model(**ex.inputs, use_cache=False, logits_to_keep=1)

    fwd = room("forward", forward, rows, None, bound=shape.forward_bytes())
    estimate = costs_from_shapes(model, processor, family, {"image": image, "question": question},
                                 [m.name for m in registered()], geometry_examples=1)
    estimate["geometry_pass"] = estimate["geometry"]  # one geometry example's pass
    print(f"budget's first-save estimates calibrated on a forward of {estimate['forward_s']:.1f} s (all logits)")
    images = family.prepare_images(processor, [image] * args.questions)
    questions = [question] * args.questions
    if wanted("generate"):
        from medvlm.eval.generate import generate_answers

        room("generate", lambda: generate_answers(model, processor, family, images, questions,
                                                  batch_size=args.questions, max_new_tokens=8, progress=False),
             rows, fwd)
    if wanted("train_step"):
        from medvlm.training.arguments import LoraArguments
        from medvlm.training.lora import attach_lora
        from medvlm.training.trainer import answer_loss

        def step():
            peft_model = attach_lora(model, family, LoraArguments(lora_r=8, lora_alpha=16), "bench")
            batch = family.model_inputs(family.train_batch(processor, images[:1], [question], [answer], prepared=True))
            peft_model.train()
            answer_loss(peft_model, batch)[0].backward()  # the Trainer's loss
            peft_model.eval()
            peft_model.unload()  # the base model back, without LoRA layers
        room("train_step", step, rows, fwd)
    if wanted("checkpoint_eval"):
        room("checkpoint_eval", lambda: checkpoint_eval(model, processor, family, images, questions), rows, fwd)
    kinds = {"hidden_states", "resid_pre"} | {k for m in registered() for k in m.shared}
    ctx = Context(model, processor, family, ex, kinds=kinds, names_filter=_EMBED_AND_RESID)  # the probe's pass
    if wanted("capture"):
        kept = 4 * ((shape.n_layers + 1) * shape.seq_len * shape.d_model + shape.n_layers * shape.seq_len ** 2)
        room("capture", lambda: ctx.cache, rows, fwd, estimate["capture"],
             shape.forward_bytes(logits_at=len(ctx.positions)) + kept)
    if wanted("geometry"):
        kept = 4 * (shape.n_layers + 1) * shape.seq_len * shape.d_model
        room("geometry", lambda: hidden_states(model, processor, family, {"image": image, "question": question}),
             rows, fwd, estimate["geometry_pass"], shape.forward_bytes() + kept)
    ctx.cache  # noqa: B018 - methods are measured beyond the shared pass
    for method in registered():
        if wanted(method.name):
            room(method.name, lambda m=method: m.run(ctx), rows, fwd, estimate[method.name], method.memory(shape))
    return 0


if __name__ == "__main__":
    sys.exit(main())

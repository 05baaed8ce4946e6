"""Batched generation for every family: left padding, KV cache, the image really passed.

The prompt is stripped from the output by position (everything after the input length), and
``num_return_sequences`` gives several samples per question from one ``generate`` call (the
five-run consistency check), instead of one call per sample. Samples are seeded per question
(:mod:`medvlm.eval.sampling`), so they do not depend on the batch or the process that answers.
The batch is chosen from a memory budget and halved on out-of-memory (:mod:`medvlm.eval.batching`).
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm
from transformers import LogitsProcessorList

from medvlm.eval.batching import BatchRecord, auto_batch_size, parse_batch_size, run_batches
from medvlm.eval.sampling import PerRowSampler
from medvlm.models.base import ModelFamily


@torch.inference_mode()
def generate_answers(
    model: torch.nn.Module,
    processor,
    family: ModelFamily,
    images: Sequence[np.ndarray],
    questions: Sequence[str],
    *,
    batch_size: int | str = "auto",
    max_new_tokens: int = 12,
    do_sample: bool = False,
    num_return_sequences: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    question_ids: Sequence[int] | None = None,
    memory_budget: int | None = None,
    resized: bool = True,
    progress: bool = True,
    latencies: list[float] | None = None,
    batch_record: BatchRecord | None = None,
) -> list[str] | list[list[str]]:
    """Answers for ``questions`` about ``images`` (prepared by the family when ``resized``:
    :meth:`~medvlm.models.base.ModelFamily.prepare_images`; else any PIL/array image). One string per question, or a list of
    ``num_return_sequences`` strings when that is above 1.

    ``batch_size``: questions per ``generate`` call, or ``"auto"`` (from ``memory_budget`` bytes,
    default half the free memory; see :func:`~medvlm.eval.batching.auto_batch_size`); either way
    halved on out-of-memory. ``batch_record``, when given, receives the batch used.
    ``question_ids``: each question's index in the whole evaluated set (default ``0..n-1``); the
    samples of a question are seeded from ``(seed, its id)``, so a shard of the set passes its
    global indices and gets the samples the whole set would.
    ``latencies``, when given a list, receives one number per question: the wall time of its
    batch (inputs built, generated, decoded) divided by the batch's size, in seconds."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions; pass one image per question")
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy decoding repeats itself)")
    ids = list(range(len(questions))) if question_ids is None else [int(i) for i in question_ids]
    if len(ids) != len(questions):
        raise ValueError(f"{len(ids)} question_ids for {len(questions)} questions; pass one index per question")
    record = batch_record if batch_record is not None else BatchRecord(requested=batch_size)
    record.requested = parse_batch_size(batch_size)
    if not questions:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tok = processor.tokenizer
    k = num_return_sequences
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True, num_return_sequences=k,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    if do_sample:  # the sampler applies temperature and top-p; generate's own warpers stay off
        gen_kwargs.update(temperature=1.0, top_p=1.0, top_k=0)
    if record.requested == "auto":
        start, record.estimate = auto_batch_size(model, processor, family, images, questions, rows_per_question=k,
                                                 max_new_tokens=max_new_tokens, budget_bytes=memory_budget,
                                                 resized=resized)
    else:
        start = min(int(record.requested), len(questions))
    outputs: list = []
    bar = tqdm(total=len(questions), desc="generate", disable=not progress or None)

    def run_batch(lo: int, hi: int) -> int:
        t0 = time.perf_counter()
        batch = family.generation_batch(processor, list(images[lo:hi]), list(questions[lo:hi]), prepared=resized)
        batch = {key: v.to(device) for key, v in family.model_inputs(batch).items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        extra = {}
        if do_sample:
            extra["logits_processor"] = LogitsProcessorList([PerRowSampler(
                ids[lo:hi], k, seed=seed, temperature=temperature, top_p=top_p, device=device)])
        out = model.generate(**batch, **gen_kwargs, **extra)
        texts = [t.strip() for t in tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)]
        outputs.extend(texts if k == 1 else [texts[i:i + k] for i in range(0, len(texts), k)])
        if latencies is not None:
            latencies.extend([(time.perf_counter() - t0) / (hi - lo)] * (hi - lo))
        return hi - lo

    try:
        run_batches(len(questions), start, run_batch, record, progress=bar.update)
    finally:
        bar.close()
        if was_training:
            model.train()
    return outputs

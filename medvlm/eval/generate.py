"""Batched generation for every family: left padding, KV cache, the image really passed.

The prompt is stripped from the output by position (everything after the input length), and
``num_return_sequences`` gives several samples per question from one ``generate`` call (the
five-run consistency check), instead of one call per sample.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from medvlm.models.base import ModelFamily


@torch.inference_mode()
def generate_answers(
    model: torch.nn.Module,
    processor,
    family: ModelFamily,
    images: Sequence[np.ndarray],
    questions: Sequence[str],
    *,
    batch_size: int = 32,
    max_new_tokens: int = 12,
    do_sample: bool = False,
    num_return_sequences: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int = 0,
    resized: bool = True,
    progress: bool = True,
    latencies: list[float] | None = None,
) -> list[str] | list[list[str]]:
    """Answers for ``questions`` about ``images`` (prepared by the family when ``resized``:
    :meth:`~medvlm.models.base.ModelFamily.prepare_images`; else any PIL/array image). One string per question, or a list of
    ``num_return_sequences`` strings when that is above 1.

    ``latencies``, when given a list, receives one number per question: the wall time of its
    batch (inputs built, generated, decoded) divided by the batch's size, in seconds."""
    if len(images) != len(questions):
        raise ValueError(f"{len(images)} images for {len(questions)} questions; pass one image per question")
    if num_return_sequences > 1 and not do_sample:
        raise ValueError("num_return_sequences > 1 needs do_sample=True (greedy decoding repeats itself)")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    tok = processor.tokenizer
    gen_kwargs = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, use_cache=True,
                      num_return_sequences=num_return_sequences,
                      pad_token_id=tok.pad_token_id, eos_token_id=family.stop_token_ids(processor))
    if do_sample:
        gen_kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
        torch.manual_seed(seed)
    outputs: list = []
    starts = range(0, len(questions), batch_size)
    for start in tqdm(starts, desc="generate", disable=not progress or None):
        t0 = time.perf_counter()
        batch = family.generation_batch(processor, list(images[start:start + batch_size]),
                                        list(questions[start:start + batch_size]), prepared=resized)
        batch = {k: v.to(device) for k, v in family.model_inputs(batch).items()}
        if "pixel_values" in batch:
            batch["pixel_values"] = batch["pixel_values"].to(model.dtype)
        out = model.generate(**batch, **gen_kwargs)
        texts = tok.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        if num_return_sequences > 1:
            k = num_return_sequences
            outputs.extend(texts[i:i + k] for i in range(0, len(texts), k))
        else:
            outputs.extend(texts)
        if latencies is not None:
            n = len(questions[start:start + batch_size])
            latencies.extend([(time.perf_counter() - t0) / n] * n)
    if was_training:
        model.train()
    return outputs

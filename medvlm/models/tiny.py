"""Tiny models of each family: real transformers classes and processors, a tokenizer built here.

``build_tiny(family, sizes, tokenizer)`` asks the family for a tiny model of its real class
(:meth:`~medvlm.models.base.ModelFamily.tiny_model`); tests build them in seconds and the embedded
demo (:mod:`medvlm.demo`) pre-trains them on phantom data. The tokenizer is a byte-level BPE
trained on a small corpus: any text encodes (unknown words fall back to bytes).

``demo:<family>`` names the embedded demo base of a family: a folder under
``$MEDVLM_HOME/base/`` that :func:`medvlm.demo.ensure_base_model` builds and records as the
family's current base (``$MEDVLM_HOME/base/<family>.current``); :func:`demo_model_dir` reads that
record, so loading ``demo:<family>`` never trains anything.
"""

from __future__ import annotations

from pathlib import Path

import torch

from medvlm.models.base import TinySizes
from medvlm.models.families import get_family
from medvlm.utils.io import medvlm_home

DEMO_SCHEME = "demo:"


def tiny_tokenizer(family: str, corpus: list[str], vocab_size: int):
    """The tokenizer of a tiny ``family`` model, trained on ``corpus`` (with the family's special tokens)."""
    return get_family(family).tiny_tokenizer(corpus, vocab_size)


def build_tiny(family: str, sizes: TinySizes, tokenizer):
    """``(model, processor)`` of ``family`` with random weights (seeded by ``sizes.seed``)."""
    torch.manual_seed(sizes.seed)
    model, processor = get_family(family).tiny_model(sizes, tokenizer)
    model.generation_config.pad_token_id = processor.tokenizer.pad_token_id
    model.generation_config.eos_token_id = processor.tokenizer.eos_token_id
    return model, processor


def current_record(family: str) -> Path:
    """The file naming the current demo base folder of ``family``."""
    return medvlm_home() / "base" / f"{family}.current"


def demo_model_dir(name: str) -> Path:
    """The folder ``demo:<family>`` names now (see the module docstring); raises when none is built."""
    family = name.split(":", 1)[1]
    get_family(family)  # an unknown family: did-you-mean
    record = current_record(family)
    if record.is_file():
        folder = record.parent / record.read_text(encoding="utf-8").strip()
        if (folder / "manifest.json").is_file():
            return folder
    raise FileNotFoundError(f"{name}: the embedded demo base of {family} is not built in {medvlm_home()} yet; "
                            f"build it with `python -m medvlm.demo {family}` (make demo does; a few minutes on a CPU)")

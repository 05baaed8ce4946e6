"""A byte-level BPE tokenizer built locally (the tiny models of tests and the embedded demo)."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<image>"]


def build_tokenizer(corpus: list[str], vocab_size: int, specials: list[str] | None = None,
                    **special_tokens: str) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus``: any text encodes (unknown words fall back to
    bytes). ``specials`` (default: pad, eos, bos, unk and ``<image>``) come first in the vocabulary;
    keyword arguments name extra special tokens (``image_token="<image>"`` by default)."""
    specials = specials or SPECIALS
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    extra = special_tokens or {"image_token": "<image>"}
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>",
                                   bos_token="<bos>", unk_token="<unk>", padding_side="right",
                                   extra_special_tokens=extra)

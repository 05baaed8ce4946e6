"""Training data in memory: images decoded and resized once, lengths known, phases kept.

The image processor resizes (and crops) each image once here, without rescaling or normalising;
the collator then only rescales and normalises, which is cheap. Decoding and resizing PNG/JPEG
on every step is what makes naive VLM fine-tuning input-bound on a CPU.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from medvlm.utils.images import read_image

logger = logging.getLogger(__name__)


def resize_only(processor, images: list) -> np.ndarray:
    """Run the processor's resize/crop without rescale/normalise → uint8 [n, H, W, 3]."""
    out = processor.image_processor(images, do_rescale=False, do_normalize=False,
                                    return_tensors="np")["pixel_values"]
    arr = np.asarray(out)
    if arr.shape[1] == 3:  # channels first → last
        arr = arr.transpose(0, 2, 3, 1)
    return np.clip(arr.round(), 0, 255).astype(np.uint8)


@dataclass
class PreparedExamples(torch.utils.data.Dataset):
    """Examples ready for the collator: ``image`` (uint8 HxWx3), ``question``, ``answer``."""

    images: np.ndarray          # [n_unique_images, H, W, 3] uint8
    image_index: np.ndarray     # [n] index into images
    questions: list[str]
    answers: list[str]
    ids: list[str]
    phases: np.ndarray          # [n] int, 0 .. n_phases-1 (annealing order)
    lengths: np.ndarray         # [n] approximate token counts (for length grouping)

    def __len__(self) -> int:
        return len(self.questions)

    def head(self, n: int) -> PreparedExamples:
        """The first ``n`` examples (sharing the decoded images)."""
        return dataclasses.replace(self, image_index=self.image_index[:n], questions=self.questions[:n],
                                   answers=self.answers[:n], ids=self.ids[:n], phases=self.phases[:n],
                                   lengths=self.lengths[:n])

    def blanked(self) -> PreparedExamples:
        """The same examples with every image a uniform mid-grey: the "does it look?" control."""
        return dataclasses.replace(self, images=np.full_like(self.images, 128))

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[self.image_index[i]], "question": self.questions[i],
                "answer": self.answers[i], "id": self.ids[i]}


def _column(records, name: str, default=None) -> list:
    """A column of a ``datasets.Dataset`` or of a list of dicts."""
    if hasattr(records, "column_names"):
        return list(records[name]) if name in records.column_names else [default] * len(records)
    return [r.get(name, default) for r in records]


def prepare_examples(records, processor, batch: int = 64) -> PreparedExamples:
    """Unified records (a ``datasets.Dataset`` or dicts) → :class:`PreparedExamples`.

    Each distinct image is decoded and resized once; lengths are tokenised for grouping; the
    ``phase`` column (from a mix) is kept, 0 when absent.
    """
    paths, questions, answers, ids = (_column(records, c) for c in ("image", "question", "answer", "id"))
    phases = _column(records, "phase", 0)
    unique = list(dict.fromkeys(paths))
    index = {p: i for i, p in enumerate(unique)}
    chunks = []
    for start in tqdm(range(0, len(unique), batch), desc="images", disable=None):
        chunk = [read_image(p) for p in unique[start:start + batch]]
        chunks.append(resize_only(processor, chunk))
    images = np.concatenate(chunks) if chunks else np.zeros((0, 1, 1, 3), np.uint8)
    tok = processor.tokenizer
    lengths = np.array([len(x) + len(y) for x, y in zip(
        tok(questions, add_special_tokens=False)["input_ids"],
        tok(answers, add_special_tokens=False)["input_ids"])], dtype=np.int64)
    return PreparedExamples(images, np.array([index[p] for p in paths], dtype=np.int64), questions,
                            answers, ids, np.asarray(phases, dtype=np.int64), lengths)

"""Filters over unified records: composable steps, each with its own reject reason.

>>> # pipeline = FilterPipeline([make_step("format"), make_step("exact_duplicates")])
>>> # result = pipeline.run(ds, "runs/filtered")
>>> # result.dataset                 # the kept rows (unified records)
>>> # result.counts[0]               # {"step": "format", "in": 900, "out": 880, "rejected": 20, "noted": 0}

Every rejected row becomes one line of ``<out_dir>/rejects.jsonl`` (``id, step, reason`` and the
row's key fields); rows that are kept but carry a note (a failed blind check) go to
``<out_dir>/filter_notes.jsonl``. Both files are written through a temp file and renamed at the end.

How a step runs (memory stays flat): an optional global pass (:meth:`FilterStep.prepare`) reads the
columns in batches and keeps only numpy arrays of a few bytes per row (hashes, first-occurrence
indices); then :meth:`FilterStep.judge` gives each batch of rows a reject reason (or "") and a
note, rejected rows are written out as they come, and the kept rows are taken with
``Dataset.select(indices)`` (an index mapping: the Arrow data are never rewritten; one byte per row
marks the kept ones). Row-wise steps may run in ``num_proc`` processes (``Dataset.map``). Steps by name (:data:`STEPS`): ``pathology``, ``exact_duplicates``,
``near_duplicate_questions``, ``duplicate_images``, ``format``, ``answer_in_question``, ``blind_check``.
"""

from medvlm.data_curation.filters.base import BLIND_TEMPLATE, KEY_FIELDS, FilterConfigError, FilterStep
from medvlm.data_curation.filters.duplicates import (
    DuplicateImages,
    ExactDuplicates,
    NearDuplicateQuestions,
    _near_duplicates,
    average_hash,
)
from medvlm.data_curation.filters.pipeline import (
    STEPS,
    FilterPipeline,
    FilterResult,
    make_step,
    parse_step_spec,
)
from medvlm.data_curation.filters.text import AnswerInQuestion, BlindCheck, FormatCheck, PathologyRelevance

__all__ = [
    "BLIND_TEMPLATE", "KEY_FIELDS", "STEPS", "AnswerInQuestion", "BlindCheck", "DuplicateImages", "ExactDuplicates",
    "FilterConfigError", "FilterPipeline", "FilterResult", "FilterStep", "FormatCheck", "NearDuplicateQuestions",
    "PathologyRelevance", "_near_duplicates", "average_hash", "make_step", "parse_step_spec",
]

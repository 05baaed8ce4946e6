"""Model mode of the evaluation: load a model (+ adapter), answer a dataset, score, judge.

:func:`evaluate_model` writes into ``output``::

    predictions.jsonl             raw greedy answers, one line per question (with ``samples`` when
                                  consistency is on, and ``latency_s``)
    predictions_paraphrase.jsonl  answers to the paraphrase groups (robustness only)
    judge.jsonl                   one judgement per open question (judge only)
    metrics.json                  score_records' result (+ robustness, judge and model sections)
    manifest.json                 written last: inputs, options, counts, versions

Under ``accelerate launch`` with N processes every process loads the model and answers its shard
of the questions (:mod:`medvlm.eval.distributed`); the main process gathers the answers in order,
and alone scores, judges and writes. ``manifest.json`` (and ``metrics.json``'s ``generation``
section) records the number of processes, the questions each generated and the batch each used.

Predictions and metrics are written before the judge runs. A judge server that is down or lacks
the model raises (:func:`~medvlm.eval.judge.check_judge_server`) after ``predictions.jsonl`` and
``metrics.json`` are on disk, and no manifest is written: the run is unfinished. ``run_eval.py``
makes the same check before the model loads, so no answers are generated for nothing. Items the
server fails on otherwise (HTTP 500, malformed JSON, timeouts) are counted invalid.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medvlm.data_curation.spec import load_split
from medvlm.eval.batching import parse_batch_size
from medvlm.eval.consistency import DEFAULT_THRESHOLD
from medvlm.eval.distributed import generate_sharded, generation_summary
from medvlm.eval.judge import judge_open_rows
from medvlm.eval.paraphrase import paraphrase_records
from medvlm.eval.run import prediction_rows
from medvlm.eval.scoring import paraphrase_robustness, score_records, to_jsonable
from medvlm.models.adapters import AdapterError, check_adapter, family_of, load_with_adapter
from medvlm.models.inputs import prepare_examples
from medvlm.utils.distributed import main_process_first, world
from medvlm.utils.hub import looks_like_missing_folder
from medvlm.utils.io import atomic_write_json, hash_rows, write_manifest
from medvlm.utils.io import write_jsonl as io_write_jsonl

logger = logging.getLogger(__name__)

#: Slices of a model-mode run (qtype first: the phantom's question types are its curriculum).
MODEL_SLICES = ("qtype", "modality", "answer_type", "body_part", "source")


class ModelEvalError(ValueError):
    """A model, adapter or dataset that cannot be evaluated; the message names it and the fix."""


@dataclass
class ModelEvalConfig:
    """What to evaluate and how. Groups: model, data, generation, checks, judge."""

    model: str = field(metadata={"help": "hub id, local folder, or demo:paligemma / demo:llava"})
    output: str = field(metadata={"help": "folder for predictions, metrics and manifest"})
    adapter: str | None = field(default=None, metadata={"help": "LoRA adapter folder to apply"})
    dtype: str = field(default="auto", metadata={"help": "auto (bfloat16 on a GPU, float32 on a CPU) | float32 | bfloat16 "
                                                         "| float16"})
    attn_implementation: str = field(default="sdpa", metadata={"help": "sdpa (fast) | eager"})
    dataset: str = field(default="phantom", metadata={"help": "phantom, a saved dataset folder, or a mix YAML"})
    split: str = field(default="test", metadata={"help": "split to evaluate"})
    question_types: list[str] | None = field(default=None, metadata={"help": "phantom question types (all)"})
    phantom_patients: int = field(default=4000, metadata={"help": "phantom only: number of patients"})
    phantom_seed: int = field(default=0, metadata={"help": "phantom only: generator seed"})
    max_samples: int | None = field(default=None, metadata={"help": "evaluate the first N questions"})
    batch_size: int | str = field(default="auto", metadata={
        "help": "questions per generate call, or auto (from the memory budget); halved on out-of-memory"})
    memory_budget: float | None = field(default=None, metadata={
        "help": "auto batch: GiB one process may use for generation (default: half its free memory)"})
    max_new_tokens: int = field(default=16, metadata={"help": "answer length budget"})
    consistency: bool = field(default=False, metadata={"help": "sample answers for the consistency check"})
    samples: int = field(default=5, metadata={"help": "sampled answers per question"})
    temperature: float = field(default=0.7, metadata={"help": "sampling temperature"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass"})
    seed: int = field(default=0, metadata={"help": "sampling seed"})
    robustness: bool = field(default=False, metadata={"help": "evaluate paraphrase groups"})
    paraphrases: int = field(default=3, metadata={"help": "reworded variants per question"})
    judge_backend: str | None = field(default=None, metadata={"help": "ollama | openai | transformers (off when empty)"})
    judge_model: str | None = field(default=None, metadata={"help": "judge model name or path"})
    judge_host: str | None = field(default=None, metadata={
        "help": "judge server: Ollama (default $OLLAMA_HOST) or an OpenAI-compatible API base (default $OPENAI_BASE_URL)"})
    judge_api_key_env: str | None = field(default=None, metadata={
        "help": "openai judge: variable holding the API key (default OPENAI_API_KEY)"})
    judge_cache: str | None = field(default=None, metadata={"help": "response cache (default output/judge_cache)"})
    judge_concurrency: int = field(default=1, metadata={"help": "parallel judge requests"})
    judge_timeout: float | None = field(default=None, metadata={"help": "seconds per judge request (120)"})
    judge_template: str = field(default="correctness", metadata={"help": "medvlm/templates/judge/<name>.txt or a file path"})

    def __post_init__(self) -> None:
        if self.max_samples is not None and self.max_samples < 1:
            raise ModelEvalError(f"--max-samples must be >= 1, got {self.max_samples}")
        try:
            self.batch_size = parse_batch_size(self.batch_size)
        except ValueError as e:
            raise ModelEvalError(f"--batch-size: {e}") from e
        if self.samples < 1 or self.max_new_tokens < 1:
            raise ModelEvalError("--samples and --max-new-tokens must be >= 1, got "
                                 f"{self.samples}, {self.max_new_tokens}")
        if self.memory_budget is not None and self.memory_budget <= 0:
            raise ModelEvalError(f"--memory-budget must be a positive number of GiB, got {self.memory_budget}")
        if bool(self.judge_backend) != bool(self.judge_model):
            raise ModelEvalError("the judge needs both --judge-backend and --judge-model (e.g. --judge-backend "
                                 "ollama --judge-model llama3.1:8b)")

    def judge_llm_config(self) -> dict[str, Any]:
        """The ``make_llm`` config of the judge (validated, nothing contacted)."""
        from medvlm.eval.judge import judge_llm_config

        return judge_llm_config(self.judge_backend, self.judge_model, self.output, host=self.judge_host,
                                cache=self.judge_cache, concurrency=self.judge_concurrency,
                                timeout=self.judge_timeout, api_key_env=self.judge_api_key_env)


# Inputs ----------------------------------------------------------------------------------------

def check_inputs(cfg: ModelEvalConfig) -> None:
    """Fail fast, before loading anything, on a missing model folder or adapter."""
    model = cfg.model
    if not model.startswith("demo:") and looks_like_missing_folder(model):
        raise ModelEvalError(f"model folder {model} does not exist; pass an existing folder holding "
                             "config.json, a hub id (owner/name), or demo:paligemma")
    if not model.startswith("demo:") and Path(model).is_dir() and not (Path(model) / "config.json").is_file():
        raise ModelEvalError(f"model folder {model} holds no config.json; point --model at a saved model "
                             "(save_pretrained output) or a hub id")
    if cfg.adapter:
        try:
            check_adapter(cfg.adapter, cfg.model, family_of(cfg.model), what="--adapter")
        except AdapterError as e:
            raise ModelEvalError(str(e).replace("model_name_or_path: ", "--model ")
                                 .replace("model_name_or_path", "--model")) from e
    if cfg.judge_backend:
        try:
            cfg.judge_llm_config()
        except ValueError as e:
            raise ModelEvalError(f"judge: {e}") from e


def load_eval_records(cfg: ModelEvalConfig):
    """The records to evaluate (phantom, saved dataset or mix), the first ``max_samples`` of them."""
    records = load_split(cfg.dataset, cfg.split, question_types=cfg.question_types,
                         phantom_patients=cfg.phantom_patients, phantom_seed=cfg.phantom_seed, build_dir=cfg.output)
    if len(records) == 0:
        raise ModelEvalError(f"dataset {cfg.dataset} has no records in split {cfg.split!r}")
    if cfg.max_samples:
        records = records.select(range(min(cfg.max_samples, len(records))))
    return records


def load_model(cfg: ModelEvalConfig):
    """``LoadedModel`` with the adapter applied (merged into the weights: faster generation)."""
    try:
        return load_with_adapter(cfg.model, cfg.adapter, merge=True, dtype=cfg.dtype,
                                 attn_implementation=cfg.attn_implementation, for_inference=True)
    except OSError as e:  # transformers' "not a valid model identifier" and missing files
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelEvalError(f"cannot load model {cfg.model!r}: {first}") from e


# Generation ------------------------------------------------------------------------------------

def answer_records(loaded, records, cfg: ModelEvalConfig, *, sample: bool = False,
                   passes: dict[str, Any] | None = None, name: str = "greedy") -> list[dict[str, Any]]:
    """Prediction rows for ``records``: greedy answers with ``latency_s``, plus ``samples`` (one
    ``generate`` per batch with ``num_return_sequences``, seeded per question) when ``sample``.
    Extra fields of the records (``group``, ``variant``) are kept. Every process calls it and gets
    every row (each generated its shard); ``passes`` collects each pass's
    :class:`~medvlm.eval.distributed.ShardedAnswers` under ``name`` (and ``samples``)."""
    examples = prepare_examples(records, loaded.processor, loaded.family)
    budget = None if cfg.memory_budget is None else int(cfg.memory_budget * 2**30)
    common = dict(batch_size=cfg.batch_size, max_new_tokens=cfg.max_new_tokens, memory_budget=budget)
    greedy = generate_sharded(loaded.model, loaded.processor, loaded.family, examples.image, examples.questions,
                              **common)
    rows = prediction_rows(records, greedy.answers)
    for row, rec, lat in zip(rows, records, greedy.latencies, strict=True):
        row["latency_s"] = lat
        for key in ("group", "variant"):
            if rec.get(key) is not None:
                row[key] = rec[key]
    if passes is not None:
        passes[name] = greedy
    if sample:
        k = cfg.samples
        sampled = generate_sharded(loaded.model, loaded.processor, loaded.family, examples.image, examples.questions,
                                   do_sample=True, num_return_sequences=k, temperature=cfg.temperature,
                                   top_p=cfg.top_p, seed=cfg.seed, **common)
        for row, s in zip(rows, sampled.answers, strict=True):
            row["samples"] = [s] if k == 1 else list(s)
        if passes is not None:
            passes["samples"] = sampled
    return rows


def answer_paraphrases(loaded, groups: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                       cfg: ModelEvalConfig, passes: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Prediction rows for paraphrase ``groups`` (:func:`~medvlm.eval.paraphrase.paraphrase_records`).

    A wording the main pass already answered (same id, same question: the base wording, and every
    row of a dataset's own paraphrase groups) reuses that row, so the base answer is the one scored
    in ``predictions.jsonl``; only the new wordings are generated."""
    done = {r["id"]: r for r in rows}

    def answered(g: Mapping[str, Any]) -> Mapping[str, Any] | None:
        main = done.get(str(g["id"]))
        return main if main is not None and main["question"] == g["question"] else None

    todo = [g for g in groups if answered(g) is None]
    new = iter(answer_records(loaded, todo, cfg, passes=passes, name="paraphrases") if todo else [])
    out = []
    for g in groups:
        main = answered(g)
        if main is None:
            out.append(next(new))
        else:
            out.append({**{k: v for k, v in main.items() if k != "samples"}, "group": g["group"],
                        "variant": g["variant"]})
    return out


def write_jsonl(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """One JSON object per line, written to a temp file then renamed."""
    return io_write_jsonl(path, (to_jsonable(row) for row in rows))


# Orchestration ---------------------------------------------------------------------------------

def scoring_options(cfg: ModelEvalConfig, scoring: Mapping[str, Any] | None) -> dict[str, Any]:
    """score_records keyword arguments: the suite's/user's, with slices and consistency k defaulted."""
    kwargs = dict(scoring or {})
    kwargs.setdefault("slice_by", MODEL_SLICES)
    if cfg.consistency:
        kwargs["consistency_k"] = cfg.samples
        kwargs["consistency_threshold"] = min(kwargs.get("consistency_threshold", DEFAULT_THRESHOLD), cfg.samples)
    return kwargs


def evaluate_model(cfg: ModelEvalConfig, scoring: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the whole model-mode evaluation (see the module docstring); returns the metrics (on the
    main process; ``{}`` on the others, which only generate their shards)."""
    t0 = time.time()
    check_inputs(cfg)
    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    kwargs = scoring_options(cfg, scoring)
    main = world()[0] == 0

    # Load data and model
    with main_process_first():  # a mix YAML or the phantom is built once
        records = load_eval_records(cfg)
    loaded = load_model(cfg)
    logger.info("evaluating %s on %d %s questions of %s", cfg.model, len(records), cfg.split, cfg.dataset)

    # Generate (every process its shard) and score (the main process)
    passes: dict[str, Any] = {}
    rows = answer_records(loaded, records, cfg, sample=cfg.consistency, passes=passes)
    metrics: dict[str, Any] = {}
    if main:
        write_jsonl(out / "predictions.jsonl", rows)
        metrics = score_records(rows, **kwargs)
    outputs = ["predictions.jsonl", "metrics.json"]
    if cfg.robustness:
        groups, unmatched = paraphrase_records(records, max_variants=cfg.paraphrases)
        para_rows = answer_paraphrases(loaded, groups, rows, cfg, passes)
        if main:
            write_jsonl(out / "predictions_paraphrase.jsonl", para_rows)
            metrics["robustness"] = paraphrase_robustness(para_rows, bootstrap=kwargs.get("bootstrap", 1000),
                                                          seed=kwargs.get("seed", 0), unmatched=unmatched)
        outputs.append("predictions_paraphrase.jsonl")
    if not main:
        return {}
    generation = generation_summary(passes)
    metrics["generation"] = generation
    metrics["model"] = {"model": cfg.model, "adapter": cfg.adapter, "dataset": cfg.dataset, "split": cfg.split,
                        "family": type(loaded.family).__name__, "seconds": round(time.time() - t0, 2)}
    atomic_write_json(out / "metrics.json", to_jsonable(metrics))

    # Judge (after the predictions are safe on disk)
    if cfg.judge_backend:
        metrics["judge"] = judge_open_rows(rows, cfg.judge_llm_config(), out, template=cfg.judge_template,
                                           concurrency=cfg.judge_concurrency)
        atomic_write_json(out / "metrics.json", to_jsonable(metrics))
        outputs += [] if "error" in metrics["judge"] else ["judge.jsonl"]

    write_manifest(out, step="eval.model", config=asdict(cfg), scoring={k: list(v) if isinstance(v, tuple) else v
                                                                         for k, v in kwargs.items()},
                   counts=metrics.get("counts", {}), outputs=outputs, world_size=generation["world_size"],
                   generation=generation,
                   data={"n": len(records), "ids_sha256": hash_rows(str(r) for r in records["id"])})
    return metrics

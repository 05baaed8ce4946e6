"""One training stage: data → model (+LoRA) → train → adapter → test-split evaluation → manifest.

The run folder (``output_dir``) ends up holding::

    config.yaml            the merged config that made the run
    checkpoint-N/          Trainer checkpoints (adapter, optimizer, scheduler, RNG, metrics.json)
    adapter/               the final adapter (safetensors) + medvlm_adapter.json
    trainer_state.json     loss curve and log history
    predictions.jsonl      raw test-split predictions;  predictions_blank.jsonl  the blank-image control
    metrics.json           the final evaluation
    manifest.json          versions, data hash, seed, counts — written last: a run without it is unfinished
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path

from transformers import set_seed
from transformers.trainer_utils import get_last_checkpoint

from medvlm.config import ConfigError, to_yaml
from medvlm.data_curation.spec import load_split
from medvlm.diagnostics.callback import DiagnosticsCallback
from medvlm.eval.metrics import UnknownMetricError, get_metric
from medvlm.eval.run import evaluate_examples, write_metrics
from medvlm.models.adapters import check_adapter, concat_adapters, family_of, write_record
from medvlm.models.inputs import VLMCollator, prepare_examples
from medvlm.models.registry import load_model_and_processor
from medvlm.training.arguments import DataArguments, LoraArguments, ModelArguments, StageArguments
from medvlm.training.callbacks import AdapterRecordCallback, CheckpointEvalCallback
from medvlm.training.lora import attach_lora, gathered_adapter_state, log_trainable
from medvlm.training.trainer import MedVLMTrainer
from medvlm.utils.io import atomic_write_text, hash_rows, write_manifest

logger = logging.getLogger(__name__)


def load_records(source: str, split: str, question_types, data_args: DataArguments, run_dir: Path):
    """Unified records of one split, as the config names the dataset (see :func:`load_split`)."""
    return load_split(source, split, question_types=question_types, phantom_patients=data_args.phantom_patients,
                      phantom_seed=data_args.phantom_seed, build_dir=run_dir)


def last_complete_checkpoint(out: Path) -> str | None:
    """The newest ``checkpoint-N`` holding ``trainer_state.json``, which the Trainer writes last, so
    a run killed while saving resumes from the checkpoint before (``get_last_checkpoint`` would pick
    the half-written one and fail). Skipped folders are logged."""
    steps = sorted(((int(p.name.split("-")[1]), p) for p in out.glob("checkpoint-*")
                    if p.is_dir() and p.name.split("-")[1].isdigit()), reverse=True)
    for _, folder in steps:
        if (folder / "trainer_state.json").is_file():
            return str(folder)
        logger.warning("%s is incomplete (no trainer_state.json: the run stopped while saving it); "
                       "resuming from an earlier checkpoint", folder)
    return None


def check_run_dir(out: Path, resume: bool) -> str | None:
    """A finished run is never overwritten; an unfinished one is resumed only when asked."""
    if (out / "manifest.json").exists() and not resume:
        raise ConfigError(f"{out} already holds a finished run (manifest.json); choose another output_dir "
                          "or delete the folder")
    last = get_last_checkpoint(str(out)) if out.is_dir() else None
    if resume:
        if last is None:
            raise ConfigError(f"resume: true, but {out} holds no checkpoint-N folder to resume from; "
                              "drop --resume to start the run")
        complete = last_complete_checkpoint(out)
        if complete is None:
            raise ConfigError(f"resume: true, but every checkpoint in {out} is incomplete (no "
                              "trainer_state.json: the run stopped while saving); delete them and drop --resume")
        return complete
    if last is not None:
        raise ConfigError(f"{out} holds checkpoints of an unfinished run; pass --resume true to resume it, or "
                          "choose another output_dir")
    return None


def _setup_reporting(args: StageArguments) -> None:
    if "wandb" in (args.report_to or []):
        if args.wandb_project:
            os.environ.setdefault("WANDB_PROJECT", args.wandb_project)
        if not os.environ.get("WANDB_API_KEY") and not os.environ.get("WANDB_MODE"):
            logger.info("no WANDB_API_KEY: logging to W&B in offline mode (sync later with `wandb sync`)")
            os.environ["WANDB_MODE"] = "offline"


def metric_list(names: str, answer_type: str) -> list[str] | None:
    """Comma-separated metric names checked against the registry now, not at the first save
    (an unknown name raises with a did-you-mean); empty means all registered metrics."""
    chosen = [n.strip() for n in (names or "").split(",") if n.strip()]
    for name in chosen:
        try:
            get_metric(name, answer_type)
        except UnknownMetricError as err:
            raise ValueError(f"checkpoint_{answer_type}_metrics: {err.args[0]}") from err
    return chosen or None


def run_stage(model_args: ModelArguments, data_args: DataArguments, lora_args: LoraArguments,
              args: StageArguments, callbacks: list | None = None) -> dict:
    """Train one stage and evaluate it; returns the final metrics. ``callbacks`` are extra
    ``TrainerCallback``s (e.g. to log elsewhere, or to stop a run in tests)."""
    out = Path(args.output_dir)
    last_checkpoint = check_run_dir(out, args.resume)
    set_seed(args.seed)
    _setup_reporting(args)
    t0 = time.time()

    # Load data ---------------------------------------------------------------------------------
    train_records = load_records(data_args.dataset, "train", data_args.question_types, data_args, out)
    eval_records = load_records(data_args.eval_dataset, data_args.eval_split,
                                data_args.eval_question_types, data_args, out)
    if data_args.max_eval_samples:
        eval_records = eval_records.select(range(min(data_args.max_eval_samples, len(eval_records))))

    # Load model --------------------------------------------------------------------------------
    image_settings = model_args.image_settings()
    if lora_args.init_adapter:  # a wrong adapter is refused before any weights load
        record = check_adapter(lora_args.init_adapter, model_args.model_name_or_path,
                               family_of(model_args.model_name_or_path), what="init_adapter")
        image_settings = image_settings or record.get("image_settings") or {}  # else the previous stage's
    loaded = load_model_and_processor(model_args.model_name_or_path, dtype=model_args.dtype,
                                      quantization_bits=model_args.quantization_bits,
                                      attn_implementation=model_args.attn_implementation,
                                      image_settings=image_settings)
    family, processor = loaded.family, loaded.processor
    model = attach_lora(loaded.model, family, lora_args, model_args.model_name_or_path,
                        quantized=model_args.quantization_bits is not None,
                        gradient_checkpointing=args.gradient_checkpointing)
    trainable = log_trainable(model, family)
    train_examples = prepare_examples(train_records, processor, family)
    eval_examples = prepare_examples(eval_records, processor, family)

    # Train -------------------------------------------------------------------------------------
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "config.yaml", to_yaml(model_args, data_args, lora_args, args))
    merged = [lora_args.init_adapter] if lora_args.init_adapter and lora_args.adapter_mode == "merge" else []
    callbacks = [AdapterRecordCallback(model_args.model_name_or_path, family.name, merged, image_settings),
                 *(callbacks or [])]
    if args.checkpoint_eval_samples:
        n = min(args.checkpoint_eval_samples, len(eval_records))
        sub = eval_records.select(range(n))
        callbacks.append(CheckpointEvalCallback(family, processor, sub, eval_examples.head(n),
                                                max_new_tokens=data_args.max_new_tokens,
                                                batch_size=data_args.generation_batch_size,
                                                closed_metrics=metric_list(args.checkpoint_closed_metrics, "closed"),
                                                open_metrics=metric_list(args.checkpoint_open_metrics, "open")))
    if args.diagnostics_examples:
        probe = load_records(data_args.eval_dataset, args.diagnostics_split, data_args.eval_question_types,
                             data_args, out)
        callbacks.append(DiagnosticsCallback(family, processor, probe, max_examples=args.diagnostics_examples))
    trainer = MedVLMTrainer(model=model, args=args, train_dataset=train_examples,
                            data_collator=VLMCollator(family, processor), callbacks=callbacks)
    for cb in callbacks:
        if isinstance(cb, CheckpointEvalCallback):
            cb.trainer = trainer
    result = trainer.train(resume_from_checkpoint=last_checkpoint)
    train_seconds = time.time() - t0

    # Save (main process) -----------------------------------------------------------------------
    main = trainer.is_world_process_zero()
    adapter = gathered_adapter_state(trainer.model)  # every process: a collective under FSDP
    if main:
        save_adapter(trainer.model, out / "adapter", model_args.model_name_or_path, family.name, merged,
                     image_settings=image_settings, state_dict=adapter)
        trainer.state.save_to_json(str(out / "trainer_state.json"))

    # Evaluate (every process answers its shard; the main process scores and writes) -------------
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    gen = dict(max_new_tokens=data_args.max_new_tokens, batch_size=data_args.generation_batch_size)
    metrics = evaluate_examples(unwrapped, processor, family, eval_records, eval_examples, out, **gen)
    blank = (evaluate_examples(unwrapped, processor, family, eval_records, eval_examples.blanked(), out,
                               name="predictions_blank", **gen) if args.blank_eval else None)
    if main:
        if blank is not None:
            metrics["blank_image"] = blank
        metrics["train"] = {"loss": result.training_loss, "steps": result.global_step,
                            "seconds": round(train_seconds, 1), **result.metrics}
        write_metrics(out, metrics)
        write_manifest(out, stage=args.stage, seed=args.seed, model=model_args.model_name_or_path,
                       init_adapter=lora_args.init_adapter, adapter_mode=lora_args.adapter_mode,
                       data={"train": len(train_records), "eval": len(eval_records),
                             "train_hash": hash_rows(train_records["id"]),
                             "eval_hash": hash_rows(eval_records["id"])},
                       trainable_parameters=trainable, world_size=args.world_size,
                       generation=metrics["generation"])
    trainer.accelerator.wait_for_everyone()
    return metrics


def save_adapter(model, folder: Path, base_model: str, family: str, merged_into_base: list[str],
                 image_settings: dict[str, int] | None = None, state_dict: dict | None = None) -> None:
    """The final adapter in safetensors, relative to the original base: a stage that merged its
    previous adapter into the base saves the concatenation of both (see
    :func:`~medvlm.models.adapters.concat_adapters`), so plain PEFT on the base reproduces the run.
    ``state_dict``: the trainable tensors gathered from FSDP shards
    (:func:`~medvlm.training.lora.gathered_adapter_state`). Written to a temp folder and renamed into place."""
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True, state_dict=state_dict)
    for earlier in merged_into_base:
        concat_adapters(earlier, tmp, tmp)
    write_record(tmp, base_model, family, image_settings=image_settings)
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)

"""Two-stage LoRA / QLoRA fine-tuning: arguments, LoRA per tower, the sampler, the trainer, the
per-checkpoint callbacks and the stage runner (``run_stage``)."""

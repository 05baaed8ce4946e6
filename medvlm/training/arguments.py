"""The stage recipes' config: model, data, LoRA and training arguments.

Model arguments   which checkpoint, dtype, quantisation (QLoRA), attention implementation
Data arguments    the training data (phantom curriculum, a built mix, or an Arrow dataset)
LoRA arguments    preset, rank, towers, and how a stage starts from a previous adapter
Stage arguments   transformers' TrainingArguments plus W&B names and the final evaluation
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

from medvlm.data_curation.phantom import BASIC_TYPES
from medvlm.eval.batching import parse_batch_size


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="demo:paligemma",
        metadata={"help": "Hub id (google/paligemma-3b-mix-448, llava-hf/llava-1.5-7b-hf), a local folder, "
                          "or demo:paligemma / demo:llava for the embedded tiny base model."})
    dtype: str = field(default="float32", metadata={"help": "float32 | bfloat16 | float16."})
    quantization_bits: int | None = field(
        default=None, metadata={"help": "4 or 8 to load the base through bitsandbytes (QLoRA); empty for none."})
    attn_implementation: str = field(
        default="eager", metadata={"help": "eager (needed for attention diagnostics) | sdpa."})
    min_pixels: int | None = field(
        default=None, metadata={"help": "Dynamic-resolution families (Qwen2.5-VL): smallest image area in pixels, "
                                        "smaller images are enlarged; empty: the checkpoint's processor config."})
    max_pixels: int | None = field(
        default=None, metadata={"help": "Dynamic-resolution families (Qwen2.5-VL): largest image area in pixels, "
                                        "larger images are shrunk (image tokens = area / 784, and memory, grow "
                                        "with it); empty: the checkpoint's processor config."})

    do_pan_and_scan: bool | None = field(
        default=None, metadata={"help": "Gemma 3 / MedGemma: true cuts a non-square image into the original view "
                                        "plus crops, 256 tokens each (memory grows with them); empty: the "
                                        "checkpoint's processor config (off in MedGemma's)."})

    def image_settings(self) -> dict[str, int]:
        """The processor overrides set in the config (``min_pixels``, ``max_pixels``, ``do_pan_and_scan``)."""
        settings = {k: int(v) for k, v in (("min_pixels", self.min_pixels), ("max_pixels", self.max_pixels))
                    if v is not None}
        if self.do_pan_and_scan is not None:
            settings["do_pan_and_scan"] = bool(self.do_pan_and_scan)
        return settings


@dataclass
class DataArguments:
    dataset: str = field(
        default="phantom",
        metadata={"help": "'phantom' (embedded data), a folder saved by build_mix / save_to_disk, or a mix "
                          "YAML (built into the run folder)."})
    question_types: list[str] = field(
        default_factory=lambda: list(BASIC_TYPES),
        metadata={"help": "Phantom only: question types of the curriculum (stage 1: the basic ones)."})
    phantom_patients: int = field(default=4000, metadata={"help": "Phantom only: number of patients."})
    phantom_seed: int = field(default=0, metadata={"help": "Phantom only: generator seed."})
    eval_dataset: str = field(
        default="phantom",
        metadata={"help": "Where the final test-split evaluation reads: 'phantom' or a saved dataset folder."})
    eval_question_types: list[str] = field(
        default_factory=list, metadata={"help": "Phantom only: question types evaluated (empty: all)."})
    eval_split: str = field(default="test", metadata={"help": "Split of the final evaluation."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Cap on evaluated questions."})
    max_new_tokens: int = field(default=12, metadata={"help": "Generation length at evaluation."})
    generation_batch_size: str = field(
        default="auto",
        metadata={"help": "Questions per generate call at evaluation (final and per checkpoint): auto (as many as "
                          "fit half the free memory) or a number; halved on out-of-memory; metrics.json says which."})

    def __post_init__(self):
        try:
            self.generation_batch_size = parse_batch_size(self.generation_batch_size)
        except ValueError as err:
            raise ValueError(f"generation_batch_size: {err}") from err


@dataclass
class LoraArguments:
    lora_preset: str = field(default="full", metadata={"help": "paper (r=12, alpha=32, q/k/v/o/up/down on both "
                                                               "towers) | full (also SigLIP out_proj, fc1, fc2)."})
    lora_r: int | None = field(default=None, metadata={"help": "Rank; empty: the preset's."})
    lora_alpha: int | None = field(default=None, metadata={"help": "Alpha; empty: the preset's."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_towers: list[str] = field(default_factory=lambda: ["vision", "projector", "language"],
                                   metadata={"help": "Towers that get LoRA: vision, projector, language."})
    init_adapter: str | None = field(
        default=None, metadata={"help": "Adapter folder of a previous stage to start from (stage 2)."})
    adapter_mode: str = field(
        default="continue", metadata={"help": "continue: train the previous adapter further | merge: merge it "
                                              "into the base and add a new adapter."})

    def __post_init__(self):
        if self.adapter_mode not in ("continue", "merge"):
            raise ValueError(f"adapter_mode must be 'continue' or 'merge', got {self.adapter_mode!r}")


@dataclass
class StageArguments(TrainingArguments):
    """transformers.TrainingArguments plus what a medvlm stage adds."""

    stage: str = field(default="stage1", metadata={"help": "Name of this stage (stage1, stage2)."})
    wandb_project: str | None = field(default=None, metadata={"help": "W&B project (with report_to: wandb)."})
    group_by_length: bool = field(default=True, metadata={"help": "Batch examples of similar length."})
    resume: bool = field(default=False, metadata={"help": "Resume this run from its last checkpoint "
                                                          "(same data, optimizer and scheduler state)."})
    checkpoint_eval_samples: int = field(
        default=0, metadata={"help": "Questions evaluated at each checkpoint save (0: none)."})
    checkpoint_closed_metrics: str = field(
        default="", metadata={"help": "Closed-question metrics at each checkpoint, comma-separated "
                                      "(e.g. accuracy,exact_match; empty: all registered)."})
    checkpoint_open_metrics: str = field(
        default="", metadata={"help": "Open-question metrics at each checkpoint, comma-separated "
                                      "(e.g. rougeL,bleu; empty: all registered)."})
    blank_eval: bool = field(default=True, metadata={"help": "Also evaluate with blanked images (control)."})
    diagnostics_examples: int = field(
        default=0, metadata={"help": "Lesion examples probed by the diagnostics at each checkpoint save (0: none); "
                                     "the probe keeps to 10% of the training time."})
    diagnostics_split: str = field(default="validation", metadata={"help": "Split the diagnostics probe reads."})

    def __post_init__(self):
        # CPU machines: float32 on the CPU (set before transformers picks the device)
        import torch

        if not torch.cuda.is_available():
            self.use_cpu = True
            self.bf16 = False
            self.fp16 = False
        self.remove_unused_columns = False  # the collator needs image/question/answer
        super().__post_init__()

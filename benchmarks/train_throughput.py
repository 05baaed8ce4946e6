"""Training throughput: medvlm's stage recipe against a plain TRL SFTTrainer, side by side.

Same model (the demo base), same LoRA, same data (the demo's stage-2 questions), same steps and
batch size. The baseline is the usual tutorial set-up: an SFTTrainer whose collator opens each
image file and runs the full processor (decode, resize, normalise, tokenise) on every step, with
random batches. medvlm decodes and resizes every image once, groups batches by length, and keeps
TRL/transformers for the loop itself. Prints samples/s of each, their ratio, and model FLOPs
utilisation (6·N·tokens per step, N = all parameters) against a matmul peak measured in this run.

    python benchmarks/train_throughput.py [--steps 40] [--batch-size 32] [--family paligemma]
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import torch  # noqa: E402
from PIL import Image  # noqa: E402
from transformers import TrainerCallback  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from medvlm.data_curation.phantom import ALL_TYPES, PhantomConfig, load_phantom  # noqa: E402
from medvlm.demo import ensure_demo_model  # noqa: E402
from medvlm.models.inputs import VLMCollator, prepare_examples  # noqa: E402
from medvlm.models.registry import load_model_and_processor  # noqa: E402
from medvlm.training.arguments import LoraArguments, StageArguments  # noqa: E402
from medvlm.training.lora import attach_lora  # noqa: E402
from medvlm.training.trainer import MedVLMTrainer  # noqa: E402


class Tokens(TrainerCallback):
    """Counts tokens actually fed to the model (for FLOPs) and times the steps after warm-up."""

    def __init__(self, warmup: int):
        self.warmup, self.tokens, self.t0, self.steps = warmup, 0, None, 0

    def on_step_begin(self, args, state, control, **kw):
        if state.global_step == self.warmup:
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kw):
        if self.t0 is not None:
            self.steps += 1

    def seconds(self) -> float:
        return time.perf_counter() - self.t0


def matmul_peak(n: int = 1024, repeats: int = 10) -> float:
    """FLOP/s of a float32 n×n matmul on this machine, best of ``repeats``."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def naive_collator(family, processor):
    def collate(rows):
        images = [Image.open(r["image"]).convert("RGB") for r in rows]
        batch = family.train_batch(processor, images, [r["question"] for r in rows], [r["answer"] for r in rows])
        return dict(batch)
    return collate


def run(kind: str, family_name: str, records, steps: int, batch_size: int, warmup: int) -> dict:
    ensure_demo_model(f"demo:{family_name}")
    loaded = load_model_and_processor(f"demo:{family_name}")
    model = attach_lora(loaded.model, loaded.family, LoraArguments(lora_r=16, lora_alpha=32), "bench")
    counter = Tokens(warmup)
    common = dict(output_dir=f"/tmp/medvlm-bench-{kind}", max_steps=steps + warmup,
                  per_device_train_batch_size=batch_size, learning_rate=1e-3, report_to=[], save_strategy="no",
                  logging_steps=1000, seed=0, dataloader_num_workers=0, disable_tqdm=True)
    prep = 0.0
    if kind == "trl":
        args = SFTConfig(**common, use_cpu=not torch.cuda.is_available(), bf16=False, remove_unused_columns=False,
                         dataset_kwargs={"skip_prepare_dataset": True})
        trainer = SFTTrainer(model=model, args=args, train_dataset=records,
                             data_collator=naive_collator(loaded.family, loaded.processor), callbacks=[counter])
        collate = naive_collator(loaded.family, loaded.processor)
    else:
        args = StageArguments(**common)
        t_prep = time.perf_counter()
        examples = prepare_examples(records, loaded.processor, loaded.family)  # one-off: every image prepared once
        prep = time.perf_counter() - t_prep
        trainer = MedVLMTrainer(model=model, args=args, train_dataset=examples,
                                data_collator=VLMCollator(loaded.family, loaded.processor), callbacks=[counter])
        collate = trainer.data_collator
    t = time.perf_counter()
    trainer.train()
    total = time.perf_counter() - t
    # tokens per sample (mean over a sample of batches, for the FLOPs estimate)
    n_params = sum(p.numel() for p in model.parameters())
    probe = collate([records[i] for i in range(min(256, len(records)))] if kind == "trl" else
                    [trainer.train_dataset[i] for i in range(min(256, len(records)))])
    tokens_per_sample = probe["input_ids"].shape[1]
    secs = counter.seconds()
    return {"samples_per_s": counter.steps * batch_size / secs, "seconds": secs, "total_seconds": total,
            "prep_seconds": prep,
            "flops_per_s": 6 * n_params * tokens_per_sample * batch_size * counter.steps / secs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", default="paligemma", help="paligemma | llava")
    parser.add_argument("--steps", type=int, default=40, help="timed steps per trainer")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    records = load_phantom(PhantomConfig(), kind="qa", split="train", qtypes=ALL_TYPES)
    peak = matmul_peak()
    results = {kind: run(kind, args.family, records, args.steps, args.batch_size, args.warmup)
               for kind in ("trl", "medvlm")}
    print(f"\nmatmul peak (float32 1024², this machine, {torch.get_num_threads()} threads): {peak / 1e9:.1f} GFLOP/s")
    print(f"{'trainer':<10}{'samples/s':>12}{'MFU':>8}{'timed s':>10}{'train s':>10}{'prep s':>10}")
    for kind, r in results.items():
        print(f"{kind:<10}{r['samples_per_s']:>12.1f}{r['flops_per_s'] / peak:>8.1%}{r['seconds']:>10.1f}"
              f"{r['total_seconds']:>10.1f}{r['prep_seconds']:>10.1f}")
    print("prep s: medvlm's one-off image decoding/resizing of the whole training set (the baseline pays it "
          "on every step instead)")
    print(f"ratio medvlm / trl: {results['medvlm']['samples_per_s'] / results['trl']['samples_per_s']:.2f}x")


if __name__ == "__main__":
    main()

"""The training data path at scale: prepare N distinct images once, then one epoch through the
DataLoader and the collator; images/s and this process's peak memory.

    python benchmarks/data_path.py --images 2000 --size 448 [--family llava] [--batch-size 8] [--workers 0]
    python benchmarks/data_path.py --images 8000 --size 448

Writes N synthetic PX-pixel PNGs (different noise and shapes each), builds a tiny model of the
family with its image size set to PX (only its processor is used), prepares the images into the
on-disk cache (``medvlm.models.inputs``: built once, then reused), and iterates one epoch of
examples through a ``DataLoader`` with the family's collator, as training does. It prints, for the
on-disk cache and, as the baseline measured in the same run, the same examples held in memory
(what the training data path did before the cache): the time to the first batch, images/s over
the epoch, and the process's peak resident memory (``ru_maxrss``) at each stage. Run each size in
its own process (peak memory is per process). The cache and images live in a temporary folder
unless ``--keep DIR`` is given (a second run with the same DIR measures the warm cache).
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medvlm.models.base import TinySizes
from medvlm.models.inputs import ImageStore, PreparedExamples, VLMCollator, prepare_examples
from medvlm.models.tiny import build_tiny, tiny_tokenizer


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: kB


def write_images(folder: Path, n: int, size: int) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        path = folder / f"img{i:05d}.png"
        if not path.exists():
            arr = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)  # coarse noise, upscaled
            img = Image.fromarray(arr).resize((size, size), Image.Resampling.NEAREST)
            img.save(path, compress_level=1)
        records.append({"id": f"r{i}", "image": str(path), "question": "Is there a lesion in the left lung?",
                        "answer": "yes" if i % 2 else "no"})
    return records


def epoch(examples: PreparedExamples, collator: VLMCollator, batch_size: int, workers: int) -> tuple[float, float]:
    """(seconds to the first batch, images/s over the epoch)."""
    loader = torch.utils.data.DataLoader(examples, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         collate_fn=collator, generator=torch.Generator().manual_seed(0))
    t0 = time.perf_counter()
    first = None
    n = 0
    for batch in loader:
        if first is None:
            first = time.perf_counter() - t0
        n += batch["input_ids"].shape[0]
    return first or 0.0, n / (time.perf_counter() - t0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=2000, help="distinct images (default 2000)")
    parser.add_argument("--size", type=int, default=448, help="image side in pixels (default 448)")
    parser.add_argument("--family", default="llava", help="model family whose processor prepares the images")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    parser.add_argument("--keep", type=Path, help="folder for the images and the cache (kept between runs)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the in-memory baseline")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        os.environ["MEDVLM_HOME"] = str(root / "home")
        records = write_images(root / f"images-{args.size}", args.images, args.size)
        tok = tiny_tokenizer(args.family, ["is there a lesion in the left lung yes no"] * 4, 300)
        _, processor = build_tiny(args.family, TinySizes(image_size=args.size, patch_size=14, vision_layers=1,
                                                         text_layers=1), tok)
        from medvlm.models.families import get_family

        family = get_family(args.family)
        collator = VLMCollator(family, processor)
        print(f"{args.images} images of {args.size} px, family {args.family}, batch {args.batch_size}, "
              f"{args.workers} workers; peak RSS at start {peak_mib():.0f} MiB")
        t = time.perf_counter()
        examples = prepare_examples(records, processor, family)
        print(f"on-disk cache: prepared/opened in {time.perf_counter() - t:.1f} s, peak RSS {peak_mib():.0f} MiB")
        first, rate = epoch(examples, collator, args.batch_size, args.workers)
        print(f"on-disk cache: first batch {first:.2f} s, {rate:.0f} images/s, peak RSS {peak_mib():.0f} MiB")
        if not args.no_baseline:
            t = time.perf_counter()
            in_memory = PreparedExamples(ImageStore(images=[examples.store[i] for i in range(len(examples.store))]),
                                         examples.image_index, examples.questions, examples.answers, examples.ids,
                                         examples.phases, examples.lengths)
            print(f"in memory (baseline): loaded in {time.perf_counter() - t:.1f} s, peak RSS {peak_mib():.0f} MiB")
            base_first, base_rate = epoch(in_memory, collator, args.batch_size, args.workers)
            print(f"in memory (baseline): first batch {base_first:.2f} s, {base_rate:.0f} images/s, "
                  f"peak RSS {peak_mib():.0f} MiB")
            print(f"ratio on-disk / in-memory images/s: {rate / base_rate:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Curation at scale: filter pipeline + two-phase mix on synthetic records, at two sizes.

    python benchmarks/curation_scale.py                      # 100k and 200k rows
    python benchmarks/curation_scale.py --sizes 20000 40000  # a quick look

Each size runs in a fresh child process, so its peak memory is its own: the peak resident set
size from ``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (KiB on Linux), printed next to the RSS
after imports (``psutil``-free: the child reads ``/proc/self/status`` VmRSS). Records are made
with ``datasets.Dataset.from_generator`` (Arrow end to end, never a Python list of all rows) and
saved as two mix sources: ``generated`` (with exact duplicates, near-duplicate questions, empty
answers, give-away questions and rows without a pathology) and ``clean``. Images are 40 tiny PNG
files shared by all rows (two of them byte copies), so the image-hash step runs too.

Prints throughput (records/s) and memory for both sizes and their ratio; never asserts. Two memory
measures: ``ru_maxrss`` counts every resident page, including the pages of the memory-mapped Arrow
files that were read (file cache: it grows with the data read and the kernel reclaims it under
pressure); the heap peak samples ``RssAnon`` (``/proc/self/status``) every 20 ms, which is the
memory the code allocates. The heap must not grow with the dataset size: the filters keep a few
bytes per row in numpy arrays and the rows stay in Arrow files. On the 2-core dev machine
(50k vs 200k rows) the heap peak was 155 vs 154 MiB while ru_maxrss went 259 -> 353 MiB.
What still grows per row: numpy arrays of 1-8 bytes per row in the global filter passes, and the
Python index lists that ``datasets.interleave_datasets`` builds (about 40 bytes per mixed row).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FINDINGS = ("nodule", "mass", "cyst", "effusion", "fracture")
FILTERS = ["format", "exact_duplicates", {"near_duplicate_questions": {"threshold": 0.8}}, "answer_in_question",
           {"pathology": {"keywords": list(FINDINGS), "min_count": 10}}, {"duplicate_images": {"max_hamming": 2}}]


def rss_kib(field: str = "VmRSS") -> int:
    """A memory field of ``/proc/self/status`` in KiB (VmRSS total, RssAnon heap, RssFile mapped files)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


class AnonPeak:
    """Samples RssAnon every 20 ms in a thread: the peak of heap memory, which excludes the pages of
    memory-mapped Arrow files that ru_maxrss also counts (those are file cache, reclaimable)."""

    def __init__(self) -> None:
        import threading

        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_kib("RssAnon"))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return max(self.peak, rss_kib("RssAnon"))


def make_images(folder: Path, n: int = 40) -> list[str]:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        path = folder / f"img{i:03d}.png"
        if i >= n - 2:  # byte copies of the first two images
            shutil.copyfile(paths[i - (n - 2)], path)
        else:
            Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(path)
        paths.append(str(path))
    return paths


def question_of(i: int) -> str:
    return f"What is seen in region {i // 40} of study {i}?"  # rows sharing an image differ in both numbers


def records(n: int, prefix: str, images: tuple[str, ...], noisy: bool):
    """Yield ``n`` unified records; ``noisy`` adds the defects the filters look for (about 18%)."""
    import random

    from medvlm.records import make_record

    rng = random.Random(prefix)
    for i in range(n):
        finding = FINDINGS[i % len(FINDINGS)]
        image = images[i % len(images)]
        question, answer = question_of(i), f"{finding} {i % 13}"
        kind = rng.random() if noisy else 1.0
        if kind < 0.05 and i > 0:      # exact duplicate of the previous row
            question, answer, image = question_of(i - 1), f"{FINDINGS[(i - 1) % 5]} {(i - 1) % 13}", images[(i - 1) % 40]
        elif kind < 0.08:
            answer = ""
        elif kind < 0.10:
            question = f"Is the {finding} {i % 13} visible as a {finding} {i % 13}?"
        elif kind < 0.15:
            finding, answer = "normal", "normal study"
        elif kind < 0.18 and i >= 40:  # the question of the row 40 back (same image), one word longer
            question = question_of(i - 40).rstrip("?") + " exactly?"
        yield make_record(id=f"{prefix}{i}", image=image, question=question, answer=answer, answer_type="open",
                          source=prefix, split="train", group_id=f"{prefix}{i // 4}", modality="CT",
                          body_part=("chest", "head", "abdomen")[i % 3], meta={"finding": finding})


def run_one(n: int, work: Path) -> dict:
    """One size, in this (child) process: generate, filter, mix; returns timings and memory."""
    import datasets

    from medvlm.data_curation.filters import FilterPipeline
    from medvlm.data_curation.mixing import MixConfig, PhaseSpec, SourceSpec, build_mix
    from medvlm.records import FEATURES

    datasets.disable_progress_bars()
    rss_start, anon_start, sampler = rss_kib(), rss_kib("RssAnon"), AnonPeak()
    images = make_images(work / "images")
    t0 = time.perf_counter()
    # gen_kwargs: a list would be split into shards by datasets (one generator run per item): a tuple is not
    for name, noisy, rows in (("generated", True, int(n * 0.8)), ("clean", False, n - int(n * 0.8))):
        ds = datasets.Dataset.from_generator(records, features=FEATURES, cache_dir=str(work / "hf-cache"),
                                             gen_kwargs={"n": rows, "prefix": name, "images": tuple(images),
                                                         "noisy": noisy})
        ds.save_to_disk(str(work / name))
    t_gen = time.perf_counter() - t0

    t0 = time.perf_counter()
    source = datasets.load_from_disk(str(work / "generated"))
    result = FilterPipeline.from_config(FILTERS).run(source, work / "filtered")
    t_filter = time.perf_counter() - t0
    peak_filter = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    anon_filter = sampler.peak

    cfg = MixConfig(sources=[SourceSpec("generated", str(work / "generated"), filters=FILTERS),
                             SourceSpec("clean", str(work / "clean"), filters=["format"])],
                    phases=[PhaseSpec("main", {"generated": 0.8, "clean": 0.2}, size=int(n * 0.5)),
                            PhaseSpec("anneal", {"clean": 0.9, "generated": 0.1}, size=int(n * 0.1))])
    t0 = time.perf_counter()
    build_mix(cfg, work / "mix")
    t_mix = time.perf_counter() - t0
    manifest = json.loads((work / "mix" / "manifest.json").read_text())
    anon_peak = sampler.stop()
    return {"n": n, "generate_s": t_gen, "filter_s": t_filter, "filter_rows_per_s": len(source) / t_filter,
            "mix_s": t_mix, "mix_rows_per_s": n / t_mix, "mix_rows": manifest["rows"],
            "filter_counts": result.counts, "rss_after_imports_mib": rss_start / 1024,
            "peak_rss_after_filters_mib": peak_filter / 1024, "anon_after_imports_mib": anon_start / 1024,
            "peak_anon_after_filters_mib": anon_filter / 1024, "peak_anon_mib": anon_peak / 1024,
            "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 200_000], help="rows per run")
    parser.add_argument("--workdir", default=None, help="scratch folder (default: a temp folder, removed)")
    parser.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # child mode
    args = parser.parse_args()
    if args.one is not None:
        print(json.dumps(run_one(args.one, Path(args.workdir))))
        return

    root = Path(args.workdir or tempfile.mkdtemp(prefix="curation-scale-"))
    env = {**os.environ, "HF_DATASETS_CACHE": str(root / "hf-cache"), "HF_HUB_OFFLINE": "1"}
    results = []
    for n in args.sizes:
        work = root / f"n{n}"
        shutil.rmtree(work, ignore_errors=True)
        out = subprocess.run([sys.executable, __file__, "--one", str(n), "--workdir", str(work)], env=env,
                             check=True, capture_output=True, text=True)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        print(f"n={n:>8}: generate {r['generate_s']:.1f}s | filters {r['filter_s']:.1f}s "
              f"({r['filter_rows_per_s']:,.0f} rows/s) | mix incl. filters {r['mix_s']:.1f}s "
              f"({r['mix_rows_per_s']:,.0f} rows/s, {r['mix_rows']} rows) | RSS after imports "
              f"{r['rss_after_imports_mib']:.0f} MiB, peak after filters {r['peak_rss_after_filters_mib']:.0f} MiB, "
              f"peak {r['peak_rss_mib']:.0f} MiB (ru_maxrss) | heap (RssAnon) after imports "
              f"{r['anon_after_imports_mib']:.0f} MiB, peak after filters {r['peak_anon_after_filters_mib']:.0f} MiB, "
              f"peak {r['peak_anon_mib']:.0f} MiB", flush=True)
        print("   filter counts: " + ", ".join(f"{c['step']} -{c['rejected']}" for c in r["filter_counts"]))
    if len(results) >= 2:
        a, b = results[0], results[-1]
        print(f"size x{b['n'] / a['n']:.1f}: peak RSS x{b['peak_rss_mib'] / a['peak_rss_mib']:.2f}, "
              f"peak heap x{b['peak_anon_mib'] / a['peak_anon_mib']:.2f}, "
              f"peak minus import RSS x{(b['peak_rss_mib'] - b['rss_after_imports_mib']) / max(1e-9, a['peak_rss_mib'] - a['rss_after_imports_mib']):.2f}, "
              f"filter throughput x{b['filter_rows_per_s'] / a['filter_rows_per_s']:.2f}")
    if args.workdir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

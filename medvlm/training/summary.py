"""Compare finished stage runs: closed accuracy, the blank-image control and accuracy per question type.

    python -m medvlm.training.summary runs/demo/stage1 runs/demo/stage2 [--output runs/demo/summary.md]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from medvlm.utils.io import atomic_write_text


def _fmt(x) -> str:
    return "—" if x is None else f"{x:.3f}" if isinstance(x, float) else str(x)


def summarize(runs: list[Path]) -> str:
    metrics = {run: json.loads((run / "metrics.json").read_text()) for run in runs}
    lines = ["| run | closed acc (n) | 95% CI | blank-image closed acc | open ROUGE-L | train steps | train s |",
             "|---|---|---|---|---|---|---|"]
    for run, m in metrics.items():
        c, o, b = m.get("closed", {}), m.get("open", {}), m.get("blank_image", {}).get("closed", {})
        ci = c.get("accuracy_ci") or [None, None]
        lines.append(f"| {run.name} | {_fmt(c.get('accuracy'))} ({c.get('n')}) | {_fmt(ci[0])}–{_fmt(ci[1])} | "
                     f"{_fmt(b.get('accuracy'))} | {_fmt(o.get('rougeL'))} | {m.get('train', {}).get('steps')} | "
                     f"{m.get('train', {}).get('seconds')} |")
    qtypes = sorted({q for m in metrics.values() for q in m.get("slices", {}).get("qtype", {})})
    if qtypes:
        lines += ["", "Closed accuracy (open: ROUGE-L) per question type:", "",
                  "| question type | " + " | ".join(r.name for r in runs) + " |",
                  "|---|" + "---|" * len(runs)]
        for q in qtypes:
            cells = []
            for m in metrics.values():
                s = m.get("slices", {}).get("qtype", {}).get(q, {})
                if s.get("closed", {}).get("n"):
                    cells.append(_fmt(s["closed"].get("accuracy")))
                elif s.get("open", {}).get("n"):
                    cells.append(f"R-L {_fmt(s['open'].get('rougeL'))}")
                else:
                    cells.append("—")
            lines.append(f"| {q} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="finished run folders (holding metrics.json)")
    parser.add_argument("--output", type=Path, help="also write the table to this Markdown file")
    args = parser.parse_args(argv)
    missing = [str(r) for r in args.runs if not (r / "metrics.json").exists()]
    if missing:
        parser.error(f"no metrics.json in {', '.join(missing)}: is the run finished?")
    text = summarize(args.runs)
    print(text)
    if args.output:
        atomic_write_text(args.output, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

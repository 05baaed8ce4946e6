"""Compare runs and checkpoints: comparison.md, a self-contained comparison.html and PNG plots.

    python eval/compare.py runs/demo/stage1 runs/demo/stage2 --output runs/demo/compare
    python eval/compare.py runs/a/checkpoint-200 runs/b/checkpoint-200 --names lr-1e-4 lr-2e-4 --output cmp

Each input is a run folder (its metrics.json and every checkpoint-N/metrics.json) or one
checkpoint-N folder. The logic lives in ``medvlm.eval.compare``; this script only parses arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from medvlm.eval.compare import CompareError, write_comparison


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("inputs", nargs="+", metavar="RUN_OR_CHECKPOINT",
                        help="run folders or checkpoint-N folders holding metrics.json")
    parser.add_argument("--names", nargs="+", metavar="NAME", help="labels for the inputs, in order (default: folder names)")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for comparison.md/.html/.json and plots")
    parser.add_argument("--print", action="store_true", help="also print comparison.md (the tables)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        result = write_comparison(args.inputs, args.output, names=args.names)
    except CompareError as e:
        print(f"compare.py: error: {e}", file=sys.stderr)
        return 2
    if args.print:
        print(Path(args.output, "comparison.md").read_text(encoding="utf-8").split("## Plots")[0].rstrip() + "\n")
    print(f"compared {len(result['rows'])} runs/checkpoints; wrote {args.output}/comparison.md, comparison.html "
          f"and {', '.join(result['plots'])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

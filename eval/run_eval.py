"""Evaluate: score a predictions file into ``metrics.json`` (+ ``manifest.json``) and print a summary.

    python eval/run_eval.py --predictions runs/stage2/predictions.jsonl --output runs/stage2/eval
    python eval/run_eval.py --predictions answers.jsonl --questions test.json \\
        --suite eval/suites/llava_med_vqa.yaml --output runs/eval-llava-med

The predictions formats (ours, LLaVA-Med's answer files) and every metric are described in
``medvlm.eval.predictions`` and ``medvlm.eval.metrics``. This script only parses arguments and
calls ``medvlm.eval``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medvlm.eval.metrics import UnknownMetricError
from medvlm.eval.predictions import PredictionsError
from medvlm.eval.scoring import format_summary, score_file, scoring_kwargs, write_metrics


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)

    what = parser.add_argument_group("what to evaluate (one mode)")
    mode = what.add_mutually_exclusive_group(required=True)
    mode.add_argument("--predictions", metavar="FILE",
                      help="predictions JSONL to score (ours: id/answer/prediction/..., or a LLaVA-Med answer file)")
    # ---- model-evaluation mode (not implemented here) -----------------------------------------
    # Add `--model` to `mode` (so it excludes --predictions) and its companions (--adapter,
    # --dataset, generation options) in their own argument group; dispatch on it in main().
    # --------------------------------------------------------------------------------------------

    preds = parser.add_argument_group("predictions mode")
    preds.add_argument("--questions", metavar="FILE",
                       help="LLaVA-Med question file (JSON list or JSONL) holding the reference answers")

    scoring = parser.add_argument_group("scoring")
    scoring.add_argument("--suite", metavar="YAML",
                         help="suite file choosing metrics, slices and bootstrap (eval/suites/*.yaml)")
    scoring.add_argument("--bootstrap", type=int, default=None, metavar="N",
                         help="bootstrap resamples for 95%% intervals (default 1000; 0 disables intervals)")
    scoring.add_argument("--seed", type=int, default=None, help="seed of the bootstrap draws (default 0)")
    scoring.add_argument("--slice-by", nargs="+", default=None, metavar="FIELD",
                         help="record fields to slice by (default: modality answer_type body_part source)")

    out = parser.add_argument_group("output")
    out.add_argument("--output", required=True, metavar="DIR",
                     help="folder for metrics.json and manifest.json (created if missing)")
    out.add_argument("--quiet", action="store_true", help="do not print the summary table")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    # Score
    try:
        kwargs = scoring_kwargs(args.suite, bootstrap=args.bootstrap, seed=args.seed, slice_by=args.slice_by)
        if args.predictions is not None:
            metrics = score_file(args.predictions, questions=args.questions, **kwargs)
            inputs = {"predictions": args.predictions, "questions": args.questions, "suite": args.suite}
        # ---- model-evaluation mode dispatch goes here (elif args.model is not None: ...) ----
    except (PredictionsError, UnknownMetricError, FileNotFoundError, ValueError) as e:
        parser.error(str(e))

    # Write
    path = write_metrics(args.output, metrics, inputs=inputs)
    if not args.quiet:
        print(format_summary(metrics))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

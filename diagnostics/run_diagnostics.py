"""Diagnostic report of a training run, and the adapter's model card.

    python diagnostics/run_diagnostics.py runs/demo-paligemma-20261122-025014
    python diagnostics/run_diagnostics.py runs/stage2 --output reports/stage2 --push-to-hub me/medvlm-adapter

RUN_DIR is a stage folder (checkpoint-N/, adapter/, metrics.json) or a folder of stages
(stage1/, stage2/). The report (report.md + figures/, report.html, indicators.json) covers every
checkpoint and the trend across them, and for a folder of stages the important heads of the
base model, stage 1 and stage 2 compared (RUN_DIR/head_comparison.json); when the run holds no
diagnostics yet (trained without the per-checkpoint callback) the final adapter is probed first.
Every stage's adapter/README.md becomes a model card carrying the report. Nothing is uploaded unless --push-to-hub is given;
a push needs the network (HF_HUB_OFFLINE unset) and a token (`huggingface-cli login` or HF_TOKEN),
both checked before any diagnostics run. The logic lives in ``medvlm.diagnostics``.

Exit status: 0 on success, 2 on a bad run folder or option (including a push that cannot work
here), 3 when the upload failed (the report and model cards are saved locally; run again to retry).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medvlm.diagnostics.model_card import FINAL_PROBE_EXAMPLES, PushFailed, run_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", metavar="RUN_DIR", help="stage folder or folder of stages")
    out = parser.add_argument_group("output")
    out.add_argument("--output", metavar="DIR", help="report folder (default: RUN_DIR/report)")
    out.add_argument("--push-to-hub", metavar="REPO_ID",
                     help="upload the last stage's adapter and model card to this hub repo (needs a token)")
    probe = parser.add_argument_group("probing the final adapter (runs without diagnostics)")
    probe.add_argument("--max-examples", type=int, default=FINAL_PROBE_EXAMPLES,
                       help=f"probe examples with lesion masks (default {FINAL_PROBE_EXAMPLES}: enough for the demo's "
                            "trust verdicts not to flip between runs; see the report's stability column)")
    probe.add_argument("--model-name-or-path", metavar="PATH",
                       help="base model, when the one recorded in adapter/medvlm_adapter.json has moved")
    probe.add_argument("--probe-final", action="store_true",
                       help="probe the final adapter even when checkpoints hold diagnostics (e.g. with more "
                            "examples than the per-checkpoint budget allowed)")
    probe.add_argument("--no-compute", action="store_true",
                       help="never load a model: report only what the run folder already holds")
    heads = parser.add_argument_group("important heads across stages (a run of two or more stages)")
    heads.add_argument("--head-examples", type=int, default=24, metavar="N",
                       help="probe examples on which the base, stage 1 and stage 2 heads are compared "
                            "(default 24; 0 skips the comparison)")
    heads.add_argument("--recompute-heads", action="store_true",
                       help="compare the heads again even when RUN_DIR/head_comparison.json exists")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        written = run_report(args.run_dir, args.output, push_to_hub=args.push_to_hub,
                             max_examples=args.max_examples, model_name_or_path=args.model_name_or_path,
                             compute_missing=not args.no_compute, probe_final=args.probe_final,
                             head_examples=args.head_examples, recompute_heads=args.recompute_heads)
    except PushFailed as err:
        print(f"run_diagnostics.py: error: {err}", file=sys.stderr)
        return 3
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"report: {written['markdown']}\n        {written['html']}")
    for stage, path in written["cards"].items():
        print(f"model card ({stage}): {path}")
    if written.get("pushed"):
        print(f"pushed: {written['pushed']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

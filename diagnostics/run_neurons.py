"""Multimodal and knowledge neurons of a stage's final adapter, with their causal checks.

    python diagnostics/run_neurons.py runs/demo-llava-20261122-025014/stage2 --max-examples 24
    python diagnostics/run_diagnostics.py runs/demo-llava-20261122-025014   # the report then shows them

STAGE_DIR holds adapter/ (and config.yaml naming the evaluation data). On the stage's probe examples
(lesion questions of its validation split) it scores the language model's MLP units at the image
positions (multimodal neurons, Schwettmann et al. 2023) and by integrated gradients at the answer
position refined over rewordings of the question (knowledge neurons, Dai et al. 2022), then checks
each set causally against random units of the same layers (suppression and amplification, paired
Wilcoxon tests over the examples). Writes STAGE_DIR/diagnostics/neurons.json (or --output) and the
top multimodal neuron's overlay; the diagnostic report reads them. The logic lives in
``medvlm.diagnostics.neurons`` and ``medvlm.diagnostics.neuron_checks``.

Exit status: 0 on success, 2 on a bad stage folder or option.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from medvlm.diagnostics.model_card import load_adapter_model, probe_records_for
from medvlm.diagnostics.neuron_checks import run_neurons
from medvlm.diagnostics.neurons import METHODS


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("stage_dir", metavar="STAGE_DIR", help="a stage folder with adapter/")
    parser.add_argument("--output", metavar="DIR", help="where neurons.json goes (default STAGE_DIR/diagnostics)")
    parser.add_argument("--model-name-or-path", metavar="PATH", help="base model, when the recorded one has moved")
    what = parser.add_argument_group("what to compute")
    what.add_argument("--max-examples", type=int, default=8, help="probe examples (default 8; the tests need >= 5)")
    what.add_argument("--method", choices=METHODS, default="direct",
                      help="multimodal score: direct (gradient-free, default) or gradient (activation x gradient)")
    what.add_argument("--top", type=int, default=10, help="multimodal neurons per example (default 10)")
    what.add_argument("--layers", type=int, nargs="+", help="decoder layers to score (default all; negative ok)")
    what.add_argument("--no-knowledge", action="store_true", help="skip the knowledge neurons (the costly part)")
    what.add_argument("--steps", type=int, default=20, help="integrated-gradient steps (default 20, Dai et al.)")
    what.add_argument("--draws", type=int, default=5, help="random control sets per example (default 5)")
    what.add_argument("--memory-mb", type=float, default=2048, help="bound on one integrated-gradient pass")
    what.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stage = Path(args.stage_dir)
    try:
        loaded = load_adapter_model(stage, args.model_name_or_path)
        result = run_neurons(loaded.model, loaded.processor, loaded.family, probe_records_for(stage),
                             args.output or stage / "diagnostics", max_examples=args.max_examples, top=args.top,
                             method=args.method, knowledge=not args.no_knowledge, steps=args.steps,
                             draws=args.draws, seed=args.seed, memory_mb=args.memory_mb, layers=args.layers)
    except (FileNotFoundError, ValueError) as err:
        parser.error(str(err))
    print(f"neurons on {result['n_examples']} probe examples ({len(result['skipped'])} skipped)")
    for kind, check in result["checks"].items():
        sup, amp = check["suppress"], check["amplify"]
        print(f"{kind}: zeroed median Δ {sup['median_top']:+.3g} vs random {sup['median_random']:+.3g} "
              f"(p = {sup['p_value']:.3g}); x2 median Δ {amp['median_top']:+.3g} vs random "
              f"{amp['median_random']:+.3g} (p = {amp['p_value']:.3g}); n = {check['n']}: {check['verdict']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

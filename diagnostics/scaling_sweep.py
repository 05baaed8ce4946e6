"""The fine-tuning scaling law on the embedded default: stage 2 at data sizes × LoRA ranks, then the fit.

    python diagnostics/scaling_sweep.py --out runs/scaling
    python diagnostics/scaling_sweep.py --out runs/scaling-tiny --data-sizes 250 500 1000 --ranks 4 16 \
        --holdout 4000 16 --stage1-steps 100 --eval-samples 128

Trains (or reuses: a run folder holding manifest.json is finished) one short stage-2 run per point
and a held-out larger run, measures each run's answer cross-entropy on fixed validation questions,
fits L = A·X^-alpha·D^-beta + E (X: trainable parameters, or the rank with --size-variable rank),
prints the points, the parameters with bootstrap intervals, the error on the points and the
held-out run's predicted against measured loss, and writes scaling_fit.json and scaling*.png in
--out. Arguments after a lone ``--`` go to every stage-2 run (e.g. ``-- --learning_rate 1e-3``).
Run from the repository root (the configs name their mixes by relative path).
"""

import argparse
import logging
import sys

from medvlm.config import ConfigError
from medvlm.demo import ensure_demo_model
from medvlm.training.cli import parse_stage_config
from medvlm.training.scaling_sweep import SweepPlan, format_report, run_sweep


def parse(argv: list[str]) -> SweepPlan:
    stage_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="Sweep folder (runs, data subsets, fit, figures).")
    p.add_argument("--config", default=SweepPlan.config, help="Stage-2 config every point starts from.")
    p.add_argument("--stage1-config", default=SweepPlan.stage1_config, help="Stage-1 config (without --init-adapter).")
    p.add_argument("--init-adapter", help="A finished stage-1 adapter folder; default: train one in OUT/stage1.")
    p.add_argument("--stage1-steps", type=int, default=SweepPlan.stage1_steps, help="Steps of that stage-1 run.")
    p.add_argument("--data-sizes", type=int, nargs="+", default=list(SweepPlan.data_sizes),
                   help="Fine-tuning examples D_f per run (one epoch each).")
    p.add_argument("--ranks", type=int, nargs="+", default=list(SweepPlan.ranks), help="LoRA ranks (alpha = 2·rank).")
    p.add_argument("--holdout", type=int, nargs=2, metavar=("D", "RANK"),
                   help="The held-out run; default: 4 × the largest data size at the largest rank.")
    p.add_argument("--epochs", type=float, default=SweepPlan.epochs, help="Passes over each run's data.")
    p.add_argument("--eval-samples", type=int, default=SweepPlan.eval_samples,
                   help="Validation questions the loss is measured on.")
    p.add_argument("--size-variable", choices=["trainable", "rank"], default=SweepPlan.size_variable,
                   help="X of the law: trainable parameters or the LoRA rank.")
    p.add_argument("--bootstrap", type=int, default=SweepPlan.n_bootstrap, help="Bootstrap resamples (0: none).")
    p.add_argument("--seed", type=int, default=SweepPlan.seed, help="Seed of the data subsets, runs and bootstrap.")
    a = p.parse_args(argv)
    return SweepPlan(out=a.out, config=a.config, stage1_config=a.stage1_config, init_adapter=a.init_adapter,
                     stage1_steps=a.stage1_steps, data_sizes=tuple(a.data_sizes), ranks=tuple(a.ranks),
                     holdout=tuple(a.holdout) if a.holdout else None, epochs=a.epochs,
                     eval_samples=a.eval_samples, size_variable=a.size_variable, n_bootstrap=a.bootstrap,
                     seed=a.seed, stage_args=stage_args)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    try:
        plan = parse(list(sys.argv[1:] if argv is None else argv))
        ensure_demo_model(parse_stage_config([plan.config])[0].model_name_or_path)  # demo:<family>: built once
        result = run_sweep(plan)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_report(result))
    print(f"fit and figures in {plan.out}/scaling_fit.json, scaling*.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())

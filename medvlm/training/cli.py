"""Command-line entry of the stage recipes: parse once, run, and turn known errors into one clear line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence

from medvlm.config import ConfigError, parse_config
from medvlm.models.adapters import AdapterError
from medvlm.training.arguments import DataArguments, LoraArguments, ModelArguments, StageArguments

CONFIG_TYPES = (ModelArguments, DataArguments, LoraArguments, StageArguments)

#: Errors whose message already names the problem and the fix: printed without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError)


def parse_stage_config(argv: Sequence[str] | None = None, stage: str | None = None):
    model_args, data_args, lora_args, args = parse_config(CONFIG_TYPES, argv)
    if stage and args.stage != stage:
        args.stage = stage
    return model_args, data_args, lora_args, args


def main(stage: str, argv: Sequence[str] | None = None,
         prepare_model: Callable[[str], object] | None = None) -> int:
    """Parse the config, run the stage, print the result; exit code 2 on a user error.
    ``prepare_model(model_name_or_path)`` runs before the model loads (the recipes pass
    :func:`medvlm.demo.ensure_demo_model`, which builds a ``demo:<family>`` base on first use)."""
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from medvlm.training.stage import run_stage

    try:
        model_args, data_args, lora_args, args = parse_stage_config(argv, stage)
        if stage == "stage2" and not lora_args.init_adapter:
            raise ConfigError("stage 2 starts from a stage-1 adapter: set init_adapter (e.g. "
                              "--init_adapter runs/demo/stage1/adapter)")
        if prepare_model is not None:
            prepare_model(model_args.model_name_or_path)
        metrics = run_stage(model_args, data_args, lora_args, args)
    except (*USER_ERRORS, AdapterError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    closed = metrics.get("closed", {})
    if closed:
        print(f"{stage}: closed accuracy {closed.get('accuracy')} (n={closed.get('n')}); "
              f"outputs in {args.output_dir}")
    return 0

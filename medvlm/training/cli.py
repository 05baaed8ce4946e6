"""Command-line entry of the stage recipes: parse once, run, and turn known errors into one clear line."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from medvlm.config import ConfigError, parse_config
from medvlm.training.arguments import DataArguments, LoraArguments, ModelArguments, StageArguments

CONFIG_TYPES = (ModelArguments, DataArguments, LoraArguments, StageArguments)

#: Errors whose message already names the problem and the fix: printed without a traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (ConfigError, FileNotFoundError, ValueError)


def parse_stage_config(argv: Sequence[str] | None = None, stage: str | None = None):
    model_args, data_args, lora_args, args = parse_config(CONFIG_TYPES, argv)
    if stage and args.stage != stage:
        args.stage = stage
    return model_args, data_args, lora_args, args


def main(stage: str, argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    from medvlm.training.lora import AdapterError
    from medvlm.training.stage import run_stage

    try:
        model_args, data_args, lora_args, args = parse_stage_config(argv, stage)
        if stage == "stage2" and not lora_args.init_adapter:
            raise ConfigError("stage 2 starts from a stage-1 adapter: set init_adapter (e.g. "
                              "--init_adapter runs/demo/stage1/adapter)")
        metrics = run_stage(model_args, data_args, lora_args, args)
    except (*USER_ERRORS, AdapterError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    closed = metrics.get("closed", {})
    if closed:
        print(f"{stage}: closed accuracy {closed.get('accuracy')} (n={closed.get('n')}); "
              f"outputs in {args.output_dir}")
    return 0

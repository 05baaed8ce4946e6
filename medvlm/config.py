"""Configs are dataclasses, loaded from YAML with command-line overrides.

``parse_config(dataclass_types, argv)`` takes ``[config.yaml] [--key value ...]``: the YAML gives
the values, the command line overrides any key (the convention of TRL's ``TrlParser``). An
unknown key in the YAML is an error that names the key, suggests the closest known one and
lists where keys are documented, instead of being silently ignored.
"""

from __future__ import annotations

import dataclasses
import difflib
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser


class ConfigError(ValueError):
    """A config that cannot be used as written; the message names the problem and the fix."""


def known_keys(dataclass_types: Sequence[type]) -> set[str]:
    return {f.name for dc in dataclass_types for f in dataclasses.fields(dc) if f.init}


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file such as "
                          "recipes/configs/demo_paligemma_stage1.yaml")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of key: value at the top level, got {type(data).__name__}")
    return data


def check_keys(values: dict[str, Any], dataclass_types: Sequence[type], origin: str) -> None:
    keys = known_keys(dataclass_types)
    for key in values:
        if key not in keys:
            close = difflib.get_close_matches(key, sorted(keys), n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(f"{origin}: unknown config key {key!r}.{hint} Known keys are the fields of "
                              f"{', '.join(dc.__name__ for dc in dataclass_types)} (see README, 'Config keys').")


def _to_argv(values: dict[str, Any]) -> list[str]:
    argv: list[str] = []
    for key, value in values.items():
        if value is None:
            continue
        if isinstance(value, bool):
            argv += [f"--{key}", str(value)]
        elif isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            import json

            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_config(dataclass_types: Sequence[type], argv: Sequence[str] | None = None) -> tuple[Any, ...]:
    """``[config.yaml] [--key value ...]`` → one instance per dataclass type.

    YAML values are turned into arguments placed before the command-line ones, so the same
    type conversion applies to both and the command line wins.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    yaml_values: dict[str, Any] = {}
    if argv and not argv[0].startswith("-"):
        path = argv.pop(0)
        yaml_values = load_yaml(path)
        check_keys(yaml_values, dataclass_types, path)
    cli_keys = {a[2:].split("=", 1)[0].replace("-", "_") for a in argv if a.startswith("--")}
    check_keys({k: None for k in cli_keys}, dataclass_types, "command line")
    yaml_values = {k: v for k, v in yaml_values.items() if k not in cli_keys}
    parser = HfArgumentParser(list(dataclass_types))
    try:
        return tuple(parser.parse_args_into_dataclasses(args=_to_argv(yaml_values) + argv,
                                                        look_for_args_file=False))
    except SystemExit as err:  # argparse printed the problem; make it an exception for callers
        raise ConfigError(f"invalid config values (see the message above): {' '.join(argv)}") from err


def to_yaml(*configs: Any) -> str:
    """The merged config as YAML, saved next to every output so a run can be reproduced."""
    merged: dict[str, Any] = {}
    for cfg in configs:
        if hasattr(cfg, "to_dict"):
            data = cfg.to_dict()
            data = {k: v for k, v in data.items() if not k.startswith("_")}
        else:
            data = dataclasses.asdict(cfg)
        merged.update(data)
    return yaml.safe_dump(merged, sort_keys=False)

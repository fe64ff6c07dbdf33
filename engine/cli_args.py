"""Command-line flags for every EngineConfig option, derived from the dataclass itself, so the
`serve` command (and anything else that builds an engine) never falls behind the config."""

from __future__ import annotations

import argparse
import json
import types
import typing
from dataclasses import MISSING, fields

from engine.config import EngineConfig


def add_engine_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine options (as vLLM's)")
    hints = typing.get_type_hints(EngineConfig)
    for field in fields(EngineConfig):
        flag = "--" + field.name.replace("_", "-")
        default = None if field.default is MISSING else field.default
        kind = _base_type(hints[field.name])
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif kind is dict:  # e.g. --speculative-config '{"method": "ngram", "num_speculative_tokens": 3}'
            group.add_argument(flag, type=json.loads, default=default, help="JSON object")
        else:
            group.add_argument(flag, type=kind, default=default, help=f"default: {default}")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    return EngineConfig(**{field.name: getattr(args, field.name) for field in fields(EngineConfig)})


def _base_type(hint):
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        hint = next(arg for arg in typing.get_args(hint) if arg is not type(None))
    return hint


def engine_flags(options: dict) -> list[str]:
    """The command-line flags that give an engine process these EngineConfig options."""
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        elif value is not None:
            flags += [flag, str(value)]
    return flags

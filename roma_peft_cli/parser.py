"""One ``HfArgumentParser`` per command, TRL style: ``--config FILE`` (YAML or JSON) gives options, command-line flags
override them.

``transformers`` (not torch) is imported when a parser is built; a command whose options include a library
dataclass (``roma_peft.trainer:RomaTrainingArguments`` ...) imports that module then, and so ``roma_peft``.
"""

from __future__ import annotations

import importlib
import json
import os

from .arguments import COMMAND_ARGUMENTS

__all__ = ["build_parser", "parse_command", "explicit_options", "config_file", "read_config"]


def _resolve(spec):
    """A dataclass, or a ``"module:Class"`` string naming one (imported now)."""
    if isinstance(spec, str):
        module, name = spec.split(":")
        return getattr(importlib.import_module(module), name)
    return spec


def build_parser(command: str):
    """The parser of ``roma-peft <command>``: every flag of the command's dataclasses, and only those."""
    from transformers import HfArgumentParser

    return HfArgumentParser(tuple(_resolve(s) for s in COMMAND_ARGUMENTS[command]), prog=f"roma-peft {command}")


def config_file(argv) -> tuple[str | None, list[str]]:
    """The config file of a command line and the remaining flags: ``--config FILE`` (TRL style) or a leading
    ``FILE.yaml``/``FILE.json`` positional; command-line flags override the file."""
    argv = list(argv)
    for i, arg in enumerate(argv):
        if arg == "--config":
            if i + 1 >= len(argv):
                raise ValueError("--config needs a file (YAML or JSON).")
            return argv[i + 1], argv[:i] + argv[i + 2 :]
        if arg.startswith("--config="):
            return arg.split("=", 1)[1], argv[:i] + argv[i + 1 :]
    if argv and not argv[0].startswith("-") and argv[0].endswith((".json", ".yaml", ".yml")):
        return argv[0], argv[1:]
    return None, argv


def read_config(path: str) -> dict:
    """The option mapping of a YAML or JSON config file (one-line errors for a missing or unparsable file)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--config {path!r}: no such file.")
    with open(path, encoding="utf-8") as f:
        try:
            if path.endswith(".json"):
                data = json.load(f)
            else:
                import yaml

                data = yaml.safe_load(f)
        except Exception as exc:  # noqa: BLE001 - JSON or YAML syntax errors, re-raised as one line
            raise ValueError(f"--config {path!r} cannot be parsed: {type(exc).__name__}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of option names to values, got {type(data).__name__}.")
    return data


def parse_command(command: str, argv) -> tuple:
    """Parse ``roma-peft <command> argv`` into the command's dataclasses (see ``COMMAND_ARGUMENTS``): the values of
    ``--config FILE`` (or a leading ``FILE.yaml``/``FILE.json``) become the defaults and the flags on the command line
    override them. ``--help`` prints the command's options and exits (status 0)."""
    parser = build_parser(command)
    path, rest = config_file(argv)
    if path is not None:
        config = read_config(path)
        known = {action.dest for action in parser._actions}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(
                f"--config {path!r}: unknown option(s) {unknown} for `roma-peft {command}` "
                f"(see roma-peft {command} --help)."
            )
        parser.set_defaults(**config)
        for action in parser._actions:  # a value from the file satisfies a required option
            if action.dest in config:
                action.required = False
    return parser.parse_args_into_dataclasses(args=rest)


def explicit_options(argv) -> set[str]:
    """Option names the user set: ``--name``/``--name=value`` flags and the keys of the config file."""
    path, rest = config_file(argv)
    explicit = set(read_config(path)) if path is not None else set()
    return explicit | {a[2:].split("=", 1)[0].replace("-", "_") for a in rest if a.startswith("--")}

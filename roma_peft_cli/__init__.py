"""The ``roma-peft`` console script, kept light: ``roma-peft --help``, ``--version`` and the help of a command import
neither torch nor PEFT.

``import roma_peft`` registers the ROMA method with PEFT, which imports PEFT (and with it torch); that is seconds
before anything could be printed. This package holds what must be answered before a command runs (the command table,
the argument dataclasses in :mod:`roma_peft_cli.arguments`, the parser in :mod:`roma_peft_cli.parser`) and imports
a command's implementation in :mod:`roma_peft.cli` only when that command runs.
"""

from __future__ import annotations

import importlib
import sys

__all__ = ["main", "run", "version", "COMMANDS"]

# command -> (implementation "module:function", one line for `roma-peft --help`). The implementation takes the
# command's arguments (a list of strings) and returns its result; it is imported when the command runs.
COMMANDS: dict[str, tuple[str, str]] = {
    "neighbours": (
        "roma_peft.cli:cmd_neighbours",
        "the successful set S, each sample's successful neighbours and their routing targets",
    ),
    "train": (
        "roma_peft.cli:cmd_train",
        "train a RoMA adapter (router weights only) with the routing-manifold regulariser",
    ),
    "evaluate": ("roma_peft.cli:cmd_evaluate", "multiple-choice accuracy of the base model or of an adapter"),
    "merge": ("roma_peft.cli:cmd_merge", "write the base model with the adapter merged in (a stock checkpoint)"),
    "export-lora": ("roma_peft.cli:cmd_export_lora", "write the adapter as a standard PEFT LoRA adapter"),
    "diagnose": ("roma_peft.cli:cmd_diagnose", "does RoMA's premise hold for this model and data?"),
    "demo": ("roma_peft.cli:cmd_demo", "the offline miniature of the paper on the shipped tiny model"),
    "recipe": (
        "roma_peft.recipe:cmd_recipe",
        "the paper's experiment from a recipe file: plan it (--dry_run) or run every stage",
    ),
}

USAGE = """\
usage: roma-peft <command> [options]
       roma-peft <command> --help      the options of one command
       roma-peft --version

Router-only post-training of Mixture-of-Experts models with RoMA (Routing Manifold Alignment).

commands:
{commands}

A typical run:
  roma-peft neighbours  --model_name_or_path M --train_file train.jsonl --output_dir nb/
  roma-peft train       --model_name_or_path M --train_file train.jsonl --neighbourhood_dir nb/ --output_dir out/
  roma-peft evaluate    --model_name_or_path M --adapter_path out/ --eval_file test.jsonl
  roma-peft merge       --model_name_or_path M --adapter_path out/ --output_dir merged/
  roma-peft export-lora --model_name_or_path M --adapter_path out/ --output_dir lora/

Options can also come from a file: roma-peft <command> --config FILE.yaml (or .json); flags on the command line
override the file. `train` reads the layer, prompt and routing options back from the neighbourhood it is given.
"""


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    return USAGE.format(commands="\n".join(f"  {name:<{width}}  {summary}" for name, (_, summary) in COMMANDS.items()))


def version() -> str:
    """The installed distribution's version (read from its metadata, without importing roma_peft)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("roma-peft")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from roma_peft import __version__

        return __version__


def _wants_help(args) -> bool:
    return any(a in ("-h", "--help") for a in args)


def run(argv: list[str] | None = None):
    """Run one command and return its result (a dict); errors propagate. :func:`main` is the console entry point."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"roma-peft {version()}")
        return None
    if argv and argv[0] in ("-h", "--help"):
        print(usage())
        return None
    if not argv or argv[0] not in COMMANDS:
        # no command, or an unknown one: a usage error (exit status 2), as argparse-based CLIs do
        problem = f"unknown command {argv[0]!r}" if argv else "no command given"
        print(
            f"roma-peft: {problem}; choose one of {', '.join(COMMANDS)} (roma-peft --help lists them)\n",
            file=sys.stderr,
        )
        print(usage(), file=sys.stderr)
        raise SystemExit(2)
    command, args = argv[0], argv[1:]
    from .arguments import COMMAND_ARGUMENTS

    if command in COMMAND_ARGUMENTS and _wants_help(args):
        from .parser import parse_command

        return parse_command(command, args)  # prints the command's options and exits before its implementation loads
    module, function = COMMANDS[command][0].split(":")
    return getattr(importlib.import_module(module), function)(args)


def main(argv: list[str] | None = None) -> int:
    """``roma-peft``: exit status 0 on success; a bad input prints one clear line instead of a traceback (status 2)."""
    try:
        run(argv)
    except _user_errors() as exc:
        command = (list(sys.argv[1:] if argv is None else argv) or ["roma-peft"])[0]
        message = " ".join(str(exc).split()) or type(exc).__name__
        print(f"roma-peft {command}: error: {message}", file=sys.stderr)
        return 2
    return 0


def _user_errors() -> tuple:
    """The exceptions that mean bad input or a diverged run, not a bug: one line and exit status 2 (others keep their
    traceback). Evaluated only when an exception propagates; a class whose module was never imported cannot have
    been raised, so nothing is imported here."""
    errors = [ValueError, OSError]  # OSError includes FileNotFoundError / FileExistsError
    for module, name in (
        ("roma_peft.trainer", "NonFiniteLossError"),
        ("roma_peft.layer", "NonFiniteAdapterError"),
        ("safetensors", "SafetensorError"),
        ("roma_peft._optional", "MissingExtraError"),
    ):
        cls = getattr(sys.modules.get(module), name, None)
        if isinstance(cls, type):
            errors.append(cls)
    return tuple(errors)

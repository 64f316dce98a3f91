"""``roma-peft --help``, ``--version`` and the help of the light commands answer without importing torch or PEFT, and
every command's help lists the flags that command reads, and only those."""

import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

import roma_peft
from roma_peft.cli import main

HEAVY = ("torch", "peft", "roma_peft")


def _console_script() -> Path:
    """The installed ``roma-peft`` script (pip writes it next to the interpreter)."""
    script = Path(sysconfig.get_path("scripts")) / "roma-peft"
    assert script.is_file(), f"no installed roma-peft script at {script}: pip install -e ."
    return script


def _imports_of_console_script(tmp_path, *argv) -> tuple[set[str], str]:
    """Run the installed ``roma-peft`` script in a fresh interpreter under ``-X importtime`` (from an empty folder, as
    a user would): the top-level modules it imported, and what it printed."""
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", str(_console_script()), *argv],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    imported = {
        line.split("|")[-1].strip().split(".")[0]
        for line in proc.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    assert "roma_peft_cli" in imported, "the installed roma-peft script is stale: pip install -e ."
    return imported, proc.stdout


@pytest.mark.parametrize("argv", [["--help"], ["--version"], ["evaluate", "--help"], ["merge", "--help"]])
def test_help_and_version_import_neither_torch_nor_peft(argv, tmp_path):
    imported, out = _imports_of_console_script(tmp_path, *argv)
    assert imported.isdisjoint(HEAVY), f"roma-peft {' '.join(argv)} imported {sorted(imported & set(HEAVY))}"
    if argv == ["--version"]:
        assert out.strip() == f"roma-peft {roma_peft.__version__}"
    else:
        assert "usage: roma-peft" in out


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exc:  # argparse prints the help and exits 0
        main([*argv, "--help"])
    assert exc.value.code == 0
    return capsys.readouterr().out


def test_each_command_lists_only_the_flags_it_reads(capsys):
    neighbours = _help(capsys, "neighbours")
    assert "--train_file" in neighbours and "--k K" in neighbours and "--eval_file" not in neighbours
    train = _help(capsys, "train")
    for flag in ("--train_file", "--eval_file", "--neighbourhood_dir", "--refresh_successful_set", "--learning_rate"):
        assert flag in train
    evaluate = _help(capsys, "evaluate")
    assert "--eval_file" in evaluate and "--train_file" not in evaluate and "--learning_rate" not in evaluate
    for command in ("merge", "export-lora"):
        text = _help(capsys, command)
        assert "--adapter_name" in text and "--train_file" not in text
    diagnose = _help(capsys, "diagnose")
    assert "--train_file" in diagnose and "--eval_file" not in diagnose
    assert "--dry_run" in _help(capsys, "recipe")  # the recipe command keeps its own parser


def test_help_is_plain_words(capsys):
    assert main(["--help"]) == 0
    texts = [capsys.readouterr().out] + [
        _help(capsys, c) for c in ("neighbours", "train", "evaluate", "merge", "diagnose")
    ]
    for text in texts:
        for markup in ("``", ":func:", ":class:", ":meth:", ":mod:", "::\n"):
            assert markup not in text, f"raw reST {markup!r} in:\n{text}"


def test_cli_default_template_is_the_librarys():
    """The console script's default prompt template is the one the library scores and trains with."""
    from roma_peft.data import DEFAULT_PROMPT_TEMPLATE
    from roma_peft_cli.arguments import DEFAULT_PROMPT_TEMPLATE as CLI_TEMPLATE

    assert CLI_TEMPLATE == DEFAULT_PROMPT_TEMPLATE

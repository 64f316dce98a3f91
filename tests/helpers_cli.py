"""Running ``roma-peft`` in a test as the console script does, and reading its one-line errors."""

import re

from roma_peft import cli


def run_cli(capsys, *argv):
    """Run ``roma-peft argv`` as the console script does; return (exit status, stderr)."""
    capsys.readouterr()
    status = cli.main([str(a) for a in argv])
    return status, capsys.readouterr().err


def one_line_error(err, command):
    """The single ``roma-peft <command>: error: ...`` line (a progress bar may precede it on the terminal line)."""
    lines = re.findall(r"roma-peft \S+: error: [^\r\n]*", err)
    assert len(lines) == 1 and lines[0].startswith(f"roma-peft {command}: error: "), err
    assert "Traceback" not in err
    return lines[0]

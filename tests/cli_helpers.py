"""The ``streamllm`` command run as a user runs it: a real process, or its ``main`` in this one."""

import os
import subprocess
import sys

from streamllm.cli import main

CLI = [sys.executable, "-m", "streamllm"]


def run(*args, timeout=600):
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=timeout, env=os.environ.copy()
    )


def assert_one_line_error(result, needle):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "error" in lines[0] and needle in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def run_here(capsys, *args):
    """``main`` in this process, as ``run`` would call it in a new one: the same parsing and the same handling of
    errors, without a new interpreter importing torch and transformers (seconds a call)."""
    capsys.readouterr()  # what came before is not this command's
    try:
        code = main(list(args))
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(["streamllm", *args], code, captured.out, captured.err)

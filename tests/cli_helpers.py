"""The ``streamllm`` command run as a user runs it: a real process."""

import os
import subprocess
import sys

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

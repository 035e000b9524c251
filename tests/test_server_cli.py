"""``streamllm serve`` refuses bad settings with one line on stderr and exit status 2, before loading a model."""

import pytest
from cli_helpers import assert_one_line_error, run_here


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--port", "70000"], "--port"),
        (["--max-sessions", "0"], "--max-sessions"),
        (["--request-timeout", "soon"], "--request-timeout"),
        (["--api-key-file", "/no/such/keys.txt"], "not found"),
        (["--state-dir", "/proc/version/sessions"], "--state-dir"),
    ],
)
def test_bad_serve_settings_get_one_line_errors(args, needle, capsys):
    assert_one_line_error(run_here(capsys, "serve", *args), needle)

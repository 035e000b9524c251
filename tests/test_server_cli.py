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


def test_a_replica_is_built_from_objects_the_command_made_once(tmp_path, monkeypatch):
    """``serve-ray`` sends each replica the ``ModelChoice`` and ``ServerConfig`` it made (they pickle), never
    its argv; the store's password is left out of them and read again where the replica runs."""
    import pickle

    from streamllm.cli import build_parser
    from streamllm.cli.serve import model_choice, server_config
    from streamllm.server.config import store_password

    args = build_parser().parse_args(
        ["serve-ray", "--model", "smollm2-135m", "--dtype", "float32", "--decode", "transformers"]
        + ["--window", "60", "--state-dir", str(tmp_path), "--threads", "1"]
    )
    choice, config = model_choice(args), server_config(args)
    assert pickle.loads(pickle.dumps((choice, config))) == (choice, config)
    assert (choice.name, choice.dtype, choice.decode, choice.threads) == (
        "smollm2-135m",
        "float32",
        "transformers",
        1,
    )
    assert config.stream.window == 60 and config.state_dir == tmp_path
    secret = tmp_path / "password"
    secret.write_text("s3cret\n")
    monkeypatch.setenv("STREAMLLM_STORE_PASSWORD", "from-env")
    assert store_password(secret) == "s3cret" and store_password(None) == "from-env"

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


def pytest_sessionstart(session):
    """Build the native decode kernels (about a minute, once per machine) before any test starts a server or a
    CLI process with a timeout, so that no such process pays for the build."""
    from streamllm.backends import native

    native.kernels()


@pytest.fixture(scope="session")
def real():
    """The bundled default model (SmolLM2-135M-Instruct), fetched once into STREAMLLM_HOME."""
    from streamllm.models import load_model

    return load_model("smollm2-135m", dtype="float32")


# The real model behind a real `streamllm serve` process, shared by the server tests. A small cache (4 + 60) so
# that conversations go far past it within a few short turns; one torch thread, so that replies are
# reproducible from process to process (test_server_restart compares two servers token by token).
SERVER_ARGS = [
    "--num-sinks", "4", "--window", "60", "--threads", "1",
    "--max-sessions", "8", "--max-tokens", "64", "--max-body-bytes", "200000", "--max-message-chars", "20000",
]  # fmt: skip


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    from server_helpers import KEY_A, KEY_B, ServerProcess

    state = tmp_path_factory.mktemp("server-state")
    proc = ServerProcess(
        [*SERVER_ARGS, "--api-key", KEY_A, "--api-key", KEY_B, "--state-dir", str(state)],
        state / "server.log",
    )
    proc.state_dir = state
    yield proc
    proc.stop()

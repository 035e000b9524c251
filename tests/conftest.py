import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(2)


# Fixtures that load the bundled real model (a test reaches one directly or through another fixture): every test
# that uses one is marked ``real``, so that ``pytest -m "not real"`` runs the tiny models alone.
REAL_MODEL_FIXTURES = {"real", "real_auto", "server"}


def pytest_collection_modifyitems(items):
    for item in items:
        if REAL_MODEL_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.real)


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


@pytest.fixture(scope="session")
def real_auto():
    """The bundled default model in the dtype ``--dtype auto`` picks on this CPU (bfloat16 where it multiplies
    bfloat16 natively, else float32): for the long streams whose claims must hold in what users run, at two to
    three times float32's speed where bfloat16 is native."""
    from streamllm.defaults import native_bf16
    from streamllm.models import load_model

    return load_model("smollm2-135m", dtype="bfloat16" if native_bf16() else "float32")


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


class RedisServer:
    """A real ``redis-server`` on a free loopback port, with a password (in its config file, not its command
    line) and every write synced to its append-only file, so that a restart keeps what was committed."""

    PASSWORD = "test-store-password-5f1c"

    def __init__(self, folder):
        import shutil

        from server_helpers import free_port

        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed (`make redis` installs Debian's package)")
        self.folder, self.port = folder, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        (folder / "redis.conf").write_text(
            f"port {self.port}\nbind 127.0.0.1\nrequirepass {self.PASSWORD}\ndir {folder}\n"
            'save ""\nappendonly yes\nappendfsync always\ndaemonize no\n'
        )
        self.proc = None
        self.start()

    def start(self) -> None:
        import subprocess
        import time

        import redis

        self.proc = subprocess.Popen(
            ["redis-server", str(self.folder / "redis.conf")],
            stdout=open(self.folder / "redis.log", "ab"),  # noqa: SIM115 - lives as long as the server
            stderr=subprocess.STDOUT,
        )
        client = self.client()
        for _ in range(100):
            try:
                client.ping()
                return
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, password=self.PASSWORD)


@pytest.fixture
def redis_server(tmp_path, monkeypatch):
    """A fresh Redis for one test; servers started by the test find its password in STREAMLLM_STORE_PASSWORD."""
    server = RedisServer(tmp_path)
    monkeypatch.setenv("STREAMLLM_STORE_PASSWORD", server.PASSWORD)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def one_torch_thread():
    """One torch thread for a module's tests (servers running in the test process), the count put back after."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny():
    """A tiny random Llama with the real tokenizer and chat template (``server_helpers.tiny_chat_model``)."""
    from server_helpers import tiny_chat_model

    return tiny_chat_model()

"""Running the server in tests: a real ``streamllm serve`` process, or the app under uvicorn in a thread.

Everything listens on 127.0.0.1 only, on a free port.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
import transformers as tf
import uvicorn

MODEL = "smollm2-135m"
KEY_A, KEY_B = "test-key-a", "test-key-b"
LIGHTHOUSE = [  # a conversation of greedy turns, for the tests that compare servers turn by turn
    "Let's talk about lighthouses. What does a lighthouse do?",
    "Who works in one?",
    "What happens in a storm?",
    "How tall are they?",
    "Name a famous one.",
    "Thank you. Summarise our chat in one line.",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, alive, timeout: float = 180.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if not alive():
            raise RuntimeError("the server exited before it was ready")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the server at {url} did not get ready in {timeout:.0f} s")


class ServerProcess:
    """``python -m streamllm serve ARGS`` (or another serving ``command``) on a free loopback port; its output
    goes to ``log``."""

    def __init__(self, args: list[str], log: Path, command: str = "serve"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "ab")  # noqa: SIM115 - closed in stop()
        cmd = [sys.executable, "-m", "streamllm", command, "--port", str(self.port), *args]
        self.proc = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, env=os.environ.copy(), start_new_session=True
        )
        try:
            wait_ready(self.url, lambda: self.proc.poll() is None)
        except BaseException:
            self.stop()
            raise RuntimeError(f"server failed to start:\n{self.log()}") from None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL: no cleanup of any kind, as in a crash."""
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)
        self._log.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=30)
        try:  # whatever it started and left (Ray's processes, when it did not stop them) goes too
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self._log.close()


class ThreadServer:
    """An ASGI app under uvicorn in a background thread (lifespan included), for in-process tests."""

    def __init__(self, app):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> ThreadServer:
        self.thread.start()
        wait_ready(self.url, self.thread.is_alive, timeout=60)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def tiny_chat_model():
    """A tiny random Llama that speaks the real model's vocabulary, with the real tokenizer and chat template:
    server logic at a fraction of the cost (its replies are noise, and always run to max_tokens)."""
    from streamllm import prepare
    from streamllm.models import pull

    tokenizer = tf.AutoTokenizer.from_pretrained(str(pull(MODEL)))
    torch.manual_seed(0)
    config = tf.LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=tokenizer.eos_token_id,
    )
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    prepare(model)
    return model, tokenizer


def chat(
    url: str, messages: list[dict], key: str = KEY_A, session: str | None = None, **params
) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    if session:
        headers["X-Session-Id"] = session
    body = {"model": params.pop("model", MODEL), "messages": messages, "temperature": 0, **params}
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300)


def ask(url: str, history: list[dict], session: str | None = None):
    """One greedy turn of 12 tokens through the openai client, history resent (and ``session`` named, if given).
    -> (reply, usage, the session id the server answered with)"""
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY_A, max_retries=0, timeout=300)
    headers = {"X-Session-Id": session} if session else None
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=history, temperature=0, max_tokens=12, extra_headers=headers
    )
    reply = raw.parse()
    return reply.choices[0].message.content, reply.usage, raw.headers["x-session-id"]

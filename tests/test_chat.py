"""`streamllm chat` in a real terminal (tmux): typing, stopping a reply with Ctrl-C, the next turn, leaving; and
the sampling a chat starts from."""

import json
import shutil
import subprocess
import sys
import time
import uuid

import pytest

from streamllm.home import home

needs_tmux = pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux is not installed")


class Terminal:
    """One tmux session running a command."""

    def __init__(self, command: str, env: dict[str, str]):
        self.name = f"streamllm-test-{uuid.uuid4().hex[:8]}"
        exports = " ".join(f"{k}={v}" for k, v in env.items())
        script = f"env {exports} {command}; echo EXIT=$?; sleep 600"
        subprocess.run(
            ["tmux", "new-session", "-d", "-s", self.name, "-x", "150", "-y", "50", script], check=True
        )

    def screen(self) -> str:
        out = subprocess.run(
            ["tmux", "capture-pane", "-p", "-J", "-S", "-500", "-t", self.name],
            capture_output=True,
            text=True,
            check=True,
        )
        return out.stdout

    def keys(self, *keys: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, *keys], check=True)

    def type(self, text: str) -> None:
        subprocess.run(["tmux", "send-keys", "-t", self.name, "-l", text], check=True)
        self.keys("Enter")

    def wait(self, predicate, what: str, timeout: float = 180) -> str:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            screen = self.screen()
            if predicate(screen):
                return screen
            time.sleep(0.3)
        raise AssertionError(f"timed out waiting for {what}; the screen:\n{self.screen()}")

    def close(self) -> None:
        subprocess.run(["tmux", "kill-session", "-t", self.name], capture_output=True)


def _prompts(screen: str) -> int:
    return sum(line.startswith(">") for line in screen.splitlines())


@pytest.fixture
def chat_home(tmp_path):
    """A home of its own (for the readline history) that shares the pulled model and the native build."""
    mine = tmp_path / "home"
    mine.mkdir()
    for part in ("models", "build", "data"):
        if (home() / part).exists():
            (mine / part).symlink_to(home() / part)
    return mine


@needs_tmux
@pytest.mark.real
def test_ctrl_c_stops_the_reply_and_the_chat_goes_on(tmp_path, chat_home):
    transcript = tmp_path / "t.jsonl"
    command = (
        f"{sys.executable} -m streamllm chat --window 60 --threads 1 --temperature 0 --max-new-tokens 400 "
        f"--transcript {transcript}"
    )
    term = Terminal(command, {"STREAMLLM_HOME": str(chat_home)})
    try:
        term.wait(lambda s: _prompts(s) == 1, "the first prompt")
        term.type("Write a long story about a lighthouse keeper and the sea.")
        term.wait(lambda s: len(s.split("lighthouse keeper and the sea.")[-1].strip()) > 80, "a reply")
        term.keys("C-c")
        screen = term.wait(lambda s: "[stopped]" in s and _prompts(s) == 2, "the prompt after Ctrl-C")
        assert "Traceback" not in screen and "interrupted" not in screen

        term.type("What is the capital of France?")
        term.wait(lambda s: _prompts(s) == 3, "the second reply")
        term.type("/stats")
        screen = term.wait(lambda s: "[turns 2," in s, "/stats")

        term.keys("C-c")
        term.wait(lambda s: "Ctrl-C again" in s, "the hint after one Ctrl-C")
        term.keys("C-c")
        screen = term.wait(lambda s: "EXIT=" in s, "the chat to end")
        assert "EXIT=0" in screen
    finally:
        term.close()
    first, second = [json.loads(line) for line in transcript.read_text().splitlines()]
    assert first["stopped"] and first["assistant"].strip()
    assert not second["stopped"] and "Paris" in second["assistant"]
    assert (chat_home / "chat_history").read_text().count("capital of France") == 1


def test_chat_sampling_prefers_the_models_own_defaults():
    from types import SimpleNamespace

    from transformers import GenerationConfig

    from streamllm.runtime.chat import CHAT_SAMPLING, chat_sampling

    assert chat_sampling(SimpleNamespace(generation_config=GenerationConfig())) == CHAT_SAMPLING
    own = GenerationConfig(do_sample=True, temperature=0.3, top_p=0.8)
    chosen = chat_sampling(SimpleNamespace(generation_config=own))
    assert (chosen.temperature, chosen.top_p, chosen.repetition_penalty) == (0.3, 0.8, 1.0)
    assert chosen.max_new_tokens == CHAT_SAMPLING.max_new_tokens

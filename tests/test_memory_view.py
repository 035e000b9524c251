"""Memory people can see: what the last reply's prompt recalled, as snippets of the conversation's own text with
how many tokens ago they were said, in the chat (``/stats``) and on the server's session endpoint; on the tiny
random model that speaks the real tokenizer, with a cache small enough (4 + 60, blocks of 16) that a few turns
evict blocks and recall them."""

import httpx
import pytest
from server_helpers import ThreadServer

from streamllm import StreamConfig
from streamllm.cli.chat import _recall_lines
from streamllm.config import MemoryConfig
from streamllm.runtime.chat import ChatSession
from streamllm.runtime.generate import Sampling
from streamllm.runtime.recalls import snippet
from streamllm.runtime.stream import Stream
from streamllm.server import ServerConfig, create_app

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MEMORY = StreamConfig(
    num_sinks=4, window=60, chunk_size=16, memory=MemoryConfig(block_size=16, blocks=2, reps=2)
)
MESSAGES = [
    "The lighthouse keeper named Orla painted the tower red and white every spring before the storms came in.",
    "Her brother Tomas kept bees on the cliff and sold honey in the harbour market on Saturdays.",
    "A ship called the Marigold ran aground on the northern rocks in the winter of the great fog.",
    "Which of them kept bees, and where did they sell the honey?",
]
WORDS = {w.strip(".,").lower() for m in MESSAGES[:-1] for w in m.split() if len(w) > 5}


def test_a_snippet_is_one_line_cut_short():
    assert snippet("  two\n\nlines\tand\ufffd  spaces ") == "two lines and spaces"
    long = snippet("word " * 100, limit=30)
    assert len(long) == 30 and long.endswith("\u2026") and "\n" not in long


class FedLog:
    """Every token fed to streams, in order (their text positions), and how many were in at each marked recall:
    the ground truth a recall's snippet and age are checked against."""

    def __init__(self, monkeypatch):
        self.ids: list[int] = []
        self.recall_points: list[int] = []
        feed = Stream.feed

        def logged(stream, ids, recall=False, query=None):
            self.ids += [int(i) for i in ids]
            if recall:
                self.recall_points.append(len(self.ids))
            return feed(stream, ids, recall, query)

        monkeypatch.setattr(Stream, "feed", logged)

    def check(self, recalls: list[dict], tokenizer) -> None:
        """Each recalled block is the conversation's text at its positions, said before the last prompt ended."""
        seen = self.recall_points[-1]
        assert recalls
        for r in recalls:
            assert r["end"] - r["start"] == MEMORY.memory.block_size and r["start"] >= MEMORY.num_sinks
            said = tokenizer.decode(self.ids[r["start"] : r["end"]], skip_special_tokens=True)
            assert r["text"] == snippet(said) and r["text"]
            assert r["tokens_ago"] == seen - r["end"] >= MEMORY.window
            assert 0 < r["layers"] <= 1
        recalled = " ".join(r["text"].lower() for r in recalls)
        assert any(word in recalled for word in WORDS), recalled  # the users' words, not only the template's


def test_the_chat_keeps_what_the_last_reply_recalled(tiny, monkeypatch):
    model, tokenizer = tiny
    fed = FedLog(monkeypatch)
    chat = ChatSession(model, tokenizer, MEMORY, Sampling(max_new_tokens=3))
    assert _recall_lines(chat) == ["[memory: no reply yet]"]
    for message in MESSAGES:
        list(chat.send(message))
    fed.check([r.as_dict() for r in chat.last_recalls], tokenizer)
    lines = _recall_lines(chat)
    assert lines[0] == f"[memory: the last reply recalled {len(chat.last_recalls)} blocks]"
    first = chat.last_recalls[0]
    assert lines[1].startswith(f"  said {first.tokens_ago:,} tokens ago, chosen by ")
    assert lines[1].endswith(f'"{first.text}"')
    chat.reset()
    assert chat.last_recalls is None
    assert _recall_lines(ChatSession(model, tokenizer, StreamConfig(num_sinks=4, window=60))) == []


def _serve(tiny, stream):
    model, tokenizer = tiny
    config = ServerConfig(model_id="tiny", stream=stream, max_tokens_limit=64, batch_decode=1)
    return ThreadServer(create_app(model, tokenizer, config))


def _chat(url, content, session=None):
    headers = {"X-Session-Id": session} if session else {}
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "temperature": 0,
        "max_tokens": 3,
    }
    reply = httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=120)
    assert reply.status_code == 200, reply.text
    return reply


def test_the_session_endpoint_shows_what_the_last_reply_recalled(tiny, monkeypatch):
    _, tokenizer = tiny
    fed = FedLog(monkeypatch)
    with _serve(tiny, MEMORY) as server:
        session = None
        for message in MESSAGES:
            reply = _chat(server.url, message, session)
            session = reply.headers["x-session-id"]
        info = httpx.get(f"{server.url}/v1/sessions/{session}", timeout=30).json()
        memory = info["memory"]
        assert memory["blocks"] > 2 and memory["tokens"] == memory["blocks"] * 16
        fed.check(memory["last_recalls"], tokenizer)
        assert reply.json()["memory_recalls"] == memory["last_recalls"]  # the same, with the reply itself
        prompt_end = reply.json()["usage"]["prompt_tokens"]
        assert all(r["tokens_ago"] == prompt_end - r["end"] for r in memory["last_recalls"])

        import openai  # the extra field does not trouble OpenAI's own client

        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)
        parsed = client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hello"}], max_tokens=2
        )
        assert parsed.choices[0].message.content is not None and parsed.model_extra["memory_recalls"] == []


def test_without_a_memory_nothing_is_added(tiny):
    with _serve(tiny, StreamConfig(num_sinks=4, window=60, chunk_size=16)) as server:
        reply = _chat(server.url, MESSAGES[0])
        info = httpx.get(f"{server.url}/v1/sessions/{reply.headers['x-session-id']}", timeout=30).json()
    assert "memory_recalls" not in reply.json() and info["memory"] is None

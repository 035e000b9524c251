"""Load test of ``streamllm serve`` on loopback: N concurrent conversations through the official openai client.

For each concurrency level it reports aggregate generated tokens/s, time to first token (p50, p99) and the
server's resident memory before and after. By default it starts its own server (and stops it at the end); with
``--url`` it measures a running one (memory then needs ``--pid``).

    python benchmarks/load.py                                # levels 1, 4, 16; 2 turns of 32 tokens each
    python benchmarks/load.py --levels 1,4,16 --json load.json --server-args "--window 1020 --threads 2"
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import openai

TOPICS = [
    "the sea", "mountains", "bread", "trains", "owls", "rain", "chess", "the moon", "bees", "castles",
    "rivers", "clocks", "gardens", "bicycles", "whales", "volcanoes", "libraries", "snow", "kites", "coffee",
]  # fmt: skip


def rss_mb(pid: int | None) -> float | None:
    if pid is None:
        return None
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return None


async def conversation(
    client, model: str, topic: str, turns: int, max_tokens: int
) -> list[tuple[float, int]]:
    """One session: ``turns`` streamed turns, the history resent each time. -> [(ttft_s, tokens)] per turn."""
    messages = [{"role": "user", "content": f"Tell me something about {topic}."}]
    results = []
    for _ in range(turns):
        start, ttft, text, tokens = time.perf_counter(), None, "", 0
        stream = await client.chat.completions.create(
            model=model,
            messages=messages,
            temperature=0,
            max_tokens=max_tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                ttft = ttft if ttft is not None else time.perf_counter() - start
                text += chunk.choices[0].delta.content
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        results.append((ttft if ttft is not None else time.perf_counter() - start, tokens))
        messages += [{"role": "assistant", "content": text}, {"role": "user", "content": "Tell me more."}]
    return results


async def level(url: str, key: str, model: str, n: int, turns: int, max_tokens: int, offset: int) -> dict:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=3600)
    topics = [f"{TOPICS[(offset + i) % len(TOPICS)]} (conversation {offset + i})" for i in range(n)]
    start = time.perf_counter()
    per_session = await asyncio.gather(*(conversation(client, model, t, turns, max_tokens) for t in topics))
    wall = time.perf_counter() - start
    await client.close()
    ttfts = [t for session in per_session for t, _ in session]
    tokens = sum(k for session in per_session for _, k in session)
    return {
        "sessions": n,
        "requests": len(ttfts),
        "tokens": tokens,
        "wall_s": round(wall, 2),
        "tok_per_s": round(tokens / wall, 2),
        "ttft_p50_s": round(float(np.percentile(ttfts, 50)), 3),
        "ttft_p99_s": round(float(np.percentile(ttfts, 99)), 3),
    }


def start_server(server_args: list[str], key: str, state_dir: str) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "streamllm", "serve", "--port", str(port), "--api-key", key]
    cmd += ["--state-dir", state_dir, *server_args]
    print("starting:", " ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(900):
        if proc.poll() is not None:
            raise SystemExit("the server exited during start-up")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not start")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", help="measure a running server instead of starting one")
    p.add_argument("--pid", type=int, help="the running server's process id (for its memory)")
    p.add_argument("--key", default=os.environ.get("STREAMLLM_API_KEY", "load-test-key"))
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--levels", default="1,4,16")
    p.add_argument("--turns", type=int, default=2)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--server-args", default="--max-sessions 32", help="extra `streamllm serve` arguments")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()

    proc, pid, url = None, args.pid, args.url
    with tempfile.TemporaryDirectory(prefix="streamllm-load-") as state_dir:
        if url is None:
            proc, url = start_server(shlex.split(args.server_args), args.key, state_dir)
            pid = proc.pid
        try:
            # One untimed turn first: the model's weights are mapped from disk and only count as resident
            # memory once a forward pass has touched them.
            asyncio.run(level(url, args.key, args.model, 1, 1, 2, offset=len(TOPICS) - 1))
            rows, offset = [], 0
            for n in (int(x) for x in args.levels.split(",")):
                before = rss_mb(pid)
                row = asyncio.run(level(url, args.key, args.model, n, args.turns, args.max_tokens, offset))
                row |= {"rss_before_mb": before and round(before), "rss_after_mb": pid and round(rss_mb(pid))}
                offset += n
                rows.append(row)
                print(json.dumps(row), flush=True)
        finally:
            if proc is not None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    print(
        "\n| sessions | requests | tokens | wall s | tok/s | TTFT p50 s | TTFT p99 s | RSS before -> after MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['sessions']} | {r['requests']} | {r['tokens']} | {r['wall_s']} | {r['tok_per_s']} | "
            f"{r['ttft_p50_s']} | {r['ttft_p99_s']} | {r['rss_before_mb']} -> {r['rss_after_mb']} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Load test of ``streamllm serve`` on loopback: N concurrent conversations through the official openai client.

For each concurrency level it reports aggregate generated tokens/s, time to first token (p50, p99) and the
server's resident memory before and after. By default it starts its own server (and stops it at the end); with
``--url`` it measures a running one (memory then needs ``--pid``).

``--targets`` measures several deployments one after the other, each on its own fresh store: ``serve`` (one
process), ``ray1`` and ``ray2`` (``streamllm serve-ray`` with 1 or 2 replicas; Ray's processes are not counted in
the RSS column; the replicas split the machine's cores between them). ``--store redis`` keeps the sessions in a real ``redis-server`` started here with a password.
``--move`` measures what it costs to move a session between processes: two servers on one store take turns of a
session whose cache is full, and the first token of a turn on the process that served the previous turn (cache in
memory) is compared with one on the other process (which restores it from the store).

    python benchmarks/load.py                                # levels 1, 4, 16; 2 turns of 32 tokens each
    python benchmarks/load.py --levels 1,4,16 --json load.json --server-args "--window 1020 --threads 2"
    python benchmarks/load.py --store redis --targets serve,ray1,ray2 --move --json docs/performance/scaling.json
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


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(
    server_args: list[str], key: str, store: list[str], command: str = "serve"
) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "streamllm", command, "--port", str(port), "--api-key", key]
    cmd += [*store, *server_args]
    print("starting:", " ".join(shlex.quote(c) for c in cmd), file=sys.stderr)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
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


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


class Redis:
    """A ``redis-server`` on a free loopback port, its password in its config file (and handed to the servers
    in STREAMLLM_STORE_PASSWORD), its data in a temporary folder."""

    def __init__(self, folder: str):
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        password = os.urandom(12).hex()
        conf = Path(folder) / "redis.conf"
        conf.write_text(
            f'port {self.port}\nbind 127.0.0.1\nrequirepass {password}\ndir {folder}\nsave ""\n'
            "appendonly yes\nappendfsync everysec\n"
        )
        os.environ["STREAMLLM_STORE_PASSWORD"] = password
        self.proc = subprocess.Popen(["redis-server", str(conf)], stdout=subprocess.DEVNULL)
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            time.sleep(0.05)
        raise SystemExit("redis-server did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=30)


def target(name: str) -> tuple[str, list[str]]:
    """(command, its own arguments) of a target: ``serve``, or ``rayN``: N replicas, which split this machine's
    cores between them (``--threads``, ``--cpus-per-replica``)."""
    if name == "serve":
        return "serve", []
    if name.startswith("ray") and name[3:].isdigit() and int(name[3:]) > 0:
        n = int(name[3:])
        share = max(1, (os.cpu_count() or 1) // n)
        return "serve-ray", ["--replicas", str(n), "--threads", str(share), "--cpus-per-replica", str(share)]
    raise SystemExit(f"unknown target {name!r}: serve, ray1, ray2, ...")


def wait_for_replicas(url: str, n: int, timeout: float = 600.0) -> None:
    """Ray's router answers once one replica is up; wait until ``n`` have answered (by their header)."""
    seen, end = set(), time.monotonic() + timeout
    while len(seen) < n:
        if time.monotonic() > end:
            raise SystemExit(f"only {len(seen)} of {n} replicas came up")
        seen.add(httpx.get(f"{url}/health", timeout=60).headers.get("x-streamllm-replica"))
        time.sleep(0.1)


def run_levels(url: str, pid: int | None, args) -> list[dict]:
    # Untimed turns first, enough to reach every replica: the model's weights are mapped from disk and only count
    # as resident memory once a forward pass has touched them, and a replica's first turn pays for that.
    asyncio.run(level(url, args.key, args.model, 8, 1, 2, offset=len(TOPICS) - 8))
    rows, offset = [], 0
    for n in (int(x) for x in args.levels.split(",")):
        before = rss_mb(pid)
        row = asyncio.run(level(url, args.key, args.model, n, args.turns, args.max_tokens, offset))
        row |= {"rss_before_mb": before and round(before), "rss_after_mb": pid and round(rss_mb(pid))}
        offset += n
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def move_cost(args, store: list[str], rounds: int = 4) -> dict:
    """TTFT of a turn on the process that holds the session in memory against one on the other process, which
    restores it from the store, for a session past its cache (a whole state plus journal records)."""
    extra = shlex.split(args.server_args)
    (a, url_a), (b, url_b) = (start_server(extra, args.key, store) for _ in range(2))
    try:
        client = openai.OpenAI(api_key=args.key, max_retries=0, timeout=600)
        text = " ".join(
            f"Sentence {i} of a long conversation about {TOPICS[i % len(TOPICS)]}." for i in range(400)
        )
        messages = [{"role": "user", "content": text}]
        session, held, moved = None, [], []

        def turn(url: str) -> float:
            nonlocal session
            start = time.perf_counter()
            raw = client.with_options(base_url=f"{url}/v1").chat.completions.with_raw_response.create(
                model=args.model,
                messages=messages,
                max_tokens=1,
                temperature=0,
                extra_headers={"X-Session-Id": session} if session else None,
            )
            seconds = time.perf_counter() - start
            session = raw.headers["x-session-id"]
            messages.extend(
                [
                    {"role": "assistant", "content": raw.parse().choices[0].message.content},
                    {"role": "user", "content": "Go on."},
                ]
            )
            return seconds

        turn(url_a)  # the long first turn fills the cache
        turn(url_a)
        for _ in range(rounds):
            moved.append(turn(url_b))  # A served the last turn: B restores the session from the store
            held.append(turn(url_b))  # B served the last turn: in its memory
            moved.append(turn(url_a))
            held.append(turn(url_a))
    finally:
        stop(a)
        stop(b)
    row = {
        "turns_each": len(held),
        "ttft_in_memory_s": round(float(np.median(held)), 4),
        "ttft_moved_s": round(float(np.median(moved)), 4),
    }
    row["move_cost_s"] = round(row["ttft_moved_s"] - row["ttft_in_memory_s"], 4)
    print(json.dumps(row), flush=True)
    return row


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
    p.add_argument("--targets", default="serve", help="serve, ray1, ray2 (comma-separated; see above)")
    p.add_argument("--ray-args", default="", help="extra `streamllm serve-ray` arguments")
    p.add_argument("--store", choices=("dir", "redis"), default="dir", help="where the sessions are kept")
    p.add_argument("--move", action="store_true", help="also measure the cost of moving a session")
    args = p.parse_args()

    rows, moves = [], None
    with tempfile.TemporaryDirectory(prefix="streamllm-load-") as folder:
        redis = Redis(folder) if args.store == "redis" else None
        try:
            for n, name in enumerate(args.targets.split(",")):
                command, own = target(name)
                if redis is not None:
                    redis.proc.terminate()  # a fresh store for each target
                    redis.proc.wait()
                    redis = Redis(tempfile.mkdtemp(dir=folder))
                store = ["--store", redis.url] if redis else ["--state-dir", f"{folder}/state-{n}"]
                proc, pid, url = None, args.pid, args.url
                if url is None:
                    extra = shlex.split(args.server_args) + (
                        shlex.split(args.ray_args) if command != "serve" else []
                    )
                    proc, url = start_server([*extra, *own], args.key, store, command)
                    pid = proc.pid if command == "serve" else None  # Ray's replicas are other processes
                    if command != "serve":
                        wait_for_replicas(url, int(own[1]))
                try:
                    rows += [{"target": name} | row for row in run_levels(url, pid, args)]
                finally:
                    if proc is not None:
                        stop(proc)
            if args.move:
                store = ["--store", redis.url] if redis else ["--state-dir", f"{folder}/state-move"]
                moves = move_cost(args, store)
        finally:
            if redis is not None:
                redis.stop()
    print(
        "\n| target | sessions | requests | tokens | wall s | tok/s | TTFT p50 s | TTFT p99 s | RSS before -> after MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['target']} | {r['sessions']} | {r['requests']} | {r['tokens']} | {r['wall_s']} | {r['tok_per_s']} | "
            f"{r['ttft_p50_s']} | {r['ttft_p99_s']} | {r['rss_before_mb']} -> {r['rss_after_mb']} |"
        )
    if moves:
        print(
            f"\nmoving a session: first token {moves['ttft_in_memory_s']} s in memory, {moves['ttft_moved_s']} s "
            f"restored from the store ({moves['move_cost_s']} s more; medians of {moves['turns_each']} turns each)"
        )
    if args.json:
        args.json.write_text(json.dumps({"levels": rows, "move": moves}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

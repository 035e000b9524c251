"""A thousand turns on one session: what each turn's save costs, and whether it stays flat.

    .venv/bin/python benchmarks/session_saves.py [--turns 1000] [--max-tokens 8] [--server-args "..."]

Starts a real ``streamllm --verbose serve --state-dir TMP`` (the default path for this CPU, cache 4+1020) and holds
one conversation with it through the ``openai`` client: each turn sends one short user message (cycling through a
few questions) under the session's id and takes a greedy reply of at most ``--max-tokens`` tokens. After each
turn it reads, from the server's own log line, how the turn was saved (a journal record or a whole state), its
bytes and milliseconds, and the server process's RSS from /proc. Reports the first and the last 100 turns side by
side. Writes session_saves.csv, session_saves.md and session_saves.png into --out.
"""

from __future__ import annotations

import os
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from _bench import command, parser

from streamllm.experiments.report import Report, figure

QUESTIONS = [
    "Tell me one thing about rivers.",
    "And about the sea?",
    "What lives in it?",
    "Why is it salty?",
    "Thanks. Something about mountains?",
]
SAVED = re.compile(r"session (\S+) saved: a (journal record|whole state), (\d+) bytes in ([\d.]+) ms")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    p = parser(__doc__, "docs/performance")
    p.add_argument("--turns", type=int, default=1000)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--server-args", default="", help="more options for streamllm serve")
    args = p.parse_args()
    from openai import OpenAI

    state = Path(tempfile.mkdtemp(prefix="session-saves-"))
    port = free_port()
    log_path = state / "server.log"
    serve = [
        sys.executable,
        "-m",
        "streamllm",
        "--verbose",
        "serve",
        "--model",
        args.model,
        "--port",
        str(port),
    ]
    serve += ["--state-dir", str(state), "--threads", str(args.threads)]
    serve += shlex.split(args.server_args)
    with open(log_path, "w") as log:
        server = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            if server.poll() is not None:
                raise SystemExit(f"the server stopped: {log_path.read_text()[-2000:]}")
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        path = httpx.get(f"{url}/health").json()["path"]
        print(
            f"{args.model}, {path['dtype']}, {path['decode']} decode, kv {path['kv_dtype']}; {args.turns} turns"
        )
        client = OpenAI(base_url=f"{url}/v1", api_key="none")
        rows, session, seen = [], None, 0
        for turn in range(1, args.turns + 1):
            headers = {"X-Session-Id": session} if session else {}
            start = time.perf_counter()
            raw = client.chat.completions.with_raw_response.create(
                model=args.model,
                messages=[{"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]}],
                max_tokens=args.max_tokens,
                temperature=0,
                extra_headers=headers,
            )
            seconds = time.perf_counter() - start
            session = raw.headers["x-session-id"]
            reply = raw.parse()
            lines = log_path.read_text().splitlines()[seen:]
            seen += len(lines)
            saves = [m for m in map(SAVED.search, lines) if m and m.group(1) == session]
            if len(saves) != 1:
                raise SystemExit(f"turn {turn}: expected one save line, found {len(saves)}")
            kind, nbytes, ms = saves[0].group(2), int(saves[0].group(3)), float(saves[0].group(4))
            rows.append(
                (
                    turn,
                    reply.usage.total_tokens,
                    kind,
                    nbytes,
                    ms,
                    round(rss_mb(server.pid), 1),
                    round(seconds, 3),
                )
            )
            if turn % 100 == 0:
                print(f"turn {turn}: {kind}, {nbytes} bytes, {ms:.1f} ms, RSS {rows[-1][5]} MB", flush=True)
    finally:
        server.terminate()
        server.wait(timeout=60)
    _write(rows, args, path)


def _summary(rows) -> dict:
    return {
        "save_ms": statistics.median(r[4] for r in rows),
        "mean_bytes": statistics.fmean(r[3] for r in rows),
        "records": sum(r[2] == "journal record" for r in rows),
        "rss_mb": statistics.median(r[5] for r in rows),
        "turn_s": statistics.median(r[6] for r in rows),
    }


def _write(rows, args, path) -> None:
    first, last = _summary(rows[:100]), _summary(rows[-100:])
    lines = [f"| | turns 1-100 | turns {len(rows) - 99}-{len(rows)} |", "|---|---|---|"]
    labels = {
        "save_ms": "median save (ms)",
        "mean_bytes": "bytes written per turn (mean)",
        "records": "turns saved as a journal record",
        "rss_mb": "server RSS (MB, median)",
        "turn_s": "turn, request to reply (s, median)",
    }
    for key, label in labels.items():
        lines.append(f"| {label} | {first[key]:,.1f} | {last[key]:,.1f} |")
    header = ("turn", "tokens in session", "saved as", "bytes", "save ms", "server RSS MB", "turn s")
    report = Report(
        "session_saves", f"{len(rows)} turns on one session ({args.model})", command(), header, rows
    )
    report.sections.append(
        f"Server path: {path['dtype']}, {path['decode']} decode, kv {path['kv_dtype']}; cache 4+1020; replies of at "
        f"most {args.max_tokens} tokens."
    )
    report.sections.append("\n".join(lines))
    fig, axes = figure(1, 2, size=(11, 4))
    turns = [r[0] for r in rows]
    axes[0][0].scatter(turns, [r[3] / 2**20 for r in rows], s=4)
    axes[0][0].set_xlabel("turn")
    axes[0][0].set_ylabel("MiB written by the save")
    axes[0][0].set_title("Bytes per save (journal records; a whole state now and then)")
    axes[0][1].plot(turns, [r[5] for r in rows])
    axes[0][1].set_xlabel("turn")
    axes[0][1].set_ylabel("server RSS (MB)")
    axes[0][1].set_title("Server RSS")
    report.figure = fig
    for path_ in report.write(args.out):
        print(f"wrote {path_}")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""One model worker thread that interleaves all sessions' turns, one step at a time.

A step is one forward pass of one turn: a chunk of its prompt, or one generated token. Turns take steps in
round-robin order, so a long prompt pasted into one session delays the others by at most one chunk per round,
and every session's tokens keep coming while others run.

Why not batch decode steps across sessions: every session's cache holds different positions (the engine keeps
one position counter per layer and stream), so one forward over several sessions needs per-row positions and
masks in the attention engine; and batched float arithmetic rounds differently from single-row arithmetic, so a
session's greedy reply would depend on which other sessions happened to be running. ``benchmarks/batch_decode.py``
measures what batching would gain on a given machine.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence

from ..generate import Event, Sampling, stream_generate
from ..stream import Stream

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The turn was cancelled (client gone or timed out) before it finished."""


class Job:
    """One turn of one session: feed ``ids`` into ``stream``, then generate. Results arrive on ``queue``.

    Queue items: ``("event", Event)`` per token, then ``("done", None)``, or ``("error", exception)``. The
    ``stopped`` future resolves (on the event loop) once the worker will not touch the stream again.
    """

    def __init__(
        self,
        model,
        tokenizer,
        stream: Stream,
        ids: Sequence[int],
        sampling: Sampling,
        loop: asyncio.AbstractEventLoop,
        chunk: int,
    ):
        if not ids:
            raise ValueError("a turn needs at least one new token")
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stopped: asyncio.Future = loop.create_future()
        self.cancelled = threading.Event()
        self.started = time.perf_counter()
        self._loop = loop
        self._steps = self._run(model, tokenizer, stream, list(ids), sampling, chunk)

    @staticmethod
    def _run(model, tokenizer, stream, ids, sampling, chunk) -> Iterator[Event | None]:
        # All but the last prompt token go in chunks, one step each; stream_generate feeds the last one.
        prefix = ids[:-1]
        for start in range(0, len(prefix), chunk):
            stream.feed(prefix[start : start + chunk])
            yield None
        yield from stream_generate(model, tokenizer, ids[-1:], sampling, stream=stream)

    def cancel(self) -> None:
        self.cancelled.set()

    def _post(self, kind: str, payload) -> None:
        try:
            self._loop.call_soon_threadsafe(self._deliver, kind, payload)
        except RuntimeError:  # the event loop is closed: the server is shutting down
            pass

    def _deliver(self, kind: str, payload) -> None:  # on the event loop
        self.queue.put_nowait((kind, payload))
        if kind != "event" and not self.stopped.done():
            self.stopped.set_result(None)

    def step(self) -> bool:
        """Do one step; True while the turn has more to do. Runs on the worker thread."""
        try:
            item = next(self._steps)
        except StopIteration:
            self._post("done", None)
            return False
        except Exception as exc:  # noqa: BLE001 - reported to the request, the worker goes on
            log.exception("a turn failed in the model worker")
            self._post("error", exc)
            return False
        if item is not None:
            self._post("event", item)
            if item.finish_reason:
                self._steps.close()
                self._post("done", None)
                return False
        return True

    def abandon(self) -> None:
        self._steps.close()
        self._post("error", Cancelled("the turn was cancelled"))


class Scheduler:
    """Owns the model: every forward pass runs on its one worker thread, turns in round-robin order."""

    def __init__(self):
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="streamllm-model-worker", daemon=True)
        self.steps = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

    @property
    def active(self) -> int:
        with self._cv:
            return len(self._jobs)

    def submit(self, job: Job) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError("the server is shutting down")
            self._jobs.append(job)
            self._cv.notify()

    def _next(self) -> Job | None:
        with self._cv:
            while not self._jobs and not self._stopping:
                self._cv.wait()
            if self._stopping:
                for job in self._jobs:
                    job.abandon()
                self._jobs.clear()
                return None
            return self._jobs.popleft()

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                if job.cancelled.is_set():
                    job.abandon()
                    continue
                more = job.step()
            except BaseException:  # never let the one worker die: the server would hang
                log.exception("the model worker hit an unexpected error")
                more = False
            self.steps += 1
            if more:
                with self._cv:
                    self._jobs.append(job)  # to the back: round-robin

"""One model worker thread that interleaves all sessions' turns, one step at a time.

A step is one forward pass of one turn: a chunk of its prompt, or one generated token. Turns take steps in
round-robin order, so a long prompt pasted into one session delays the others by at most one chunk per round,
and every session's tokens keep coming while others run.

Decode steps of different sessions share one pass (``--batch-decode N``, 16 by default: batched jobs, and
``runtime.stream.feed_together``, which reads the weights once for all of them): on a 2-core CPU with the default
path that gives 1.5x the aggregate tokens/s at 16 sessions (``docs/performance.md``, "The server"). It is on by
default because on the default paths it moves no result: over 8 sessions x 64 tokens of real text, batched and
one-at-a-time decoding gave the same next-token NLL to 4 decimals and the same greedy choice every time, in
bfloat16 on 4-bit weights and in exact float32 (``benchmarks/batch_agreement.py``), while bfloat16 itself moves
NLL by 0.05 on average from float32. Batched arithmetic may still round differently in rare cases, so
``--batch-decode 1`` remains for a server whose replies must depend on nothing but each session's own history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable, Generator, Sequence

import torch

from ..runtime.generate import Event, Generation, Sampling
from ..runtime.stream import Stream, feed_together

log = logging.getLogger(__name__)


class Cancelled(Exception):
    """The turn was cancelled (client gone or timed out) before it finished."""


class Job:
    """One turn of one session: feed ``ids`` into ``stream``, then generate. Results arrive on ``queue``.

    Queue items: ``("event", Event)`` per token, then ``("done", None)``, or ``("error", exception)``. The
    ``stopped`` future resolves (on the event loop) once the worker will not touch the stream again.

    A ``batched`` job does not feed its generated tokens itself: it leaves each one ``waiting`` for the scheduler,
    which feeds it together with other jobs' tokens (or alone) and hands the logits back through ``resume``.
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
        batched: bool = False,
    ):
        if not ids:
            raise ValueError("a turn needs at least one new token")
        self.queue: asyncio.Queue = asyncio.Queue()
        self.stopped: asyncio.Future = loop.create_future()
        self.cancelled = threading.Event()
        self.stream = stream
        self.batched = batched
        self.waiting: int | None = None  # a generated token waiting to be fed (batched jobs only)
        self._loop = loop
        self._steps = self._run(model, tokenizer, stream, list(ids), sampling, chunk)

    def _run(
        self, model, tokenizer, stream, ids, sampling, chunk
    ) -> Generator[Event | None, torch.Tensor, None]:
        """The turn as steps: the prompt in chunks, then the token loop (``Generation``), one token per step."""
        prefix = ids[:-1]
        for start in range(0, len(prefix), chunk):
            stream.feed(prefix[start : start + chunk])
            yield None
        loop = Generation(model, tokenizer, ids, sampling)
        # with a memory, the prompt's end selects what is recalled, by what the whole turn says
        logits = stream.feed(ids[-1:], recall=True, query=ids)
        loop.prefilled(stream)
        while True:
            token = loop.next_token(logits)
            if self.batched:
                self.waiting = token
                logits = yield None  # the scheduler feeds the token (alone or batched) and sends the logits
            else:
                logits = stream.feed([token])
            event = loop.emit(token, stream)
            yield event
            if event.finish_reason:
                return

    def resume(self, logits: torch.Tensor) -> bool:
        """The waiting token was fed: emit its event and run on to the next token to feed."""
        self.waiting = None
        try:
            event = self._steps.send(logits)
            if event is None:
                raise RuntimeError("a fed token gave no event")
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)
            return False
        self._post("event", event)
        if event.finish_reason:
            self._steps.close()
            self._post("done", None)
            return False
        return self.step()  # samples the next token: cheap, and makes it ready for the next batch

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
        if self.waiting is not None:  # nothing shared the pass with this token: feed it alone
            try:
                logits = self.stream.feed([self.waiting])
            except Exception as exc:  # noqa: BLE001 - reported to the request, the worker goes on
                log.exception("a turn failed in the model worker")
                self.fail(exc)
                return False
            return self.resume(logits)
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

    def fail(self, exc: BaseException) -> None:
        self._steps.close()
        self._post("error", exc)

    def abandon(self) -> None:
        self._steps.close()
        self._post("error", Cancelled("the turn was cancelled"))


class Scheduler:
    """Owns the model: every forward pass runs on its one worker thread, turns in round-robin order.

    With ``batch > 1``, turns that wait for their next token to be fed (batched jobs) share one forward pass,
    up to ``batch`` of them (``feed_together``); prompt chunks still go one turn at a time. ``on_batch`` is
    told the size of each such decode pass (1 when a waiting token found no company); it must not raise.
    """

    def __init__(self, model=None, batch: int = 1, on_batch: Callable[[int], None] | None = None):
        self.model, self.batch, self.on_batch = model, batch, on_batch
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="streamllm-model-worker", daemon=True)
        self.batched_steps = self.batched_rows = 0

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify_all()
        self._thread.join(timeout=30)

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

    def _companions(self, job: Job) -> list[Job]:
        """Other queued turns whose next token can share ``job``'s forward pass (taken off the queue)."""
        if self.batch < 2 or job.waiting is None or not job.stream.batchable:
            return []
        with self._cv:
            found = [
                j
                for j in self._jobs
                if j.waiting is not None and not j.cancelled.is_set() and j.stream.batchable
            ][: self.batch - 1]
            for j in found:
                self._jobs.remove(j)
        return found

    def _work(self) -> None:
        while (job := self._next()) is not None:
            group = [job]
            try:
                if job.cancelled.is_set():
                    job.abandon()
                    continue
                group += self._companions(job)
                if job.waiting is not None and self.on_batch is not None:
                    self.on_batch(len(group))
                if len(group) == 1:
                    more = [job.step()]
                else:
                    more = self._step_together(group)
            except BaseException as exc:  # never let the one worker die: the server would hang
                log.exception("the model worker hit an unexpected error")
                for j in group:
                    with contextlib.suppress(BaseException):
                        j.fail(exc)
                more = [False] * len(group)
            with self._cv:
                # to the back: round-robin
                self._jobs.extend(j for j, m in zip(group, more, strict=True) if m)

    def _step_together(self, group: list[Job]) -> list[bool]:
        try:
            tokens = [j.waiting for j in group if j.waiting is not None]
            if len(tokens) < len(group):
                raise RuntimeError("a job in a batched step has no token waiting")
            logits = feed_together([j.stream for j in group], tokens)  # (K, V)
        except Exception as exc:  # noqa: BLE001 - every turn in the batch reports it
            log.exception("a batched decode step failed")
            for j in group:
                j.fail(exc)
            return [False] * len(group)
        self.batched_steps += 1
        self.batched_rows += len(group)
        return [j.resume(row) for j, row in zip(group, logits, strict=True)]

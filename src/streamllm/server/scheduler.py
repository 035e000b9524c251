"""One model worker thread that interleaves all sessions' turns, one step at a time.

A step is one forward pass of one turn: a chunk of its prompt, or one generated token. Turns take steps in
round-robin order, so a long prompt pasted into one session delays the others by at most one chunk per round,
and every session's tokens keep coming while others run.

Decode steps of different sessions can share one pass (``--batch-decode N``, ``BatchJob`` and
``batching.decode_step``, which reads the weights once for all of them): on a 2-core CPU that gives 2.1x the
tokens/s with 4 sessions and 3.5x with 16 (bfloat16; ``benchmarks/batch_decode.py``). It is off by default
because batched arithmetic rounds differently from
single-row arithmetic: with it, a greedy reply can (in rare near-ties) depend on which other sessions happened to
be running, while without it a session's replies depend on nothing but its own history.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator, Sequence

import torch

from ..generate import Event, Sampling, _Detokenizer, _eos_ids, sample, stream_generate
from ..stream import Stream
from .batching import batchable, decode_step

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
        self.stream = stream
        self.waiting: int | None = None  # a generated token waiting to be fed (batched jobs only)
        self._loop = loop
        self._steps = self._run(model, tokenizer, stream, list(ids), sampling, chunk)

    def _run(self, model, tokenizer, stream, ids, sampling, chunk) -> Iterator[Event | None]:
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

    def fail(self, exc: BaseException) -> None:
        self._steps.close()
        self._post("error", exc)

    def abandon(self) -> None:
        self._steps.close()
        self._post("error", Cancelled("the turn was cancelled"))


class Scheduler:
    """Owns the model: every forward pass runs on its one worker thread, turns in round-robin order.

    With ``batch > 1``, turns that wait for their next token to be fed (``BatchJob``) share one forward pass,
    up to ``batch`` of them (``batching.decode_step``); prompt chunks still go one turn at a time.
    """

    def __init__(self, model=None, batch: int = 1):
        self.model, self.batch = model, batch
        self._jobs: deque[Job] = deque()
        self._cv = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="streamllm-model-worker", daemon=True)
        self.steps = self.batched_steps = self.batched_rows = 0

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

    def _companions(self, job: Job) -> list[Job]:
        """Other queued turns whose next token can share ``job``'s forward pass (taken off the queue)."""
        if self.batch < 2 or job.waiting is None or not batchable(job.stream):
            return []
        with self._cv:
            found = [
                j
                for j in self._jobs
                if j.waiting is not None and not j.cancelled.is_set() and batchable(j.stream)
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
            self.steps += 1
            with self._cv:
                self._jobs.extend(
                    j for j, m in zip(group, more, strict=True) if m
                )  # to the back: round-robin

    def _step_together(self, group: list[Job]) -> list[bool]:
        try:
            logits = decode_step(self.model, [j.stream for j in group], [j.waiting for j in group])  # (K, V)
        except Exception as exc:  # noqa: BLE001 - every turn in the batch reports it
            log.exception("a batched decode step failed")
            for j in group:
                j.fail(exc)
            return [False] * len(group)
        self.batched_steps += 1
        self.batched_rows += len(group)
        return [j.resume(row) for j, row in zip(group, logits, strict=True)]


class BatchJob(Job):
    """A turn whose decode steps can share a forward pass with other turns' (``--batch-decode``).

    The same token loop as ``stream_generate`` (sampling, stop strings, end of turn), split around the feed of
    each generated token so that the scheduler can feed several turns' tokens at once.
    """

    def _run(self, model, tokenizer, stream, ids, sampling, chunk) -> Iterator[Event | None]:
        prefix = ids[:-1]
        for start in range(0, len(prefix), chunk):
            stream.feed(prefix[start : start + chunk])
            yield None
        generator = torch.Generator().manual_seed(sampling.seed) if sampling.seed is not None else None
        eos = set() if sampling.ignore_eos else _eos_ids(model, tokenizer)
        detok, pending = _Detokenizer(tokenizer), ""
        hold = max((len(s) for s in sampling.stop), default=1) - 1  # text held back while a stop may start
        recent = ids[-64:]
        start = time.perf_counter()
        logits = stream.feed(ids[-1:])
        prefill_s, decode_start = time.perf_counter() - start, time.perf_counter()
        for n in range(1, sampling.max_new_tokens + 1):
            token = sample(logits, sampling, recent, generator)
            recent = (recent + [token])[-64:]
            self.waiting = token
            logits = yield None  # the scheduler feeds the token (alone or batched) and sends the logits
            finish = "stop" if token in eos else ("length" if n == sampling.max_new_tokens else None)
            pending += "" if token in eos else detok.push(token)
            hit = min((i for i in (pending.find(s) for s in sampling.stop) if i >= 0), default=-1)
            if hit >= 0:
                pending, finish = pending[:hit], "stop"
            cut = len(pending) if finish else max(0, len(pending) - hold)
            text, pending = pending[:cut], pending[cut:]
            elapsed = time.perf_counter() - decode_start
            rate = n / elapsed if elapsed else 0.0
            yield Event(token, text, stream.cache_length, stream.tokens_seen, n, rate, prefill_s, finish)

    def step(self) -> bool:
        if self.waiting is None:
            return super().step()
        try:  # nothing to share the step with: feed it alone
            logits = self.stream.feed([self.waiting])
        except Exception as exc:  # noqa: BLE001 - reported to the request, the worker goes on
            log.exception("a turn failed in the model worker")
            self.fail(exc)
            return False
        return self.resume(logits)

    def resume(self, logits: torch.Tensor) -> bool:
        """The waiting token was fed: emit its event and run on to the next token to feed."""
        self.waiting = None
        try:
            event = self._steps.send(logits)
        except Exception as exc:  # noqa: BLE001
            self.fail(exc)
            return False
        self._post("event", event)
        if event.finish_reason:
            self._steps.close()
            self._post("done", None)
            return False
        return super().step()  # samples the next token: cheap, and makes it ready for the next batch

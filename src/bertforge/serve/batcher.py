"""Dynamic batching: one bounded queue per model, one worker that batches rows of concurrent requests.

A request hands `submit(kind, rows, lengths)` its prepared rows (token id lists, windows, ...) and
awaits their results, in its own order. The worker (an asyncio task) waits until the queued rows of the
oldest row's kind reach `max_batch_tokens` tokens or that row has waited `max_wait_ms`, then takes rows
of that kind, oldest first, up to the token budget (so one request's rows may be split over batches,
and a batch mixes requests), and runs the kind's runner on them in `executor`: the event loop never
waits on the model. The runner sorts its rows by length and cuts them into forwards itself
(`bertforge.api.Model.run_*`). While a batch runs, new requests queue up and form the next batch.

The queue is bounded in tokens: a request that would push it past `max_queue_tokens` while other
requests wait gets `QueueFull` (the app answers 503 with Retry-After), so memory stays bounded. A
single request larger than the bound is still taken when the queue is empty (the app caps request
sizes separately). Rows of requests whose caller went away are dropped before they reach the model.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

from bertforge.serve.metrics import Metrics


class QueueFull(Exception):
    """The queue holds `max_queue_tokens`: come back after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"the request queue is full: retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class _Job:
    kind: str
    future: asyncio.Future
    results: list
    pending: int
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class _Item:
    job: _Job
    index: int  # row index within the job
    row: Any
    tokens: int


class Batcher:
    """The queue and worker of one model; `runners[kind](rows) -> results` run in `executor`."""

    def __init__(self, model: str, runners: dict[str, Callable[[list], list]], executor: Executor,
                 metrics: Metrics, *, max_batch_tokens: int = 4096, max_wait_ms: float = 2.0,
                 max_queue_tokens: int = 262144) -> None:
        self.model, self.runners, self.executor, self.metrics = model, runners, executor, metrics
        self.max_batch_tokens, self.max_wait = max_batch_tokens, max_wait_ms / 1000
        self.max_queue_tokens = max_queue_tokens
        self.queue: deque[_Item] = deque()
        self.queued_tokens = 0
        self.kind_tokens: dict[str, int] = {}  # queued tokens per kind
        self.busy = False
        self._arrived = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._seconds_per_token = 1e-5  # moving estimate, for Retry-After

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=f"batcher-{self.model}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass

    async def submit(self, kind: str, rows: Sequence, lengths: Sequence[int]) -> list:
        """Queue `rows` (row i has lengths[i] tokens) and wait for their results, in order."""
        if not rows:
            return []
        tokens = [max(1, int(n)) for n in lengths]
        total = sum(tokens)
        if self.queue and self.queued_tokens + total > self.max_queue_tokens:
            self.metrics.rejected.labels(self.model).inc()
            wait = (self.queued_tokens + total) * self._seconds_per_token
            raise QueueFull(max(1, int(wait + 0.999)))
        job = _Job(kind, asyncio.get_running_loop().create_future(), [None] * len(rows), len(rows))
        self.queue.extend(_Item(job, i, r, n) for i, (r, n) in enumerate(zip(rows, tokens)))
        self.queued_tokens += total
        self.kind_tokens[kind] = self.kind_tokens.get(kind, 0) + total
        self._gauge()
        self._arrived.set()
        return await job.future

    def _gauge(self) -> None:
        self.metrics.queue_rows.labels(self.model).set(len(self.queue))
        self.metrics.queue_tokens.labels(self.model).set(self.queued_tokens)

    async def _loop(self) -> None:
        while True:
            if not self.queue:
                self._arrived.clear()
                await self._arrived.wait()
                continue
            kind = self.queue[0].job.kind
            deadline = self.queue[0].job.enqueued + self.max_wait
            while self.kind_tokens.get(kind, 0) < self.max_batch_tokens and (left := deadline - time.perf_counter()) > 0:
                self._arrived.clear()
                try:
                    await asyncio.wait_for(self._arrived.wait(), left)
                except TimeoutError:
                    break
            items = self._take(kind)
            if items:
                await self._run(kind, items)

    def _dequeued(self, it: _Item) -> None:
        self.queued_tokens -= it.tokens
        self.kind_tokens[it.job.kind] -= it.tokens

    def _take(self, kind: str) -> list[_Item]:
        """Rows of `kind`, oldest first, up to the token budget (at least one); dropped: rows of callers gone."""
        taken, rest, tokens = [], deque(), 0
        while self.queue:
            it = self.queue.popleft()
            if it.job.future.done():  # the caller went away (cancelled): skip its rows
                self._dequeued(it)
                continue
            if it.job.kind == kind and (not taken or tokens + it.tokens <= self.max_batch_tokens):
                taken.append(it)
                tokens += it.tokens
                self._dequeued(it)
            else:
                rest.append(it)
                if it.job.kind == kind:  # budget full: keep the rest in order
                    rest.extend(self.queue)
                    self.queue.clear()
        self.queue = rest
        self._gauge()
        return taken

    async def _run(self, kind: str, items: list[_Item]) -> None:
        loop = asyncio.get_running_loop()
        tokens = sum(it.tokens for it in items)
        jobs = {id(it.job): it.job for it in items}
        self.busy = True
        start = time.perf_counter()
        try:
            results = await loop.run_in_executor(self.executor, self.runners[kind], [it.row for it in items])
        except Exception as exc:  # the model failed: every caller in this batch gets the error
            for job in jobs.values():
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        finally:
            self.busy = False
        seconds = time.perf_counter() - start
        self._seconds_per_token = 0.8 * self._seconds_per_token + 0.2 * seconds / tokens
        self.metrics.observe_batch(self.model, kind, len(items), tokens, len(jobs), seconds)
        for it, result in zip(items, results):
            job = it.job
            job.results[it.index] = result
            job.pending -= 1
            if job.pending == 0 and not job.future.done():
                job.future.set_result(job.results)

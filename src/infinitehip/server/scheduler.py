"""A bounded request queue in front of one worker thread that drives a continuous-batching runner.

The worker owns the model. Each round it takes newly submitted requests (``runner.add``), drops
the ones whose client went away (``runner.cancel``: the slot and its KV are freed at once), runs
one ``runner.step()`` (a prefill budget, then one decode step for every active request) and
hands each event to its request. Requests beyond ``max_batch`` running + ``max_queue`` waiting
are refused at once (the app answers 429); after ``close`` or a worker crash, 503.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Protocol

from ..engine.sampling import SamplingParams

log = logging.getLogger("infinitehip.server")
_DONE = object()


class QueueFull(Exception):
    """The scheduler already holds its maximum number of requests."""


class Unavailable(Exception):
    """The scheduler is shutting down, or its worker stopped."""


class EngineFailure(RuntimeError):
    """A step failed inside the engine; the request was dropped (the log has the traceback)."""


class Runner(Protocol):
    """What the worker drives (``server.engine.ModelEngine``, or a test double)."""

    max_batch: int
    has_work: bool

    def add(self, prompt, params: SamplingParams) -> int: ...          # ValueError: a bad request
    def step(self) -> list: ...      # events with .request .text .n_generated .finished .finish_reason
    def cancel(self, request: int) -> bool: ...
    def abort(self) -> list[int]: ...       # after a failed step: drop the requests it was running


class Job:
    """One request's handle: its events arrive in order, then the end (or an exception)."""

    def __init__(self, prompt, params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None):
        self.prompt, self.params = prompt, params
        self.cancelled = threading.Event()
        self._loop = loop  # given: events are delivered to an asyncio queue on that loop
        self._out = asyncio.Queue() if loop is not None else queue.Queue()

    def put(self, item):
        """Called by the worker thread."""
        if self._loop is None:
            self._out.put(item)
            return
        try:
            self._loop.call_soon_threadsafe(self._out.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    def results(self) -> Iterator[object]:
        """Events as the worker produces them (no loop given); re-raises the worker's exception."""
        while (item := self._out.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item

    async def aresults(self) -> AsyncIterator[object]:
        """The same, awaited on the loop given at creation."""
        while (item := await self._out.get()) is not _DONE:
            if isinstance(item, BaseException):
                raise item
            yield item


class Scheduler:
    def __init__(self, runner: Runner, max_queue: int = 64):
        self.runner, self.max_queue = runner, max_queue
        self._inbox: queue.Queue[Job | None] = queue.Queue()
        self._lock = threading.Lock()
        self._outstanding = 0              # submitted and not yet finished (any thread)
        self._jobs: dict[int, Job] = {}    # runner request id -> job (worker thread only)
        self._closing = threading.Event()
        self._stopped = False              # the worker has left its loop (set under the lock)
        self.error: BaseException | None = None
        self._worker = threading.Thread(target=self._loop, name="infinitehip-worker", daemon=True)
        self._worker.start()

    @property
    def alive(self) -> bool:
        return self._worker.is_alive() and not self._closing.is_set()

    @property
    def limit(self) -> int:
        return self.runner.max_batch + self.max_queue

    def submit(self, prompt, params: SamplingParams, loop: asyncio.AbstractEventLoop | None = None) -> Job:
        # Under the lock with the worker's exit: a job is queued before the worker's last drain of
        # the inbox (which ends it), or refused; never left where no one takes it.
        with self._lock:
            if self._closing.is_set():
                raise Unavailable("the server is shutting down")
            if self._stopped or not self._worker.is_alive():
                raise Unavailable("the generation worker stopped after an internal error (see the server log); "
                                  "restart the server")
            if self._outstanding >= self.limit:
                raise QueueFull(f"{self._outstanding} requests are already running or waiting "
                                f"(max_batch {self.runner.max_batch} + max_queue {self.max_queue})")
            self._outstanding += 1
            job = Job(prompt, params, loop)
            self._inbox.put(job)
        return job

    def close(self):
        self._closing.set()
        self._inbox.put(None)   # wakes an idle worker
        self._worker.join(timeout=30)

    @property
    def outstanding(self) -> int:
        return self._outstanding

    def _loop(self):
        try:
            while not self._closing.is_set():
                self._take_new(wait=not self._jobs)
                self._drop_cancelled()
                if self._jobs:
                    self._step()
        except BaseException as e:  # a bug in the loop itself: later requests get 503
            self.error = e
            log.exception("the generation worker stopped")
        finally:
            with self._lock:
                self._stopped = True
            for rid in list(self._jobs):
                self._finish(rid, Unavailable("the server stopped before this request finished"))
            while True:  # requests submitted but never taken
                try:
                    job = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    self._end(job, Unavailable("the server stopped before this request started"))

    def _take_new(self, wait: bool):
        """Hand newly submitted jobs to the runner; block for one when nothing runs."""
        while True:
            try:
                job = self._inbox.get(timeout=0.5) if wait else self._inbox.get_nowait()
            except queue.Empty:
                if wait and not self._closing.is_set():
                    continue
                return
            if job is None:
                return
            wait = False
            if job.cancelled.is_set():
                self._end(job)
                continue
            try:
                self._jobs[self.runner.add(job.prompt, job.params)] = job
            except ValueError as e:  # the request itself is bad: a 400 for it alone
                self._end(job, e)
            except Exception:   # a bug while queueing it (nothing is held yet): a 500 for it alone
                log.exception("queueing a request failed; dropping it")
                self._end(job, EngineFailure("internal error while starting this request"))
            except BaseException:   # the worker goes down: this job ends with the others, not never
                self._end(job, Unavailable("the server stopped before this request started"))
                raise

    def _drop_cancelled(self):
        for rid, job in list(self._jobs.items()):
            if job.cancelled.is_set():
                self.runner.cancel(rid)
                self._finish(rid)

    def _step(self):
        try:
            events = self.runner.step()
        except Exception:
            # Every request holding a slot may have half-written KV: fail those, keep serving.
            log.exception("engine step failed; dropping the requests it was running")
            for rid in self.runner.abort():
                self._finish(rid, EngineFailure("internal error while generating"))
            return
        for e in events:
            job = self._jobs.get(e.request)
            if job is not None:
                job.put(e)
                if e.finished:
                    self._finish(e.request)

    def _finish(self, rid: int, error: BaseException | None = None):
        job = self._jobs.pop(rid, None)
        if job is not None:
            self._end(job, error)

    def _end(self, job: Job, error: BaseException | None = None):
        if error is not None:
            job.put(error)
        job.put(_DONE)
        with self._lock:
            self._outstanding -= 1

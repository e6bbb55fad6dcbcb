"""A bounded request queue in front of one worker thread that owns the model.

Requests never share model state: the worker runs them one at a time, so concurrent clients get
exactly the answers they get alone. A full queue is refused at once (the app answers 429), and a
client that goes away cancels its request, which frees its KV cache at the next token.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

_DONE = object()


class QueueFull(Exception):
    """The scheduler already holds its maximum number of waiting requests."""


@dataclass
class Job:
    run: Callable[[threading.Event], Iterator[object]]   # yields pieces; checks the event to stop early
    out: "queue.Queue[object]" = field(default_factory=queue.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def results(self) -> Iterator[object]:
        """Pieces as the worker produces them; re-raises the worker's exception, if any."""
        while True:
            item = self.out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item


class Scheduler:
    def __init__(self, max_queue: int = 64):
        self._jobs: "queue.Queue[Job | None]" = queue.Queue(maxsize=max_queue)
        self._worker = threading.Thread(target=self._loop, name="infinitehip-worker", daemon=True)
        self._worker.start()

    def submit(self, run: Callable[[threading.Event], Iterator[object]]) -> Job:
        job = Job(run)
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            raise QueueFull(f"{self._jobs.maxsize} requests are already waiting") from None
        return job

    def close(self):
        self._jobs.put(None)
        self._worker.join(timeout=10)

    def _loop(self):
        while (job := self._jobs.get()) is not None:
            if job.cancelled.is_set():
                continue
            try:
                for piece in job.run(job.cancelled):
                    job.out.put(piece)
                    if job.cancelled.is_set():
                        break
            except BaseException as e:  # handed to the request that caused it
                job.out.put(e)
            job.out.put(_DONE)

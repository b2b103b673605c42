"""One model, a bounded queue and a fixed number of engine slots.

A request is *admitted* (or refused with :class:`QueueFull` when the queue is
full), *waits* for a slot, then *runs* in a worker thread. A client that goes
away while waiting leaves the queue; one that goes away while running has its
:class:`Job` cancelled, which stops the work at the next denoising step or
decoded token. A slot is freed only when its thread has really stopped, so the
engine never runs more than ``max_concurrency`` jobs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from openbagel.serve.metrics import Metrics

log = logging.getLogger("openbagel.serve")
T = TypeVar("T")

#: Seconds between checks for a disconnected client.
POLL_SECONDS = 0.1


class QueueFull(Exception):
    """The queue is full; the client should retry later (HTTP 429)."""


class NotReady(Exception):
    """The model is still loading, or failed to load (HTTP 503)."""


class Cancelled(Exception):
    """The client went away; the job stopped at a step boundary."""


class Job:
    """The cancellation flag and the token count of one request's work.

    ``on_step`` and ``on_token`` are the hooks handed to the pipeline: they
    raise :class:`Cancelled` once :meth:`cancel` has been called.
    """

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._cancelled = threading.Event()
        self.tokens = 0
        self._metrics = metrics

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def check(self) -> None:
        """Raise :class:`Cancelled` if the job was cancelled."""
        if self._cancelled.is_set():
            raise Cancelled()

    def on_step(self, step=None) -> None:
        self.check()

    def on_token(self, token: int) -> None:
        self.tokens += 1
        if self._metrics is not None:
            self._metrics.tokens.inc()
        self.check()


class ModelLoad:
    """Builds the model once, in a background thread started by the first
    :meth:`start`; a failure is kept in ``error`` (``"Type: message"``), not raised.

    Args:
        load: builds the :class:`~openbagel.pipeline.BagelPipeline`.
    """

    def __init__(self, load: Callable[[], object]):
        self.load = load
        self.value = None
        self.error: str | None = None
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._started = False

    def start(self) -> None:
        with self._lock:
            if self._started:
                return
            self._started = True
        threading.Thread(target=self._run, name="openbagel-load", daemon=True).start()

    def _run(self) -> None:
        start = time.perf_counter()
        try:
            self.value = self.load()
            log.info("model loaded in %.1f s; ready", time.perf_counter() - start)
        except Exception as e:  # reported to whoever asks for the model
            self.error = f"{type(e).__name__}: {e}"
            log.error("model failed to load: %s", self.error)
        finally:
            self._done.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until loading finished (either way); False on timeout."""
        return self._done.wait(timeout)


class Engine:
    """Runs jobs on one pipeline, ``max_concurrency`` at a time, at most
    ``max_queue`` more waiting.

    Args:
        load: builds the pipeline; called once in a background thread by :meth:`start` (:class:`ModelLoad`).
        max_queue: admitted requests that may wait for a slot.
        max_concurrency: jobs running at once (threads).
        metrics: where queue depth and in-flight counts are reported.
    """

    def __init__(self, load: Callable[[], object], max_queue: int, max_concurrency: int, metrics: Metrics):
        self.model = ModelLoad(load)
        self.max_queue, self.max_concurrency = max_queue, max_concurrency
        self.metrics = metrics
        self._pool = ThreadPoolExecutor(max_workers=max_concurrency, thread_name_prefix="openbagel-engine")
        self._slots: asyncio.Semaphore | None = None
        self.waiting = 0
        self.running = 0
        self._jobs: set[Job] = set()

    # -- loading ---------------------------------------------------------

    def start(self) -> None:
        """Load the model in a background thread (``/ready`` turns 200 when done)."""
        self.model.start()

    def wait_loaded(self, timeout: float | None = None) -> bool:
        """Block until loading finished (either way); False on timeout."""
        return self.model.wait(timeout)

    @property
    def pipe(self):
        return self.model.value

    @property
    def load_error(self) -> str | None:
        return self.model.error

    @property
    def ready(self) -> bool:
        return self.pipe is not None

    def require_pipe(self):
        """The loaded pipeline.

        Raises:
            NotReady: the model is still loading, or failed to load.
        """
        if self.pipe is None:
            raise NotReady(self.load_error or "the model is still loading")
        return self.pipe

    # -- admission and running -------------------------------------------

    @property
    def full(self) -> bool:
        """Whether :meth:`admit` would refuse now (every slot busy, ``max_queue`` waiting)."""
        return self.waiting + self.running >= self.max_queue + self.max_concurrency

    def admit(self) -> None:
        """Take a place in the queue, synchronously (call it before the first ``await``).

        Raises:
            NotReady: the model is not loaded.
            QueueFull: ``max_queue`` requests already wait and every slot is busy.
        """
        self.require_pipe()
        if self.full:
            raise QueueFull()
        self.waiting += 1
        self._gauges()

    async def run(
        self,
        fn: Callable[[Job], T],
        job: Job,
        is_disconnected: Callable[[], Awaitable[bool]] | None = None,
    ) -> T:
        """Wait for a slot, then run ``fn(job)`` in a worker thread; needs a prior :meth:`admit`.

        Raises:
            Cancelled: the client went away (while waiting, or ``fn`` stopped on it).
            Whatever ``fn`` raises.
        """
        if self._slots is None:
            self._slots = asyncio.Semaphore(self.max_concurrency)
        try:
            acquire = asyncio.ensure_future(self._slots.acquire())
            try:
                while not await self._done(acquire, is_disconnected):
                    pass
            except BaseException:
                if acquire.done() and not acquire.cancelled():
                    self._slots.release()
                acquire.cancel()
                raise
        finally:
            self.waiting -= 1
            self._gauges()
        self.running += 1
        self._jobs.add(job)
        self._gauges()
        fut = asyncio.get_running_loop().run_in_executor(self._pool, fn, job)
        try:
            while not await self._done(fut, is_disconnected, job):
                pass
            return fut.result()
        except BaseException:
            job.cancel()
            raise
        finally:
            if fut.done():
                self._finish(job)
            else:  # the slot stays taken until the thread has stopped
                fut.add_done_callback(lambda f: self._finish(job, f))

    async def _done(self, fut: asyncio.Future, is_disconnected, job: Job | None = None) -> bool:
        done, _ = await asyncio.wait({fut}, timeout=POLL_SECONDS)
        if done:
            return True
        if is_disconnected is not None and await is_disconnected():
            if job is None:  # still waiting: leave the queue now
                raise Cancelled()
            job.cancel()  # running: the thread stops at its next step
        return False

    def _finish(self, job: Job, fut: asyncio.Future | None = None) -> None:
        if fut is not None and not fut.cancelled():
            fut.exception()  # collected: the job ended after its request (a client that left)
        self.running -= 1
        self._jobs.discard(job)
        self._slots.release()
        self._gauges()

    @property
    def queue_depth(self) -> int:
        """Admitted requests that cannot start now for want of a slot.

        Not ``waiting`` itself: a finished job frees its slot a moment before
        the next request resumes to take it, and a request admitted in between
        would otherwise show one more waiting than the queue holds.
        """
        return max(0, self.waiting + self.running - self.max_concurrency)

    def _gauges(self) -> None:
        self.metrics.queue_depth.set(self.queue_depth)
        self.metrics.in_flight.set(self.running)

    def close(self) -> None:
        """Cancel running jobs and stop the worker threads."""
        for job in list(self._jobs):
            job.cancel()
        self._pool.shutdown(wait=False, cancel_futures=True)

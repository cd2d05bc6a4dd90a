"""Work on threads: the pool that hashes and writes file blocks, and waiting for thread work.

Hashing and writing let go of the GIL, so they run beside the event loop's parsing.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections import deque
from concurrent.futures import CancelledError, Executor, Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

T = TypeVar("T")

# Threads that hash and write files (blocks.BLOCK_SIZE blocks), per app: the
# event loop parses while they work, mostly without the GIL. No more than the cores
# (more were slower with many uploads at once: bench/README).
WRITE_THREADS = min(4, os.cpu_count() or 1)


class WriterPool:
    """Threads that hash and write file blocks, knowing how many of them are busy.

    The event loop holds the GIL while it parses. A writer thread needs the GIL for
    a moment to begin a block (then hashlib and os.write let go of it), and would get
    it only when the loop next blocks: the two would take turns instead of working
    side by side (in process, CPU time = wall time). So when a thread is free,
    `submit` waits, off the GIL and for at most HANDSHAKE_SECONDS, until the job says
    it is about to hash. With every thread busy it does not wait: the loop must never
    stall behind other uploads' blocks.
    """

    HANDSHAKE_SECONDS = 0.002

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="upload-asgi-write")
        self._lock = threading.Lock()
        self._busy = 0

    def submit(self, fn: Callable[..., None], *args: Any, handshake: bool = True) -> Future[None]:
        """Run `fn(*args, started=event)`; `fn` sets the event just before it lets go of the GIL.

        `handshake=False` for a job the loop will await next (a file's last block):
        there is no parsing to overlap, and waiting could only delay the loop.
        """
        with self._lock:
            idle = self._busy < self.threads
            self._busy += 1
        started = threading.Event()
        future = self._executor.submit(self._run, fn, args, started)
        # Done or cancelled before it ran (an aborted upload): either way, no longer busy.
        future.add_done_callback(self._job_over)
        if idle and handshake:
            started.wait(self.HANDSHAKE_SECONDS)
        return future

    @property
    def busy(self) -> int:
        """Jobs submitted and not yet over (running or queued)."""
        return self._busy

    def _run(self, fn: Callable[..., None], args: tuple[Any, ...], started: threading.Event) -> None:
        try:
            fn(*args, started=started)
        finally:
            started.set()

    def _job_over(self, _future: Future[None]) -> None:
        with self._lock:
            self._busy -= 1


class InOrder:
    """One file's write jobs, run on the pool in the order given, one at a time.

    A job handed in while the last one runs is taken by the same thread as soon as
    that one ends, without a trip back to the event loop (a wake-up and a hand-off
    per block). When other jobs wait for a thread, the rest goes to the back of the
    pool's queue instead, so that a long upload never keeps a thread from the others.
    Once a job fails or is cancelled, every later job fails or is cancelled unrun: no
    block is written after a missing one.
    """

    def __init__(self, pool: WriterPool) -> None:
        self._pool = pool
        self._lock = threading.Lock()
        self._waiting: deque[tuple[Callable[..., None], tuple[Any, ...], Future[None]]] = deque()
        self._running = False  # a pool job of ours is running or queued
        self._failure: BaseException | None = None

    def submit(self, fn: Callable[..., None], *args: Any, handshake: bool = True) -> Future[None]:
        """Like `WriterPool.submit` (the handshake only when no job of ours is running);
        `fn` gets `started=None` when it follows a job of ours."""
        future: Future[None] = Future()
        with self._lock:
            self._waiting.append((fn, args, future))
            if self._running:
                return future
            self._running = True
        try:
            self._pool.submit(self._run_waiting, handshake=handshake)
        except BaseException:
            with self._lock:
                self._waiting.pop()
                self._running = False
            raise
        return future

    def _run_waiting(self, started: threading.Event | None, take_turns: bool = True) -> None:
        ran = False
        while True:
            with self._lock:
                if not self._waiting:
                    self._running = False
                    return
                if ran and take_turns and self._pool.busy > self._pool.threads:
                    break  # others wait for a thread: take turns
                fn, args, future = self._waiting.popleft()
            self._run(fn, args, future, started)
            started, ran = None, True
        try:
            self._pool.submit(self._run_waiting, handshake=False)
        except RuntimeError:  # the pool takes no more jobs (interpreter exit): finish here
            self._run_waiting(None, take_turns=False)

    def _run(self, fn: Callable[..., None], args: tuple[Any, ...], future: Future[None],
             started: threading.Event | None) -> None:
        # Every future goes through set_running_or_notify_cancel: a cancelled one that is not told so
        # stays "not done" for concurrent.futures.wait, and an aborted upload waited for ever.
        if not future.set_running_or_notify_cancel():  # cancelled by an aborted upload
            self._failure = self._failure or CancelledError()
        elif self._failure is None:
            try:
                fn(*args, started=started)
            except BaseException as exc:
                self._failure = exc
                future.set_exception(exc)
            else:
                future.set_result(None)
            return
        else:  # after a failed or cancelled one: never runs, fails the same
            future.set_exception(self._failure)
        if started is not None:
            started.set()  # nothing runs: the loop need not wait


async def wait_through_cancel(future: asyncio.Future[Any]) -> bool:
    """Wait until `future` (work on a thread, which cannot be stopped) is done, even if
    this task is cancelled meanwhile; return whether it was, for the caller to re-raise."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    if not future.cancelled():
        future.exception()  # read: callers take the outcome from the thread's own future
    return cancelled


async def run_blocking(fn: Callable[..., T], *args: Any, executor: Executor | None = None) -> T:
    """Run store work on a thread (of `executor`, else the loop's default); if cancelled meanwhile,
    let it finish first (it holds a lock)."""
    future = asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    if await wait_through_cancel(future):
        raise asyncio.CancelledError
    return future.result()

"""Appending a request body to a resumable upload: in blocks, on a writer thread.

The store's blocking work (`ResumableUpload` methods) runs on threads; `run_blocking`
waits for it even through a cancel, because the work holds the upload's lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from collections import deque
from concurrent.futures import Future
from typing import Any, Callable, TypeVar

from upload_service.storage import ResumableUpload
from upload_service.threads import InOrder, WriterPool, wait_through_cancel
from upload_service.units import MiB

T = TypeVar("T")

APPEND_BLOCK_SIZE = 1 * MiB  # as targets.WRITE_BLOCK_SIZE: one thread handoff per MiB
BLOCKS_IN_FLIGHT = 2  # as targets.BLOCKS_IN_FLIGHT: the writer goes on to the next without the loop
# A body that pauses this long has what arrived written, without waiting for a full block.
IDLE_HAND_OFF_SECONDS = 0.05


class AppendBody:
    """A `BodyConsumer` that appends a request body to an upload, on a writer thread.

    Like `targets.UploadFileTarget`: chunks gather into blocks of APPEND_BLOCK_SIZE;
    the writer hashes each (the per-chunk checksum, if any) and appends it (which
    counts it into the whole-file SHA-256), in order, one at a time (`threads.InOrder`),
    while the loop reads on; with BLOCKS_IN_FLIGHT blocks with it, `write_backlog` says
    which to wait for. Unlike a form's file, a part block does not wait for more: when
    the body pauses for IDLE_HAND_OFF_SECONDS, what arrived is handed off, so a client
    that stops mid-`PATCH` has its bytes on disk, in the offset a `HEAD` reports, kept
    if the server dies.
    """

    def __init__(self, upload: ResumableUpload, pool: WriterPool, checksum: str | None) -> None:
        self.upload = upload
        self.checksum = hashlib.new(checksum) if checksum else None
        self._writer = InOrder(pool)
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._jobs: deque[Future[None]] = deque()  # blocks with the writer, oldest first
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= APPEND_BLOCK_SIZE:
            self.hand_off()
        if self._timer is None and self._chunks:
            self._timer = self._loop.call_later(IDLE_HAND_OFF_SECONDS, self._hand_off_idle)

    def write_backlog(self) -> Future[None] | None:
        if self._buffered < APPEND_BLOCK_SIZE:
            return None
        self.hand_off()
        return self._jobs[0] if self._buffered >= APPEND_BLOCK_SIZE else None

    def hand_off(self) -> None:
        """Give what waits to the writer, unless it has BLOCKS_IN_FLIGHT of ours."""
        while self._jobs and self._jobs[0].done():
            self._jobs.popleft().result()  # a failed write raises here
        if not self._chunks or len(self._jobs) >= BLOCKS_IN_FLIGHT:
            return
        # Joined here, as a form's blocks are: off the writer's path.
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        block = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._jobs.append(self._writer.submit(self._append, block))

    def _hand_off_idle(self) -> None:
        """The body paused: write what waits (once the writer has room)."""
        self._timer = None
        if any(job.done() and job.exception() is not None for job in self._jobs):
            return  # the failure is raised where the body is read
        self.hand_off()
        if self._chunks:
            self._timer = self._loop.call_later(IDLE_HAND_OFF_SECONDS, self._hand_off_idle)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def flush(self) -> None:
        """Write every byte received so far; wait for it even if cancelled meanwhile."""
        self._stop_timer()
        while True:
            self.hand_off()
            if not self._jobs:
                return
            if await wait_through_cancel(asyncio.wrap_future(self._jobs[0])):
                await self.settle()
                raise asyncio.CancelledError

    async def settle(self) -> None:
        """After a failure: drop what is not yet handed off, wait for what is being written."""
        self._stop_timer()
        self._chunks, self._buffered = [], 0
        # The writer runs our jobs in order: once the last is done, all are.
        if self._jobs and await wait_through_cancel(asyncio.wrap_future(self._jobs[-1])):
            raise asyncio.CancelledError

    def _append(self, data: bytes, started: threading.Event | None = None) -> None:
        if started is not None:
            started.set()  # WriterPool: we let go of the GIL now
        if self.checksum is not None:
            self.checksum.update(data)
        self.upload.append(data)


async def run_blocking(fn: Callable[..., T], *args: Any) -> T:
    """Run store work on a thread; if cancelled meanwhile, let it finish first (it holds a lock)."""
    future = asyncio.get_running_loop().run_in_executor(None, fn, *args)
    if await wait_through_cancel(future):
        raise asyncio.CancelledError
    return future.result()


"""Appending a request body to a resumable upload: in blocks, on a writer thread.

The store's blocking work (`ResumableUpload` methods) runs on threads; `run_blocking`
waits for it even through a cancel, because the work holds the upload's lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from concurrent.futures import Executor, Future
from typing import Any, Callable, TypeVar

from upload_service.storage import ResumableUpload
from upload_service.threads import wait_through_cancel
from upload_service.units import MiB

T = TypeVar("T")

APPEND_BLOCK_SIZE = 1 * MiB  # as targets.WRITE_BLOCK_SIZE: one thread handoff per MiB


class AppendBody:
    """A `BodyConsumer` that appends a request body to an upload, on a writer thread.

    Like `targets.UploadFileTarget`, one job at a time is hashed (the per-chunk
    checksum, if any) and appended (which counts it into the whole-file SHA-256)
    while the loop reads on; what arrives meanwhile waits in memory, at most
    APPEND_BLOCK_SIZE before the loop waits for the writer. Unlike a form's file,
    what waits is handed off as soon as the writer is free, not when more arrives:
    a client that pauses mid-`PATCH` has its bytes on disk, counted in the offset
    a `HEAD` reports and kept if the server dies.
    """

    def __init__(self, upload: ResumableUpload, executor: Executor, checksum: str | None) -> None:
        self.upload = upload
        self.executor = executor
        self.checksum = hashlib.new(checksum) if checksum else None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._loop = asyncio.get_running_loop()
        self.job: Future[None] | None = None

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        self.hand_off()

    def write_backlog(self) -> Future[None] | None:
        self.hand_off()
        return self.job if self._buffered >= APPEND_BLOCK_SIZE else None

    def hand_off(self) -> None:
        """Give what waits to the writer, unless it is still busy with the last job."""
        job = self.job
        if not self._chunks or (job is not None and not job.done()):
            return
        if job is not None:
            job.result()  # a failed write raises here
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        self.job = self.executor.submit(self._append, chunks)
        self.job.add_done_callback(self._written)

    def _written(self, job: Future[None]) -> None:
        """On the writer thread: a job is over; the loop hands off what arrived meanwhile."""
        if not job.cancelled() and job.exception() is None:
            self._loop.call_soon_threadsafe(self._hand_off_waiting, job)

    def _hand_off_waiting(self, job: Future[None]) -> None:
        if self.job is job:  # nobody handed off since (feed, flush, settle)
            self.hand_off()

    async def flush(self) -> None:
        """Write every byte received so far; wait for it even if cancelled meanwhile."""
        while True:
            job = self.job
            if job is not None:
                if await wait_through_cancel(asyncio.wrap_future(job)):
                    self._chunks, self._buffered = [], 0
                    await self.settle()
                    raise asyncio.CancelledError
                job.result()
            if self.job is not job:
                continue  # the writer's callback handed off more meanwhile
            if not self._chunks:
                return
            self.hand_off()

    async def settle(self) -> None:
        """After a failure: drop what is not yet handed off, wait for what is being written."""
        self._chunks, self._buffered = [], 0
        cancelled = False
        while self.job is not None and not self.job.done():
            cancelled = await wait_through_cancel(asyncio.wrap_future(self.job)) or cancelled
        if cancelled:
            raise asyncio.CancelledError

    def _append(self, chunks: list[bytes], started: threading.Event | None = None) -> None:
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
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


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
    """A `BodyConsumer` that appends a request body to an upload, in blocks, on a writer thread.

    Like `targets.UploadFileTarget`: chunks gather into blocks of APPEND_BLOCK_SIZE;
    one block at a time is hashed (the per-chunk checksum, if any) and appended
    (which counts it into the whole-file SHA-256) while the loop reads on.
    """

    def __init__(self, upload: ResumableUpload, executor: Executor, checksum: str | None) -> None:
        self.upload = upload
        self.executor = executor
        self.checksum = hashlib.new(checksum) if checksum else None
        self._chunks: list[bytes] = []
        self._buffered = 0
        self.job: Future[None] | None = None

    def feed(self, chunk: bytes) -> None:
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= APPEND_BLOCK_SIZE:
            self.hand_off()

    def write_backlog(self) -> Future[None] | None:
        self.hand_off()
        return self.job if self._buffered >= APPEND_BLOCK_SIZE else None

    def hand_off(self) -> None:
        if not self._chunks or (self.job is not None and not self.job.done()):
            return
        if self.job is not None:
            self.job.result()  # a failed write raises here
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        self.job = self.executor.submit(self._append, chunks)

    async def flush(self) -> None:
        """Write every byte received so far; wait for it even if cancelled meanwhile."""
        while True:
            if self.job is not None:
                cancelled = await wait_through_cancel(asyncio.wrap_future(self.job))
                if cancelled:
                    self._chunks, self._buffered = [], 0
                    raise asyncio.CancelledError
                self.job.result()
            if not self._chunks:
                return
            self.hand_off()

    async def settle(self) -> None:
        """After a failure: drop what is not yet handed off, wait for the block being written."""
        self._chunks, self._buffered = [], 0
        if self.job is not None:
            cancelled = await wait_through_cancel(asyncio.wrap_future(self.job))
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


"""Appending a request body to a resumable upload: in blocks, on a writer thread.

The store's blocking work (`ResumableUpload` methods) runs on threads; `run_blocking`
waits for it even through a cancel, because the work holds the upload's lock.
"""

from __future__ import annotations

import asyncio
import hashlib
import threading
from concurrent.futures import Future

from upload_service.blocks import BlockQueue
from upload_service.storage import ResumableUpload
from upload_service.threads import WriterPool, wait_through_cancel

# A body that pauses this long has what arrived written, without waiting for a full block.
IDLE_HAND_OFF_SECONDS = 0.05


class AppendBody:
    """A `BodyConsumer` that appends a request body to an upload, on a writer thread.

    As a form's file (`targets.UploadFileTarget`), in 1 MiB blocks (`blocks.BlockQueue`):
    the writer hashes each (the per-chunk checksum, if any) and appends it (which
    counts it into the whole-file SHA-256), in order, while the loop reads on.
    Unlike a form's file, a part block does not wait for more: when the body pauses
    for IDLE_HAND_OFF_SECONDS, what arrived is handed off, so a client that stops
    mid-`PATCH` has its bytes written (kept by `keep`; the store says when they count
    in the offset a `HEAD` reports: a body that may be refused whole is not counted
    until it ends).
    """

    def __init__(self, upload: ResumableUpload, pool: WriterPool, checksum: str | None) -> None:
        self.upload = upload
        self.checksum = hashlib.new(checksum) if checksum else None
        self._blocks = BlockQueue(pool, self._append)
        self._loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None

    def feed(self, chunk: bytes) -> None:
        self._blocks.add(chunk)
        if self._timer is None and self._blocks.chunks:
            self._timer = self._loop.call_later(IDLE_HAND_OFF_SECONDS, self._hand_off_idle)

    def write_backlog(self) -> Future[None] | None:
        return self._blocks.backlog()

    def _hand_off_idle(self) -> None:
        """The body paused: write what waits (once the writer has room)."""
        self._timer = None
        if self._blocks.failed:
            return  # the failure is raised where the body is read
        self._blocks.hand_off()
        if self._blocks.chunks:
            self._timer = self._loop.call_later(IDLE_HAND_OFF_SECONDS, self._hand_off_idle)

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    async def flush(self) -> None:
        """Write every byte received so far; wait for it even if cancelled meanwhile."""
        self._stop_timer()
        while True:
            self._blocks.hand_off()
            job = self._blocks.oldest
            if job is None:
                return
            if await wait_through_cancel(asyncio.wrap_future(job)):
                await self.settle()
                raise asyncio.CancelledError

    async def settle(self) -> None:
        """After a failure: drop what is not yet handed off, wait for what is being written."""
        self._stop_timer()
        self._blocks.drop()
        # The writer runs our jobs in order: once the last is done, all are.
        last = self._blocks.last
        if last is not None and await wait_through_cancel(asyncio.wrap_future(last)):
            raise asyncio.CancelledError

    def _append(self, data: bytes, started: threading.Event | None = None) -> None:
        if started is not None:
            started.set()  # WriterPool: we let go of the GIL now
        if self.checksum is not None:
            self.checksum.update(data)
        self.upload.append(data)

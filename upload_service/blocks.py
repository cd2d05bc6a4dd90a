"""A stream's bytes gathered into blocks that a writer thread takes, in order.

The event loop adds each chunk as it arrives; every BLOCK_SIZE of them is joined into
one block and handed to the writer pool, where one thread at a time hashes and writes
a stream's blocks (`threads.InOrder`) while the loop reads on. With BLOCKS_IN_FLIGHT
of them with the writer, a full block waits, and `backlog` names the job to wait for:
that is the backpressure that pauses the client. A form's file
(`targets.UploadFileTarget`) and a `PATCH` body (`appending.AppendBody`) are written so.
"""

from __future__ import annotations

from collections import deque
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_futures
from typing import Callable

from upload_service.threads import InOrder, WriterPool
from upload_service.units import MiB

# One thread hand-off per MiB instead of one per 64 KiB read (bench/ measured 256 KiB
# to 4 MiB), and at most ~3 blocks per stream in memory.
BLOCK_SIZE = 1 * MiB
# Blocks with the writer at once: one being written, the next waiting, so that the
# writer goes on to it without waiting for the event loop (threads.InOrder).
BLOCKS_IN_FLIGHT = 2
# Chunks smaller than this are copied together as they come: kept one object each, a
# block of 1-byte chunks (chunked coding, HTTP/2 DATA frames) held dozens of bytes a byte.
SMALL_CHUNK = 4096


class BlockQueue:
    """Chunks gathered into blocks for `write(block, started=...)` on a writer thread.

    `add` each chunk (a full block is handed off at once if the writer has room);
    `end` when the stream ends, so that the rest is a block too; after each chunk,
    wait for `backlog()` until it is None. A failed write raises from the next
    hand-off, on the loop's side, and no later block is written.
    """

    def __init__(self, pool: WriterPool, write: Callable[..., None]) -> None:
        self._writer = InOrder(pool)
        self._write = write
        self.chunks: list[bytes | bytearray] = []  # received, not yet handed off
        self.buffered = 0
        self.ended = False
        self._jobs: deque[Future[None]] = deque()  # blocks with the writer, oldest first

    def add(self, chunk: bytes) -> None:
        if len(chunk) >= SMALL_CHUNK:
            self.chunks.append(chunk)
        elif self.chunks and isinstance(self.chunks[-1], bytearray):
            self.chunks[-1] += chunk
        else:
            self.chunks.append(bytearray(chunk))
        self.buffered += len(chunk)
        if self.buffered >= BLOCK_SIZE:
            self.hand_off()

    def end(self) -> None:
        """No more chunks: what waits is the last block (handed off without the handshake:
        the loop awaits it next, with nothing to parse meanwhile)."""
        self.ended = True
        if self.chunks:
            self.hand_off()

    @property
    def ready(self) -> bool:
        """A block waits for the writer: a full one, or the last."""
        return self.buffered >= BLOCK_SIZE or (self.ended and bool(self.chunks))

    def hand_off(self) -> None:
        """Give what waits to the writer as one block, unless it has BLOCKS_IN_FLIGHT of ours."""
        while self._jobs and self._jobs[0].done():
            self._jobs.popleft().result()  # a failed write (ENOSPC) raises here
        if not self.chunks or len(self._jobs) >= BLOCKS_IN_FLIGHT:
            return
        # Joined here: the GIL is held for the copy wherever it runs, and here it is off
        # the writer's path (hashing and writing, without the GIL, once each a block).
        chunks, self.chunks, self.buffered = self.chunks, [], 0
        block = chunks[0] if len(chunks) == 1 and isinstance(chunks[0], bytes) else b"".join(chunks)
        self._jobs.append(self._writer.submit(self._write, block, handshake=not self.ended))

    def backlog(self) -> Future[None] | None:
        """The job to wait for before adding more: a block that is ready waits on it."""
        if not self.ready:
            return None  # most chunks
        self.hand_off()
        return self._jobs[0] if self.ready else None

    def submit(self, write: Callable[..., None], data: bytes) -> None:
        """Queue other work for the writer, in order with the blocks (no handshake)."""
        self._jobs.append(self._writer.submit(write, data, handshake=False))

    def take(self) -> bytes:
        """Take back what was not handed off, as one block."""
        chunks, self.chunks, self.buffered = self.chunks, [], 0
        return b"".join(chunks)

    def drop(self) -> None:
        """Forget what was not handed off."""
        self.chunks, self.buffered = [], 0

    @property
    def oldest(self) -> Future[None] | None:
        return self._jobs[0] if self._jobs else None

    @property
    def last(self) -> Future[None] | None:
        """The last job: done once every one is (InOrder fails it too when an earlier one failed)."""
        return self._jobs[-1] if self._jobs else None

    @property
    def failed(self) -> bool:
        return any(job.done() and job.exception() is not None for job in self._jobs)

    @property
    def written(self) -> bool:
        """Everything added is handed off and written."""
        return not self.chunks and all(job.done() for job in self._jobs)

    def cancel(self) -> None:
        """Drop what is not written; return once the writer no longer runs our jobs (blocking)."""
        self.drop()
        for job in reversed(self._jobs):  # the waiting ones first: they never run
            job.cancel()
        wait_for_futures(self._jobs)  # at most one block's hash and write

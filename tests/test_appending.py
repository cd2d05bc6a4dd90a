"""upload_service/appending.py: a PATCH body appended in blocks, on the writer pool."""

from __future__ import annotations

import asyncio
import gc
import threading
import time

import pytest

from upload_service.appending import AppendBody
from upload_service.blocks import BLOCK_SIZE, BLOCKS_IN_FLIGHT
from upload_service.threads import WriterPool

CHUNK = 64 * 1024


class GatedUpload:
    """Stands in for a `ResumableUpload`: appends wait for `gate`; the writer's thread is noted."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.gate = threading.Event()
        self.written: list[bytes] = []
        self.threads: set[str] = set()
        self.fail_at = fail_at

    def append(self, data: bytes) -> None:
        self.gate.wait(5)
        if len(self.written) == self.fail_at:
            raise OSError(28, "No space left on device")
        self.written.append(data)
        self.threads.add(threading.current_thread().name)


def chunks_of(blocks: int) -> list[bytes]:
    """`blocks` blocks' worth of 64 KiB chunks, each block's bytes its own."""
    per_block = BLOCK_SIZE // CHUNK
    return [bytes([block]) * CHUNK for block in range(blocks) for _ in range(per_block)]


def test_a_full_block_waits_for_the_oldest_once_the_writer_has_its_share():
    """Two blocks go to the writer while the body is read on; a third full one waits for
    the first (the backpressure), and then every byte is appended, in order, in blocks."""

    async def main() -> None:
        upload = GatedUpload()
        consumer = AppendBody(upload, WriterPool(2), None)
        chunks = chunks_of(BLOCKS_IN_FLIGHT + 1)
        backlog = None
        for chunk in chunks:
            consumer.feed(chunk)
            assert backlog is None, "fed on after the backlog said wait"
            backlog = consumer.write_backlog()
        assert backlog is not None and not backlog.done()
        upload.gate.set()
        await asyncio.wrap_future(backlog)
        await consumer.flush()
        assert [len(block) for block in upload.written] == [BLOCK_SIZE] * (BLOCKS_IN_FLIGHT + 1)
        assert b"".join(upload.written) == b"".join(chunks)

    asyncio.run(main())


def test_the_writer_goes_on_to_the_next_block_without_the_event_loop():
    """The block handed in while the last one is appended is taken by the same thread
    (threads.InOrder), with no round trip through the loop (blocked here)."""

    async def main() -> None:
        upload = GatedUpload()
        consumer = AppendBody(upload, WriterPool(2), None)
        for chunk in chunks_of(BLOCKS_IN_FLIGHT):
            consumer.feed(chunk)
            assert consumer.write_backlog() is None
        upload.gate.set()
        deadline = time.monotonic() + 5
        while len(upload.written) < BLOCKS_IN_FLIGHT and time.monotonic() < deadline:
            time.sleep(0.01)  # the event loop runs nothing meanwhile
        assert len(upload.written) == BLOCKS_IN_FLIGHT and len(upload.threads) == 1
        await consumer.flush()

    asyncio.run(main())


def test_a_failed_append_is_raised_and_no_later_block_is_written(caplog):
    async def main() -> None:
        upload = GatedUpload(fail_at=0)
        consumer = AppendBody(upload, WriterPool(2), None)
        for chunk in chunks_of(BLOCKS_IN_FLIGHT + 1):
            consumer.feed(chunk)
            consumer.write_backlog()
        upload.gate.set()
        with pytest.raises(OSError):
            await consumer.flush()
        await consumer.settle()
        assert upload.written == []

    asyncio.run(main())
    gc.collect()
    assert "never retrieved" not in caplog.text  # raised once, where the body is read


def test_a_paused_body_is_handed_off_without_a_full_block():
    async def main() -> None:
        upload = GatedUpload()
        upload.gate.set()
        consumer = AppendBody(upload, WriterPool(2), None)
        consumer.feed(b"x" * 1000)
        for _ in range(100):
            await asyncio.sleep(0.01)
            if upload.written:
                break
        assert upload.written == [b"x" * 1000]
        await consumer.flush()

    asyncio.run(main())

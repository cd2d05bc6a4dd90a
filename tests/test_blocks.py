"""upload_service/blocks.py: chunks gathered into blocks for a writer thread, with backpressure."""

from __future__ import annotations

import threading

import pytest

from upload_service.blocks import BLOCK_SIZE, BLOCKS_IN_FLIGHT, BlockQueue
from upload_service.threads import WriterPool

CHUNK = 64 * 1024


class GatedWriter:
    """Records each block it is given; every write waits for `gate`; `fail_at` raises ENOSPC."""

    def __init__(self, fail_at: int | None = None) -> None:
        self.gate = threading.Event()
        self.blocks: list[bytes] = []
        self.fail_at = fail_at

    def __call__(self, data: bytes, started: threading.Event | None = None) -> None:
        self.gate.wait(5)
        if len(self.blocks) == self.fail_at:
            raise OSError(28, "No space left on device")
        self.blocks.append(data)


def block_of(byte: int) -> list[bytes]:
    return [bytes([byte]) * CHUNK] * (BLOCK_SIZE // CHUNK)


def test_chunks_become_whole_blocks_in_order_and_the_rest_one_last_block():
    writer = GatedWriter()
    writer.gate.set()
    queue = BlockQueue(WriterPool(2), writer)
    chunks = block_of(1) + block_of(2) + [b"tail"]
    for chunk in chunks:
        queue.add(chunk)
        while (job := queue.backlog()) is not None:
            job.result(5)
    assert not queue.ready  # a partial block waits for more, or for the end
    queue.end()
    queue.last.result(5)
    assert [len(block) for block in writer.blocks] == [BLOCK_SIZE, BLOCK_SIZE, 4]
    assert b"".join(writer.blocks) == b"".join(chunks)
    assert queue.written


def test_tiny_chunks_are_held_together_not_one_object_each():
    """1-byte chunks (chunked coding, HTTP/2 DATA frames) once held ~57 bytes of memory a byte, one
    object each: a block in the making is a few objects whatever the chunks, and written whole."""
    import tracemalloc

    writer = GatedWriter()
    writer.gate.set()
    queue = BlockQueue(WriterPool(2), writer)
    data = bytes(range(256)) * 2000 + b"x" * 5000 + bytes(range(100))  # 517,100 bytes
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for i in range(len(data) - 5100):
        queue.add(data[i : i + 1])
    queue.add(data[-5100:-100])  # one not small: kept as it is
    for i in range(len(data) - 100, len(data)):
        queue.add(data[i : i + 1])
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(queue.chunks) == 3 and held < 2 * len(data)
    queue.end()
    queue.last.result(5)
    assert writer.blocks == [data]


def test_backlog_names_the_oldest_block_once_the_writer_has_its_share():
    writer = GatedWriter()
    queue = BlockQueue(WriterPool(2), writer)
    for byte in range(BLOCKS_IN_FLIGHT):
        for chunk in block_of(byte):
            queue.add(chunk)
            assert queue.backlog() is None  # handed off: the writer has room
    for chunk in block_of(BLOCKS_IN_FLIGHT):
        queue.add(chunk)
    oldest = queue.backlog()
    assert oldest is not None and not oldest.done() and queue.buffered == BLOCK_SIZE
    writer.gate.set()
    oldest.result(5)
    assert queue.backlog() is None  # the waiting block went on
    queue.end()
    queue.last.result(5)
    assert [block[0] for block in writer.blocks] == list(range(BLOCKS_IN_FLIGHT + 1))


def test_a_failed_write_raises_at_the_next_hand_off_and_no_later_block_is_written():
    writer = GatedWriter(fail_at=0)
    writer.gate.set()
    queue = BlockQueue(WriterPool(2), writer)
    for chunk in block_of(0):
        queue.add(chunk)
    with pytest.raises(OSError):
        queue.last.result(5)
    assert queue.failed
    with pytest.raises(OSError, match="No space"):
        for chunk in block_of(1):
            queue.add(chunk)
    assert writer.blocks == []


def test_cancel_drops_what_waits_and_returns_once_the_writer_is_done_with_us():
    writer = GatedWriter()
    queue = BlockQueue(WriterPool(2), writer)
    for byte in range(BLOCKS_IN_FLIGHT):
        for chunk in block_of(byte):
            queue.add(chunk)
    queue.add(b"more")
    threading.Timer(0.05, writer.gate.set).start()
    queue.cancel()
    assert queue.chunks == [] and queue.buffered == 0
    assert writer.blocks == [] or len(writer.blocks) == 1  # the running one, if it had begun
    assert all(job.done() for job in (queue.oldest, queue.last))

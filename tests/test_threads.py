"""upload_service/threads.py: the writer pool."""

from __future__ import annotations

import threading
import time

import pytest

from upload_service import threads
from upload_service.threads import WriterPool


def test_writer_pool_forgets_a_job_cancelled_before_it_ran():
    """A queued block cancelled by an aborted upload is no longer counted as busy (else
    the pool would think itself busy for good and skip the handshake)."""
    pool = WriterPool(1)
    gate = threading.Event()

    def hold(started):
        started.set()
        gate.wait(5)

    running = pool.submit(hold)
    queued = pool.submit(lambda started: None)
    assert pool.busy == 2
    assert queued.cancel()
    gate.set()
    running.result(5)
    assert pool.busy == 0


def test_writer_pool_waits_for_a_free_thread_to_begin(monkeypatch):
    """With a thread free, submit returns only once the job has signalled that it begins
    (so the writer got the GIL); the job's result comes back through the future."""
    monkeypatch.setattr(threads.WriterPool, "HANDSHAKE_SECONDS", 10.0)
    pool = threads.WriterPool(1)
    began = []
    release = threading.Event()

    def job(value, started):
        began.append(value)
        started.set()
        release.wait(10)

    future = pool.submit(job, "first")
    assert began == ["first"]  # submit waited for it
    release.set()
    assert future.result(10) is None


def test_writer_pool_never_waits_on_busy_threads(monkeypatch):
    """With every thread busy, submit must not wait: the event loop would stall behind
    other uploads' blocks."""
    monkeypatch.setattr(threads.WriterPool, "HANDSHAKE_SECONDS", 10.0)
    pool = threads.WriterPool(1)
    release = threading.Event()

    def blocking(started):
        started.set()
        release.wait(10)

    first = pool.submit(blocking)
    begun = time.monotonic()
    second = pool.submit(lambda started: None)  # queued behind the first
    waited = time.monotonic() - begun
    release.set()
    first.result(10)
    second.result(10)
    assert waited < 5.0  # far below the 10 s handshake: it did not wait


def test_writer_pool_job_that_raises_still_frees_its_thread():
    pool = threads.WriterPool(1)

    def failing(started):
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        pool.submit(failing).result(10)
    assert pool.submit(lambda started: started.set()).result(10) is None
    assert pool._busy == 0

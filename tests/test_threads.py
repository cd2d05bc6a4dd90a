"""upload_service/threads.py: the writer pool."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from concurrent.futures import wait as wait_for_futures

import pytest

from upload_service import threads
from upload_service.threads import WriterPool


def wait_until_idle(pool: WriterPool) -> None:
    """The pool's count drops in a done-callback that may run just after the last result."""
    deadline = time.monotonic() + 5
    while pool.busy and time.monotonic() < deadline:
        time.sleep(0.001)
    assert pool.busy == 0


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
    wait_until_idle(pool)


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
    wait_until_idle(pool)


def test_in_order_runs_a_files_jobs_in_order_on_one_pool_job():
    """A job handed in while the last one runs is taken by the same thread when it ends:
    one pool job for the lot, in the order given, never two at once."""
    pool = WriterPool(2)
    jobs = threads.InOrder(pool)
    gate = threading.Event()
    ran, threads_seen, running = [], set(), []

    def job(value, started):
        if started is not None:
            started.set()
            gate.wait(10)
        running.append(value)
        assert len(running) == 1  # never two at once
        ran.append(value)
        threads_seen.add(threading.get_ident())
        running.pop()

    futures = [jobs.submit(job, 0)]
    futures += [jobs.submit(job, i) for i in range(1, 6)]  # while the first waits at the gate
    assert pool.busy == 1
    gate.set()
    for future in futures:
        future.result(10)
    assert ran == list(range(6)) and len(threads_seen) == 1
    wait_until_idle(pool)
    assert jobs.submit(job, 6).result(10) is None  # idle again: a new pool job
    assert ran[-1] == 6


def recording(ran: list[str], name: str):
    def job(started):
        ran.append(name)
    return job


def gated_first_job(gate: threading.Event, ran: list[str]):
    def first(started):
        started.set()
        gate.wait(10)
        ran.append("first")
    return first


def test_in_order_fails_every_later_job_unrun_once_one_failed():
    """Also a job handed in after the failed one's run ended: no block is written after a
    missing one (the failed block may be followed by the file's last, the only one awaited)."""
    pool = WriterPool(1)
    jobs = threads.InOrder(pool)
    gate = threading.Event()
    ran = []

    def failing(started):
        ran.append("failing")
        raise OSError(28, "No space left on device")

    later = recording(ran, "later")
    futures = [jobs.submit(gated_first_job(gate, ran)), jobs.submit(failing), jobs.submit(later)]
    gate.set()
    futures[0].result(10)
    for future in futures[1:]:
        with pytest.raises(OSError):
            future.result(10)
    wait_until_idle(pool)
    with pytest.raises(OSError):
        jobs.submit(later).result(10)  # a new run: still failed, still unrun
    assert ran == ["first", "failing"]


def test_in_order_cancels_every_later_job_once_one_was_cancelled():
    pool = WriterPool(1)
    jobs = threads.InOrder(pool)
    gate = threading.Event()
    ran = []

    later = recording(ran, "later")
    futures = [jobs.submit(gated_first_job(gate, ran)), jobs.submit(later), jobs.submit(later)]
    assert futures[1].cancel()  # an aborted upload's waiting block
    gate.set()
    futures[0].result(10)
    wait_until_idle(pool)
    with pytest.raises(CancelledError):
        futures[2].result(10)
    with pytest.raises(CancelledError):
        jobs.submit(later).result(10)  # a new run: still cancelled, still unrun
    assert ran == ["first"]


def test_in_order_tells_waiters_of_a_job_cancelled_after_an_earlier_one_failed():
    """An upload aborted by a failed write (ENOSPC) cancels its waiting blocks and waits for them
    all (BlockQueue.cancel): a cancelled job must count as done for concurrent.futures.wait, or the
    abort waited for ever (a real full-disk test hung one run in a hundred)."""
    pool = WriterPool(1)
    jobs = threads.InOrder(pool)
    gate = threading.Event()

    def failing(started):
        started.set()
        gate.wait(10)
        raise OSError(28, "No space left on device")

    futures = [jobs.submit(failing), jobs.submit(recording([], "later")), jobs.submit(recording([], "last"))]
    assert futures[2].cancel()
    gate.set()
    done, pending = wait_for_futures(futures, timeout=5)
    assert pending == set()
    with pytest.raises(OSError):
        futures[1].result()


def test_in_order_takes_turns_with_other_jobs_waiting_for_a_thread():
    """A file whose next block is always waiting must not keep a thread from other uploads:
    with jobs queued for the pool, the rest of its run goes to the back of the queue."""
    pool = WriterPool(1)
    long_file, other_file = threads.InOrder(pool), threads.InOrder(pool)
    gate = threading.Event()
    ran = []

    futures = [long_file.submit(gated_first_job(gate, ran)), long_file.submit(recording(ran, "long 2")),
               long_file.submit(recording(ran, "long 3"))]
    futures.append(other_file.submit(recording(ran, "other")))  # queued for the pool's one thread
    gate.set()
    for future in futures:
        future.result(10)
    assert ran == ["first", "other", "long 2", "long 3"]
    wait_until_idle(pool)

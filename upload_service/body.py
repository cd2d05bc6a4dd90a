"""Reading a request body: the size limit, the idle timeout, the rate floor, backpressure."""

from __future__ import annotations

import asyncio
import math
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Protocol

from upload_service.asgi import Receive
from upload_service.errors import ClientGone, IncompleteBody, PayloadTooLarge, RequestTimeout, UploadInterrupted


class BodyConsumer(Protocol):
    """Where body bytes go: `feed` each chunk, then wait for `write_backlog()` until None."""

    def feed(self, chunk: bytes) -> None: ...

    def write_backlog(self) -> Future[None] | None: ...


@dataclass
class BodyProgress:
    """How much of a request body was read, and whether all of it."""

    received: int = 0
    complete: bool = False


@dataclass
class RateFloor:
    """UPLOAD_MIN_RATE: once `grace` seconds have passed, a body must have sent `rate`
    bytes for each second after them, not counting the time we made it wait."""

    rate: int
    grace: float
    started: float
    paused: float = 0.0

    def check(self, received: int, now: float) -> None:
        elapsed = now - self.started - self.paused
        if self.rate and elapsed > self.grace and received < self.rate * (elapsed - self.grace):
            raise RequestTimeout(
                f"the client sent {received} bytes in {elapsed:.1f} s, slower than {self.rate} bytes"
                f" a second after the first {self.grace:g} s"
            )


class Interrupt:
    """Lets another request end the reading of a body early: `read_body` then raises
    UploadInterrupted (at once if it waits for the client, else once its disk wait ends)."""

    def __init__(self) -> None:
        self.requested = False
        self.deadline: asyncio.Timeout | None = None  # read_body's, while it reads
        self._watch: asyncio.TimerHandle | None = None

    def request(self) -> None:
        self.requested = True
        deadline = self.deadline
        if deadline is not None and deadline.when() is not None and not deadline.expired():
            deadline.reschedule(asyncio.get_running_loop().time())

    def watch(self, asked: Callable[[], bool], every: float) -> None:
        """Call `asked()` on the loop every `every` seconds until `unwatch`; request when it says so."""
        def check() -> None:
            if asked():
                self.request()
            else:
                self._watch = loop.call_later(every, check)

        loop = asyncio.get_running_loop()
        self._watch = loop.call_later(every, check)

    def unwatch(self) -> None:
        if self._watch is not None:
            self._watch.cancel()


def check_interrupt(interrupt: Interrupt | None) -> None:
    if interrupt is not None and interrupt.requested:
        raise UploadInterrupted("another request for this upload took it over; what this one sent is kept")


async def wait_for_the_disk(consumer: BodyConsumer, job: Future[None] | None, floor: RateFloor) -> None:
    """Backpressure: the writers are behind. The time waited does not count against the client's rate."""
    loop = asyncio.get_running_loop()
    waiting_since = loop.time()
    while job is not None:
        await asyncio.wrap_future(job)
        job = consumer.write_backlog()
    floor.paused += loop.time() - waiting_since


def check_promised(progress: BodyProgress, promised: int | None) -> None:
    if promised is not None and progress.received < promised:
        raise IncompleteBody(
            f"the request body ended after {progress.received} bytes, short of the {promised} its"
            " headers promise (Content-Length; a chunked body asking to switch protocols, at"
            " least 1): the server passed on no more"
        )


async def read_body(
    receive: Receive, consumer: BodyConsumer, progress: BodyProgress, limit: int, idle: float, min_rate: int,
    interrupt: Interrupt | None = None, promised: int | None = None,
) -> None:
    """Feed every http.request body chunk to `consumer`: at most `limit` bytes, none
    `idle` seconds apart, at `min_rate` bytes a second on average after the first `idle`;
    until `interrupt` is requested, if one is given; at least `promised` (`asgi.promised_length`)."""
    check_interrupt(interrupt)
    loop = asyncio.get_running_loop()
    floor = RateFloor(min_rate, grace=idle, started=loop.time())
    # The idle deadline moves at most every `slack` seconds, not per chunk (each move is
    # a new timer: 0.1 ms a MiB at 64 KiB chunks), and to `idle + slack` past the move:
    # a client is cut off after between `idle` and `idle + slack` seconds of silence.
    slack = idle / 16
    moved = floor.started
    try:
        async with asyncio.timeout_at(moved + idle + slack) as deadline:
            if interrupt is not None:
                interrupt.deadline = deadline
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    raise ClientGone()
                chunk = message.get("body", b"")
                progress.received += len(chunk)
                if progress.received > limit:
                    raise PayloadTooLarge(
                        f"the request body is larger than {limit} bytes",
                        limit="request_size", max=limit,
                    )
                if chunk:
                    consumer.feed(chunk)
                    if (job := consumer.write_backlog()) is not None:
                        deadline.reschedule(None)  # a slow disk is not an idle client
                        moved = -math.inf
                        await wait_for_the_disk(consumer, job, floor)
                # www.rst: more_body defaults to False.
                if not message.get("more_body", False):
                    progress.complete = True
                    check_promised(progress, promised)
                    return
                now = loop.time()
                floor.check(progress.received, now)
                if now - moved > slack:
                    check_interrupt(interrupt)  # before its wake-up is moved away
                    deadline.reschedule(now + idle + slack)
                    moved = now
    except TimeoutError:
        if deadline.expired():  # ours, not an OSError with ETIMEDOUT from below
            check_interrupt(interrupt)
            raise RequestTimeout(f"the client sent no body bytes for {idle:g} seconds") from None
        raise
    finally:
        if interrupt is not None:
            interrupt.deadline = None


async def has_bytes(receive: Receive, progress: BodyProgress) -> bool:
    """Read a body of unknown length (HTTP/2 sends DATA without one) to its end, or to its first bytes."""
    while True:
        message = await receive()
        if message["type"] != "http.request":
            raise ClientGone()
        if message.get("body"):
            progress.received += len(message["body"])
            return True
        if not message.get("more_body", False):
            progress.complete = True
            return False

"""Answering before the body is read, on servers that need it drained (SPEC §8).

Hypercorn 0.18 stops reading a connection whose app returned while its receive queue
(10 messages) was full, and over HTTP/2 drops the whole connection when a stream whose
answer has ended gets more DATA. So after an early answer we keep reading (bounded).
This module can go when hypercorn no longer needs it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Awaitable

from upload_service.asgi import Message, Receive, Send, send_error
from upload_service.body import RateFloor
from upload_service.errors import PayloadTooLarge, RequestTimeout, UploadError

logger = logging.getLogger("upload_asgi")

# After an early error answer, how much of the rest of the body we read and drop
# so that the server can still deliver the answer (SPEC §8), and for how long.
DRAIN_LIMIT_BYTES = 16 * 1024 * 1024
DRAIN_LIMIT_SECONDS = 2.0
# A client that stopped sending this long after the answer has given up its body.
DRAIN_PAUSE_SECONDS = 0.5


async def read_to_end(receive: Receive) -> None:
    """Read and drop body messages until the body ends or the client leaves."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def drain_body(receive: Receive, max_bytes: int, seconds: float, pause: float | None = None) -> bool:
    """Read and drop what is left of a body until it ends, passes `max_bytes`, `seconds`
    have gone by, or (with `pause`) it stops coming for that long (SPEC §8). Return whether
    it ended (or the client left).

    Hypercorn 0.18 stops reading a connection whose app returned while its receive
    queue was full; draining lets it deliver our answer and then close. (HTTP/2:
    `answer_before_body_end` drains while data comes instead.)
    """
    drained = 0
    try:
        async with asyncio.timeout(seconds):
            while drained <= max_bytes:  # a body of exactly max_bytes ends with one more message
                async with asyncio.timeout(pause):  # None: no bound per message
                    message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return True
                drained += len(message.get("body", b""))
    except TimeoutError:
        pass
    return False


async def discard_body(receive: Receive) -> UploadError | None:
    """Read and drop a body that the route does not read, before it answers: hypercorn 0.18 stops
    reading a connection whose app returned with unread body messages queued (SPEC §8). None once
    the body ended (or the client left); the error to answer if it is longer or slower than the
    drain's bounds (DRAIN_LIMIT_BYTES, DRAIN_LIMIT_SECONDS)."""
    started = time.monotonic()
    if await drain_body(receive, DRAIN_LIMIT_BYTES, DRAIN_LIMIT_SECONDS):
        return None
    if time.monotonic() - started >= DRAIN_LIMIT_SECONDS:
        return RequestTimeout(f"a body this route does not read took over {DRAIN_LIMIT_SECONDS:g} s")
    return PayloadTooLarge(f"a body this route does not read is over {DRAIN_LIMIT_BYTES} bytes",
                           limit="request_size", max=DRAIN_LIMIT_BYTES)


async def drain_while_coming(receive: Receive, pause: float, floor: RateFloor) -> None:
    """Read and drop the rest of a body while it keeps coming: until it ends, pauses for
    `pause` seconds, or comes slower than `floor` (UPLOAD_MIN_RATE, as a body being stored)."""
    loop = asyncio.get_running_loop()
    drained = 0
    try:
        while True:
            async with asyncio.timeout(pause):
                message = await receive()
            if message["type"] != "http.request" or not message.get("more_body", False):
                return
            drained += len(message.get("body", b""))
            floor.check(drained, loop.time())
    except (TimeoutError, RequestTimeout):
        pass


async def answer_before_body_end(
    receive: Receive, send: Send, error: UploadError, http_version: str, min_rate: int, idle_timeout: float,
    headers: tuple[tuple[bytes, bytes], ...] = (), hold_last_byte: bool = True,
) -> None:
    """Answer `error` to a request whose body was not read to its end, and drain the rest;
    on HTTP/1.1, holding the answer's last byte meanwhile unless told not to (a proxy's request)."""
    if http_version == "2":
        # Hypercorn 0.18 forgets an HTTP/2 stream when its response ends, and a DATA frame the
        # client still sends then drops or wedges the whole connection (README, "Running in
        # production"). An app cannot reset a stream: the answer stays open while we drop the
        # rest of the body, for as long as it keeps coming at a stored body's rate; a client
        # that stopped gets the answer's end after DRAIN_LIMIT_SECONDS of silence.
        await send_error(send, error, headers=headers, more_body=True)
        floor = RateFloor(min_rate, grace=idle_timeout, started=asyncio.get_running_loop().time())
        await drain_while_coming(receive, DRAIN_LIMIT_SECONDS, floor)
        await send({"type": "http.response.body", "body": b""})
        return
    # HTTP/1.1: the answer goes out now but for its last byte, which waits while we drop a
    # bounded rest of the body: the servers close a `Connection: close` connection once the
    # answer is whole, and a client still sending (as `requests` does) got a reset instead.
    # A reverse proxy passes on no answer it has not got whole: it gets it whole at once.
    held = HeldLastByte(send, holding=hold_last_byte)
    answer = send_error(held.send, error, headers=((b"connection", b"close"), *headers), more_body=True)
    if not await send_while_reading(receive, answer):
        await drain_body(receive, DRAIN_LIMIT_BYTES, DRAIN_LIMIT_SECONDS, pause=DRAIN_PAUSE_SECONDS)
    await send_while_reading(receive, held.end())


class HeldLastByte:
    """A `send` that holds back the last byte of the response body (when `holding`), until `end`."""

    def __init__(self, send: Send, holding: bool = True) -> None:
        self._send = send
        self._holding = holding
        self._last = b""

    async def send(self, message: Message) -> None:
        if self._holding and message["type"] == "http.response.body" and message.get("body"):
            body = message["body"]
            self._last = body[-1:]
            message = {**message, "body": body[:-1]}
        await self._send(message)

    async def end(self) -> None:
        await self._send({"type": "http.response.body", "body": self._last})


async def send_while_reading(receive: Receive, sending: Awaitable[None]) -> bool:
    """Send, reading and dropping the body meanwhile; return whether it ended (or the client left).

    hypercorn 0.18 puts http.disconnect into the receive queue inside an answer's last send
    and blocks there while that queue (10 messages) is full (SPEC §8), as it is whenever
    something awaited since our last receive() (a middleware's send, say).
    """
    reading = asyncio.ensure_future(read_to_end(receive))
    try:
        await sending
    finally:
        reading.cancel()  # nothing if it saw the end already
    await asyncio.wait([reading])
    if reading.cancelled():
        return False
    if reading.exception() is not None:
        logger.debug("reading the rest of a refused body failed", exc_info=reading.exception())
    return True

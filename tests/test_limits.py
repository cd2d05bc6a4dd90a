"""Limits (SPEC §3, §5): each one answers 413 naming it, stops reading there and leaves nothing on disk.

In process, with a traced receive/send to see when the answer goes out, on both storage
backends (the local dir and S3: a refused request leaves no object and no multipart
upload); then the file and request limits through a real hypercorn, with a raw client that
keeps sending after the 413 (SPEC §8: it must get the answer and see the connection
closed, not hang). Those are about HTTP and the early answer, not storage: local only.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import socket
import urllib.parse
from dataclasses import dataclass, field
from typing import Any, Iterable

import pytest

import upload_asgi
from upload_service import early_answer
from support import (
    upload_scope,
    call_app,
    http_scope,
    BOUNDARY,
    Part,
    Reply,
    Server,
    assert_nothing_stored,
    assert_stored,
    chunked,
    chunks_of,
    field_part,
    file_part,
    form_body,
    form_content_type,
    raw_request,
    read_answer,
    request_head,
)

KiB = 1024
MiB = 1024 * KiB


@dataclass
class Trace:
    """One request fed by hand, with the order of every receive() and send()."""

    reply: Reply
    events: list[tuple[str, Any]] = field(default_factory=list)

    @property
    def body_read_before_answer(self) -> int:
        """Body bytes the app had received when it started its answer."""
        total = 0
        for kind, value in self.events:
            if kind == "send" and value == "http.response.start":
                return total
            if kind == "receive":
                total += value
        raise AssertionError("no answer")

    @property
    def receives_before_answer(self) -> int:
        return self.events.index(("send", "http.response.start")) if self.reply.status else -1

    @property
    def body_read(self) -> int:
        return sum(v for k, v in self.events if k == "receive")


async def call_traced(app: Any, scope: dict[str, Any], chunks: Iterable[bytes]) -> Trace:
    """Like support.call_app, but record when each body chunk is taken and the answer sent."""
    queue = iter([*({"type": "http.request", "body": c, "more_body": True} for c in chunks),
                  {"type": "http.request", "body": b"", "more_body": False}])
    trace = Trace(Reply())

    async def receive() -> dict[str, Any]:
        message = next(queue, {"type": "http.disconnect"})
        trace.events.append(("receive", len(message.get("body", b""))))
        return message

    async def send(message: dict[str, Any]) -> None:
        trace.events.append(("send", message["type"]))
        reply = trace.reply
        if message["type"] == "http.response.start":
            reply.status = message["status"]
            reply.headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            reply.body += message.get("body", b"")

    await app(scope, receive, send)
    return trace




@pytest.fixture
def backend_settings() -> dict[str, Any]:
    return {"fsync": False}


def assert_limit(trace: Trace, limit: str, maximum: int) -> None:
    reply = trace.reply
    assert reply.status == 413, reply.body
    reply.check_length()
    assert reply.headers["content-type"] == "application/json"
    payload = reply.json()
    assert payload["error"] == "payload_too_large"
    assert payload["limit"] == limit
    assert payload["max"] == maximum
    assert isinstance(payload["detail"], str) and payload["detail"]
    # The body was not read to its end: the answer says the connection closes.
    assert reply.headers.get("connection") == "close"


def noise(size: int) -> bytes:
    return os.urandom(size)


# -- in process: one test per limit --------------------------------------------------


@pytest.mark.parametrize("chunk", [1000, 4096, 65536], ids=["1000B", "4K", "64K"])
async def test_file_over_its_limit(make_backend_app, backend, chunk):
    app = make_backend_app(max_file_size=50 * KiB)
    body = form_body([file_part(noise(2 * MiB))])
    trace = await call_traced(app, upload_scope(length=len(body)), chunks_of(body, chunk))
    assert_limit(trace, "file_size", 50 * KiB)
    # It stopped at the limit (plus at most the chunk that crossed it), not at the end.
    assert trace.body_read_before_answer <= 50 * KiB + 200 + chunk
    backend.assert_nothing_stored()


async def test_file_at_its_limit_is_stored(make_backend_app, backend):
    data = noise(50 * KiB)
    app = make_backend_app(max_file_size=50 * KiB)
    body = form_body([file_part(data)])
    trace = await call_traced(app, upload_scope(length=len(body)), chunks_of(body, 3000))
    assert trace.reply.status == 201, trace.reply.body
    backend.assert_stored(trace.reply.json(), data)


async def test_second_file_over_its_limit_removes_the_first(make_backend_app, backend):
    app = make_backend_app(max_file_size=50 * KiB)
    body = form_body([file_part(noise(10 * KiB), name="files"), file_part(noise(60 * KiB), name="files")])
    trace = await call_traced(app, upload_scope("/upload-multiple"), chunks_of(body, 4096))
    assert_limit(trace, "file_size", 50 * KiB)
    backend.assert_nothing_stored()


@pytest.mark.parametrize("name", ["description", "sha256"])
async def test_text_field_over_its_limit(make_backend_app, backend, name):
    app = make_backend_app(max_field_size=1 * KiB)
    body = form_body([file_part(b"x" * 100), field_part(name, "d" * (64 * KiB))])
    trace = await call_traced(app, upload_scope(), chunks_of(body, 512))
    assert_limit(trace, "field_size", 1 * KiB)
    assert trace.body_read_before_answer <= 1 * KiB + 600 + 512
    backend.assert_nothing_stored()


async def test_text_field_at_its_limit_is_kept(make_backend_app, backend):
    data = b"payload"
    app = make_backend_app(max_field_size=1 * KiB)
    body = form_body([file_part(data), field_part("description", "d" * KiB)])
    trace = await call_traced(app, upload_scope(), chunks_of(body, 100))
    assert trace.reply.status == 201, trace.reply.body
    assert trace.reply.json()["description"] == "d" * KiB
    backend.assert_stored(trace.reply.json(), data)


@pytest.mark.parametrize("description, files, status", [
    ("\x01" * (64 * KiB), 3, 413),  # 393 KB as JSON each: past 1 MiB on three records
    ("\x01" * (64 * KiB), 2, 201),
    ("d" * (10 * KiB), 100, 201),  # 10 KiB on each of 100 files: within it
])
async def test_a_description_on_every_record_of_many_files_has_a_budget(
    make_backend_app, backend, description, files, status
):
    """The description goes on each record (answer and sidecar): at most 1 MiB of it as JSON in all."""
    app = make_backend_app()
    datas = [noise(100) for _ in range(files)]
    file_parts = [file_part(data, filename=f"f{i}", name="files") for i, data in enumerate(datas)]
    parts = [field_part("description", description), *file_parts]
    trace = await call_traced(app, upload_scope("/upload-multiple"), chunks_of(form_body(parts), 65536))
    reply = trace.reply
    assert reply.status == status, reply.body[:300]
    if status == 413:
        assert reply.json()["limit"] == "descriptions" and reply.json()["max"] == MiB
        backend.assert_nothing_stored()
    else:
        for record, data in zip(reply.json()["files"], datas):
            assert record["description"] == description
            backend.assert_stored(record, data)


async def test_unregistered_field_is_bounded_like_a_text_field(make_backend_app, backend):
    app = make_backend_app(max_field_size=1 * KiB)
    body = form_body([field_part("junk", b"j" * (MiB)), file_part(b"x")])
    trace = await call_traced(app, upload_scope(), chunks_of(body, 4096))
    assert_limit(trace, "field_size", 1 * KiB)
    assert trace.body_read_before_answer <= KiB + 300 + 4096


@pytest.mark.parametrize("path, name, allowed", [("/upload-multiple", "files", 3), ("/upload", "file", 1)])
async def test_more_files_than_allowed(make_backend_app, backend, path, name, allowed):
    app = make_backend_app(max_files=3)
    parts = [file_part(noise(20 * KiB), filename=f"f{i}", name=name) for i in range(allowed + 1)]
    parts.append(file_part(noise(MiB), filename="never-read", name=name))
    body = form_body(parts)
    trace = await call_traced(app, upload_scope(path), chunks_of(body, 8192))
    assert_limit(trace, "files", allowed)
    # The answer came when the extra part started, not after the last file.
    assert trace.body_read_before_answer < (allowed + 1) * 21 * KiB + 8192
    backend.assert_nothing_stored()


async def test_files_at_their_limit_are_stored(make_backend_app, backend):
    app = make_backend_app(max_files=3)
    datas = [noise(1000 + i) for i in range(3)]
    body = form_body([file_part(d, filename=f"f{i}", name="files") for i, d in enumerate(datas)])
    trace = await call_traced(app, upload_scope("/upload-multiple"), chunks_of(body, 777))
    assert trace.reply.status == 201, trace.reply.body
    for record, data in zip(trace.reply.json()["files"], datas):
        backend.assert_stored(record, data)


async def test_more_parts_than_allowed(make_backend_app, backend):
    app = make_backend_app(max_parts=5)
    parts = [file_part(b"data")] + [field_part(f"extra{i}", "x") for i in range(10_000)]
    body = form_body(parts)
    trace = await call_traced(app, upload_scope(), chunks_of(body, 1024))
    assert_limit(trace, "parts", 5)
    assert trace.body_read_before_answer < 6 * 100 + 1024
    backend.assert_nothing_stored()


async def test_empty_parts_count_too(make_backend_app, backend):
    """Parts the app ignores (no name, empty file input) still count towards max_parts."""
    app = make_backend_app(max_parts=3)
    nameless = Part("", headers=[b"Content-Disposition: form-data"])
    empty_file = file_part(b"", filename="")
    body = form_body([file_part(b"data"), nameless, empty_file, nameless, empty_file])
    trace = await call_traced(app, upload_scope(), [body])
    assert_limit(trace, "parts", 3)
    backend.assert_nothing_stored()


async def test_request_over_its_limit_without_content_length(make_backend_app, backend):
    app = make_backend_app(max_request_size=100 * KiB)
    body = form_body([file_part(noise(MiB))])
    trace = await call_traced(app, upload_scope(length=None), chunks_of(body, 4096))
    assert_limit(trace, "request_size", 100 * KiB)
    assert trace.body_read_before_answer <= 100 * KiB + 4096
    backend.assert_nothing_stored()


async def test_request_over_its_limit_with_a_lying_content_length(make_backend_app, backend):
    app = make_backend_app(max_request_size=100 * KiB)
    body = form_body([file_part(noise(MiB))])
    trace = await call_traced(app, upload_scope(length=1000), chunks_of(body, 4096))
    assert_limit(trace, "request_size", 100 * KiB)
    assert trace.body_read_before_answer <= 100 * KiB + 4096
    backend.assert_nothing_stored()


async def test_request_at_its_limit_is_stored(make_backend_app, backend):
    data = noise(10 * KiB)
    body = form_body([file_part(data)])
    app = make_backend_app(max_request_size=len(body))
    trace = await call_traced(app, upload_scope(length=len(body)), chunks_of(body, 1500))
    assert trace.reply.status == 201, trace.reply.body
    backend.assert_stored(trace.reply.json(), data)


@pytest.mark.parametrize("path", ["/upload", "/upload-multiple"])
async def test_declared_length_over_the_limit_is_refused_before_the_body(make_backend_app, backend, path):
    app = make_backend_app(max_request_size=100 * KiB)
    chunks = itertools.repeat(b"z" * 65536, 64)  # 4 MiB the client would send
    trace = await call_traced(app, upload_scope(path, length=100 * KiB + 1), chunks)
    assert_limit(trace, "request_size", 100 * KiB)
    # The answer went out before the first receive(): no body byte was asked for.
    assert trace.events[:2] == [("send", "http.response.start"), ("send", "http.response.body")]
    # Afterwards it drains a bounded amount so that a server can deliver the answer (SPEC §8).
    assert trace.body_read <= early_answer.DRAIN_LIMIT_BYTES + 65536
    backend.assert_nothing_stored()


async def test_declared_length_at_the_limit_is_read(make_backend_app, backend):
    data = b"q" * 1000
    body = form_body([file_part(data)])
    app = make_backend_app(max_request_size=len(body))
    trace = await call_traced(app, upload_scope(length=len(body)), [body])
    assert trace.reply.status == 201
    backend.assert_stored(trace.reply.json(), data)


async def test_limits_are_independent_per_request(make_backend_app, backend):
    """A refused request leaves the app fully usable for the next one."""
    app = make_backend_app(max_file_size=10 * KiB)
    body = form_body([file_part(noise(20 * KiB))])
    assert (await call_traced(app, upload_scope(), [body])).reply.status == 413
    data = noise(10 * KiB)
    trace = await call_traced(app, upload_scope(), [form_body([file_part(data)])])
    assert trace.reply.status == 201
    backend.assert_stored(trace.reply.json(), data)


# -- through a real hypercorn -----------------------------------------------------------

SERVER_LIMITS = {
    "UPLOAD_FSYNC": "0",
    "UPLOAD_MAX_FILE_SIZE": "1M",
    "UPLOAD_MAX_REQUEST_SIZE": "4M",
    "UPLOAD_MAX_FIELD_SIZE": "4K",
}
BLOCK = b"\xa5" * MiB


@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    upload_dir = tmp_path_factory.mktemp("limits") / "uploads"
    with Server(upload_dir, env=SERVER_LIMITS) as server:
        yield server


def file_start(name: str = "file") -> bytes:
    """The body up to the first byte of a file part's data."""
    return b"--" + BOUNDARY.encode() + b"\r\n" + file_part(b"", name=name).head() + b"\r\n\r\n"


def endless(first: bytes, megabytes: int) -> Iterable[bytes]:
    """`first`, then `megabytes` MiB: a client that keeps sending whatever it hears."""
    return itertools.chain([first], itertools.repeat(BLOCK, megabytes))


def headers_for(length: int | None) -> list[tuple[str, str]]:
    headers = [("Content-Type", form_content_type())]
    headers.append(("Content-Length", str(length)) if length is not None else ("Transfer-Encoding", "chunked"))
    return headers


HOSTILE_CASES = [
    pytest.param(
        "/upload", headers_for(200 * MiB), endless(file_start(), 200), "request_size", 4 * MiB,
        id="declared-length",
    ),
    pytest.param(
        "/upload", headers_for(None), chunked(endless(file_start(), 200)), "file_size", 1 * MiB,
        id="file-chunked",
    ),
    pytest.param(
        "/upload-multiple", headers_for(3 * MiB + 500), endless(file_start("files"), 3), "file_size", 1 * MiB,
        id="file-content-length",
    ),
    pytest.param(
        "/upload-multiple",
        headers_for(None),
        chunked(endless(form_body([file_part(b"f" * (MiB - 1000), name="files")] * 5), 200)),
        "request_size", 4 * MiB,
        id="request-chunked",
    ),
    pytest.param(
        "/upload",
        headers_for(None),
        chunked(itertools.chain([b"--" + BOUNDARY.encode() + b"\r\n" + field_part("description", b"").head() + b"\r\n\r\n"], itertools.repeat(BLOCK, 200))),
        "field_size", 4 * KiB,
        id="field-chunked",
    ),
]


@pytest.mark.parametrize("path, headers, body, limit, maximum", HOSTILE_CASES)
def test_server_answers_413_and_closes_while_the_client_keeps_sending(
    limited_server, path, headers, body, limit, maximum
):
    """SPEC §8: the client gets the 413 and then sees the connection closed, within bounds."""
    reply = raw_request(limited_server.port, request_head(path, headers), body, timeout=30, close_wait=15)
    assert reply.status == 413
    assert int(reply.headers["content-length"]) == len(reply.body)
    payload = reply.json()
    assert (payload["error"], payload["limit"], payload["max"]) == ("payload_too_large", limit, maximum)
    assert reply.headers.get("connection") == "close"
    assert reply.closed, "the server kept the connection open after its early answer"
    # The client stopped far short of what it meant to send: the server quit reading.
    assert reply.sent < 100 * MiB
    assert_nothing_stored(limited_server.upload_dir)


def test_server_keeps_serving_after_refusals(limited_server):
    data = os.urandom(MiB)  # exactly the file limit
    body = form_body([file_part(data + b"!")])
    for _ in range(3):
        refused = raw_request(limited_server.port, request_head("/upload", headers_for(len(body))), [body])
        assert refused.status == 413
        assert refused.json()["limit"] == "file_size"
    with limited_server.client() as http:
        assert http.get("/health").json()["uploads_in_flight"] == 0
        stored = http.post("/upload", files={"file": ("ok", data)})
    assert stored.status_code == 201, stored.text
    record = stored.json()
    assert_stored(limited_server.upload_dir, record, data)
    os.unlink(limited_server.upload_dir / record["id"])
    os.unlink(limited_server.upload_dir / f"{record['id']}.json")


@pytest.mark.parametrize("extra, status", [(0, 200), (1, 413)])
async def test_a_body_the_route_does_not_read_may_be_up_to_the_drain_limit(app, extra: int, status: int):
    """A route that reads no body reads and drops up to DRAIN_LIMIT_BYTES of one (SPEC §8): exactly
    that much is fine, a byte more is 413 with the limit named, as every 413 names it."""
    size = early_answer.DRAIN_LIMIT_BYTES + extra
    scope = http_scope("/health", "GET", headers=[("content-length", str(size))])
    reply = await call_app(app, scope, chunks_of(b"x" * size, 1 << 20))
    assert reply.status == status, reply.body
    if status == 413:
        assert (reply.json()["limit"], reply.json()["max"]) == ("request_size", early_answer.DRAIN_LIMIT_BYTES)


@pytest.mark.parametrize(
    "method, path, status",
    [("GET", "/health", 200), ("GET", "/files", 200), ("POST", "/nowhere", 404), ("POST", "/health", 405),
     ("GET", "/files/" + "0" * 32, 404), ("OPTIONS", "/files", 204), ("DELETE", "/files/" + "0" * 32, 404)],
)
def test_a_body_the_route_does_not_read_keeps_the_connection_going(limited_server, method, path, status):
    """SPEC §8: a body in many small chunks to a route that reads none (hypercorn queues them;
    an app that returned without reading them left the connection hanging): read and dropped
    first, so the answer comes and the next request on the connection too."""
    body = b"".join(chunked(chunks_of(os.urandom(20_000), 7)))
    head = request_head(path, [("Content-Type", "application/octet-stream"), ("Transfer-Encoding", "chunked"),
                               ("Tus-Resumable", "1.0.0")], method=method)
    with socket.create_connection(("127.0.0.1", limited_server.port), timeout=10) as sock:
        sock.sendall(head + body)
        answer = read_answer(sock)
        assert answer[0] == status, answer
        assert answer[1].get("connection") != "close"
        sock.sendall(request_head("/health", [], method="GET"))
        assert read_answer(sock)[0] == 200


def test_both_transfer_encoding_and_content_length_is_refused_and_closes(limited_server):
    """RFC 9112 §6.1: the mark of request smuggling; hypercorn 0.18 took the chunked body and kept
    the connection, so what a proxy in front read as the body could be read here as a request."""
    body = form_body([file_part(b"smuggled")])
    head = request_head("/upload", [("Content-Type", form_content_type()), ("Transfer-Encoding", "chunked"),
                                    ("Content-Length", "5")])
    with socket.create_connection(("127.0.0.1", limited_server.port), timeout=10) as sock:
        sock.sendall(head + b"".join(chunked([body])) + request_head("/health", [], method="GET"))
        status, headers, answer = read_answer(sock)
        assert status == 400 and headers["connection"] == "close", answer
        assert json.loads(answer)["error"] == "ambiguous_length"
        assert sock.recv(65536) == b""  # the request after it is never read
    assert_nothing_stored(limited_server.upload_dir)


@pytest.mark.parametrize("what", ["upload", "stored file"])
def test_a_delete_with_a_body_keeps_the_connection_going(limited_server, what):
    """A DELETE reads no body: one sent anyway (a tus termination, a file's delete) is read and
    dropped before the 204, so the next request on the connection is answered."""
    with socket.create_connection(("127.0.0.1", limited_server.port), timeout=10) as sock:
        if what == "upload":
            sock.sendall(request_head("/files", [("Tus-Resumable", "1.0.0"), ("Upload-Length", "10"),
                                                 ("Content-Length", "0")]))
        else:
            body = form_body([file_part(b"abc")])
            sock.sendall(request_head("/upload", [("Content-Type", form_content_type()),
                                                  ("Content-Length", str(len(body)))]) + body)
        status, headers, _ = read_answer(sock)
        assert status == 201
        path = urllib.parse.urlsplit(headers["location"]).path
        body = os.urandom(5 * MiB)
        head = request_head(path, [("Tus-Resumable", "1.0.0"), ("Content-Type", "application/octet-stream"),
                                   ("Content-Length", str(len(body)))], method="DELETE")
        sock.sendall(head + body)
        status, headers, _ = read_answer(sock)
        assert status == 204 and headers.get("connection") != "close"
        sock.sendall(request_head(path, [], method="GET"))
        assert read_answer(sock)[0] == 404


def test_a_body_too_long_for_a_route_that_reads_none_is_413_and_closes(limited_server):
    reply = raw_request(limited_server.port, request_head("/health", headers_for(None), method="GET"),
                        chunked(itertools.repeat(BLOCK, 40)), timeout=30, close_wait=15)
    assert reply.status == 413 and reply.json()["error"] == "payload_too_large"
    assert reply.headers.get("connection") == "close" and reply.closed


def test_a_slow_body_for_a_route_that_reads_none_is_408_and_closes(limited_server):
    head = request_head("/health", [("Content-Length", "100")], method="GET")
    with socket.create_connection(("127.0.0.1", limited_server.port), timeout=10) as sock:
        sock.sendall(head + b"x" * 10)  # and nothing more: past the 2 s the route waits for it
        status, headers, body = read_answer(sock)
        assert (status, json.loads(body)["error"]) == (408, "request_timeout")
        assert headers.get("connection") == "close"
        assert sock.recv(1) == b""  # closed


class AwaitingSend:
    """A middleware whose send awaits before passing each message on (as one that logs or
    compresses asynchronously would): the app yields between its last receive() and its answer."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        async def awaiting_send(message: dict[str, Any]) -> None:
            await asyncio.sleep(0.05)
            await send(message)

        await self.app(scope, receive, awaiting_send if scope["type"] == "http" else send)


def awaiting_app() -> AwaitingSend:
    """`hypercorn 'test_limits:awaiting_app()'`: the upload app behind AwaitingSend."""
    return AwaitingSend(upload_asgi.create_app())


def test_early_answer_behind_an_awaiting_middleware_still_closes(tmp_path):
    """SPEC §8 with the receive queue full when the answer goes out.

    While the middleware awaits, hypercorn fills its 10-message receive queue; it then
    puts http.disconnect into that queue inside the app's final send. Unless the app
    keeps receiving while it answers, that send never returns: the connection hangs
    and the upload's slot is never given back.
    """
    upload_dir = tmp_path / "uploads"
    with Server(upload_dir, app="test_limits:awaiting_app()", env=SERVER_LIMITS) as server:
        for _ in range(3):
            reply = raw_request(
                server.port, request_head("/upload", headers_for(None)), chunked(endless(file_start(), 100)),
                timeout=30, close_wait=15,
            )
            assert reply.status == 413
            assert reply.json()["limit"] == "file_size"
            assert reply.closed, "the connection hung after the early answer"
        with server.client() as http:
            assert http.get("/health").json()["uploads_in_flight"] == 0
    assert_nothing_stored(upload_dir)

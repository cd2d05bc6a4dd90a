"""The app called with ASGI events scripted by hand: exact chunking, disconnects, lifespan, routing.

Uploads run on both storage backends (`backend_app`); the lifespan and upload-dir tests
are about the local store's dirs (S3's startup sweep and health: test_s3store), and the
GETs of page, health and metrics touch no storage: those use the local `app`.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
from pathlib import Path
from typing import Any

import pytest
from hypercorn.utils import LifespanFailureError

import upload_asgi
from support import (
    BOUNDARY,
    assert_nothing_stored,
    call_app,
    chunks_of,
    field_part,
    file_part,
    form_body,
    form_content_type,
    http_scope,
    split_at,
    stored_ids,
    upload_scope,
)

B = BOUNDARY.encode()


@pytest.fixture
def config(upload_dir: Path) -> upload_asgi.Config:
    # Many uploads per test here; fsync is covered in test_targets and through the server.
    return upload_asgi.Config(upload_dir=upload_dir, fsync=False)


@pytest.fixture
def backend_settings() -> dict[str, Any]:
    return {"fsync": False}


def file_data(size: int, seed: int = 0) -> bytes:
    """Random bytes with boundary look-alikes sprinkled in (they must stay data)."""
    rng = random.Random(seed)
    traps = [b"\r\n", b"\r\n--", b"\r\n--" + B[:-1], b"--" + B + b"\r\n", b"\r\n--" + B + b"X", b"\r\r\n\n"]
    out = bytearray()
    while len(out) < size:
        out += rng.randbytes(rng.randrange(1, 300))
        out += rng.choice(traps)
    return bytes(out[:size])




def check_json(reply, status: int) -> Any:
    assert reply.status == status, reply.body
    assert reply.headers["content-type"] == "application/json"
    reply.check_length()
    return reply.json()


# -- chunk splits ---------------------------------------------------------------------


def with_empty_chunks(chunks: list[bytes]) -> list[bytes]:
    out = [b""]
    for chunk in chunks:
        out += [chunk, b"", b""]
    return out


CHUNKINGS = [
    pytest.param(3 * 1024, lambda body: chunks_of(body, 1), id="1-byte"),
    pytest.param(200 * 1024, lambda body: chunks_of(body, 7), id="7-bytes"),
    pytest.param(200 * 1024, lambda body: chunks_of(body, 333), id="333-bytes"),
    pytest.param(200 * 1024, lambda body: chunks_of(body, 4095), id="4095-bytes"),
    pytest.param(300 * 1024, lambda body: chunks_of(body, 64 * 1024), id="64KiB"),
    pytest.param(300 * 1024, lambda body: chunks_of(body, 64 * 1024 + 1), id="64KiB+1"),
    pytest.param(300 * 1024, lambda body: [body], id="one-chunk"),
    pytest.param(50 * 1024, lambda body: with_empty_chunks(chunks_of(body, 1000)), id="empty-chunks-between"),
    pytest.param(50 * 1024, lambda body: [b"", b"", body, b""], id="empty-chunks-around"),
]


@pytest.mark.parametrize("size, chunker", CHUNKINGS)
async def test_upload_any_chunking(backend_app, backend, size, chunker):
    data = file_data(size)
    body = form_body([field_part("description", "chunked"), file_part(data, "trap.bin", content_type="x/y")])
    chunks = chunker(body)
    assert b"".join(chunks) == body
    reply = await call_app(backend_app, upload_scope(), chunks)
    record = check_json(reply, 201)
    assert record["filename"] == "trap.bin"
    assert record["content_type"] == "x/y"
    assert record["description"] == "chunked"
    backend.assert_stored(record, data)


async def test_every_split_point_of_a_small_body(backend_app, backend):
    data = b"a\r\n--" + B[:5] + b"\r\n"
    body = form_body([file_part(data, "s.txt")], epilogue=b"tail")
    for cut in range(len(body) + 1):
        reply = await call_app(backend_app, upload_scope(), split_at(body, [cut]))
        record = check_json(reply, 201)
        backend.assert_stored(record, data)


async def test_multiple_files_with_odd_chunks(backend_app, backend):
    files = [(f"f{i}.dat", f"application/x-{i}", file_data(10_000 * i + 1, seed=i)) for i in range(4)]
    body = form_body([file_part(d, n, "files", c) for n, c, d in files])
    reply = await call_app(backend_app, upload_scope("/upload-multiple"), chunks_of(body, 997))
    answer = check_json(reply, 201)
    assert answer["count"] == 4
    assert answer["total_size"] == sum(len(d) for _, _, d in files)
    for record, (name, ctype, data) in zip(answer["files"], files):
        assert (record["filename"], record["content_type"]) == (name, ctype)
        backend.assert_stored(record, data)


# -- disconnect mid-body ------------------------------------------------------------------


def disconnect_points(body: bytes) -> list[Any]:
    file_start = body.index(b"\r\n\r\n") + 4
    return [
        pytest.param(0, id="before-any-body"),
        pytest.param(10, id="in-the-first-boundary"),
        pytest.param(file_start - 5, id="in-the-part-headers"),
        pytest.param(file_start + 1, id="after-one-file-byte"),
        pytest.param(file_start + 70_000, id="mid-file"),
        pytest.param(len(body) - 3, id="in-the-closing-boundary"),
        pytest.param(len(body), id="whole-body-but-no-end"),
    ]


DISCONNECT_BODY = form_body([file_part(file_data(150_000), "gone.bin"), field_part("description", "bye")])


@pytest.mark.parametrize("cut", disconnect_points(DISCONNECT_BODY))
async def test_disconnect_mid_body_leaves_nothing_and_sends_nothing(backend_app, backend, cut):
    chunks = chunks_of(DISCONNECT_BODY[:cut], 16 * 1024) if cut else []
    reply = await call_app(backend_app, upload_scope(), chunks, disconnect_after=True)
    assert reply.messages == []
    backend.assert_nothing_stored()


async def test_disconnect_after_some_complete_files_stores_none(backend_app, backend):
    body = form_body([file_part(b"x" * 1000, f"{i}.txt", "files") for i in range(3)])
    cut = body.rindex(b"Content-Disposition")  # two files whole, the third not begun
    reply = await call_app(backend_app, upload_scope("/upload-multiple"), [body[:cut]], disconnect_after=True)
    assert reply.messages == []
    backend.assert_nothing_stored()
    # The app is still fine afterwards.
    reply = await call_app(backend_app, upload_scope("/upload-multiple"), [body])
    assert check_json(reply, 201)["count"] == 3


@pytest.mark.parametrize("cut", disconnect_points(DISCONNECT_BODY)[:-1])  # not the whole body
async def test_a_body_the_server_ends_short_of_its_length_is_refused(backend_app, backend, cut):
    """A server that ends the body before its Content-Length (uvicorn's httptools, for a request
    with `Upgrade`) lost bytes the client sent: 400 incomplete_body, never a file cut short."""
    chunks = chunks_of(DISCONNECT_BODY[:cut], 16 * 1024) if cut else []
    reply = await call_app(backend_app, upload_scope(length=len(DISCONNECT_BODY)), chunks)
    detail = check_json(reply, 400)
    assert detail["error"] == "incomplete_body"
    assert f"after {cut} bytes, short of the {len(DISCONNECT_BODY)} its headers promise" in detail["detail"]
    backend.assert_nothing_stored()


# -- lifespan ------------------------------------------------------------------------------


async def run_lifespan(app: Any, events: list[str], sent: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    queue = iter([{"type": f"lifespan.{e}"} for e in events])
    sent = [] if sent is None else sent

    async def receive() -> dict[str, Any]:
        return next(queue)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}, "state": {}}, receive, send)
    return sent


# Local only: the upload dir, its .partial/ and the flock of a live upload are the local store's.


async def test_lifespan_creates_dirs(app, upload_dir):
    assert not upload_dir.exists()
    sent = await run_lifespan(app, ["startup", "shutdown"])
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
    assert (upload_dir / ".partial").is_dir()
    assert_nothing_stored(upload_dir)


async def test_lifespan_sweeps_stale_partials_but_not_live_ones(app, upload_dir):
    partial = upload_dir / ".partial"
    partial.mkdir(parents=True)
    (partial / "0123456789abcdef0123456789abcdef").write_bytes(b"from a crashed run")
    kept = upload_dir / "stored-before"
    kept.write_bytes(b"a stored file is never swept")
    live = partial / "live"
    fd = os.open(live, os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another worker's upload in flight (SPEC §8)
        sent = await run_lifespan(app, ["startup", "shutdown"])
    finally:
        os.close(fd)
    assert sent[0] == {"type": "lifespan.startup.complete"}
    assert sorted(p.name for p in partial.iterdir()) == ["live"]
    assert kept.read_bytes() == b"a stored file is never swept"


async def test_lifespan_startup_fails_with_a_message(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_bytes(b"")
    app = upload_asgi.create_app(upload_asgi.Config(upload_dir=blocker / "uploads"))
    sent: list[dict[str, Any]] = []
    # A send that returns after the failure (a middleware that dropped it): the app
    # raises hypercorn's own error, which hypercorn's lifespan lets through (issue 11).
    with pytest.raises(LifespanFailureError, match="UPLOAD_DIR: "):
        sent = await run_lifespan(app, ["startup"], sent)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert sent[0]["message"].startswith("UPLOAD_DIR: ")


async def test_upload_works_without_lifespan(backend_app, backend):
    # A host that does not forward lifespan to a mounted app: dirs are made on first use.
    reply = await call_app(backend_app, upload_scope(), [form_body([file_part(b"abc", "a.txt")])])
    backend.assert_stored(check_json(reply, 201), b"abc")


# -- routing ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "root_path, path",
    [
        pytest.param("", "/upload", id="no-mount"),
        pytest.param("/files", "/files/upload", id="path-includes-root"),
        pytest.param("/files", "/upload", id="path-without-root"),
        pytest.param("/a/b/", "/a/b/upload", id="root-with-slash"),
        pytest.param("/a/b/", "/a/b//upload", id="root-with-slash-joined"),  # uvicorn --root-path /a/b/
        pytest.param("/", "//upload", id="root-slash-joined"),  # uvicorn --root-path /
        pytest.param("/a//", "/a///upload", id="root-with-slashes-joined"),
    ],
)
async def test_root_path_routing(backend_app, backend, root_path, path):
    body = form_body([file_part(b"mounted", "m.txt")])
    reply = await call_app(backend_app, upload_scope(path, root_path=root_path), [body])
    backend.assert_stored(check_json(reply, 201), b"mounted")


@pytest.mark.parametrize(
    "root_path, path, status",
    [
        pytest.param("/files", "/files", 200, id="root-itself-is-the-page"),
        pytest.param("/files", "/files/", 200, id="root-slash-is-the-page"),
        pytest.param("/files", "/files/health", 200, id="health-under-root"),
        pytest.param("/files", "/filesupload", 404, id="prefix-not-at-slash-boundary"),
        pytest.param("/files", "/files/nope", 404, id="unknown-under-root"),
    ],
)
async def test_root_path_gets(app, root_path, path, status):
    reply = await call_app(app, http_scope(path, "GET", root_path=root_path))
    assert reply.status == status
    reply.check_length()


@pytest.mark.parametrize(
    "path, status",
    [
        pytest.param("http://example.com/health", 200, id="absolute-form"),
        pytest.param("HTTPS://example.com:8443/health", 200, id="scheme-any-case"),
        pytest.param("http://example.com", 200, id="no-path-is-the-page"),
        pytest.param("http://example.com/files/health", 200, id="under-root"),
        pytest.param("ftp://example.com/health", 404, id="not-http"),
        pytest.param("*", 405, id="asterisk-form-is-options-only"),
    ],
)
async def test_absolute_form_targets(app, path, status):
    root_path = "/files" if "/files/" in path else ""
    reply = await call_app(app, http_scope(path, "GET", root_path=root_path))
    assert reply.status == status


async def test_page_links_under_root_path(app):
    reply = await call_app(app, http_scope("/files/", "GET", root_path="/files"))
    assert reply.headers["content-type"].startswith("text/html")
    assert b'action="/files/upload"' in reply.body


@pytest.mark.parametrize("path", ["/nope", "/upload/", "/UPLOAD", "/health/x", "//upload"])
async def test_unknown_path_404(backend_app, backend, path):
    reply = await call_app(backend_app, http_scope(path, "POST", content_type=form_content_type()),
                           [form_body([file_part(b"x")])])
    assert check_json(reply, 404)["error"] == "not_found"
    backend.assert_nothing_stored()


@pytest.mark.parametrize(
    "method, path, allow",
    [
        pytest.param("GET", "/upload", "POST", id="get-upload"),
        pytest.param("PUT", "/upload-multiple", "POST", id="put-upload-multiple"),
        pytest.param("POST", "/", "GET, HEAD", id="post-page"),
        pytest.param("DELETE", "/health", "GET, HEAD", id="delete-health"),
        pytest.param("PATCH", "/metrics", "GET, HEAD", id="patch-metrics"),
    ],
)
async def test_other_method_405_with_allow(backend_app, backend, method, path, allow):
    reply = await call_app(backend_app, http_scope(path, method))
    payload = check_json(reply, 405)
    assert payload["error"] == "method_not_allowed" and payload["detail"]
    assert reply.headers["allow"] == allow
    backend.assert_nothing_stored()


@pytest.mark.parametrize("path", ["/", "/health", "/metrics"])
async def test_head_answers_like_get_without_body(app, path):
    get = await call_app(app, http_scope(path, "GET"))
    head = await call_app(app, http_scope(path, "HEAD"))
    assert head.status == get.status == 200
    assert head.body == b""
    assert head.headers["content-type"] == get.headers["content-type"]
    if path != "/health":  # /health reports free bytes, which move
        assert head.headers["content-length"] == get.headers["content-length"]


async def test_head_on_404_and_405_has_no_body(app):
    head = await call_app(app, http_scope("/nope", "HEAD"))
    assert (head.status, head.body) == (404, b"")
    head = await call_app(app, http_scope("/upload", "HEAD"))
    assert (head.status, head.body, head.headers["allow"]) == (405, b"", "POST")


async def test_health(app):
    reply = await call_app(app, http_scope("/health", "GET"))
    payload = check_json(reply, 200)
    assert payload["status"] == "ok"
    assert payload["uploads_in_flight"] == 0
    assert payload["free_bytes"] > 0


async def test_health_is_503_while_the_upload_dir_cannot_be_used(tmp_path, caplog):
    """A load balancer must not send uploads to an app whose upload dir is unusable."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    app = upload_asgi.create_app(upload_asgi.Config(upload_dir=blocker / "uploads", fsync=False))
    reply = await call_app(app, http_scope("/health", "GET"))
    payload = check_json(reply, 503)
    assert payload["status"] == "unavailable" and payload["free_bytes"] is None
    assert payload["reason"] == "the store cannot be used: Not a directory"  # the path only in the log
    assert f"UPLOAD_DIR: cannot use {blocker / 'uploads'}" in caplog.text
    head = await call_app(app, http_scope("/health", "HEAD"))
    assert (head.status, head.body) == (503, b"")

    blocker.unlink()  # fixed: the next check prepares the dir and reports ok
    blocker.mkdir()
    payload = check_json(await call_app(app, http_scope("/health", "GET")), 200)
    assert payload["status"] == "ok" and payload["free_bytes"] > 0
    assert (blocker / "uploads" / ".partial").is_dir()


async def test_websocket_closed_politely(app):
    sent: list[dict[str, Any]] = []
    events = iter([{"type": "websocket.connect"}])

    async def receive() -> dict[str, Any]:
        return next(events, {"type": "websocket.disconnect", "code": 1000})

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "asgi": {"version": "3.0"}, "path": "/upload", "root_path": "",
             "headers": [], "query_string": b"", "subprotocols": []}
    await app(scope, receive, send)
    assert [m["type"] for m in sent] == ["websocket.close"]
    assert sent[0]["code"] in (1000, 1003, 1008)


async def test_apps_are_independent(tmp_path):
    one = upload_asgi.create_app(upload_asgi.Config(upload_dir=tmp_path / "one", fsync=False))
    two = upload_asgi.create_app(upload_asgi.Config(upload_dir=tmp_path / "two", fsync=False))
    body = form_body([file_part(b"1", "a")])
    reply = await call_app(one, upload_scope(), [body])
    check_json(reply, 201)
    assert len(stored_ids(tmp_path / "one")) == 1
    assert not (tmp_path / "two").exists()
    reply = await call_app(two, upload_scope(), [body])
    assert hashlib.sha256(b"1").hexdigest() == check_json(reply, 201)["sha256"]


@pytest.mark.parametrize("tokens, warned", [({"read_token": "r"}, True), ({"read_token": "r", "token": "w"}, False),
                                            ({}, False)])
async def test_a_read_token_without_an_upload_token_is_warned_of_at_startup(tmp_path, caplog, tokens, warned):
    app = upload_asgi.create_app(upload_asgi.Config(upload_dir=tmp_path / "up", **tokens))
    sent = await run_lifespan(app, ["startup", "shutdown"])
    assert sent[0] == {"type": "lifespan.startup.complete"}
    assert ("may still upload and delete" in caplog.text) == warned
    # Mounted by a host that never forwards lifespan: at the first request instead, once.
    caplog.clear()
    mounted = upload_asgi.create_app(upload_asgi.Config(upload_dir=tmp_path / "up", **tokens))
    for _ in range(2):
        assert (await call_app(mounted, http_scope("/health", "GET"))).status == 200
    assert caplog.text.count("may still upload and delete") == (1 if warned else 0)

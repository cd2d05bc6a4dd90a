"""before_upload and on_upload with the scope (issue 11), in process and through hypercorn.

In process on both storage backends (`backend`); through hypercorn on the local one (its
demo hook writes a file beside the upload).
"""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Any

import pytest

import support
from support import (
    Reply,
    Server,
    assert_stored,
    call_app,
    file_part,
    form_body,
    form_content_type,
    http_scope,
)
from upload_asgi import UploadRefused
from upload_service.hooks import request_headers, takes_scope


def upload_scope(path: str = "/upload", headers: list[tuple[str, str]] | None = None) -> dict[str, Any]:
    """An upload scope with the user header the hooks read."""
    return support.upload_scope(path, headers=headers or [("X-User", "ann")])


class Hook:
    """A before_upload hook, sync or async, that records what it saw and may refuse."""

    def __init__(self, kind: str = "sync", refuse: BaseException | None = None) -> None:
        self.kind = kind
        self.refuse = refuse
        self.calls: list[tuple[dict, dict]] = []
        self.body_events_before: list[int] = []
        self.events = 0  # body events the app had read, seen from the hook

    def __call__(self, scope: dict, headers: dict) -> Any:
        def run() -> None:
            self.calls.append((scope, headers))
            self.body_events_before.append(self.events)
            if self.refuse is not None:
                raise self.refuse
            scope.setdefault("state", {})["user"] = headers.get("x-user")

        if self.kind == "sync":
            return run()

        async def later() -> None:
            await asyncio.sleep(0)
            run()

        return later()


async def call_counting(app: Any, scope: dict, chunks: list[bytes], hook: Hook) -> Reply:
    """call_app, with the hook told how many body events were read so far."""
    events = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    events.append({"type": "http.request", "body": b"", "more_body": False})
    reply = Reply()

    async def receive() -> dict:
        hook.events += 1
        return events.pop(0) if events else {"type": "http.disconnect"}

    await app(scope, receive, reply.record)
    return reply


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_before_upload_sees_the_request_and_lets_it_through(make_backend_app, backend, kind):
    hook = Hook(kind)
    seen: list[tuple[dict, dict]] = []

    async def on_upload(record: dict, scope: dict) -> None:
        seen.append((record, scope))

    app = make_backend_app(on_upload=on_upload, before_upload=hook)
    data = os.urandom(50_000)
    scope = upload_scope(headers=[("X-User", "ann"), ("Accept", "a"), ("Accept", "b")])
    reply = await call_counting(app, scope, [form_body([file_part(data, "a.bin")])], hook)
    assert reply.status == 201, reply.body
    record = reply.json()
    backend.assert_stored(record, data)
    [(hook_scope, headers)] = hook.calls
    assert hook_scope is scope and hook.body_events_before == [0]  # before the first body byte
    assert headers["x-user"] == "ann" and headers["accept"] == "a, b"
    assert headers["content-type"] == form_content_type()
    assert seen == [(record, scope)] and seen[0][1]["state"]["user"] == "ann"


@pytest.mark.parametrize("kind", ["sync", "async"])
async def test_a_refusal_is_the_answer_and_nothing_is_stored(make_backend_app, backend, kind, caplog):
    refusal = UploadRefused(403, "uploads are closed today", code="closed", headers=[("Retry-After", "86400")])
    hook = Hook(kind, refuse=refusal)
    stored: list[dict] = []
    app = make_backend_app(on_upload=stored.append, before_upload=hook)
    with caplog.at_level(logging.INFO, logger="upload_asgi"):
        reply = await call_counting(app, upload_scope(), [form_body([file_part(os.urandom(200_000))])], hook)
    assert reply.status == 403
    reply.check_length()
    assert reply.json() == {"error": "closed", "detail": "uploads are closed today"}
    assert reply.headers["retry-after"] == "86400"
    assert hook.body_events_before == [0] and stored == []
    backend.assert_nothing_stored()
    assert app.metrics.outcomes == {"rejected": 1} and app.metrics.in_flight == 0
    assert "upload refused: 403 closed after 0 bytes: uploads are closed today" in caplog.messages


async def test_a_5xx_refusal_is_the_hosts_decision_not_a_failure(make_backend_app, backend, caplog):
    hook = Hook(refuse=UploadRefused(503, "maintenance", code="maintenance"))
    app = make_backend_app(before_upload=hook)
    with caplog.at_level(logging.INFO, logger="upload_asgi"):
        reply = await call_app(app, upload_scope(), [form_body([file_part(b"x")])])
    assert reply.status == 503 and reply.json()["error"] == "maintenance"
    assert app.metrics.outcomes == {"rejected": 1}
    backend.assert_nothing_stored()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_hook_that_raises_gives_500_and_stores_nothing(make_backend_app, backend, caplog):
    hook = Hook(refuse=RuntimeError("the user database is down"))
    app = make_backend_app(before_upload=hook)
    reply = await call_app(app, upload_scope(), [form_body([file_part(b"x")])])
    assert reply.status == 500
    assert reply.json() == {"error": "internal_error", "detail": "the server's before_upload hook failed"}
    assert "the user database is down" in caplog.text  # logged with its traceback, not sent
    backend.assert_nothing_stored()
    assert app.metrics.outcomes == {"failed": 1}


async def test_the_token_is_checked_before_the_hook(make_backend_app):
    hook = Hook()
    app = make_backend_app(token="s3cret", before_upload=hook)
    reply = await call_app(app, upload_scope(), [form_body([file_part(b"x")])])
    assert reply.status == 401 and hook.calls == []
    reply = await call_app(app, upload_scope(headers=[("Authorization", "Bearer s3cret"), ("X-User", "b")]),
                           [form_body([file_part(b"x")])])
    assert reply.status == 201 and hook.calls[0][1]["x-user"] == "b"


async def test_a_resumable_body_over_the_request_limit_is_refused_before_the_hook(make_backend_app):
    """As for a form: the declared Content-Length is a header check, so the hook never sees a
    creation or a PATCH that the request limit refuses."""
    hook = Hook()
    app = make_backend_app(before_upload=hook, max_request_size=1000)
    tus = [("Tus-Resumable", "1.0.0"), ("Content-Type", "application/offset+octet-stream")]
    creation = support.http_scope("/files", "POST", headers=[*tus, ("Upload-Length", "5000"), ("Content-Length", "2000")])
    reply = await call_app(app, creation, [b"x" * 2000])
    assert (reply.status, reply.json()["limit"], hook.calls) == (413, "request_size", [])
    created = await call_app(app, support.http_scope("/files", "POST", headers=[*tus, ("Upload-Length", "5000")]))
    assert created.status == 201 and len(hook.calls) == 1
    patch = support.http_scope(created.headers["location"], "PATCH",
                               headers=[*tus, ("Upload-Offset", "0"), ("Content-Length", "2000")])
    reply = await call_app(app, patch, [b"x" * 2000])
    assert (reply.status, reply.json()["limit"], len(hook.calls)) == (413, "request_size", 1)


async def test_on_upload_with_one_parameter_still_gets_the_record_alone(make_backend_app):
    got: list[Any] = []

    def one(record):
        got.append(record)

    def with_default(record, extra=None):  # two positional parameters: it gets the scope
        got.append(extra)

    def star(*args):
        got.append(len(args))

    for callback in (one, with_default, star):
        app = make_backend_app(on_upload=callback)
        assert (await call_app(app, upload_scope(), [form_body([file_part(b"x")])])).status == 201
    assert got[0]["size"] == 1 and got[1]["type"] == "http" and got[2] == 2


def test_takes_scope():
    assert not takes_scope(lambda record: None)
    assert takes_scope(lambda record, scope: None)
    assert not takes_scope(lambda record, *, scope=None: None)  # keyword-only: not given


def test_request_headers_join_repeated_names():
    scope = http_scope(headers=[("X-A", "1"), ("x-a", "2"), ("Host", "h")])
    assert request_headers(scope) == {"x-a": "1, 2", "host": "h"}


@pytest.mark.parametrize("status", [200, 302, 600, "403", True])
def test_a_refusal_needs_an_error_status(status):
    with pytest.raises(ValueError):
        UploadRefused(status, "no")


@pytest.mark.parametrize(
    "header",
    [("Content-Length", "3"), ("content-type", "text/html"), ("Transfer-Encoding", "chunked"),
     ("Connection", "keep-alive"), ("X-A", "1\r\nSet-Cookie: a=b"), ("X-A", "nul\0"), ("bad name", "1"), ("", "1")],
)
def test_a_refusal_cannot_set_headers_that_frame_or_break_the_answer(header):
    with pytest.raises(ValueError):
        UploadRefused(429, "slow down", headers=[header])


async def test_a_hook_refusing_with_a_framing_header_fails_as_a_500_with_one_length(make_backend_app, backend):
    """Sent, a second Content-Length made hypercorn drop the answer and left uvicorn's client
    reading 3 bytes of it."""

    def refuse(scope, headers):
        raise UploadRefused(429, "slow down", headers=[("Retry-After", "5"), ("Content-Length", "3")])

    app = make_backend_app(before_upload=refuse)
    reply = await call_app(app, upload_scope(), [form_body([file_part(b"x")])])
    assert reply.status == 500 and reply.json()["error"] == "internal_error"
    [start] = [m for m in reply.messages if m["type"] == "http.response.start"]
    assert [name.lower() for name, _ in start["headers"]].count(b"content-length") == 1
    reply.check_length()
    backend.assert_nothing_stored()


async def test_a_refusal_says_a_detail_that_is_not_text_as_text(make_backend_app, backend):
    def refuse(scope, headers):
        raise UploadRefused(400, 42, code="bad")  # type: ignore[arg-type]

    app = make_backend_app(before_upload=refuse)
    reply = await call_app(app, upload_scope(), [form_body([file_part(b"x")])])
    assert reply.status == 400 and reply.json() == {"error": "bad", "detail": "42"}
    assert app.metrics.outcomes == {"rejected": 1}


async def test_a_hooks_own_cancelled_error_is_its_failure_not_a_disconnect(make_backend_app, backend):
    """A hook that awaits something cancelled raises CancelledError while its request is not
    being cancelled: a 500 like any failing hook (with the ids of what was stored)."""

    async def awaits_a_cancelled_task(*args):
        task = asyncio.ensure_future(asyncio.sleep(10))
        task.cancel()
        await task

    app = make_backend_app(before_upload=awaits_a_cancelled_task)
    reply = await call_app(app, upload_scope(), [form_body([file_part(b"x")])])
    assert reply.json() == {"error": "internal_error", "detail": "the server's before_upload hook failed"}
    backend.assert_nothing_stored()
    app = make_backend_app(on_upload=awaits_a_cancelled_task)
    reply = await call_app(app, upload_scope(), [form_body([file_part(b"kept")])])
    assert reply.status == 500 and reply.json()["ids"] == backend.stored_ids()
    backend.assert_stored(backend.stored_record(reply.json()["ids"][0]), b"kept")
    assert app.metrics.outcomes == {"failed": 1}


# -- through hypercorn -----------------------------------------------------------------------


def test_hooks_through_hypercorn(upload_dir):
    big = os.urandom(3 * 1024 * 1024)
    with Server(upload_dir, app="hook_apps:app", env={"UPLOAD_FSYNC": "0"}) as server, server.client() as client:
        anonymous = client.post("/upload", files={"file": ("a.bin", b"abc")})
        over_quota = client.post("/upload", files={"file": ("big.bin", big)}, headers={"X-User": "small"})
        allowed = client.post("/upload", files={"file": ("big.bin", big)}, headers={"X-User": "ann"})
    assert anonymous.status_code == 403 and anonymous.json() == {"error": "no_user", "detail": "who are you?"}
    assert over_quota.status_code == 413 and over_quota.json()["error"] == "quota"
    assert over_quota.headers["retry-after"] == "3600"
    assert allowed.status_code == 201, allowed.text
    record = allowed.json()
    assert (upload_dir / f"{record['id']}.user").read_text() == "ann"
    (upload_dir / f"{record['id']}.user").unlink()
    assert_stored(upload_dir, record, big)

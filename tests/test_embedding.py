"""Embedding: the on_upload callback, root_path, and mounting under /files in real hosts.

The callback tests run on both storage backends (`backend`): called once the file and
its record are in the store, never for a refused upload, and a raising one keeps them.
"""

from __future__ import annotations

import asyncio
import hashlib
from urllib.parse import unquote
import json
import logging
import os
import re
from typing import Any

import pytest

import upload_asgi
from upload_service import asgi
from support import (
    upload_scope,
    Server,
    assert_stored,
    call_app,
    field_part,
    file_part,
    form_body,
    form_content_type,
    http_scope,
    stored_ids,
)

# -- the on_upload callback -------------------------------------------------------------


class Recorder:
    """An on_upload callback, sync or async, that checks the file is committed when called."""

    def __init__(self, backend: Any, kind: str, fail_on: int | None = None) -> None:
        self.backend = backend
        self.kind = kind
        self.fail_on = fail_on  # raise on this call (0-based)
        self.records: list[dict[str, Any]] = []
        self.committed: list[bool] = []

    def _record(self, record: dict[str, Any]) -> None:
        self.committed.append(self.backend.holds(record))
        self.records.append(record)
        if self.fail_on == len(self.records) - 1:
            raise RuntimeError(f"indexer down while handling {self.backend.upload_dir}/{record['id']}")

    def callback(self):
        if self.kind == "sync":
            return self._record

        async def on_upload(record: dict[str, Any]) -> None:
            await asyncio.sleep(0)  # a real await: the app must await the coroutine
            self._record(record)

        return on_upload


KINDS = [pytest.param("sync", id="sync-callback"), pytest.param("async", id="async-callback")]


@pytest.fixture
def backend_settings() -> dict[str, Any]:
    return {"fsync": False}




@pytest.mark.parametrize("kind", KINDS)
async def test_callback_gets_the_record_of_a_stored_file(make_backend_app, backend, kind):
    recorder = Recorder(backend, kind)
    app = make_backend_app(on_upload=recorder.callback())
    data = os.urandom(100_000)
    body = form_body([field_part("description", "scan"), file_part(data, "scan.pdf", content_type="application/pdf")])
    reply = await call_app(app, upload_scope(), [body])
    assert reply.status == 201, reply.body
    reply.check_length()
    record = reply.json()
    assert recorder.records == [record]
    assert recorder.committed == [True]  # called after commit: file and sidecar in place
    assert record["description"] == "scan" and record["content_type"] == "application/pdf"
    backend.assert_stored(record, data)


@pytest.mark.parametrize("kind", KINDS)
async def test_callback_fires_once_per_file_of_a_multiple_upload(make_backend_app, backend, kind):
    recorder = Recorder(backend, kind)
    app = make_backend_app(on_upload=recorder.callback())
    files = [(f"f{i}.bin", os.urandom(1000 * i)) for i in range(4)]
    body = form_body([file_part(data, name, name="files") for name, data in files])
    reply = await call_app(app, upload_scope("/upload-multiple"), [body])
    assert reply.status == 201, reply.body
    answer = reply.json()
    assert answer["count"] == 4
    assert recorder.records == answer["files"]  # once each, in form order
    assert recorder.committed == [True] * 4  # all files committed before the first call
    assert len({r["id"] for r in recorder.records}) == 4
    for record, (_, data) in zip(answer["files"], files):
        backend.assert_stored(record, data)


async def test_callback_gets_a_copy_of_the_record(make_backend_app, backend):
    def meddle(record: dict[str, Any]) -> None:
        record["id"] = "../../etc/passwd"
        record["size"] = -1

    app = make_backend_app(on_upload=meddle)
    data = b"keep me as I am"
    reply = await call_app(app, upload_scope(), [form_body([file_part(data)])])
    assert reply.status == 201
    backend.assert_stored(reply.json(), data)


def _big_file_body() -> bytes:
    return form_body([file_part(b"x" * 4096)])


FAILURES = [
    pytest.param({"max_file_size": 1024}, {}, [_big_file_body()], False, 413, id="file-too-large"),
    pytest.param({}, {}, [form_body([field_part("description", "no file")])], False, 422, id="no-file"),
    pytest.param(
        {}, {}, [form_body([file_part(b"abc"), field_part("sha256", "0" * 64)])], False, 422, id="sha256-mismatch"
    ),
    pytest.param({}, {}, [form_body([file_part(b"a"), file_part(b"b")])], False, 413, id="two-files-on-upload"),
    pytest.param({}, {"content_type": "text/plain"}, [b"hello"], False, 415, id="not-multipart"),
    pytest.param({}, {}, [form_body([file_part(b"abc")])[:-10]], False, 400, id="truncated-body"),
    pytest.param({"token": "s3cret"}, {}, [form_body([file_part(b"abc")])], False, 401, id="no-token"),
    pytest.param({}, {}, [form_body([file_part(b"x" * 50_000)])[:30_000]], True, None, id="client-disconnects"),
]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize(("overrides", "scope_kwargs", "chunks", "disconnect", "status"), FAILURES)
async def test_callback_never_fires_for_a_failed_upload(
    make_backend_app, backend, kind, overrides, scope_kwargs, chunks, disconnect, status
):
    recorder = Recorder(backend, kind)
    app = make_backend_app(on_upload=recorder.callback(), **overrides)
    scope = http_scope("/upload", content_type=scope_kwargs.get("content_type", form_content_type()))
    reply = await call_app(app, scope, chunks, disconnect_after=disconnect)
    assert reply.status == status, reply.body
    if status is not None:
        reply.check_length()
        assert reply.json()["error"]
    assert recorder.records == []
    backend.assert_nothing_stored()


@pytest.mark.parametrize("kind", KINDS)
async def test_raising_callback_gives_500_and_keeps_the_stored_file(make_backend_app, backend, kind, caplog):
    recorder = Recorder(backend, kind, fail_on=0)
    app = make_backend_app(on_upload=recorder.callback())
    data = os.urandom(50_000)
    with caplog.at_level(logging.ERROR, logger="upload_asgi"):
        reply = await call_app(app, upload_scope(), [form_body([file_part(data, "keep.bin")])])
    assert reply.status == 500
    reply.check_length()
    answer = reply.json()
    assert answer["error"] == "internal_error"
    [file_id] = backend.stored_ids()
    assert answer["ids"] == [file_id]  # the client learns what was stored
    assert "Traceback" not in answer["detail"] and str(backend.upload_dir) not in reply.body.decode()
    # The stored file and its record stay, exactly as a 201 would have left them.
    record = backend.stored_record(file_id)
    assert record["filename"] == "keep.bin"
    backend.assert_stored(record, data)
    assert recorder.records == [record]
    backend.assert_nothing_in_flight()
    # Logged on the server, with the callback's traceback.
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]
    assert any(file_id in r.getMessage() for r in logged), caplog.text
    assert "indexer down" in caplog.text


async def test_callback_raising_on_a_later_file_keeps_every_file(make_backend_app, backend):
    recorder = Recorder(backend, "async", fail_on=1)
    app = make_backend_app(on_upload=recorder.callback())
    files = [os.urandom(2000), os.urandom(3000), os.urandom(4000)]
    body = form_body([file_part(data, f"{i}.bin", name="files") for i, data in enumerate(files)])
    reply = await call_app(app, upload_scope("/upload-multiple"), [body])
    assert reply.status == 500
    ids = reply.json()["ids"]
    assert sorted(ids) == backend.stored_ids() and len(ids) == 3
    for file_id, data in zip(ids, files):
        backend.assert_stored(backend.stored_record(file_id), data)
    assert len(recorder.records) == 2  # the first, and the one that raised


async def test_app_keeps_serving_after_a_raising_callback(make_backend_app, backend):
    calls = []

    def flaky(record: dict[str, Any]) -> None:
        calls.append(record["id"])
        if len(calls) == 1:
            raise ValueError("first call fails")

    app = make_backend_app(on_upload=flaky)
    first = await call_app(app, upload_scope(), [form_body([file_part(b"one")])])
    second = await call_app(app, upload_scope(), [form_body([file_part(b"two")])])
    assert (first.status, second.status) == (500, 201)
    assert len(backend.stored_ids()) == 2


# -- root_path -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "root_path", "expected"),
    [
        pytest.param("/upload", "", "/upload", id="not-mounted"),
        pytest.param("/files/upload", "/files", "/upload", id="path-keeps-root"),  # Starlette, hypercorn
        pytest.param("/upload", "/files", "/upload", id="path-without-root"),  # older servers
        pytest.param("/files", "/files", "/", id="mount-point-itself"),
        pytest.param("/files/", "/files", "/", id="mount-point-slash"),
        pytest.param("/files/", "/files/", "/", id="root-with-slash"),
        pytest.param("/a/b/health", "/a/b", "/health", id="nested-root"),
        pytest.param("/filesystem/upload", "/files", "/filesystem/upload", id="no-partial-segment-match"),
        pytest.param("", "", "/", id="empty-path"),
    ],
)
def test_route_path(path, root_path, expected):
    assert asgi.route_path({"path": path, "root_path": root_path}) == expected


def page_urls(html: str) -> tuple[list[str], str]:
    """The page's form actions, and the root its script builds URLs from."""
    actions = re.findall(r'<form\b[^>]*\baction="([^"]*)"', html)
    settings = re.search(r"SETTINGS\s*=\s*(\{.*?\});", html)
    assert settings, "the page has no SETTINGS object"
    return actions, json.loads(settings.group(1))["root"]


def check_page_under(html: str, prefix: str) -> str:
    """The page's form and script post under `prefix`; return the form's upload URL."""
    actions, root = page_urls(html)
    assert actions, "the page has no form"
    assert all(a.startswith(prefix + "/") for a in actions), actions
    assert root == prefix
    # Any URL the script opens is built from SETTINGS.root, never a bare absolute path.
    assert not re.search(r"""\.open\(\s*["'][A-Z]+["']\s*,\s*["'`]/""", html)
    assert not re.search(r"""fetch\(\s*["'`]/""", html)
    return actions[0]


@pytest.mark.parametrize("scope_path", ["/files/", "/"], ids=["path-keeps-root", "path-without-root"])
async def test_page_under_root_path_posts_under_it(app, scope_path):
    reply = await call_app(app, http_scope(scope_path, method="GET", root_path="/files"))
    assert reply.status == 200
    reply.check_length()
    assert check_page_under(reply.body.decode(), "/files") == "/files/upload"


async def test_page_escapes_a_hostile_root_path(app):
    root = '/x"><script>alert(1)</script>'
    reply = await call_app(app, http_scope(root + "/", method="GET", root_path=root))
    html = reply.body.decode()
    assert "<script>alert(1)" not in html
    assert unquote(page_urls(html)[1]) == root  # the script still sees the real root, as a URL path


async def test_mounted_upload_in_process(app, upload_dir):
    data = os.urandom(10_000)
    scope = http_scope("/files/upload", root_path="/files", content_type=form_content_type())
    reply = await call_app(app, scope, [form_body([file_part(data)])])
    assert reply.status == 201
    assert_stored(upload_dir, reply.json(), data)
    outside = await call_app(app, http_scope("/filesystem/upload", root_path="/files", method="GET"))
    assert outside.status == 404


async def test_without_lifespan_dirs_are_made_and_swept_on_first_use(tmp_path):
    upload_dir = tmp_path / "not" / "yet" / "there"
    app = upload_asgi.create_app(upload_asgi.Config(upload_dir=upload_dir))
    assert not upload_dir.exists()  # create_app touches nothing
    health = await call_app(app, http_scope("/health", method="GET"))
    assert health.status == 200
    assert isinstance(health.json()["free_bytes"], int) and health.json()["free_bytes"] > 0
    assert (upload_dir / ".partial").is_dir()

    # A stale partial file from a crashed process, and a fresh app that never sees lifespan.
    stale = upload_dir / ".partial" / "0123456789abcdef0123456789abcdef"
    stale.write_bytes(b"half a file")
    app = upload_asgi.create_app(upload_asgi.Config(upload_dir=upload_dir))
    data = b"first upload after a crash"
    reply = await call_app(app, http_scope("/upload", content_type=form_content_type()), [form_body([file_part(data)])])
    assert reply.status == 201
    assert not stale.exists()
    assert_stored(upload_dir, reply.json(), data)


# -- mounted in real hosts, through hypercorn ----------------------------------------------------


HOSTS = [
    pytest.param("embed_apps:dispatcher", id="hypercorn-DispatcherMiddleware"),
    pytest.param("embed_apps:starlette", id="starlette-Mount"),
]


@pytest.mark.slow
@pytest.mark.parametrize("host", HOSTS)
def test_mounted_under_files_through_hypercorn(tmp_path, host):
    upload_dir = tmp_path / "uploads"  # not created: with Starlette nobody runs our lifespan
    stale = None
    with Server(upload_dir, app=host, env={"UPLOAD_FSYNC": "0"}) as server, server.client() as client:
        assert client.get("/").text == "the host application"

        page = client.get("/files/")
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert int(page.headers["content-length"]) == len(page.content)
        action = check_page_under(page.text, "/files")
        assert action == "/files/upload"

        if host == "embed_apps:starlette":
            # No lifespan reached the mounted app, so it has not touched the disk yet.
            assert not upload_dir.exists()
        else:
            assert (upload_dir / ".partial").is_dir()  # DispatcherMiddleware forwarded lifespan
            stale = upload_dir / ".partial" / "left-by-a-crash"
            stale.write_bytes(b"stale")  # written after startup: no sweep should run again

        # Post the way the page's form does: to its action, with its field names.
        data = os.urandom(3 * 1024 * 1024 + 17)
        response = client.post(
            action, files={"file": ("photo.jpg", data, "image/jpeg")}, data={"description": "mounted"}
        )
        assert response.status_code == 201, response.text
        record = response.json()
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert record["filename"] == "photo.jpg" and record["description"] == "mounted"
        assert_stored(upload_dir, record, data)

        health = client.get("/files/health").json()
        assert health["status"] == "ok" and health["free_bytes"] > 0 and health["uploads_in_flight"] == 0
        metrics = client.get("/files/metrics").text
        assert 'upload_asgi_uploads_total{outcome="stored"} 1.0' in metrics.splitlines()

        several = client.post(
            "/files/upload-multiple", files=[("files", ("a.txt", b"a")), ("files", ("b.txt", b"bb"))]
        )
        assert several.status_code == 201 and several.json()["count"] == 2

        # Paths outside the mount are the host's, not ours.
        assert client.get("/health").text == "the host application"
        assert client.post("/upload", content=b"x").text == "the host application"
        assert client.get("/files/nope").status_code == 404

    if stale is not None:
        assert stale.exists()
    assert len(stored_ids(upload_dir)) == 3


@pytest.mark.slow
def test_behind_a_proxy_that_strips_the_prefix(upload_dir):
    """nginx `location /files/ { proxy_pass http://app/; }` + `hypercorn --root-path /files`:
    the app sees /upload, and its page still points the browser at /files/upload."""
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}, args=["--root-path", "/files"]) as server:
        with server.client() as client:
            page = client.get("/")  # what the proxy forwards for /files/
            action = check_page_under(page.text, "/files")
            data = os.urandom(100_000)
            response = client.post(action.removeprefix("/files"), files={"file": ("p.bin", data)})
    assert response.status_code == 201, response.text
    assert_stored(upload_dir, response.json(), data)


# -- a bad setting under hypercorn's DispatcherMiddleware (issue 11) ----------------------------


@pytest.mark.parametrize("workers", ["0", "1"])
def test_a_bad_setting_under_the_dispatcher_fails_fast_naming_it(tmp_path, workers):
    """The dispatcher drops lifespan.startup.failed: this waited 60 s for LifespanTimeoutError."""
    import subprocess
    import sys
    import time

    from support import ROOT, free_port

    env = {
        **os.environ,
        "UPLOAD_DIR": str(tmp_path / "uploads"),
        "UPLOAD_MAX_FILE_SIZE": "lots",
        "PYTHONPATH": str(ROOT) + os.pathsep + str(ROOT / "tests"),
    }
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "hypercorn", "-w", workers, "--bind", f"127.0.0.1:{free_port()}", "mounted_app:app"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    took = time.monotonic() - started
    output = done.stdout + done.stderr
    assert took < 20, output
    assert "Lifespan failure in startup. 'UPLOAD_MAX_FILE_SIZE: 'lots' is not a size" in output
    assert "upload_asgi: upload-asgi cannot start: UPLOAD_MAX_FILE_SIZE: 'lots'" in output
    assert "LifespanTimeoutError" not in output and "Running on" not in output
    if workers == "0":
        assert done.returncode != 0  # with workers, hypercorn 0.18 exits 0 (pgjones/hypercorn#269)
    assert not (tmp_path / "uploads").exists()

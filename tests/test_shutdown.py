"""SIGTERM with uploads in flight (issue 11): the grace hypercorn gives them, and nothing left behind.

On both storage backends (on S3 the upload has a part sent when the signal comes)."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import time
from typing import Any

import httpx
import pytest

from support import HeldUpload, Server, file_part, form_body, request_head, wait_for

MiB = 1024 * 1024




def writing(backend: Any) -> bool:
    """An upload is being written: a partial file with bytes in it, or (S3) a multipart upload."""
    if backend.name == "local":
        partial_dir = backend.upload_dir / ".partial"
        return partial_dir.is_dir() and any(p.stat().st_size > 0 for p in partial_dir.iterdir())
    return bool(backend.in_flight())


def upload_server(backend: Any, args: list[str] | None = None, app: str = "upload_asgi:app") -> Server:
    env = {"UPLOAD_FSYNC": "0", **backend.server_env()}
    return Server(backend.upload_dir, app=app, env=env, args=args or []).start()


def terminate(server: Server, group: bool = False) -> None:
    """SIGTERM to hypercorn's main process only, without waiting (`docker stop`, systemd's
    KillMode=mixed), or to every process of the server (KillMode=control-group)."""
    assert server.proc is not None
    if group:
        os.killpg(server.proc.pid, signal.SIGTERM)
    else:
        os.kill(server.proc.pid, signal.SIGTERM)


@pytest.mark.slow
def test_an_upload_cut_off_by_sigterm_leaves_nothing(backend):
    # hypercorn's default --graceful-timeout (3 s): an upload that does not finish in
    # time is cut off; its partial file (on S3: its multipart upload, a part sent) must go with it.
    data = os.urandom(12 * MiB)
    body = form_body([file_part(data, "cut.bin")])
    server = upload_server(backend)
    held = HeldUpload(server.port, body, first=7 * MiB)
    try:
        wait_for(lambda: writing(backend))
        started = time.monotonic()
        terminate(server)
        answer = held.answer_after_waiting()  # the client sends nothing more
        assert server.proc.wait(timeout=30) is not None
        took = time.monotonic() - started
    finally:
        held.close()
        server.stop()
    assert answer.startswith(b"HTTP/1.1 500 \r\ncontent-length: 0\r\n"), answer  # hypercorn's, on cancel
    assert took < 15, f"shutdown took {took:.1f} s"
    backend.assert_nothing_stored()
    backend.assert_nothing_in_flight()
    assert "upload cancelled by the server after" in server.log()


@pytest.mark.slow
@pytest.mark.parametrize(
    "workers, group, app, path",
    [("1", False, "upload_asgi:app", "/upload"), ("2", False, "upload_asgi:app", "/upload"),
     ("2", True, "upload_asgi:app", "/upload"), ("2", False, "embed_apps:starlette", "/files/upload")],
    ids=["w1", "w2", "w2-group", "w2-mounted-without-lifespan"],
)
def test_an_upload_that_ends_within_the_graceful_timeout_is_stored(backend, workers, group, app, path):
    """With -w 2 the idle worker stops at once, and hypercorn's main process then sends SIGTERM to
    the other: it ignores it and finishes the upload. So does every worker when the signal goes to
    the whole group (systemd's default KillMode=control-group), and one whose app is mounted by a
    host that never forwards lifespan (Starlette's Mount: the first request starts it)."""
    data = os.urandom(12 * MiB)
    body = form_body([file_part(data, "finishes.bin")])
    server = upload_server(backend, ["-w", workers, "--graceful-timeout", "30"], app)
    held = HeldUpload(server.port, body, first=7 * MiB, path=path)
    try:
        wait_for(lambda: writing(backend))
        terminate(server, group)
        time.sleep(4)  # past hypercorn's default 3 s: the upload is still being taken
        status, record = held.finish()
        server.proc.wait(timeout=30)
    finally:
        held.close()
        server.stop()
    assert status == 201, record
    backend.assert_stored(record, data)
    backend.assert_nothing_in_flight()


@pytest.mark.slow
def test_a_patch_cut_off_by_sigterm_keeps_what_arrived(backend):
    """Cut off at the graceful timeout, a tus PATCH keeps the bytes that arrived, as when its
    client leaves (SPEC §12: it stays resumable); a restarted server finishes the upload."""
    data = os.urandom(12 * MiB)
    tus = {"Tus-Resumable": "1.0.0"}
    server = upload_server(backend)
    try:
        created = httpx.post(f"{server.url}/files", headers={**tus, "Upload-Length": str(len(data))})
        location = created.headers["location"]
        upload_id = location.rsplit("/", 1)[1]
        head = request_head(location, [*tus.items(), ("Content-Type", "application/offset+octet-stream"),
                                       ("Upload-Offset", "0"), ("Content-Length", str(len(data)))], method="PATCH")
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(head + data[: 7 * MiB])
            if backend.name == "local":
                staged = backend.upload_dir / ".resumable" / upload_id
                wait_for(lambda: staged.stat().st_size == 7 * MiB)
            else:
                wait_for(lambda: backend.in_flight())  # a part sent; the rest is held in memory
                time.sleep(1)
            terminate(server)
            assert server.proc.wait(timeout=30) is not None
    finally:
        server.stop()
    server = upload_server(backend)
    try:
        offset = int(httpx.head(f"{server.url}{location}", headers=tus).headers["upload-offset"])
        assert offset == 7 * MiB if backend.name == "local" else 5 * MiB <= offset <= 7 * MiB
        reply = httpx.patch(f"{server.url}{location}", content=data[offset:], timeout=60, headers={
            **tus, "Content-Type": "application/offset+octet-stream", "Upload-Offset": str(offset)})
        assert reply.status_code == 204, reply.text
        record = httpx.get(f"{server.url}{location}/record").json()
    finally:
        server.stop()
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    backend.assert_stored(record, data)

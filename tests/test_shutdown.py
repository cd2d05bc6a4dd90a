"""SIGTERM with uploads in flight (issue 11): the grace hypercorn gives them, and nothing left behind.

On both storage backends (on S3 the upload has a part sent when the signal comes)."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from support import HeldUpload, Server, file_part, form_body, wait_for

MiB = 1024 * 1024




def writing(backend: Any) -> bool:
    """An upload is being written: a partial file with bytes in it, or (S3) a multipart upload."""
    if backend.name == "local":
        partial_dir = backend.upload_dir / ".partial"
        return partial_dir.is_dir() and any(p.stat().st_size > 0 for p in partial_dir.iterdir())
    return bool(backend.in_flight())


def upload_server(backend: Any, args: list[str] | None = None) -> Server:
    return Server(backend.upload_dir, env={"UPLOAD_FSYNC": "0", **backend.server_env()}, args=args or []).start()


def terminate(server: Server) -> None:
    """SIGTERM to hypercorn's main process only, without waiting (`docker stop`, systemd's
    KillMode=mixed). Its workers install no handler for SIGTERM: sent to the whole group
    (KillMode=control-group) it kills them at once, without any grace (README "Shutdown")."""
    assert server.proc is not None
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
def test_an_upload_that_ends_within_the_graceful_timeout_is_stored(backend):
    data = os.urandom(12 * MiB)
    body = form_body([file_part(data, "finishes.bin")])
    server = upload_server(backend, ["--graceful-timeout", "30"])
    held = HeldUpload(server.port, body, first=7 * MiB)
    try:
        wait_for(lambda: writing(backend))
        terminate(server)
        time.sleep(4)  # past hypercorn's default 3 s: the upload is still being taken
        status, record = held.finish()
        server.proc.wait(timeout=30)
    finally:
        held.close()
        server.stop()
    assert status == 201, record
    backend.assert_stored(record, data)
    backend.assert_nothing_in_flight()

"""SIGTERM with uploads in flight (issue 11): the grace hypercorn gives them, and nothing left behind."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from support import HeldUpload, Server, wait_for, assert_nothing_stored, assert_stored, file_part, form_body

MiB = 1024 * 1024




def writing(partial_dir: Path) -> bool:
    return partial_dir.is_dir() and any(p.stat().st_size > 0 for p in partial_dir.iterdir())


def terminate(server: Server) -> None:
    """SIGTERM to hypercorn's main process only, without waiting (`docker stop`, systemd's
    KillMode=mixed). Its workers install no handler for SIGTERM: sent to the whole group
    (KillMode=control-group) it kills them at once, without any grace (README "Shutdown")."""
    assert server.proc is not None
    os.kill(server.proc.pid, signal.SIGTERM)


@pytest.mark.slow
def test_an_upload_cut_off_by_sigterm_leaves_nothing(upload_dir):
    # hypercorn's default --graceful-timeout (3 s): an upload that does not finish in
    # time is cut off; its partial file must go with it.
    data = os.urandom(4 * MiB)
    body = form_body([file_part(data, "cut.bin")])
    server = Server(upload_dir, env={"UPLOAD_FSYNC": "0"}).start()
    held = HeldUpload(server.port, body, first=2 * MiB)
    try:
        wait_for(lambda: writing(upload_dir / ".partial"))
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
    assert_nothing_stored(upload_dir)
    assert list((upload_dir / ".partial").iterdir()) == []
    assert "upload cancelled by the server after" in server.log()


@pytest.mark.slow
def test_an_upload_that_ends_within_the_graceful_timeout_is_stored(upload_dir):
    data = os.urandom(4 * MiB)
    body = form_body([file_part(data, "finishes.bin")])
    server = Server(upload_dir, env={"UPLOAD_FSYNC": "0"}, args=["--graceful-timeout", "30"]).start()
    held = HeldUpload(server.port, body, first=2 * MiB)
    try:
        wait_for(lambda: writing(upload_dir / ".partial"))
        terminate(server)
        time.sleep(4)  # past hypercorn's default 3 s: the upload is still being taken
        status, record = held.finish()
        server.proc.wait(timeout=30)
    finally:
        held.close()
        server.stop()
    assert status == 201, record
    assert_stored(upload_dir, record, data)
    assert list((upload_dir / ".partial").iterdir()) == []

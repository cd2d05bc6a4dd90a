"""SIGTERM with uploads in flight (issue 11): the grace hypercorn gives them, and nothing left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import time
from pathlib import Path

import pytest

from support import Server, assert_nothing_stored, assert_stored, file_part, form_body, form_content_type

MiB = 1024 * 1024


class HeldUpload:
    """An HTTP/1.1 upload sent by hand: head and first bytes now, the rest on demand."""

    def __init__(self, port: int, body: bytes, first: int) -> None:
        self.body = body
        self.first = first
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = (
            "POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: {form_content_type()}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body[:first])

    def finish(self) -> tuple[int, dict]:
        self.sock.sendall(self.body[self.first :])
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise ConnectionError(f"closed without an answer after {data!r}")
            data += chunk
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(rest) < length:
            rest += self.sock.recv(65536)
        return int(head.split()[1]), json.loads(rest[:length])

    def answer_after_waiting(self) -> bytes:
        """What the server sends without more body: its bytes until it closes."""
        data = b""
        try:
            while chunk := self.sock.recv(65536):
                data += chunk
        except OSError:
            pass
        return data

    def close(self) -> None:
        self.sock.close()


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.05)


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

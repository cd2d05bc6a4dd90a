"""upload-asgi under uvicorn (httptools, uvloop) and granian, not only hypercorn.

Nothing of the app may rely on hypercorn's behaviour: an upload and its download, an
early answer to a client that keeps sending, a client that leaves mid-upload, a bad
setting at lifespan startup. (hypercorn itself is covered by test_server.py and others.)
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import subprocess
import time

import httpx
import pytest

from support import (
    ROOT,
    Server,
    assert_nothing_stored,
    assert_stored,
    file_part,
    form_body,
    form_content_type,
    partial_files,
    raw_request,
    wait_for,
)

MiB = 1024 * 1024
KINDS = [pytest.param("uvicorn", id="uvicorn"), pytest.param("granian", id="granian")]


def request_head(body: bytes) -> bytes:
    return (
        f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: {form_content_type()}\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()


def whole_answer(data: bytes) -> bool:
    """Whether `data` holds a response head and its Content-Length of body."""
    head, found, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?i)content-length: *(\d+)", head)
    return bool(found and match and len(body) >= int(match.group(1)))


@pytest.fixture(params=KINDS)
def served(request, upload_dir):
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0", "UPLOAD_MAX_FILE_SIZE": "8M"}, kind=request.param) as server:
        yield server


def test_an_upload_is_stored_and_served_back(served, upload_dir):
    data = os.urandom(5 * MiB + 17)
    body = form_body([file_part(data, "été.bin")])
    with httpx.Client(base_url=served.url, timeout=60) as client:
        reply = client.post("/upload", content=body, headers={"content-type": form_content_type()})
        assert reply.status_code == 201, reply.text
        record = reply.json()
        assert record["sha256"] == hashlib.sha256(data).hexdigest() and record["filename"] == "été.bin"
        assert reply.headers["location"] == f"/files/{record['id']}"
        assert_stored(upload_dir, record, data)
        download = client.get(f"/files/{record['id']}")
        assert download.status_code == 200 and download.content == data
        part = client.get(f"/files/{record['id']}", headers={"range": "bytes=100-199"})
        assert part.status_code == 206 and part.content == data[100:200]


@pytest.mark.parametrize(
    "kind, prefix_option, proxy_strips",
    [("hypercorn", "--root-path", False), ("uvicorn", "--root-path", True), ("granian", "--url-path-prefix", False)],
)
def test_behind_a_proxy_under_the_apps_own_prefix(kind, prefix_option, proxy_strips, upload_dir):
    """The README's nginx under /files: hypercorn and granian take the path whole, uvicorn
    stripped (it puts --root-path back in front); /files/<id> is then no longer ambiguous."""
    data = os.urandom(100_000)

    def forwarded(path):  # what nginx sends on for the client's path
        return path.removeprefix("/files") if proxy_strips else path

    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}, kind=kind, args=[prefix_option, "/files"]) as server:
        with httpx.Client(base_url=server.url, timeout=30) as client:
            reply = client.post(forwarded("/files/upload"), files={"file": ("a.bin", data)})
            assert reply.status_code == 201, reply.text
            record = reply.json()
            assert reply.headers["location"] == f"/files/files/{record['id']}"
            assert client.get(forwarded(reply.headers["location"])).content == data
            assert "/files/upload" in client.get(forwarded("/files/")).text  # the page
            assert client.get(forwarded("/files/files")).json()["files"] == [record]  # the listing, not the page
            created = client.post(forwarded("/files/files"), headers={"tus-resumable": "1.0.0", "upload-length": "3"})
            assert created.status_code == 201 and created.headers["location"].startswith("/files/files/")
            head = client.head(forwarded(created.headers["location"]), headers={"tus-resumable": "1.0.0"})
            assert head.status_code == 200 and head.headers["upload-offset"] == "0"


@pytest.mark.parametrize("kind", ["hypercorn", "uvicorn", "granian"])
def test_an_absolute_form_target_is_routed_by_its_path(kind, upload_dir):
    """RFC 9112 §3.2.2: a server MUST accept `POST http://host/upload` (hypercorn hands the app
    the whole URL as the path; uvicorn and granian its path)."""
    data = b"absolute form"
    body = form_body([file_part(data)])
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}, kind=kind) as server:
        url = f"http://127.0.0.1:{server.port}"
        head = request_head(body).replace(b"POST /upload ", f"POST {url}/upload ".encode(), 1)
        reply = raw_request(server.port, head, [body])
        assert reply.status == 201, reply.body
        record = reply.json()
        assert_stored(upload_dir, record, data)
        fetch = f"GET {url}/files/{record['id']} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        download = raw_request(server.port, fetch)
        assert download.status == 200 and download.body == data


@pytest.mark.parametrize("kind", ["hypercorn", "uvicorn", "granian"])
def test_an_upgrade_request_is_stored_or_refused_never_taken_short(kind, upload_dir):
    """`curl --http2` on http:// and Java's HttpClient ask for h2c with `Upgrade`. uvicorn's httptools
    passes the app none of such a request's body: a 400 saying so, not a form "with no boundary line"
    (nor a tus PATCH of "0 bytes"); hypercorn and granian pass the body on."""
    data = b"asked for h2c"
    body = form_body([file_part(data)])
    upgrade = b"Connection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\n"
    chunked_head = (f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Type: {form_content_type()}\r\n"
                    "Transfer-Encoding: chunked\r\n").encode() + upgrade + b"\r\n"
    chunked_body = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body), body)
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}, kind=kind) as server:
        head = request_head(body).replace(b"Host: x\r\n", b"Host: x\r\n" + upgrade, 1)
        for head, sent in ((head, body), (chunked_head, chunked_body)):
            reply = raw_request(server.port, head, [sent])
            if reply.status == 201:
                assert kind != "uvicorn"
                assert_stored(upload_dir, reply.json(), data)
            else:
                assert kind == "uvicorn" and reply.status == 400, reply.body
                # uvicorn may answer first itself: it parses the body bytes it did not pass on as a request
                if reply.body != b"Invalid HTTP request received.":
                    assert reply.json()["error"] == "incomplete_body"
                    assert "after 0 bytes, short of the" in reply.json()["detail"]
                assert_nothing_stored(upload_dir)


def test_an_early_answer_reaches_a_client_that_keeps_sending(served, upload_dir):
    """A file over UPLOAD_MAX_FILE_SIZE: 413 while the client is still sending, nothing stored."""
    body = form_body([file_part(os.urandom(20 * MiB))])
    head = request_head(body)
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(head)
        answer = b""
        sent = 0
        sock.settimeout(0.05)
        deadline = time.monotonic() + 30
        while not whole_answer(answer) and time.monotonic() < deadline:
            if sent < len(body):
                try:
                    sent += sock.send(body[sent : sent + 256 * 1024])
                except (BlockingIOError, TimeoutError, ConnectionError):
                    pass
            try:
                answer += sock.recv(65536)
            except (TimeoutError, BlockingIOError):
                pass
            except ConnectionError:
                break
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert b'"error":"payload_too_large"' in answer
    wait_for(lambda: not partial_files(upload_dir), what="the partial file removed")
    assert_nothing_stored(upload_dir)


@pytest.mark.parametrize("kind", ["hypercorn", "uvicorn", "granian"])
def test_a_client_that_reads_only_once_its_body_is_sent_gets_the_early_answer(kind, upload_dir):
    """A 401 while the client sends 3 MB in steady pieces, reading nothing until it has sent
    them all (as `requests` does): the rest is read and dropped before the answer ends, so the
    client gets the answer, not a reset (hypercorn closed as soon as the answer ended)."""
    env = {"UPLOAD_FSYNC": "0", "UPLOAD_TOKEN": "secret"}
    body = form_body([file_part(os.urandom(3 * MiB))])
    with Server(upload_dir, env=env, kind=kind) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(request_head(body))
            for start in range(0, len(body), 100_000):
                sock.sendall(body[start : start + 100_000])
                time.sleep(0.01)
            answer = b""
            while not whole_answer(answer) and (data := sock.recv(65536)):
                answer += data
    assert answer.startswith(b"HTTP/1.1 401"), answer[:200]
    assert b'"error":"unauthorized"' in answer
    assert_nothing_stored(upload_dir)


def test_a_client_that_leaves_mid_upload_leaves_nothing(served, upload_dir):
    body = form_body([file_part(os.urandom(6 * MiB))])
    head = request_head(body)
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as sock:
        sock.sendall(head + body[: 3 * MiB])
        wait_for(lambda: partial_files(upload_dir), what="the upload on disk")
    wait_for(lambda: not partial_files(upload_dir), what="the partial file removed")
    assert_nothing_stored(upload_dir)
    with httpx.Client(base_url=served.url) as client:  # and the server serves on
        assert client.get("/health").json()["uploads_in_flight"] == 0


def test_an_upload_uvicorn_cuts_off_at_its_graceful_timeout_leaves_nothing(upload_dir):
    """uvicorn cancels what still runs at --timeout-graceful-shutdown, sends lifespan.shutdown and
    exits: the app holds the shutdown until the cancelled upload has removed its partial file."""
    body = form_body([file_part(os.urandom(6 * MiB))])
    server = Server(upload_dir, env={"UPLOAD_FSYNC": "0"}, kind="uvicorn", args=["--timeout-graceful-shutdown", "1"])
    with server, socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(request_head(body) + body[: 3 * MiB])
        wait_for(lambda: partial_files(upload_dir), what="the upload on disk")
        server.proc.terminate()
        server.proc.wait(timeout=30)
    assert partial_files(upload_dir) == []
    assert_nothing_stored(upload_dir)
    assert "upload cancelled by the server after" in server.log()


@pytest.mark.parametrize("kind", ["uvicorn", "granian"])
def test_a_bad_setting_stops_startup_naming_the_variable(kind, tmp_path):
    server = Server(tmp_path / "uploads", env={"UPLOAD_MAX_FILES": "0"}, kind=kind)
    proc = subprocess.run(server.cmd, env=server.env, cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "UPLOAD_MAX_FILES" in proc.stdout + proc.stderr

"""The files resource through a real `hypercorn upload_asgi:app`: HTTP/1.1, h2c, curl, raw requests.

The downloads, deletes and ids run on both storage backends (`backend_server`). Local
only: the hostile ids (refused before any store is asked: test_files checks that on both,
in process) and the big download, whose file is written into the upload dir by hand.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx
import pytest

from support import Server, raw_request, read_vmhwm_kib, request_head, serving_pid, stored_ids

MiB = 1024 * 1024
NAME = "Frühstück «menu» 日本.bin"


def check(reply: httpx.Response) -> httpx.Response:
    """Content-Length is the body's length (none for 204 and 304; the GET's size for HEAD)."""
    if reply.status_code in (204, 304):
        assert "content-length" not in reply.headers and reply.content == b""
    elif reply.request.method != "HEAD":
        assert int(reply.headers["content-length"]) == len(reply.content)
    return reply


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def upload(client: httpx.Client, data: bytes, name: str = NAME, content_type: str = "application/x-demo") -> Any:
    reply = check(client.post("/upload", files={"file": (name, data, content_type)}))
    assert reply.status_code == 201, reply.text
    assert reply.headers["location"] == f"/files/{reply.json()['id']}"
    return reply.json()


@pytest.fixture(scope="module")
def payload() -> bytes:
    return os.urandom(5 * MiB + 3)


def test_download_a_few_mb_with_a_non_ascii_name(backend_server, payload, backend):
    with backend_server.client() as client:
        record = upload(client, payload)
        url = f"/files/{record['id']}"
        reply = check(client.get(url))
        head = check(client.head(url))
        ranged = check(client.get(url, headers={"range": "bytes=1048570-2097160"}))
        suffix = check(client.get(url, headers={"range": "bytes=-100"}))
        beyond = check(client.get(url, headers={"range": f"bytes={len(payload)}-"}))
        cached = check(client.get(url, headers={"if-none-match": reply.headers["etag"]}))
        stale = check(client.get(url, headers={"range": "bytes=0-9", "if-range": '"not-it"'}))
        fresh = check(client.get(url, headers={"range": "bytes=0-9", "if-range": reply.headers["last-modified"]}))
        the_record = check(client.get(url + "/record"))
        listing = check(client.get("/files"))
    assert reply.status_code == 200 and sha(reply.content) == sha(payload)
    headers = reply.headers
    assert headers["content-type"] == "application/x-demo"
    assert headers["etag"] == f'"{sha(payload)}"'
    assert headers["repr-digest"] == f"sha-256=:{base64.b64encode(hashlib.sha256(payload).digest()).decode()}:"
    assert headers["accept-ranges"] == "bytes" and headers["last-modified"].endswith(" GMT")
    disposition = headers["content-disposition"]
    assert disposition.startswith('attachment; filename="Fruhstuck _menu_ __.bin"; filename*=UTF-8\'\'')
    assert unquote(disposition.split("filename*=UTF-8''")[1]) == NAME
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(payload)) and head.headers["etag"] == headers["etag"]
    assert ranged.status_code == 206 and ranged.content == payload[1048570:2097161]
    assert ranged.headers["content-range"] == f"bytes 1048570-2097160/{len(payload)}"
    assert suffix.status_code == 206 and suffix.content == payload[-100:]
    assert beyond.status_code == 416 and beyond.headers["content-range"] == f"bytes */{len(payload)}"
    assert beyond.json()["error"] == "range_not_satisfiable"
    assert cached.status_code == 304 and cached.headers["etag"] == headers["etag"]
    assert stale.status_code == 200 and len(stale.content) == len(payload)
    assert fresh.status_code == 206 and fresh.content == payload[:10]
    assert the_record.json() == record
    assert listing.json() == {"files": [record], "next_cursor": None}
    backend.assert_stored(record, payload)


def test_delete_over_the_wire(backend_server, backend):
    with backend_server.client() as client:
        record = upload(client, b"short-lived")
        gone = check(client.delete(f"/files/{record['id']}"))
        after = check(client.get(f"/files/{record['id']}"))
        again = check(client.delete(f"/files/{record['id']}"))
    assert gone.status_code == 204
    assert after.status_code == 404 and after.json()["error"] == "not_found"
    assert again.status_code == 404
    backend.assert_nothing_stored()


def test_http2_download(backend_server, payload):
    with backend_server.client(http1=False, http2=True) as client:  # h2c with prior knowledge
        record = upload(client, payload)
        url = f"/files/{record['id']}"
        reply = check(client.get(url))
        ranged = check(client.get(url, headers={"range": "bytes=100-"}))
        head = check(client.head(url))
        cached = check(client.get(url, headers={"if-none-match": f'W/"{record["sha256"]}"'}))
    assert reply.http_version == "HTTP/2" and reply.status_code == 200
    assert sha(reply.content) == sha(payload) and reply.headers["etag"] == f'"{sha(payload)}"'
    assert ranged.status_code == 206 and ranged.content == payload[100:]
    assert head.http_version == "HTTP/2" and head.headers["content-length"] == str(len(payload))
    assert cached.status_code == 304


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl not installed")
def test_curl_saves_under_the_name_and_resumes(backend_server, payload, tmp_path):
    with backend_server.client() as client:
        plain = upload(client, payload, "report v1.bin")
        fancy = upload(client, b"fancy", NAME)
    out = tmp_path / "curl"
    out.mkdir()

    def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run(["curl", "-sS", "--fail", *args], cwd=out, capture_output=True, timeout=60, check=True)

    curl("-OJ", f"{backend_server.url}/files/{plain['id']}")
    assert sha((out / "report v1.bin").read_bytes()) == sha(payload)
    curl("-OJ", f"{backend_server.url}/files/{fancy['id']}")  # curl -J takes the ASCII filename=
    assert (out / "Fruhstuck _menu_ __.bin").read_bytes() == b"fancy"
    part = curl("-r", "0-99", f"{backend_server.url}/files/{plain['id']}").stdout
    assert part == payload[:100]
    (out / "resumed.bin").write_bytes(payload[: 2 * MiB])  # an interrupted download
    curl("-C", "-", "-o", "resumed.bin", f"{backend_server.url}/files/{plain['id']}")
    assert sha((out / "resumed.bin").read_bytes()) == sha(payload)


@pytest.mark.parametrize(
    "target, statuses",
    [
        pytest.param("/files/..%2F..%2Fetc%2Fpasswd", {404}, id="encoded-traversal"),
        pytest.param("/files/../../etc/passwd", {404}, id="traversal"),
        pytest.param("/files/%2e%2e", {404}, id="encoded-dots"),
        pytest.param("/files/%00", {404}, id="nul"),
        pytest.param("/files/{id}%00", {404}, id="id-then-nul"),
        pytest.param("/files/{id}.json", {404}, id="sidecar"),
        pytest.param("/files/{id}%2Erecord", {404}, id="encoded-dot"),
        pytest.param("/files/.partial", {404}, id="partial-dir"),
        pytest.param("/files/{ID}", {404}, id="upper-case"),
        pytest.param("/files/%30%31%32%33%34%35%36%37%38%39%61%62%63%64%65%66" * 1, {404}, id="encoded-hex-16"),
        pytest.param("/files/" + "a" * 8000, {404, 400, 414, 431}, id="very-long"),
    ],
)
def test_hostile_ids_over_the_wire(server, target, statuses, upload_dir):
    with server.client() as client:
        record = upload(client, b"keep me")
    path = target.format(id=record["id"], ID=record["id"].upper())
    for method in ("GET", "DELETE"):
        reply = raw_request(server.port, request_head(path, [("Connection", "close")], method=method), close_wait=2)
        assert reply.status in statuses, (method, reply.status, reply.body[:200])
        assert int(reply.headers["content-length"]) == len(reply.body)
        assert b"keep me" not in reply.body and b"root:" not in reply.body
    assert raw_head_status(server.port, path) in statuses
    assert stored_ids(upload_dir) == [record["id"]]


def raw_head_status(port: int, path: str) -> int:
    """HEAD over a raw socket (raw_request would wait for a body a HEAD never has)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(request_head(path, [("Connection", "close")], method="HEAD"))
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data:
                break
            head += data
    return int(head.split(b" ", 2)[1])


def test_encoded_id_is_still_the_id(backend_server):
    """A percent-encoded id decodes to the id itself (ASGI paths are decoded): served, not refused."""
    with backend_server.client() as client:
        record = upload(client, b"encoded")
    encoded = "".join(f"%{ord(c):02x}" for c in record["id"])
    reply = raw_request(backend_server.port, request_head(f"/files/{encoded}", [("Connection", "close")], method="GET"))
    assert reply.status == 200 and reply.body == b"encoded"


def read_io(pid: int) -> dict[str, int]:
    fields = {}
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = int(value)
    return fields


@pytest.mark.slow
def test_big_download_in_flat_memory_and_a_client_leaving_stops_the_reads(upload_dir):
    size = 512 * MiB
    upload_dir.mkdir(parents=True)
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}) as server, server.client() as client:
        # Place the file as a stored one (uploading 512 MiB would only slow the test).
        record = upload(client, b"seed")
        path = upload_dir / record["id"]
        with open(path, "wb") as f:
            block = os.urandom(MiB)
            digest = hashlib.sha256()
            for _ in range(size // MiB):
                f.write(block)
                digest.update(block)
        sidecar = upload_dir / f"{record['id']}.json"
        sidecar.write_text(json.dumps({**record, "size": size, "sha256": digest.hexdigest()}))
        pid = serving_pid(server)
        warm = upload(client, os.urandom(3 * MiB), "warm.bin")
        assert len(check(client.get(f"/files/{warm['id']}")).content) == 3 * MiB  # every path once
        before = read_vmhwm_kib(pid)
        got = hashlib.sha256()
        received = 0
        started = time.monotonic()
        with client.stream("GET", f"/files/{record['id']}") as reply:
            assert reply.status_code == 200 and reply.headers["content-length"] == str(size)
            for chunk in reply.iter_bytes(256 * 1024):
                got.update(chunk)
                received += len(chunk)
        seconds = time.monotonic() - started
        grown_mib = (read_vmhwm_kib(pid) - before) / 1024
        assert received == size and got.hexdigest() == digest.hexdigest()
        assert grown_mib < 48, f"the server grew {grown_mib:.0f} MiB serving {size // MiB} MiB"
        print(f"512 MiB download: {size / MiB / seconds:.0f} MiB/s, peak RSS grew {grown_mib:.1f} MiB")

        # A client that reads 1 MiB and leaves: the server stops reading the file.
        io_before = read_io(pid)["rchar"]
        with client.stream("GET", f"/files/{record['id']}") as reply:
            next(reply.iter_bytes(MiB))
        time.sleep(1.0)
        assert check(client.get("/health")).status_code == 200
        read_after = read_io(pid)["rchar"] - io_before
        assert read_after < size // 4, f"the server read {read_after / MiB:.0f} MiB for a client that left"

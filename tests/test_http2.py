"""HTTP/2 through real hypercorn: over TLS (ALPN h2) and cleartext h2c.

Hypercorn 0.18 speaks h2c two ways: with prior knowledge (the client opens with the
HTTP/2 preface) for any request, and by `Upgrade: h2c` only for requests without a
body; an upload carrying `Upgrade: h2c` is answered in HTTP/1.1 (hypercorn ignores
the upgrade), which these tests check too.

httpx/httpcore copy the rest of a `bytes` body for every 16 KiB DATA frame they send
(quadratic: 50 MiB takes ~20 s), so bodies are streamed in 64 KiB chunks here, as a
file would be.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import ssl
import time
from pathlib import Path
from typing import Iterator

import h2.config
import h2.connection
import h2.events
import httpx
import pytest
import trustme

from support import (
    Server,
    assert_nothing_stored,
    assert_stored,
    field_part,
    file_part,
    form_body,
    form_content_type,
    stored_ids,
)

MiB = 1024 * 1024


def stream(body: bytes, size: int = 64 * 1024) -> Iterator[bytes]:
    view = memoryview(body)
    for i in range(0, len(body), size):
        yield bytes(view[i : i + size])


def upload_headers(body: bytes) -> dict[str, str]:
    return {"content-type": form_content_type(), "content-length": str(len(body))}


@pytest.fixture
def tls(tmp_path: Path) -> tuple[Path, ssl.SSLContext]:
    """A throwaway CA and a certificate for 127.0.0.1: the server's PEM, the client's context."""
    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(str(pem))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return pem, context


@pytest.fixture
def tls_server(upload_dir: Path, tls: tuple[Path, ssl.SSLContext]) -> Iterator[Server]:
    pem, _ = tls
    args = ["--certfile", str(pem), "--keyfile", str(pem)]
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}, args=args, scheme="https") as running:
        yield running


@pytest.fixture
def h2c_server(upload_dir: Path) -> Iterator[Server]:
    env = {"UPLOAD_FSYNC": "0", "UPLOAD_MAX_FILE_SIZE": "16M"}
    with Server(upload_dir, env=env) as running:
        yield running


def sha256_of_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(MiB):
            digest.update(chunk)
    return digest.hexdigest()


# -- over TLS --------------------------------------------------------------------------


@pytest.mark.slow
def test_http2_tls_upload_of_50_mib(tls_server, tls, upload_dir):
    _, context = tls
    data = os.urandom(50 * MiB)
    body = form_body([field_part("description", "over h2"), file_part(data, "big.bin")])
    with httpx.Client(base_url=tls_server.url, http2=True, verify=context, timeout=120) as client:
        response = client.post("/upload", content=stream(body), headers=upload_headers(body))
        health = client.get("/health")
    assert response.http_version == "HTTP/2"
    assert response.status_code == 201, response.text
    assert int(response.headers["content-length"]) == len(response.content)
    record = response.json()
    expected = hashlib.sha256(data).hexdigest()
    assert record["sha256"] == expected and record["size"] == 50 * MiB
    assert record["description"] == "over h2"
    assert sha256_of_file(upload_dir / record["id"]) == expected
    assert (upload_dir / f"{record['id']}.json").is_file()
    assert list((upload_dir / ".partial").iterdir()) == []
    assert health.http_version == "HTTP/2" and health.json()["uploads_in_flight"] == 0


@pytest.mark.slow
async def test_http2_tls_concurrent_streams_on_one_connection(tls_server, tls, upload_dir):
    _, context = tls
    files = [os.urandom(3 * MiB + i) for i in range(6)]
    limits = httpx.Limits(max_connections=1)  # all six streams share one TLS connection
    async with httpx.AsyncClient(
        base_url=tls_server.url, http2=True, verify=context, timeout=120, limits=limits
    ) as client:

        async def send(i: int, data: bytes) -> httpx.Response:
            body = form_body([file_part(data, f"{i}.bin")])

            async def chunks():
                for chunk in stream(body):
                    yield chunk

            return await client.post("/upload", content=chunks(), headers=upload_headers(body))

        responses = await asyncio.gather(*(send(i, d) for i, d in enumerate(files)))
    assert [r.http_version for r in responses] == ["HTTP/2"] * 6
    assert [r.status_code for r in responses] == [201] * 6
    records = [r.json() for r in responses]
    assert len({r["id"] for r in records}) == 6
    for record, data in zip(records, files):
        assert_stored(upload_dir, record, data)


def test_tls_server_still_speaks_http11(tls_server, tls, upload_dir):
    _, context = tls
    data = os.urandom(MiB)
    with httpx.Client(base_url=tls_server.url, verify=context) as client:
        response = client.post("/upload", files={"file": ("a.bin", data)})
    assert response.http_version == "HTTP/1.1" and response.status_code == 201
    assert_stored(upload_dir, response.json(), data)


# -- cleartext h2c -------------------------------------------------------------------------


def test_h2c_prior_knowledge_upload(h2c_server, upload_dir):
    data = os.urandom(8 * MiB + 3)
    body = form_body([file_part(data, "h2c.bin")])
    with httpx.Client(base_url=h2c_server.url, http1=False, http2=True, timeout=60) as client:
        response = client.post("/upload", content=stream(body), headers=upload_headers(body))
        several = client.post("/upload-multiple", files=[("files", ("x", b"x")), ("files", ("y", b"yy"))])
    assert response.http_version == "HTTP/2"
    assert response.status_code == 201, response.text
    assert_stored(upload_dir, response.json(), data)
    assert several.http_version == "HTTP/2" and several.json()["count"] == 2


class RawH2:
    """A small HTTP/2 client on the h2 library that reads while it sends, as browsers do."""

    def __init__(self, port: int, sock: socket.socket | None = None, upgraded: h2.connection.H2Connection | None = None):
        self.sock = sock or socket.create_connection(("127.0.0.1", port), timeout=20)
        self.conn = upgraded or h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        if upgraded is None:
            self.conn.initiate_connection()
        self.flush()

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.sock.sendall(data)

    def events(self) -> list[h2.events.Event]:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the server closed the connection")
        events = self.conn.receive_data(data)
        self.flush()
        return events

    def request(
        self, path: str, body: bytes = b"", headers: dict[str, str] | None = None, method: str = "POST",
        stop_after: int | None = None, stream_id: int | None = None, keep_sending: bool = False,
    ) -> tuple[int | None, bytes, str]:
        """Send a request, keep reading; stop sending when an answer comes (`keep_sending`: when
        the stream ends; or at `stop_after` bytes, then reset the stream). Return (status, body,
        how the stream ended)."""
        if stream_id is None:
            stream_id = self.conn.get_next_available_stream_id()
            fields = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "127.0.0.1")]
            fields += list((headers or {}).items())
            self.conn.send_headers(stream_id, fields, end_stream=not body and method == "GET")
        sent, status, answer, ended = 0, None, b"", ""
        limit = len(body) if stop_after is None else stop_after
        deadline = time.monotonic() + 30
        while not ended:
            assert time.monotonic() < deadline, "no answer in time"
            while (status is None or keep_sending) and sent < limit:
                window = min(self.conn.local_flow_control_window(stream_id), self.conn.max_outbound_frame_size)
                if window <= 0:
                    break
                step = min(window, limit - sent)
                self.conn.send_data(stream_id, body[sent : sent + step])
                sent += step
                if sent == len(body):
                    self.conn.end_stream(stream_id)
            if stop_after is not None and sent >= stop_after and status is None:
                self.conn.reset_stream(stream_id)
                self.flush()
                return None, b"", "reset-by-client"
            self.flush()
            for event in self.events():
                if getattr(event, "stream_id", None) != stream_id:
                    continue
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                elif isinstance(event, h2.events.DataReceived):
                    answer += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                elif isinstance(event, h2.events.StreamEnded):
                    ended = "ended"
                elif isinstance(event, h2.events.StreamReset):
                    ended = "reset-by-server"
        return status, answer, ended

    def close(self) -> None:
        self.sock.close()


def test_h2c_upgrade_without_body_switches_to_http2(h2c_server):
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    settings = conn.initiate_upgrade_connection().decode()  # already base64url
    sock = socket.create_connection(("127.0.0.1", h2c_server.port), timeout=20)
    sock.sendall(
        "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        f"Upgrade: h2c\r\nHTTP2-Settings: {settings}\r\n\r\n".encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101 ")
    client = RawH2(h2c_server.port, sock=sock, upgraded=conn)
    try:
        status, answer, ended = client.request("/health", method="GET", stream_id=1)  # stream 1 = the GET
        assert (status, ended) == (200, "ended")
        assert b'"status":"ok"' in answer
    finally:
        client.close()


def test_h2c_upgrade_on_an_upload_is_answered_in_http11(h2c_server, upload_dir):
    data = os.urandom(100_000)
    body = form_body([file_part(data)])
    with httpx.Client(base_url=h2c_server.url) as client:
        response = client.post(
            "/upload", content=body,
            headers={**upload_headers(body), "connection": "Upgrade, HTTP2-Settings",
                     "upgrade": "h2c", "http2-settings": "AAMAAABkAAQAAP__"},
        )
    assert response.http_version == "HTTP/1.1" and response.status_code == 201
    assert_stored(upload_dir, response.json(), data)


def next_upload_goes_through(client: RawH2, upload_dir: Path) -> None:
    """After a refusal, the connection's next upload is stored, and it alone."""
    data = os.urandom(300_000)
    second = form_body([file_part(data, "after-413.bin")])
    status, answer, ended = client.request("/upload", second, upload_headers(second))
    assert (status, ended) == (201, "ended"), answer
    [file_id] = stored_ids(upload_dir)
    assert (upload_dir / file_id).read_bytes() == data


def test_http2_early_413_reaches_a_client_that_reads_while_sending(h2c_server, upload_dir):
    body = form_body([file_part(os.urandom(20 * MiB), "too-big.bin")])  # limit is 16 MiB
    client = RawH2(h2c_server.port)
    try:
        status, answer, ended = client.request("/upload", body, upload_headers(body))
        assert status == 413 and ended == "ended"
        assert b'"error":"payload_too_large"' in answer
        assert_nothing_stored(upload_dir)
        # The connection survives: hypercorn 0.18 forgets a stream once its response
        # ends, and a DATA frame still in flight would then drop the connection
        # (KeyError in hypercorn/protocol/h2.py); the app keeps the answer open while
        # it drains, so the next stream on the same connection still uploads.
        next_upload_goes_through(client, upload_dir)
    finally:
        client.close()


def test_http2_413_past_the_request_limit_spares_the_other_uploads(upload_dir):
    """A body without Content-Length refused when it passes UPLOAD_MAX_REQUEST_SIZE: what the client
    still has in flight is drained too (not only what the limit allowed, which is nothing), so the
    connection and its next upload survive."""
    env = {"UPLOAD_FSYNC": "0", "UPLOAD_MAX_REQUEST_SIZE": "4M"}
    body = form_body([file_part(os.urandom(6 * MiB), "too-big.bin")])
    with Server(upload_dir, env=env) as server:
        client = RawH2(server.port)
        try:
            status, answer, ended = client.request(
                "/upload", body, {"content-type": form_content_type()}, keep_sending=True
            )
            assert (status, ended) == (413, "ended")
            assert b'"error":"payload_too_large"' in answer
            next_upload_goes_through(client, upload_dir)
        finally:
            client.close()


def test_http2_a_refused_stream_that_keeps_sending_spares_the_upload_beside_it(upload_dir):
    """One connection: a valid upload, and beside it a stream refused at once (its Content-Length is
    over UPLOAD_MAX_REQUEST_SIZE) whose client keeps sending, steadily, for longer than every drain
    bound (UPLOAD_IDLE_TIMEOUT 1 s, 2 s). Its answer stays open until its body ends: hypercorn 0.18,
    given DATA for a stream whose answer ended, drops the connection, or with another stream's app
    running wedges it for good (the upload beside it never answered, SIGTERM no longer stops it)."""
    env = {"UPLOAD_FSYNC": "0", "UPLOAD_MAX_REQUEST_SIZE": "1M", "UPLOAD_IDLE_TIMEOUT": "1"}
    data = os.urandom(600_000)
    valid = form_body([file_part(data, "beside.bin")])
    refused_length = 6 * MiB
    fields = [(":method", "POST"), (":path", "/upload"), (":scheme", "http"), (":authority", "127.0.0.1")]
    with Server(upload_dir, env=env) as server:
        client = RawH2(server.port)
        conn = client.conn
        beside = conn.get_next_available_stream_id()
        conn.send_headers(beside, fields + list(upload_headers(valid).items()))
        refused = conn.get_next_available_stream_id()
        conn.send_headers(refused, fields + [("content-type", form_content_type()), ("content-length", str(refused_length))])
        client.flush()
        client.sock.settimeout(0.005)
        # ~200 KB/s beside (3 s), ~1.6 MB/s refused (4 s): both still sending when the old bounds ran out.
        plan = {beside: (valid, 2048), refused: (b"x" * refused_length, 16384)}
        sent = {beside: 0, refused: 0}
        status: dict[int, int] = {}
        answers = {beside: b"", refused: b""}
        ended: set[int] = set()
        deadline = time.monotonic() + 60
        try:
            while len(ended) < 2 or sent[refused] < refused_length:
                assert time.monotonic() < deadline, (status, sent, ended)
                for stream_id, (body, step) in plan.items():
                    step = min(step, len(body) - sent[stream_id], conn.local_flow_control_window(stream_id))
                    if step > 0:
                        done = sent[stream_id] + step == len(body)
                        conn.send_data(stream_id, body[sent[stream_id] : sent[stream_id] + step], end_stream=done)
                        sent[stream_id] += step
                client.flush()
                time.sleep(0.01)
                try:
                    events = client.events()
                except socket.timeout:
                    continue
                for event in events:
                    stream_id = getattr(event, "stream_id", None)
                    if isinstance(event, h2.events.ResponseReceived):
                        status[stream_id] = int(dict(event.headers)[b":status"])
                    elif isinstance(event, h2.events.DataReceived):
                        answers[stream_id] += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, stream_id)
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        ended.add(stream_id)
                client.flush()
            assert status == {beside: 201, refused: 413}, answers
            [file_id] = stored_ids(upload_dir)
            assert (upload_dir / file_id).read_bytes() == data
            client.sock.settimeout(20)
            assert client.request("/health", method="GET")[0] == 200  # the connection serves on
        finally:
            client.close()


@pytest.mark.slow
def test_http2_early_413_to_a_client_that_keeps_sending_spares_the_connection(h2c_server, upload_dir):
    """A client that goes on sending after the 413, for longer than the HTTP/1.1 drain
    bound (2 s): the answer stays open until its body ends, so hypercorn never sees a
    DATA frame for a forgotten stream and the connection's next upload goes through."""
    body = form_body([file_part(os.urandom(20 * MiB), "too-big.bin")])  # limit is 16 MiB
    client = RawH2(h2c_server.port)
    conn = client.conn
    stream_id = conn.get_next_available_stream_id()
    fields = [(":method", "POST"), (":path", "/upload"), (":scheme", "http"), (":authority", "127.0.0.1")]
    conn.send_headers(stream_id, fields + list(upload_headers(body).items()))
    client.flush()
    client.sock.settimeout(0.005)
    sent, status, ended, answered_at = 0, None, False, None
    deadline = time.monotonic() + 60
    try:
        # Send the whole body whatever the server says or does (even if it ends the stream).
        while not (ended and sent == len(body)):
            assert time.monotonic() < deadline, "the too-big upload never ended"
            while sent < len(body):
                window = min(conn.local_flow_control_window(stream_id), conn.max_outbound_frame_size)
                if window <= 0:
                    break
                step = min(window, len(body) - sent)
                conn.send_data(stream_id, body[sent : sent + step], end_stream=sent + step == len(body))
                sent += step
                client.flush()
                if status is not None:
                    time.sleep(0.01)  # after the answer: ~16 KiB every 10 ms, 4 MiB in > 2.5 s
                    break
            try:
                events = client.events()
            except socket.timeout:
                continue
            for event in events:
                if isinstance(event, h2.events.ResponseReceived):
                    status = int(dict(event.headers)[b":status"])
                    answered_at = time.monotonic()
                elif isinstance(event, h2.events.DataReceived):
                    conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                    ended = True
            client.flush()
        assert status == 413
        assert time.monotonic() - answered_at > 2.5  # kept sending past the HTTP/1.1 drain bound
        client.sock.settimeout(20)
        next_upload_goes_through(client, upload_dir)
    finally:
        client.close()


def test_http2_stream_reset_mid_upload_leaves_nothing(h2c_server, upload_dir):
    body = form_body([file_part(os.urandom(4 * MiB))])
    client = RawH2(h2c_server.port)
    try:
        _, _, ended = client.request("/upload", body, upload_headers(body), stop_after=MiB)
        assert ended == "reset-by-client"
        # The same connection still serves: a second stream uploads intact.
        data = os.urandom(300_000)
        second = form_body([file_part(data, "after-reset.bin")])
        status, answer, ended = client.request("/upload", second, upload_headers(second))
        assert (status, ended) == (201, "ended")
    finally:
        client.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any((upload_dir / ".partial").iterdir()):
        time.sleep(0.05)
    [file_id] = stored_ids(upload_dir)
    assert (upload_dir / file_id).read_bytes() == data
    assert list((upload_dir / ".partial").iterdir()) == []
    with httpx.Client(base_url=h2c_server.url) as http:
        metrics = http.get("/metrics").text.splitlines()
    assert 'upload_asgi_uploads_total{outcome="disconnected"} 1.0' in metrics


def files_open_by(pids: list[int], path: Path) -> int:
    count = 0
    for pid in pids:
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            try:
                count += os.readlink(fd) == str(path)
            except OSError:
                pass  # closed meanwhile
    return count


def test_http2_download_the_client_resets_lets_go_of_the_file(h2c_server, upload_dir):
    """hypercorn takes a download's body whole while the client's window is shut, then its last send
    waits for good; once the client resets the stream, the app gives that send up and closes the file."""
    with h2c_server.client() as http:
        record = http.post("/upload", files={"file": ("big.bin", os.urandom(8 * MiB))}).json()
    path = upload_dir / record["id"]
    client = RawH2(h2c_server.port)  # never acknowledges data: the stream's window stays shut
    try:
        stream_id = client.conn.get_next_available_stream_id()
        client.conn.send_headers(stream_id, [(":method", "GET"), (":path", f"/files/{record['id']}"),
                                             (":scheme", "http"), (":authority", "127.0.0.1")], end_stream=True)
        client.flush()
        while not any(isinstance(event, h2.events.ResponseReceived) for event in client.events()):
            pass
        time.sleep(0.5)  # hypercorn has taken the whole body by now
        client.conn.reset_stream(stream_id)
        client.flush()
        deadline = time.monotonic() + 10
        while files_open_by(h2c_server.pids(), path) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert files_open_by(h2c_server.pids(), path) == 0
        status, answer, ended = client.request("/health", method="GET")
        assert (status, ended) == (200, "ended")
    finally:
        client.close()


UNKNOWN = "/files/" + "0" * 32
TUS = {"tus-resumable": "1.0.0"}


@pytest.mark.parametrize(
    "method, path, headers, status",
    [
        ("GET", "/health", {}, 200),
        ("PUT", UNKNOWN, {}, 405),
        ("GET", UNKNOWN, {}, 404),
        ("DELETE", UNKNOWN, TUS, 404),
        ("HEAD", UNKNOWN, TUS, 404),
        ("OPTIONS", "/files", {}, 204),
        ("PATCH", UNKNOWN, {**TUS, "content-type": "application/offset+octet-stream", "upload-offset": "0"}, 404),
        ("POST", "/files", {**TUS, "upload-length": "5"}, 201),
        ("POST", "/upload", {"content-type": "multipart/form-data; boundary=x"}, 400),
    ],
)
def test_http2_a_stream_that_ends_after_content_length_0_spares_the_connection(
    h2c_server, upload_dir, method, path, headers, status
):
    """`content-length: 0`, then the stream's end in an empty DATA frame of its own (httpx sends a PUT
    without content so): answered only after that end, or hypercorn drops the whole connection."""
    client = RawH2(h2c_server.port)
    try:
        stream_id = client.conn.get_next_available_stream_id()
        fields = [(":method", method), (":path", path), (":scheme", "http"), (":authority", "127.0.0.1")]
        client.conn.send_headers(stream_id, [*fields, ("content-length", "0"), *headers.items()])
        client.flush()
        time.sleep(0.2)  # time to answer before the end, if the app did not wait for it
        client.conn.end_stream(stream_id)
        answer = client.request(path, method=method, stream_id=stream_id)
        assert answer[0] == status and answer[2] == "ended"
        next_upload_goes_through(client, upload_dir)
    finally:
        client.close()


@pytest.mark.parametrize("method, path, status", [("GET", "/health", 200), ("GET", "/nowhere", 404), ("PUT", "/upload", 405)])
def test_http2_body_without_a_length_to_a_route_that_reads_none_spares_the_connection(
    h2c_server, upload_dir, method, path, status
):
    """HTTP/2 needs no Content-Length: such a body is read and dropped before the answer, or its next
    DATA frame would reach hypercorn for a stream already ended and drop the whole connection."""
    client = RawH2(h2c_server.port)
    try:
        answer = client.request(path, os.urandom(MiB), method=method, keep_sending=True)
        assert answer[0] == status and answer[2] == "ended"
        next_upload_goes_through(client, upload_dir)
    finally:
        client.close()

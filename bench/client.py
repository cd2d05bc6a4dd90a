"""The raw-socket HTTP/1.1 client: what it sends costs the server as little CPU as a client can.

An upload is a pre-built head, then one pre-built block again and again with
`sendall` (chunked: the block framed once as a chunk): the client and the server
share this machine's cores. `request` sends any other request (downloads, tus).
"""

from __future__ import annotations

import hashlib
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from bench import payloads
from bench.payloads import Upload


# -- the client -------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


def request_head(port: int, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {payloads.CONTENT_TYPE}\r\n{framing}\r\nConnection: close\r\n\r\n"
    ).encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


_FRAMED: dict[int, bytes] = {}


def framed_block(block: bytes) -> bytes:
    """The block as one HTTP chunk, built once per block."""
    if id(block) not in _FRAMED:
        _FRAMED[id(block)] = chunk(block)
    return _FRAMED[id(block)]


def send_upload(port: int, upload: Upload, chunked: bool = False, timeout: float = 600.0) -> Answer:
    """POST the upload on a new connection; return the answer and the seconds it took."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            if chunked:
                sock.sendall(request_head(port, None) + chunk(upload.head))
                block = framed_block(upload.block)
                for _ in range(upload.repeats):
                    sock.sendall(block)
                sock.sendall(chunk(upload.tail) + b"0\r\n\r\n")
            else:
                sock.sendall(request_head(port, upload.body_length) + upload.head)
                for _ in range(upload.repeats):
                    sock.sendall(upload.block)
                sock.sendall(upload.tail)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early; read what it said
        status, body = read_answer(sock)
    return Answer(status, body, time.perf_counter() - started)


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    """The status and the body (to its Content-Length, or until the server closes)."""
    status, headers, body = read_head(sock)
    length = int(headers["content-length"]) if "content-length" in headers else None
    while length is None or len(body) < length:
        received = sock.recv(65536)
        if not received:
            break
        body += received
    return status, body


def check_stored(answer: Answer, upload: Upload) -> bool:
    """The upload app stored exactly what was sent."""
    if answer.status != 201:
        return False
    record = answer.json()
    return record["size"] == upload.size and record["sha256"] == upload.sha256


def check_drained(answer: Answer, upload: Upload, hashed: bool = False) -> bool:
    """The drain-only (or, `hashed`, the store-only) app read the whole body."""
    if answer.status != 200:
        return False
    record = answer.json()
    return record["received"] == upload.body_length and (not hashed or record["sha256"] == upload.body_sha256)


# -- any request: downloads and tus ---------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]  # names lower-cased
    body: bytes
    seconds: float
    received: int = 0  # body bytes counted (downloads keep none of them)
    sha256: str | None = None  # of the body, when asked for
    extra: dict[str, Any] = field(default_factory=dict)

    def json(self) -> Any:
        return json.loads(self.body)


def read_head(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """The status, the headers and whatever of the body came with them."""
    data = b""
    while b"\r\n\r\n" not in data:
        received = sock.recv(65536)
        if not received:
            raise ConnectionError(f"the server closed the connection without an answer: {data[:200]!r}")
        data += received
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers, rest


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None,
            body: Iterable[bytes] = (), length: int | None = None, keep: bool = True,
            digest: bool = False, drop_after: int | None = None, timeout: float = 600.0) -> Response:
    """One request on a new connection. The body is sent block by block (`length` bytes in all).

    `keep=False` counts the answer's body without keeping it (`digest`: and hashes it);
    `drop_after` closes the connection once that many body bytes are sent, without
    reading an answer (a client whose link dropped).
    """
    lines = [f"{method} {path} HTTP/1.1", f"Host: 127.0.0.1:{port}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if length is not None:
        lines.append(f"Content-Length: {length}")
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sent = 0
        try:
            sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode())
            for block in body:
                if drop_after is not None and sent + len(block) >= drop_after:
                    sock.sendall(block[: drop_after - sent])
                    sock.shutdown(socket.SHUT_RDWR)
                    return Response(0, {}, b"", time.perf_counter() - started, extra={"sent": drop_after})
                sock.sendall(block)
                sent += len(block)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early; read what it said
        status, answer_headers, rest = read_head(sock)
        # No Content-Length: read to the close we asked for (a chunked body is counted with its framing).
        bodiless = method == "HEAD" or status in (204, 304)
        expected = 0 if bodiless else int(answer_headers.get("content-length", 1 << 62))
        hasher = hashlib.sha256(rest) if digest else None
        kept, received = [rest], len(rest)
        buffer = bytearray(1 << 20)
        while received < expected:
            n = sock.recv_into(buffer)
            if not n:
                break
            received += n
            if hasher is not None:
                hasher.update(memoryview(buffer)[:n])
            if keep:
                kept.append(bytes(buffer[:n]))
    return Response(status, answer_headers, b"".join(kept) if keep else b"", time.perf_counter() - started,
                    received, hasher.hexdigest() if hasher else None)

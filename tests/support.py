"""Helpers shared by the tests: multipart bodies, ASGI calls fed by hand, disk checks, a real server."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.client import read_head  # noqa: E402  (the bench's raw HTTP/1.1 reader, on ROOT)
BOUNDARY = "----upload-asgi-test-boundary-7MA4YWxkTrZu0gW"


# -- multipart bodies -------------------------------------------------------------


@dataclass
class Part:
    """One part of a multipart/form-data body; `headers` replaces the usual ones."""

    name: str
    data: bytes = b""
    filename: str | None = None
    content_type: str | None = None
    headers: list[bytes] | None = None

    def head(self) -> bytes:
        if self.headers is not None:
            return b"\r\n".join(self.headers)
        disposition = f'form-data; name="{self.name}"'
        if self.filename is not None:
            disposition += f'; filename="{self.filename}"'
        lines = [b"Content-Disposition: " + disposition.encode()]
        if self.content_type is not None:
            lines.append(b"Content-Type: " + self.content_type.encode())
        return b"\r\n".join(lines)


def file_part(data: bytes, filename: str = "data.bin", name: str = "file", content_type: str | None = None) -> Part:
    return Part(name, data, filename=filename, content_type=content_type)


def field_part(name: str, value: str | bytes) -> Part:
    return Part(name, value.encode() if isinstance(value, str) else value)


def form_body(parts: Iterable[Part], boundary: str = BOUNDARY, preamble: bytes = b"", epilogue: bytes = b"") -> bytes:
    b = boundary.encode()
    out = [preamble]
    for part in parts:
        out += [b"--", b, b"\r\n", part.head(), b"\r\n\r\n", part.data, b"\r\n"]
    out += [b"--", b, b"--\r\n", epilogue]
    return b"".join(out)


def partial_files(upload_dir: Path) -> list[Path]:
    """What is in the upload dir's `.partial/` (files being written), sorted."""
    return sorted((upload_dir / ".partial").iterdir())


def multi_body() -> tuple[bytes, list[tuple[str, str, bytes]]]:
    """A form of a description and three files (text, binary, empty), and the files."""
    files = [
        ("one.txt", "text/plain", b"first file\r\n"),
        ("two.png", "image/png", bytes(range(256)) * 3),
        ("three.bin", "application/x-thing", b""),
    ]
    parts = [field_part("description", "three files")]
    parts += [file_part(data, name, "files", ctype) for name, ctype, data in files]
    return form_body(parts), files


def reader_for(store: Any, limits: Any = None, file_field: str = "files") -> Any:
    """A FormReader on `store` for the test BOUNDARY, reading `description` and `sha256`."""
    from targets import FormLimits, FormReader

    limits = limits or FormLimits(max_file_size=1 << 30, max_field_size=64 * 1024, max_files=10, max_parts=20)
    return FormReader(BOUNDARY.encode(), store, limits, file_field=file_field, text_fields=("description", "sha256"))


def form_content_type(boundary: str = BOUNDARY) -> str:
    return f"multipart/form-data; boundary={boundary}"


def split_at(data: bytes, points: Iterable[int]) -> list[bytes]:
    """Cut `data` at the given offsets (sorted, deduplicated, clipped)."""
    cuts = sorted({p for p in points if 0 < p < len(data)})
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def chunks_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


# -- the ASGI app called by hand ---------------------------------------------------


@dataclass
class Reply:
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    messages: list[dict[str, Any]] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)

    def check_length(self) -> None:
        assert int(self.headers["content-length"]) == len(self.body)

    async def record(self, message: dict[str, Any]) -> None:
        """An ASGI `send` that keeps what the app answered."""
        self.messages.append(message)
        if message["type"] == "http.response.start":
            self.status = message["status"]
            self.headers = {k.decode().lower(): v.decode() for k, v in message["headers"]}
        elif message["type"] == "http.response.body":
            self.body += message.get("body", b"")


def http_scope(
    path: str = "/upload",
    method: str = "POST",
    headers: Iterable[tuple[str, str]] = (),
    root_path: str = "",
    content_type: str | None = None,
) -> dict[str, Any]:
    raw = [(k.lower().encode(), v.encode()) for k, v in headers]
    if content_type is not None:
        raw.append((b"content-type", content_type.encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": root_path,
        "query_string": b"",
        "headers": raw,
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


def upload_scope(
    path: str = "/upload",
    headers: Iterable[tuple[str, str]] = (),
    boundary: str = BOUNDARY,
    token: str | None = None,
    length: int | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """A POST scope with a multipart Content-Type, and an Authorization or Content-Length if given."""
    extra = list(headers)
    if token is not None:
        extra.append(("authorization", token))
    if length is not None:
        extra.append(("content-length", str(length)))
    return http_scope(path, headers=extra, content_type=form_content_type(boundary), **kwargs)


async def call_app(app: Any, scope: dict[str, Any], chunks: Iterable[bytes] = (), disconnect_after: bool = False) -> Reply:
    """Run one request: each chunk is an http.request event, then more_body=False.

    With `disconnect_after`, the last event is http.disconnect instead of the end
    of the body (a client that left mid-upload).
    """
    events: list[dict[str, Any]] = [
        {"type": "http.request", "body": chunk, "more_body": True} for chunk in chunks
    ]
    if disconnect_after:
        events.append({"type": "http.disconnect"})
    else:
        events.append({"type": "http.request", "body": b"", "more_body": False})
    queue = iter(events)
    reply = Reply()

    async def receive() -> dict[str, Any]:
        try:
            return next(queue)
        except StopIteration:
            return {"type": "http.disconnect"}

    await app(scope, receive, reply.record)
    return reply


# -- disk checks -----------------------------------------------------------------


def stored_ids(upload_dir: Path) -> list[str]:
    """Ids of stored files (data files, not sidecars, not .partial)."""
    return sorted(p.name for p in upload_dir.iterdir() if p.is_file() and not p.name.endswith(".json"))


def assert_nothing_stored(upload_dir: Path) -> None:
    """The upload dir holds no file and no sidecar, and .partial/ and .resumable/ are empty."""
    if not upload_dir.exists():
        return
    staging = (".partial", ".resumable")
    leftovers = [p.name for p in upload_dir.iterdir() if p.name not in staging]
    for name in staging:
        if (upload_dir / name).exists():
            leftovers += [f"{name}/{p.name}" for p in (upload_dir / name).iterdir()]
    assert leftovers == [], leftovers


def assert_stored(upload_dir: Path, record: dict[str, Any], data: bytes) -> None:
    """The record's file holds exactly `data` and its sidecar holds the record."""
    import hashlib

    assert (upload_dir / record["id"]).read_bytes() == data
    assert record["size"] == len(data)
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert json.loads((upload_dir / f"{record['id']}.json").read_text()) == record


# -- a real hypercorn ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(kind: str, port: int, app: str, args: Iterable[str]) -> list[str]:
    """The command that serves `app` on `port` with the ASGI server `kind`."""
    bind = {
        "hypercorn": ["--bind", f"127.0.0.1:{port}"],
        "uvicorn": ["--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop", "--http", "httptools"],
        "granian": ["--interface", "asgi", "--host", "127.0.0.1", "--port", str(port), "--no-ws"],
    }[kind]
    return [sys.executable, "-m", kind, *bind, *args, app]


class Server:
    """`hypercorn <app>` (or uvicorn, granian) in a subprocess on a free loopback port, stopped by its PID."""

    def __init__(
        self,
        upload_dir: Path,
        app: str = "upload_asgi:app",
        env: dict[str, str] | None = None,
        args: Iterable[str] = (),
        scheme: str = "http",
        kind: str = "hypercorn",
    ) -> None:
        self.upload_dir = upload_dir
        self.port = free_port()
        self.scheme = scheme
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.cmd = server_command(kind, self.port, app, args)
        self.env = {
            **os.environ,
            "UPLOAD_DIR": str(upload_dir),
            "PYTHONPATH": str(ROOT) + os.pathsep + str(ROOT / "tests"),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = upload_dir.parent / f"{kind}-{self.port}.log"

    def start(self, timeout: float = 20.0) -> "Server":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            self.cmd, env=self.env, cwd=ROOT, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.cmd[2]} exited {self.proc.returncode}: {self.log()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"{self.cmd[2]} did not listen in {timeout}s: {self.log()}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def pids(self) -> list[int]:
        """The server process and its children (the workers, with -w N)."""
        assert self.proc is not None
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        return [self.proc.pid, *(int(p) for p in out.stdout.split())]

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self._log.close()
        self.proc = None

    def kill(self) -> None:
        """kill -9 the server and its workers: a crash, not a shutdown."""
        self.stop(signal.SIGKILL)

    def client(self, **kwargs: Any) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def read_vmhwm_kib(pid: int) -> int:
    """Peak resident set size of a process (VmHWM), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


# -- raw HTTP/1.1 clients and the serving process (issue 3) -------------------------


@dataclass
class RawReply:
    """What a raw-socket client saw: the answer, and whether the server then closed."""

    status: int
    headers: dict[str, str]
    body: bytes
    closed: bool  # the server closed the connection after its answer
    sent: int  # body bytes the client got into the socket

    def json(self) -> Any:
        return json.loads(self.body)


def chunked(chunks: Iterable[bytes]) -> Iterator[bytes]:
    """Frame chunks with HTTP/1.1 chunked transfer coding (no Content-Length sent)."""
    for chunk in chunks:
        if chunk:
            yield b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    yield b"0\r\n\r\n"


def request_head(
    path: str, headers: Iterable[tuple[str, str]], method: str = "POST", host: str = "127.0.0.1"
) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", *(f"{k}: {v}" for k, v in headers)]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def raw_request(
    port: int, head: bytes, body: Iterable[bytes] = (), timeout: float = 30.0, close_wait: float = 10.0
) -> RawReply:
    """Send `head` and then `body` from a thread while this thread reads the answer.

    The sender keeps going after an answer arrives (a client that ignores an early
    413) and stops at the first send error. Raises TimeoutError when no complete
    answer arrives within `timeout`; `closed` says whether the server closed the
    connection within `close_wait` seconds after answering.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    stop = threading.Event()
    sent = 0

    def pump() -> None:
        nonlocal sent
        try:
            sock.sendall(head)
            for chunk in body:
                if stop.is_set():
                    return
                sock.sendall(chunk)
                sent += len(chunk)
        except OSError:
            pass

    sender = threading.Thread(target=pump, daemon=True)
    sender.start()
    buf = bytearray()
    deadline = time.monotonic() + timeout

    def read_more(until: float) -> bool:
        """Read once; False at end of stream (or reset)."""
        sock.settimeout(max(0.01, until - time.monotonic()))
        try:
            data = sock.recv(65536)
        except socket.timeout:
            raise TimeoutError("no complete answer in time") from None
        except ConnectionResetError:
            return False
        buf.extend(data)
        return bool(data)

    try:
        while True:  # skip 1xx answers
            while b"\r\n\r\n" not in buf:
                if not read_more(deadline):
                    raise ConnectionError(f"closed before an answer: {bytes(buf)!r}")
            head_end = buf.index(b"\r\n\r\n")
            lines = bytes(buf[:head_end]).decode("latin-1").split("\r\n")
            status = int(lines[0].split()[1])
            del buf[: head_end + 4]
            if status >= 200:
                break
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        length = int(headers.get("content-length", "0"))
        while len(buf) < length:
            if not read_more(deadline):
                raise ConnectionError("closed in the middle of the answer")
        body_bytes = bytes(buf[:length])
        del buf[:length]
        closed = False
        close_deadline = time.monotonic() + close_wait
        try:
            while read_more(close_deadline):
                del buf[:]
            closed = True
        except TimeoutError:
            pass
        return RawReply(status, headers, body_bytes, closed, sent)
    finally:
        stop.set()
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        sock.close()
        sender.join(timeout=10)


def serving_pid(server: "Server") -> int:
    """The process that runs the app: hypercorn's spawned worker with -w N >= 1
    (the started process only supervises), or the started process with -w 0."""
    for pid in server.pids()[1:]:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"spawn_main" in cmdline:
            return pid
    assert server.proc is not None
    return server.proc.pid


def read_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer (its Content-Length, or none: a 204), read off a keep-alive connection."""
    status, headers, body = read_head(sock)
    while len(body) < int(headers.get("content-length", 0)):
        received = sock.recv(65536)
        if not received:
            raise ConnectionError(f"closed after {len(body)} bytes of the body")
        body += received
    return status, headers, body


class HeldUpload:
    """An HTTP/1.1 upload sent by hand: head and first bytes now, the rest on demand."""

    def __init__(self, port: int, body: bytes, first: int, path: str = "/upload") -> None:
        self.body = body
        self.first = first
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = (
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: {form_content_type()}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body[:first])

    def finish(self) -> tuple[int, dict]:
        self.sock.sendall(self.body[self.first :])
        status, _, body = read_answer(self.sock)
        return status, json.loads(body)

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


def wait_for(condition: Any, timeout: float = 30.0, what: str = "condition", every: float = 0.02) -> Any:
    """Poll `condition()` until it is true (and return it), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def assert_error(reply: Any, status: int, code: str) -> dict[str, Any]:
    """An error answer: `status`, an exact length, and JSON with `code` and a human `detail`.

    Takes a recorded `Reply` (call_app) or an httpx response.
    """
    got, body = (reply.status, reply.body) if isinstance(reply, Reply) else (reply.status_code, reply.content)
    assert got == status, body
    assert int(reply.headers["content-length"]) == len(body)
    assert reply.headers["content-type"] == "application/json"
    payload = json.loads(body)
    assert payload["error"] == code
    assert isinstance(payload["detail"], str) and payload["detail"]
    assert b"Traceback" not in body
    return payload

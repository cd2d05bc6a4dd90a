"""Hostile input: memory stays flat in a real hypercorn, and random bodies never cause a 500,
a hang or a leftover file.

The memory tests run the local backend (S3's bound on memory, parts in flight x part size,
is test_s3store's); the random bodies run on both backends.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import os
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest
from hypothesis import assume, event, given, settings, strategies as st

import upload_asgi
from backends import close_app
from support import (
    BOUNDARY,
    Part,
    Server,
    assert_nothing_stored,
    call_app,
    field_part,
    file_part,
    form_body,
    form_content_type,
    http_scope,
    raw_request,
    read_vmhwm_kib,
    request_head,
    serving_pid,
    split_at,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
MEMORY_BOUND_KIB = 60 * 1024  # peak RSS may rise at most this much above idle
BLOCK = b"A" * MiB


# -- memory, through a real hypercorn ------------------------------------------------------


def warm_up(server: Server) -> int:
    """Run every code path once, then return the serving process's idle peak RSS (KiB)."""
    with server.client() as http:
        assert http.get("/health").status_code == 200
        reply = http.post("/upload", files={"file": ("warm", os.urandom(MiB))}, data={"description": "d"})
        assert reply.status_code == 201
        record = reply.json()
        assert http.post("/upload", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
    os.unlink(server.upload_dir / record["id"])
    os.unlink(server.upload_dir / f"{record['id']}.json")
    return read_vmhwm_kib(serving_pid(server))


def repeat_block(megabytes: int) -> Iterable[bytes]:
    return itertools.repeat(BLOCK, megabytes)


def boundary_line() -> bytes:
    return b"--" + BOUNDARY.encode() + b"\r\n"


ATTACKS = {
    # A part header line that never ends.
    "header-line-100MB": (
        boundary_line() + b'Content-Disposition: form-data; name="file"; filename="',
        100,
    ),
    # 100 MB before the first boundary.
    "preamble-100MB": (b"", 100),
    # A field the route does not read, 100 MB long.
    "unregistered-field-100MB": (boundary_line() + field_part("junk", b"").head() + b"\r\n\r\n", 100),
    # Header lines that end, but a header block that does not.
    "header-block-100MB": (boundary_line() + b'Content-Disposition: form-data; name="file"\r\n', 100),
}
EXPECTED = {
    "header-line-100MB": (400, "malformed_multipart"),
    "preamble-100MB": (400, "malformed_multipart"),
    "unregistered-field-100MB": (413, "payload_too_large"),
    "header-block-100MB": (400, "malformed_multipart"),
}


def attack_body(name: str) -> tuple[int, Iterable[bytes]]:
    start, megabytes = ATTACKS[name]
    if name == "header-block-100MB":
        line = b"X-Filler: " + b"f" * 100 + b"\r\n"
        chunks = itertools.chain([start], itertools.repeat(line * (MiB // len(line)), megabytes))
        return len(start) + megabytes * (MiB // len(line)) * len(line), chunks
    return len(start) + megabytes * MiB, itertools.chain([start], repeat_block(megabytes))


@pytest.fixture(scope="module")
def memory_server(tmp_path_factory):
    upload_dir = tmp_path_factory.mktemp("memory") / "uploads"
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}) as server:
        server.idle_kib = warm_up(server)
        yield server


def test_the_app_runs_in_hypercorns_worker_process(memory_server):
    """With the default -w 1, hypercorn spawns one worker: that child, not the started
    process, runs the app, so that is the process whose memory counts."""
    pid = serving_pid(memory_server)
    assert pid != memory_server.proc.pid
    assert "spawn_main" in Path(f"/proc/{pid}/cmdline").read_text()


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_hostile_body_is_refused_in_flat_memory(memory_server, attack, capsys):
    length, body = attack_body(attack)
    head = request_head("/upload", [("Content-Type", form_content_type()), ("Content-Length", str(length))])
    reply = raw_request(memory_server.port, head, body, timeout=60, close_wait=20)
    status, code = EXPECTED[attack]
    assert (reply.status, reply.json()["error"]) == (status, code)
    assert reply.closed
    assert reply.sent < 50 * MiB  # the server stopped reading long before the end
    peak = read_vmhwm_kib(serving_pid(memory_server))
    with capsys.disabled():
        print(f"\n[memory] {attack}: idle {memory_server.idle_kib} KiB, peak {peak} KiB, "
              f"+{peak - memory_server.idle_kib} KiB, client sent {reply.sent / MiB:.1f} MiB")
    assert peak - memory_server.idle_kib < MEMORY_BOUND_KIB
    with memory_server.client() as http:
        assert http.get("/health").json()["uploads_in_flight"] == 0
    assert_nothing_stored(memory_server.upload_dir)


class HashingStream:
    """2 GiB of file data, generated and hashed as it is sent."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.hash = hashlib.sha256()
        self.block = os.urandom(MiB)

    def __iter__(self) -> Iterator[bytes]:
        sent = 0
        counter = 0
        while sent < self.size:
            # Vary each block a little so that the stored file is not one block repeated.
            block = counter.to_bytes(8, "big") + self.block[8:]
            block = block[: self.size - sent]
            self.hash.update(block)
            sent += len(block)
            counter += 1
            yield block


@pytest.mark.slow
def test_2gib_upload_in_flat_memory(tmp_path, capsys):
    upload_dir = tmp_path / "uploads"
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}) as server:
        idle = warm_up(server)
        data = HashingStream(2 * GiB)
        before = form_body([file_part(b"", filename="two-gib.bin")]).split(b"\r\n\r\n\r\n")[0] + b"\r\n\r\n"
        after = b"\r\n--" + BOUNDARY.encode() + b"--\r\n"
        length = len(before) + data.size + len(after)
        head = request_head("/upload", [("Content-Type", form_content_type()), ("Content-Length", str(length))])
        reply = raw_request(server.port, head, itertools.chain([before], data, [after]), timeout=600)
        assert reply.status == 201, reply.body
        record = reply.json()
        assert record["size"] == 2 * GiB
        assert record["sha256"] == data.hash.hexdigest()
        stored = upload_dir / record["id"]
        try:
            assert stored.stat().st_size == 2 * GiB
        finally:
            stored.unlink()
        peak = read_vmhwm_kib(serving_pid(server))
        with capsys.disabled():
            print(f"\n[memory] 2 GiB upload: idle {idle} KiB, peak {peak} KiB, +{peak - idle} KiB")
        assert peak - idle < MEMORY_BOUND_KIB
        with server.client() as http:
            assert http.get("/health").status_code == 200


# -- random bodies, in process -------------------------------------------------------------

FUZZ_LIMITS = dict(
    max_file_size=4 * KiB, max_request_size=16 * KiB, max_field_size=512, max_files=3, max_parts=8,
    fsync=False, idle_timeout=5.0,
)
ANSWER_BOUND = 10.0  # seconds; a hang fails the example instead of the whole run
ALLOWED = {201, 400, 413, 415, 422}


def run_one(
    app: Any, backend: Any, path: str, headers: list[tuple[str, str]], chunks: list[bytes],
    disconnect: bool = False,
):
    """Call the app once (on a loop of its own), check the invariants, and clean up what a 201 stored.

    With `disconnect`, the client leaves instead of ending its body.
    """
    scope = http_scope(path, headers=headers)

    async def call() -> Any:
        try:
            return await asyncio.wait_for(call_app(app, scope, chunks, disconnect_after=disconnect), ANSWER_BOUND)
        finally:
            await close_app(app)  # the S3 store's client is this loop's

    reply = asyncio.run(call())
    if reply.status is None:  # the client left before any answer: none is sent, nothing kept
        assert disconnect and reply.messages == []
        backend.assert_nothing_stored()
        return reply
    assert reply.status in ALLOWED, (reply.status, reply.body)
    reply.check_length()
    payload = reply.json()
    if reply.status != 201:
        assert set(payload) >= {"error", "detail"}
        backend.assert_nothing_stored()
        return reply
    records = [payload] if path == "/upload" else payload["files"]
    body = b"".join(chunks)
    for record in records:
        data = backend.stored_bytes(record["id"])
        assert data in body  # the stored bytes came from the body, whole
        backend.assert_stored(record, data)
        backend.remove(record["id"])
    backend.assert_nothing_stored()
    return reply


@pytest.fixture
def fuzz_app(backend: Any) -> Any:
    return upload_asgi.create_app(backend.config(**FUZZ_LIMITS))


names = st.sampled_from(["file", "files", "description", "sha256", "other", "", "FILE"])
small_bytes = st.binary(max_size=600)
filenames = st.one_of(
    st.none(),
    st.text(max_size=30).map(lambda s: s.replace('"', "").replace("\r", "").replace("\n", "")),
    st.sampled_from(["", "a.txt", "C:\\dir\\x.bin", "../../etc/passwd", "caf\u00e9.txt"]),
)


@st.composite
def parts(draw) -> Part:
    name = draw(names)
    filename = draw(filenames)
    data = draw(st.one_of(small_bytes, st.integers(0, 6 * KiB).map(lambda n: b"\r\n-" * (n // 3))))
    content_type = draw(st.one_of(st.none(), st.sampled_from(["text/plain", "application/x-y; a=b", ""])))
    part = Part(name, data, filename=filename, content_type=content_type)
    if draw(st.booleans()):
        # Mutate the header block: shuffle, change case, add junk lines, or replace it.
        lines = part.head().split(b"\r\n")
        choice = draw(st.integers(0, 3))
        if choice == 0:
            lines = draw(st.permutations(lines))
        elif choice == 1:
            lines = [line.upper() if draw(st.booleans()) else line.lower() for line in lines]
        elif choice == 2:
            lines = lines + draw(st.lists(st.binary(min_size=1, max_size=40), max_size=3))
        else:
            lines = draw(st.lists(st.binary(max_size=60), min_size=1, max_size=3))
        part.headers = lines
    return part


boundaries = st.one_of(
    st.just(BOUNDARY),
    st.text("0123456789abcXYZ'()+_,-./:=? ", min_size=1, max_size=70).filter(lambda b: not b.endswith(" ")),
)


@st.composite
def content_types(draw, boundary: str) -> str | None:
    if draw(st.sampled_from(["right"] * 4 + ["wrong"])) == "right":  # in its various spellings
        return draw(st.sampled_from([
            form_content_type(boundary),
            f'multipart/form-data; boundary="{boundary}"',
            f"Multipart/Form-Data; charset=utf-8; boundary={boundary}",
            f'multipart/form-data;boundary="{boundary}"; boundary=other',
        ]))
    return draw(st.one_of(
        st.just("multipart/form-data"),
        st.just(f"multipart/mixed; boundary={boundary}"),
        st.none(),
        st.text(max_size=60).map(lambda s: s.encode("utf-8", "replace").decode("latin-1")),
        st.just(f"multipart/form-data; boundary={boundary}x"),
        st.just(f"multipart/form-data; boundary={boundary[:-1] or 'q'}"),
    ))


@st.composite
def requests(draw):
    path = draw(st.sampled_from(["/upload", "/upload-multiple"]))
    boundary = draw(boundaries)
    drawn = draw(st.lists(parts(), max_size=5))
    if draw(st.booleans()):  # a well-formed file part somewhere among them
        name = "file" if path == "/upload" else "files"
        drawn.insert(draw(st.integers(0, len(drawn))), file_part(draw(small_bytes), name=name))
    body = form_body(
        drawn,
        boundary=boundary,
        preamble=draw(st.sampled_from([b"", b"preamble\r\n", b"\r\n"])),
        epilogue=draw(st.sampled_from([b"", b"epilogue", b"\r\n--" + boundary.encode() + b"--\r\n"])),
    )
    mutation = draw(st.sampled_from(["none"] * 4 + ["truncate", "flip", "insert", "delete", "random"]))
    if mutation == "truncate":
        body = body[: draw(st.integers(0, len(body)))]
    elif mutation in ("flip", "insert", "delete") and body:
        for _ in range(draw(st.integers(1, 4))):
            if not body:
                break
            i = draw(st.integers(0, len(body) - 1))
            byte = bytes([draw(st.integers(0, 255))])
            if mutation == "flip":
                body = body[:i] + byte + body[i + 1 :]
            elif mutation == "insert":
                body = body[:i] + draw(st.sampled_from([byte, b"\r\n", b"\r\n--" + boundary.encode()])) + body[i:]
            else:
                body = body[:i] + body[i + draw(st.integers(1, 20)) :]
    elif mutation == "random":
        body = draw(st.binary(max_size=3000))
    headers = []
    content_type = draw(content_types(boundary))
    if content_type is not None:
        headers.append(("content-type", content_type))
    length = draw(st.sampled_from(["none", "right", "short", "long", "junk"]))
    if length != "none":
        value = {"right": str(len(body)), "short": str(max(0, len(body) - 7)), "long": str(len(body) + 7),
                 "junk": draw(st.sampled_from(["-1", "abc", "1e3", " 12", "99999999999999999999"]))}[length]
        headers.append(("content-length", value))
    cuts = draw(st.lists(st.integers(0, max(len(body), 1)), max_size=12))
    chunks = split_at(body, cuts)
    if draw(st.booleans()):  # empty chunks in between
        chunks = [c for chunk in chunks for c in (chunk, b"")]
    disconnect = draw(st.sampled_from([False] * 5 + [True]))
    return path, headers, chunks, disconnect


# On both backends; on S3 a tenth of the examples (each is S3 calls).


def test_random_requests_never_500_hang_or_leave_files(backend, fuzz_app):
    @settings(max_examples=backend.examples(600), deadline=None)
    @given(request=requests())
    def check(request):
        path, headers, chunks, disconnect = request
        reply = run_one(fuzz_app, backend, path, headers, chunks, disconnect)
        event(f"{reply.status} {reply.json().get('error', '')}" if reply.status else "disconnected")

    check()


def test_random_bytes_never_500(backend, fuzz_app):
    @settings(max_examples=backend.examples(300), deadline=None)
    @given(
        path=st.sampled_from(["/upload", "/upload-multiple"]),
        body=st.binary(max_size=4000),
        cuts=st.lists(st.integers(0, 4000), max_size=10),
    )
    def check(path, body, cuts):
        run_one(fuzz_app, backend, path, [("content-type", form_content_type())], split_at(body, cuts))

    check()


def test_truncated_valid_bodies(backend, fuzz_app):
    """Every prefix of a valid body is refused with 400 (or stored when whole), never more."""

    @settings(max_examples=backend.examples(300), deadline=None)
    @given(
        path=st.sampled_from(["/upload", "/upload-multiple"]),
        data=st.binary(max_size=5000),
        cut=st.integers(0, 10_000),
        chunk=st.integers(1, 700),
    )
    def check(path, data, cut, chunk):
        name = "file" if path == "/upload" else "files"
        body = form_body([field_part("description", "about it"), file_part(data, name=name)])
        cut = min(cut, len(body))
        prefix = body[:cut]
        chunks = [prefix[i : i + chunk] for i in range(0, len(prefix), chunk)]
        reply = run_one(fuzz_app, backend, path, [("content-type", form_content_type())], chunks)
        if cut == len(body):
            assert reply.status in (201, 413)
        else:
            assume(len(body) - cut > 0)
            # Once the close delimiter is in, what follows (its CRLF) is epilogue.
            complete = b"\r\n--" + BOUNDARY.encode() + b"--" in prefix
            assert reply.status in ((201, 413) if complete else (400, 413))

    check()

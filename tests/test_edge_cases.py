"""Edge cases found in review: each was a 500, a wrong 201, a leftover file or unbounded memory."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from pathlib import Path

import pytest

import targets
from upload_service import framing, localstore, threads
import upload_asgi
from support import (
    BOUNDARY,
    Part,
    assert_nothing_stored,
    assert_stored,
    call_app,
    chunks_of,
    field_part,
    file_part,
    form_body,
    form_content_type,
    http_scope,
)

MiB = 1024 * 1024
B = BOUNDARY.encode()


@pytest.fixture
def config(upload_dir: Path) -> upload_asgi.Config:
    return upload_asgi.Config(upload_dir=upload_dir, fsync=False)


def upload_scope(path: str = "/upload", boundary: str = BOUNDARY, headers=()) -> dict:
    return http_scope(path, headers=headers, content_type=form_content_type(boundary))


def check_error(reply, status: int, code: str) -> None:
    assert reply.status == status, reply.body
    reply.check_length()
    assert reply.json()["error"] == code


@pytest.mark.parametrize(
    "charset, status",
    [("utf-8", 201), ("utf-16", 201), ("", 201), ("idna", 201), ("punycode", 201), ("undefined", 201)],
)
async def test_filename_star_in_any_charset_is_a_record_or_a_400(app, upload_dir, charset, status):
    """A charset other than ISO-8859-1 is read as UTF-8 (never handed to a codec such as idna,
    which raises on bad input): a record, never a 500."""
    data = b"named oddly"
    disposition = f"Content-Disposition: form-data; name=\"file\"; filename*={charset}''%ffname%E2%82%AC.txt"
    body = form_body([Part("file", data, headers=[disposition.encode()])])
    reply = await call_app(app, upload_scope(), [body])
    assert reply.status == status, reply.body
    reply.check_length()
    if status == 400:
        assert_nothing_stored(upload_dir)
        return
    record = reply.json()
    assert record["filename"].endswith("name€.txt")  # read as UTF-8 (%ff is not UTF-8)
    assert_stored(upload_dir, record, data)


def test_filename_star_latin1_is_decoded():
    assert framing.decode_ext_value("ISO-8859-1'fr'%E9t%E9.txt") == "été.txt"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            form_body([file_part(b"abcd"), field_part("description", "x")]).replace(
                b"\r\n--" + B + b"\r\nContent-Disposition: form-data; name=\"description\"",
                b"\r\n--" + B + b" \t\r\nContent-Disposition: form-data; name=\"description\"",
            ),
            id="between-parts",
        ),
        pytest.param(
            form_body([file_part(b"abcd")]).replace(b"--" + B + b"\r\n", b"--" + B + b"  \r\n", 1),
            id="first-boundary",
        ),
        pytest.param(form_body([file_part(b"abcd")]).replace(b"--" + B + b"--", b"--" + B + b" --"), id="close"),
    ],
)
@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
async def test_transport_padding_is_refused_never_misread(app, upload_dir, body, chunk):
    """RFC 2046 padding after a boundary: the parser would read it as body (one file of two
    parts, 201): refused instead."""
    reply = await call_app(app, upload_scope(), chunks_of(body, chunk))
    check_error(reply, 400, "malformed_multipart")
    assert_nothing_stored(upload_dir)


async def test_a_repeated_text_field_is_refused(app, upload_dir):
    """Each text field lives in memory: 200 copies of one would hold 200 x the field limit."""
    parts = [field_part("description", "x" * 1000) for _ in range(3)] + [file_part(b"data")]
    reply = await call_app(app, upload_scope(), [form_body(parts)])
    check_error(reply, 400, "malformed_multipart")
    assert "more than once" in reply.json()["detail"]
    assert_nothing_stored(upload_dir)


async def test_a_boundary_shaped_like_an_rfc2047_word_is_read_as_it_is(app, upload_dir):
    boundary = "=?utf-8?q?x?="  # legal (RFC 2046 bchars); the email package would decode it to "x"
    data = b"data\r\n--x\r\n--x--\r\n"  # what a decoded boundary would cut short
    body = form_body([file_part(data)], boundary=boundary)
    reply = await call_app(app, upload_scope(boundary=f'"{boundary}"'), [body])
    assert reply.status == 201, reply.body
    assert_stored(upload_dir, reply.json(), data)


@pytest.mark.parametrize("length", ["²", "-5", "1e3", " 12 "])
async def test_an_odd_content_length_is_not_a_500(app, upload_dir, length):
    data = b"content"
    reply = await call_app(app, upload_scope(headers=[("content-length", length)]), [form_body([file_part(data)])])
    assert reply.status == 201, reply.body
    assert_stored(upload_dir, reply.json(), data)


@pytest.mark.parametrize("cancels", [1, 3])
async def test_cancelled_during_commit_stores_nothing(config, upload_dir, monkeypatch, cancels):
    """A request cancelled while its files are being committed (on a thread that cannot be
    stopped) ends with nothing stored: the commit finishes, then is undone. Cancelled
    again (a server shutting down cancels everything again), it still waits for the
    commit: cleaning up beside it left files stored."""
    app = upload_asgi.create_app(config)
    committing = threading.Event()
    real_write_sidecar = localstore.write_sidecar

    def slow_write_sidecar(*args, **kwargs):
        committing.set()
        time.sleep(0.3)
        return real_write_sidecar(*args, **kwargs)

    monkeypatch.setattr(localstore, "write_sidecar", slow_write_sidecar)
    body = form_body([file_part(b"one", name="files"), file_part(b"two", name="files")])
    task = asyncio.ensure_future(call_app(app, upload_scope("/upload-multiple"), [body]))
    while not committing.is_set():
        await asyncio.sleep(0.01)
    for _ in range(cancels):
        task.cancel()
        await asyncio.sleep(0.02)
    with pytest.raises(asyncio.CancelledError):
        await task
    assert_nothing_stored(upload_dir)
    assert app.metrics.outcomes == {"disconnected": 1}
    assert app.metrics.in_flight == 0


async def test_cleaning_up_after_a_slow_write_does_not_stall_the_loop(config, upload_dir, monkeypatch):
    """A client that leaves while a block is being written: the cleanup waits for that
    write off the event loop, so every other request goes on meanwhile."""
    app = upload_asgi.create_app(config)
    real_write_all = localstore.write_all

    def slow_write_all(fd, data):
        time.sleep(1.0)
        real_write_all(fd, data)

    monkeypatch.setattr(localstore, "write_all", slow_write_all)
    gaps = []

    async def tick():
        last = time.monotonic()
        while True:
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticker = asyncio.ensure_future(tick())
    body = form_body([file_part(os.urandom(3 * MiB))])
    try:
        reply = await call_app(app, upload_scope(), chunks_of(body[: 2 * MiB], 64 * 1024), disconnect_after=True)
    finally:
        ticker.cancel()
    assert reply.status is None  # the client left: no answer
    assert_nothing_stored(upload_dir)
    # Waiting on the loop for the block being written stalled it for up to the write's 1 s;
    # 0.4 s leaves room for a busy machine's scheduling.
    assert max(gaps) < 0.4, f"the event loop stalled for {max(gaps):.2f} s"


async def test_a_process_stopping_is_not_answered_as_a_500(config, upload_dir):
    """KeyboardInterrupt or SystemExit from below goes up, it is not turned into an answer."""
    app = upload_asgi.create_app(config)
    sent = []

    async def receive():
        raise SystemExit(3)

    async def send(message):
        sent.append(message)

    with pytest.raises(SystemExit):
        await app(upload_scope(), receive, send)
    assert sent == []
    assert app.metrics.in_flight == 0
    assert_nothing_stored(upload_dir)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"Content-Type: text/plain " + b"(" * 1200, id="nested-comments"),
        pytest.param(b'Content-Type: text/plain ("' + b"(" * 1200, id="comments-behind-a-quote"),
        pytest.param(b'Content-Disposition: form-data; name="file"; filename="a" ' + b"(" * 1200, id="in-disposition"),
        pytest.param(b"Content-Type: text/plain" + b";" * 16000, id="separators"),
        pytest.param(b"Content-Type: text/plain;" + b" ;" * 8000, id="spaced-separators"),
        pytest.param(b'Content-Disposition: form-data; name="file"; filename="' + b"a " * 8000 + b'"', id="quoted-spaces"),
        pytest.param(b"Content-Type: text/plain; a=" + b'""' * 7000, id="empty-quoted-strings"),
        pytest.param(b"Content-Type: text/plain; a=" + b"@" * 15000, id="specials"),
        pytest.param(
            b'Content-Disposition: form-data; name="file"; filename="' + b"=?utf-8?q?a?=" * 1100 + b'"',
            id="encoded-words",
        ),
    ],
)
async def test_a_header_the_email_package_chokes_on_is_a_quick_400(app, upload_dir, header):
    """Nested comments made the email package recurse (RecursionError: a 500); thousands of
    separators made it take seconds per part, and the parser as long again (a worker stalled
    for minutes by one request of 200 such parts)."""
    disposition = b'Content-Disposition: form-data; name="file"; filename="a.txt"'
    headers = [header] if header.startswith(b"Content-Disposition") else [disposition, header]
    parts = [Part("file", b"data", headers=headers) for _ in range(5)]
    started = time.monotonic()
    reply = await call_app(app, upload_scope("/upload-multiple"), [form_body(parts)])
    assert time.monotonic() - started < 1.0
    check_error(reply, 400, "malformed_multipart")
    assert_nothing_stored(upload_dir)


async def test_a_long_filename_with_spaces_is_still_read(app, upload_dir):
    filename = " ".join(["word"] * 50) + ".txt"  # 49 spaces, 249 characters
    reply = await call_app(app, upload_scope(), [form_body([file_part(b"data", filename=filename)])])
    assert reply.status == 201, reply.body
    assert reply.json()["filename"] == filename


@pytest.mark.parametrize("digest_file", [b"%s", b"%s\n", b"  %s\r\n", b"%s  data.bin\n"])  # last: sha256sum
async def test_a_sha256_sent_as_a_file_part_is_still_checked(app, upload_dir, digest_file):
    """`curl -F sha256=@digest.txt` sends the digest with a filename: it was silently
    ignored, so a wrong digest still gave 201."""
    import hashlib

    data = b"checked content"
    right = hashlib.sha256(data).hexdigest().encode()
    digest = file_part(digest_file % right, filename="digest.txt", name="sha256", content_type="text/plain")
    reply = await call_app(app, upload_scope(), [form_body([file_part(data), digest])])
    assert reply.status == 201, reply.body
    assert_stored(upload_dir, reply.json(), data)

    wrong = file_part(digest_file % (b"0" * 64), filename="digest.txt", name="sha256")
    reply = await call_app(app, upload_scope(), [form_body([file_part(data), wrong])])
    check_error(reply, 422, "sha256_mismatch")
    assert len(list(upload_dir.glob("*.json"))) == 1  # only the first upload


async def test_a_description_sent_as_a_file_part_is_read(app, upload_dir):
    note = file_part("a note from a file".encode(), filename="note.txt", name="description")
    reply = await call_app(app, upload_scope(), [form_body([note, file_part(b"data")])])
    assert reply.status == 201, reply.body
    assert reply.json()["description"] == "a note from a file"


class CountingExecutor(threads.WriterPool):
    """Counts write jobs submitted and not yet finished."""

    def __init__(self) -> None:
        super().__init__(2)
        self.outstanding = 0
        self.most = 0
        self._lock = threading.Lock()

    def submit(self, fn, *args, **kwargs):
        with self._lock:
            self.outstanding += 1
            self.most = max(self.most, self.outstanding)
        future = super().submit(fn, *args, **kwargs)
        future.add_done_callback(self._done)
        return future

    def _done(self, _future) -> None:
        with self._lock:
            self.outstanding -= 1


def test_many_files_on_a_slow_disk_hold_a_bounded_number_of_blocks(tmp_path, monkeypatch):
    """Each ended file's last block used to go to the executor without backpressure: a form of
    60 files on a slow disk queued ~60 MiB. Now the reader waits, as read_body does."""
    real_write = localstore.os.write

    def slow_write(fd, data):
        time.sleep(0.005)
        return real_write(fd, data)

    monkeypatch.setattr(localstore.os, "write", slow_write)
    files = [os.urandom(MiB - 1 - i) for i in range(24)]
    body = form_body([file_part(data, f"{i}.bin", name="files") for i, data in enumerate(files)])
    store = localstore.LocalStore(tmp_path / "uploads")
    store.prepare()
    limits = targets.FormLimits(max_file_size=1 << 30, max_field_size=1 << 16, max_files=100, max_parts=200)
    executor = CountingExecutor()
    reader = targets.FormReader(B, store, limits, "files", ("description",), executor=executor)
    for chunk in chunks_of(body, 64 * 1024):
        reader.feed(chunk)
        while (job := reader.write_backlog()) is not None:
            job.result()
    reader.close()
    for target in reader.files:
        if target.job is not None:
            target.job.result()
    assert executor.most <= 3
    assert [t.size for t in reader.files] == [len(d) for d in files]
    for target, data in zip(reader.files, files):
        target.sink.close()
        assert target.sink.path.read_bytes() == data

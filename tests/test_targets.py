"""targets.py driven directly: the pure helpers, the Framer, FormReader and the file target.

No ASGI, no event loop: bytes in, files and records out (the way h11 tests its pieces).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import threading
from pathlib import Path

import pytest

from support import BOUNDARY, Part, field_part, file_part, form_body, split_at
from targets import FormLimits, FormReader, UploadFileTarget
from upload_service.errors import FormError, LimitExceeded
from upload_service.framing import (
    DEFAULT_CONTENT_TYPE,
    MAX_FILENAME_CHARS,
    MAX_PART_HEADER_BYTES,
    MAX_PART_HEADER_LINES,
    MAX_PREAMBLE,
    Framer,
    PartInfo,
    clean_filename,
    decode_ext_value,
    parse_header_params,
    read_part_headers,
)
from upload_service.localstore import LocalStore, sweep_stale_partials
from upload_service.threads import WriterPool

B = BOUNDARY.encode()
LIMITS = FormLimits(max_file_size=1 << 30, max_field_size=64 * 1024, max_files=10, max_parts=20)


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    store = LocalStore(tmp_path / "uploads")
    store.prepare()
    return store


@pytest.fixture
def partial_dir(store: LocalStore) -> Path:
    return store.partial_dir


def reader_for(store: LocalStore, limits: FormLimits = LIMITS, file_field: str = "files") -> FormReader:
    return FormReader(B, store, limits, file_field=file_field, text_fields=("description", "sha256"))


# -- parse_header_params ----------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        pytest.param("text/plain", ("text/plain", {}), id="no-params"),
        pytest.param(
            'form-data; name="file"; filename="a.txt"',
            ("form-data", {"name": "file", "filename": "a.txt"}),
            id="quoted",
        ),
        pytest.param("form-data; name=file; filename=a.txt", ("form-data", {"name": "file", "filename": "a.txt"}),
                     id="token"),
        pytest.param('Form-Data; NAME="x"', ("form-data", {"name": "x"}), id="case-folded-keys-not-values"),
        pytest.param('form-data; name="a;b"; filename="c d.txt"', ("form-data", {"name": "a;b", "filename": "c d.txt"}),
                     id="semicolon-and-space-in-quotes"),
        pytest.param(r'form-data; filename="a\"b\\c"', ("form-data", {"filename": 'a"b\\c'}), id="escapes"),
        pytest.param(r'form-data; filename="C:\Users\me\a.txt"', ("form-data", {"filename": r"C:\Users\me\a.txt"}),
                     id="windows-path-kept"),
        pytest.param('form-data; name="first"; name="second"', ("form-data", {"name": "first"}), id="first-wins"),
        pytest.param("form-data ;  name = x ;", ("form-data", {"name": "x"}), id="loose-whitespace"),
        pytest.param("form-data; flag; name=x", ("form-data", {"flag": "", "name": "x"}), id="bare-key"),
        pytest.param('form-data; filename="unterminated', ("form-data", {"filename": "unterminated"}),
                     id="unterminated-quote"),
        pytest.param("multipart/form-data; boundary=\"a b'()+_,-./:=?\"",
                     ("multipart/form-data", {"boundary": "a b'()+_,-./:=?"}), id="boundary-all-bchars"),
        pytest.param("", ("", {}), id="empty"),
    ],
)
def test_parse_header_params(value, expected):
    assert parse_header_params(value) == expected


# -- decode_ext_value ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        pytest.param("UTF-8''%E2%82%AC%20rates.txt", "€ rates.txt", id="utf-8"),
        pytest.param("utf-8'en'na%C3%AFve.txt", "naïve.txt", id="language-tag"),
        pytest.param("iso-8859-1''caf%E9.txt", "café.txt", id="latin-1"),
        pytest.param("''plain.txt", "plain.txt", id="no-charset-means-utf-8"),
        pytest.param("x-unknown-charset''a%C3%A9", "aé", id="unknown-charset-falls-back"),
        pytest.param("UTF-8''%FF.txt", "\ufffd.txt", id="bad-bytes-replaced"),
    ],
)
def test_decode_ext_value(value, expected):
    assert decode_ext_value(value) == expected


# -- clean_filename -------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        pytest.param("report.pdf", "report.pdf", id="plain"),
        pytest.param("../../etc/passwd", "passwd", id="dot-dot-slash"),
        pytest.param("..\\..\\x", "x", id="dot-dot-backslash"),
        pytest.param("/abs/path", "path", id="absolute"),
        pytest.param("C:\\Windows\\x.txt", "x.txt", id="windows-full-path"),
        pytest.param("a\x00b\tc\x7f\r\nd.txt", "abcd.txt", id="control-chars"),
        pytest.param("..", "unnamed", id="dot-dot"),
        pytest.param(".", "unnamed", id="dot"),
        pytest.param("dir/", "unnamed", id="trailing-separator"),
        pytest.param("", "unnamed", id="empty"),
        pytest.param("  spaced.txt  ", "spaced.txt", id="outer-space"),
        pytest.param("ünïcödé 文件.txt", "ünïcödé 文件.txt", id="non-ascii"),
        pytest.param("x" * 1000, "x" * MAX_FILENAME_CHARS, id="capped"),
    ],
)
def test_clean_filename(raw, expected):
    assert clean_filename(raw) == expected


# -- read_part_headers -------------------------------------------------------------


def test_read_part_headers_file_part():
    info = read_part_headers(b'Content-Disposition: form-data; name="file"; filename="a.txt"\r\nContent-Type: text/plain')
    assert info == PartInfo("file", "a.txt", "text/plain")


def test_read_part_headers_any_case_and_order():
    block = b'content-type: image/png\r\nCONTENT-DISPOSITION: form-data; name="file"; filename="p.png"'
    assert read_part_headers(block) == PartInfo("file", "p.png", "image/png")


def test_read_part_headers_text_field_defaults():
    assert read_part_headers(b'Content-Disposition: form-data; name="description"') == PartInfo(
        "description", None, DEFAULT_CONTENT_TYPE
    )


def test_read_part_headers_empty_filename_is_not_none():
    info = read_part_headers(b'Content-Disposition: form-data; name="file"; filename=""')
    assert info is not None and info.filename == ""


@pytest.mark.parametrize(
    "params, expected",
    [
        pytest.param(b"filename*=UTF-8''%E2%82%AC.txt", "€.txt", id="filename-star-alone"),
        pytest.param(b"filename=\"plain.txt\"; filename*=UTF-8''%E2%82%AC.txt", "plain.txt", id="filename-wins"),
        pytest.param(b"filename*=UTF-8''%E2%82%AC.txt; filename=\"plain.txt\"", "plain.txt",
                     id="filename-wins-either-order"),
        pytest.param("filename=\"日本語.txt\"".encode(), "日本語.txt", id="raw-utf-8"),
    ],
)
def test_read_part_headers_filename_forms(params, expected):
    info = read_part_headers(b'Content-Disposition: form-data; name="file"; ' + params)
    assert info.filename == expected


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b"Content-Type: text/plain", id="no-content-disposition"),
        pytest.param(b'Content-Disposition: form-data; filename="a.txt"', id="no-name"),
        pytest.param(b'Content-Disposition: form-data; name=""; filename="a.txt"', id="empty-name"),
    ],
)
def test_read_part_headers_parts_to_skip(block):
    assert read_part_headers(block) is None


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b'Content-Disposition: form-data; name="a"\r\nContent-Disposition: form-data; name="b"',
                     id="two-content-dispositions"),
        pytest.param(b'Content-Disposition: attachment; name="a"', id="not-form-data"),
        pytest.param(b'Content-Disposition: form-data; name="a";\r\n filename="x"', id="folded"),
        pytest.param(b'Content-Disposition: form-data; name="a"; filename="\xff\xfe"', id="not-utf-8"),
        pytest.param(b'Content-Disposition: form-data; name="a"\rX: y', id="bare-cr"),
        pytest.param(b'Content-Disposition: form-data; name="a"' + b"\r\nX-A: b" * MAX_PART_HEADER_LINES,
                     id="too-many-lines"),
    ],
)
def test_read_part_headers_refuses(block):
    with pytest.raises(FormError):
        read_part_headers(block)


# -- Framer --------------------------------------------------------------------


def framed(body: bytes, chunks: list[bytes], max_parts: int = 20) -> tuple[bytes, Framer]:
    framer = Framer(B, max_parts)
    out = b"".join(piece for chunk in chunks for piece in framer.feed(chunk))
    return out, framer


GOLDEN_PARTS = [
    field_part("description", "two files"),
    file_part(b"alpha\r\n--" + B[:-1] + b"\r\n-", "a.txt", "files", "text/plain"),
    Part("files", b"beta", headers=[b"Content-Type: image/png",
                                     b'content-disposition: form-data; name="files"; filename="b.png"']),
]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10**6], ids=lambda s: f"chunks-of-{s}")
def test_framer_cuts_preamble_and_epilogue(step):
    inner = form_body(GOLDEN_PARTS)
    body = b"preamble line\r\n" + inner + b"epilogue --" + B + b"\r\n"
    chunks = [body[i : i + step] for i in range(0, len(body), step)]
    out, framer = framed(body, chunks)
    # The parser sees the form from its first boundary to its closing one, nothing else.
    assert out == inner[: inner.rindex(b"--") + 2]
    assert framer.complete
    assert [(p.name, p.filename, p.content_type) for p in framer.parts] == [
        ("description", None, DEFAULT_CONTENT_TYPE),
        ("files", "a.txt", "text/plain"),
        ("files", "b.png", "image/png"),
    ]


@pytest.mark.parametrize("step", [1, 2, 5, 49, 50, 51, 10**6], ids=lambda s: f"chunks-of-{s}")
def test_framer_counts_each_queued_body(step):
    parts = [
        Part("x", b"no name: not queued", headers=[b"Content-Type: text/plain"]),
        field_part("description", ""),
        file_part(b"-" + B + b"--", "a", "files"),
        file_part(b"\r\n--" + B[:-1], "b", "files"),
    ]
    body = form_body(parts, preamble=b"pre\r\n", epilogue=b"\r\n--" + B + b"\r\n")
    _, framer = framed(body, [body[i : i + step] for i in range(0, len(body), step)])
    assert framer.body_sizes == [0, len(B) + 3, len(B) + 3]


def test_framer_holds_headers_until_body_bytes_follow():
    # streaming-form-data must never get a part's first body byte at the end of a piece.
    body = form_body([file_part(b"one", "1", "files"), file_part(b"-x", "2", "files")])
    second = body.index(b"-x")
    framer = Framer(B, 20)
    pieces = [p for chunk in split_at(body, [second + 1]) for p in framer.feed(chunk)]
    assert not any(p.endswith(b"\r\n\r\n-") for p in pieces)
    assert b"".join(pieces) == body[: body.rindex(b"--") + 2]


def test_form_reader_refuses_what_the_parser_slipped_on(store, partial_dir):
    # Bytes next to a "\r\n--boundary" that is no delimiter: with this cut,
    # streaming-form-data 2.1 hands the part over without its last 51 bytes.
    marker = b"\r\n--" + B
    content = marker + b"x" + marker + b"x" + marker + b"-\x00\x00\x00\x00-"
    body = form_body([file_part(content, "a.txt", "files")])
    cut = body.index(content) + len(content) - 1
    reader = reader_for(store)
    for chunk in split_at(body, [cut]):
        reader.feed(chunk)
    try:
        reader.close()
    except FormError:
        pass  # refused: fine
    else:
        assert reader.files[0].size == len(content)  # or read right
    reader.abort()
    assert list(partial_dir.iterdir()) == []


def test_framer_incomplete_body_is_not_complete():
    body = form_body([file_part(b"data")])
    for cut in range(len(body) - 2):
        _, framer = framed(body, [body[:cut]])
        assert not framer.complete, cut


def test_framer_bounds_the_preamble():
    framer = Framer(B, 20)
    with pytest.raises(FormError):
        for chunk in [b"x" * 4096] * (MAX_PREAMBLE // 4096 + 2):
            list(framer.feed(chunk))


def test_framer_bounds_a_header_block():
    body = b"--" + B + b"\r\nX-Long: " + b"a" * (MAX_PART_HEADER_BYTES + 10)
    with pytest.raises(FormError):
        framed(body, [body[i : i + 1000] for i in range(0, len(body), 1000)])


def test_framer_counts_parts():
    body = form_body([field_part(f"f{i}", "x") for i in range(5)])
    with pytest.raises(LimitExceeded):
        framed(body, [body], max_parts=4)


# -- UploadFileTarget ---------------------------------------------------------------


def test_file_target_writes_hashes_counts(store, partial_dir):
    target = UploadFileTarget(store.new_file(), PartInfo("file", "../x/report.pdf", "application/pdf"), 1 << 20)
    target.start()
    chunks = [b"", b"abc", bytes(range(256)), b"\r\n--", b""]
    for chunk in chunks:
        target.data_received(chunk)
    target.finish()
    data = b"".join(chunks)
    assert target.finished
    assert target.size == len(data)
    assert target.sha256 == hashlib.sha256(data).hexdigest()
    assert target.filename == "report.pdf"
    assert target.content_type == "application/pdf"
    assert target.sink.path.parent == partial_dir and target.sink.path.name == target.id
    target.sink.sync()
    target.sink.close()
    assert target.sink.path.read_bytes() == data


def test_file_target_abort_removes_partial_file_and_is_idempotent(store, partial_dir):
    target = UploadFileTarget(store.new_file(), PartInfo("file", "a", DEFAULT_CONTENT_TYPE), 1 << 20)
    target.start()
    target.data_received(b"partial")
    assert target.sink.path.exists()
    target.abort()
    assert not target.sink.path.exists()
    target.abort()  # again: no error
    assert list(partial_dir.iterdir()) == []


def test_file_target_abort_before_start(store, partial_dir):
    target = UploadFileTarget(store.new_file(), PartInfo("file", "a", DEFAULT_CONTENT_TYPE), 1 << 20)
    target.abort()
    assert list(partial_dir.iterdir()) == []


def test_file_target_size_limit(store, partial_dir):
    target = UploadFileTarget(store.new_file(), PartInfo("file", "a", DEFAULT_CONTENT_TYPE), 10)
    target.start()
    target.data_received(b"x" * 10)
    with pytest.raises(LimitExceeded):
        target.data_received(b"y")
    target.abort()
    assert list(partial_dir.iterdir()) == []


def test_file_ids_are_unique_and_path_safe(store, partial_dir):
    ids = {UploadFileTarget(store.new_file(), PartInfo("f", "a", "x"), 1).id for _ in range(1000)}
    assert len(ids) == 1000
    assert all(len(i) == 32 and all(c in "0123456789abcdef" for c in i) for i in ids)


# -- FormReader ------------------------------------------------------------------


def multi_body() -> tuple[bytes, list[tuple[str, str, bytes]]]:
    files = [
        ("one.txt", "text/plain", b"first file\r\n"),
        ("two.png", "image/png", bytes(range(256)) * 3),
        ("three.bin", "application/x-thing", b""),
    ]
    parts = [field_part("description", "three files")]
    parts += [file_part(data, name, "files", ctype) for name, ctype, data in files]
    return form_body(parts), files


@pytest.mark.parametrize("step", [1, 5, 61, 4096, 10**6], ids=lambda s: f"chunks-of-{s}")
def test_form_reader_reads_every_file(store, partial_dir, step):
    body, files = multi_body()
    reader = reader_for(store)
    for i in range(0, len(body), step):
        reader.feed(body[i : i + step])
    reader.close()
    assert reader.field("description") == "three files"
    assert reader.field("sha256") is None
    got = [(t.filename, t.content_type, t.size, t.sha256, t.finished) for t in reader.files]
    assert got == [(n, c, len(d), hashlib.sha256(d).hexdigest(), True) for n, c, d in files]
    for target, (_, _, data) in zip(reader.files, files):
        target.sink.close()
        assert target.sink.path.read_bytes() == data


def test_form_reader_skips_other_parts(store, partial_dir):
    body = form_body([
        field_part("unknown", "dropped"),
        file_part(b"not ours", "x.txt", name="other"),
        file_part(b"empty filename", "", name="files"),
        file_part(b"ours", "y.txt", name="files"),
    ])
    reader = reader_for(store)
    reader.feed(body)
    reader.close()
    assert [t.filename for t in reader.files] == ["y.txt"]
    assert reader.fields == {}
    assert sorted(p.name for p in partial_dir.iterdir()) == [reader.files[0].id]


def test_form_reader_abort_removes_everything(store, partial_dir):
    body, _ = multi_body()
    reader = reader_for(store)
    reader.feed(body[: body.index(b"two.png") + 300])  # inside the second file
    assert len(list(partial_dir.iterdir())) == 2
    reader.abort()
    reader.abort()
    assert list(partial_dir.iterdir()) == []


@pytest.mark.parametrize("cut", [0, 1, 20, 100, -300, -60, -5, -3, -1])
def test_form_reader_truncated_body_fails_at_close(store, partial_dir, cut):
    body, _ = multi_body()
    body = body[: len(body) - 2]  # no CRLF after the closing boundary: still whole
    reader = reader_for(store)
    reader.feed(body[:cut] if cut else b"")
    with pytest.raises(FormError):
        reader.close()
    reader.abort()
    assert list(partial_dir.iterdir()) == []


def test_form_reader_whole_body_without_final_crlf_closes(store, partial_dir):
    body, files = multi_body()
    reader = reader_for(store)
    reader.feed(body[:-2])
    reader.close()
    assert len(reader.files) == len(files)
    reader.abort()


def test_form_reader_limits(store, partial_dir):
    body, _ = multi_body()
    for limits in (
        FormLimits(max_file_size=100, max_field_size=1024, max_files=10, max_parts=10),
        FormLimits(max_file_size=1 << 20, max_field_size=5, max_files=10, max_parts=10),
        FormLimits(max_file_size=1 << 20, max_field_size=1024, max_files=2, max_parts=10),
        FormLimits(max_file_size=1 << 20, max_field_size=1024, max_files=10, max_parts=3),
    ):
        reader = reader_for(store, limits)
        with pytest.raises(LimitExceeded):
            reader.feed(body)
        reader.abort()
        assert list(partial_dir.iterdir()) == []


def test_form_reader_non_utf8_field_is_a_form_error(store, partial_dir):
    body = form_body([field_part("description", b"\xff\xfe"), file_part(b"x", "a", name="files")])
    reader = reader_for(store)
    reader.feed(body)
    reader.close()
    with pytest.raises(FormError):
        reader.field("description")
    reader.abort()


# -- commit and the partial sweep --------------------------------------------------------


def test_commit_files_moves_and_writes_sidecars(store, partial_dir):
    upload_dir = store.upload_dir
    body, files = multi_body()
    reader = reader_for(store)
    reader.feed(body)
    reader.close()
    records = [{"id": t.id, "filename": t.filename, "size": t.size} for t in reader.files]
    store.commit_files([(t.sink, r) for t, r in zip(reader.files, records)])
    assert list(partial_dir.iterdir()) == []
    for record, (_, _, data) in zip(records, files):
        assert (upload_dir / record["id"]).read_bytes() == data
        assert json.loads((upload_dir / f"{record['id']}.json").read_text()) == record
    assert len(list(upload_dir.iterdir())) == 2 * len(files) + 1  # + .partial/


def test_prepare_upload_dir_creates_and_sweeps_only_stale_files(tmp_path):
    upload_dir = tmp_path / "deep" / "uploads"
    LocalStore(upload_dir).prepare()
    partial_dir = upload_dir / ".partial"
    assert partial_dir == upload_dir / ".partial" and partial_dir.is_dir()
    stale = partial_dir / "stale"
    stale.write_bytes(b"left by a crashed process")
    live = partial_dir / "live"
    fd = os.open(live, os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another worker is writing it
        assert sweep_stale_partials(partial_dir) == 1
        assert sorted(p.name for p in partial_dir.iterdir()) == ["live"]
    finally:
        os.close(fd)
    LocalStore(upload_dir).prepare()  # the lock is gone: now it is stale
    assert list(partial_dir.iterdir()) == []


def test_split_helper_sanity():
    # The other test files lean on split_at; make sure it keeps every byte.
    body = form_body([file_part(b"x" * 50)])
    for points in ([], [1], [5, 5, 3], [0, len(body)], list(range(0, len(body), 7))):
        assert b"".join(split_at(body, points)) == body


def test_writer_pool_forgets_a_job_cancelled_before_it_ran():
    """A queued block cancelled by an aborted upload is no longer counted as busy (else
    the pool would think itself busy for good and skip the handshake)."""
    pool = WriterPool(1)
    gate = threading.Event()

    def hold(started):
        started.set()
        gate.wait(5)

    running = pool.submit(hold)
    queued = pool.submit(lambda started: None)
    assert pool.busy == 2
    assert queued.cancel()
    gate.set()
    running.result(5)
    assert pool.busy == 0

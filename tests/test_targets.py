"""targets.py driven directly: the file target and FormReader, bytes in, partial files and fields out.

No ASGI, no event loop (the way h11 tests its pieces)."""

from __future__ import annotations

import hashlib

import pytest

from support import BOUNDARY, field_part, file_part, form_body, multi_body, reader_for, split_at
from targets import FormLimits, UploadFileTarget
from upload_service.errors import FormError, LimitExceeded
from upload_service.framing import (
    DEFAULT_CONTENT_TYPE,
    PartInfo,
)

B = BOUNDARY.encode()

# -- UploadFileTarget ---------------------------------------------------------------

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
    reader.feed(body[: body.index(b"three.bin")])  # two files ended, the third not yet begun
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


def test_split_helper_sanity():
    # The other test files lean on split_at; make sure it keeps every byte.
    body = form_body([file_part(b"x" * 50)])
    for points in ([], [1], [5, 5, 3], [0, len(body)], list(range(0, len(body), 7))):
        assert b"".join(split_at(body, points)) == body

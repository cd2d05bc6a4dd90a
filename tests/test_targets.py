"""targets.py driven directly: the file target and FormReader, bytes in, partial files and fields out.

No ASGI, no event loop (the way h11 tests its pieces).
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from support import BOUNDARY, chunks_of, field_part, file_part, form_body, multi_body, reader_for, split_at
from targets import FormLimits, FormReader, UploadFileTarget
from upload_service import localstore, threads
from upload_service.blocks import BLOCKS_IN_FLIGHT
from upload_service.errors import FormError, LimitExceeded
from upload_service.framing import DEFAULT_CONTENT_TYPE, PartInfo

B = BOUNDARY.encode()
MiB = 1024 * 1024

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
    assert Path(target.sink.path).parent == partial_dir and Path(target.sink.path).name == target.id
    target.sink.sync()
    target.sink.close()
    assert Path(target.sink.path).read_bytes() == data


def test_file_target_abort_removes_partial_file_and_is_idempotent(store, partial_dir):
    target = UploadFileTarget(store.new_file(), PartInfo("file", "a", DEFAULT_CONTENT_TYPE), 1 << 20)
    target.start()
    target.data_received(b"partial")
    assert Path(target.sink.path).exists()
    target.abort()
    assert not Path(target.sink.path).exists()
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
        assert Path(target.sink.path).read_bytes() == data


def test_form_reader_skips_other_parts(store, partial_dir):
    body = form_body([
        field_part("unknown", "dropped"),
        file_part(b"not ours", "x.txt", name="other"),
        file_part(b"", "", name="files"),  # an empty file input
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


class CountingExecutor(threads.WriterPool):
    """Counts the blocks handed to its writers and not yet written: in all, and most of one file."""

    def __init__(self) -> None:
        super().__init__(2)
        self.outstanding = 0
        self.most = 0
        self.of_file: dict[int, int] = {}
        self.most_of_one_file = 0
        self._lock = threading.Lock()

    def count(self, future, file: int) -> None:
        with self._lock:
            self.outstanding += 1
            self.of_file[file] = self.of_file.get(file, 0) + 1
            self.most = max(self.most, self.outstanding)
            self.most_of_one_file = max(self.most_of_one_file, self.of_file[file])
        future.add_done_callback(lambda _future: self._done(file))

    def _done(self, file: int) -> None:
        with self._lock:
            self.outstanding -= 1
            self.of_file[file] -= 1


@pytest.fixture
def count_blocks(monkeypatch):
    """Each block a target hands to its InOrder queue is counted by its CountingExecutor."""
    real_submit = threads.InOrder.submit

    def submit(self, fn, *args, **kwargs):
        future = real_submit(self, fn, *args, **kwargs)
        if isinstance(self._pool, CountingExecutor):
            self._pool.count(future, id(self))
        return future

    monkeypatch.setattr(threads.InOrder, "submit", submit)


@pytest.mark.parametrize("size", [MiB - 1, 5 * MiB // 2])
def test_many_files_on_a_slow_disk_hold_a_bounded_number_of_blocks(tmp_path, monkeypatch, count_blocks, size):
    """Each ended file's last block used to go to the executor without backpressure: a form of
    60 files on a slow disk queued ~60 MiB. Now the reader waits, as read_body does: at most
    BLOCKS_IN_FLIGHT blocks of the file being read and of one ended file are with the writers."""
    real_write = localstore.os.write

    def slow_write(fd, data):
        time.sleep(0.005)
        return real_write(fd, data)

    monkeypatch.setattr(localstore.os, "write", slow_write)
    files = [os.urandom(size - i) for i in range(12)]
    body = form_body([file_part(data, f"{i}.bin", name="files") for i, data in enumerate(files)])
    store = localstore.LocalStore(tmp_path / "uploads")
    store.prepare()
    limits = FormLimits(max_file_size=1 << 30, max_field_size=1 << 16, max_files=100, max_parts=200)
    executor = CountingExecutor()
    reader = FormReader(B, store, limits, "files", ("description",), executor=executor)
    for chunk in chunks_of(body, 64 * 1024):
        reader.feed(chunk)
        while (job := reader.write_backlog()) is not None:
            job.result()
    reader.close()
    for target in reader.files:
        if target.job is not None:
            target.job.result()
    assert executor.most <= 2 * BLOCKS_IN_FLIGHT
    assert executor.most_of_one_file <= BLOCKS_IN_FLIGHT
    if size > 2 * MiB:  # a file's next block was waiting while the writer was on the last
        assert executor.most_of_one_file == BLOCKS_IN_FLIGHT
    assert [t.size for t in reader.files] == [len(d) for d in files]
    for target, data in zip(reader.files, files):
        target.sink.close()
        assert Path(target.sink.path).read_bytes() == data


# -- small files: held for the commit ------------------------------------------------


def executor_reader(store, max_files=100):
    limits = FormLimits(max_file_size=1 << 30, max_field_size=1 << 16, max_files=max_files, max_parts=2 * max_files)
    return FormReader(B, store, limits, "files", ("description",), executor=CountingExecutor())


def finish_writing(reader):
    for target in reader.files:
        if target.job is not None:
            target.job.result()
    reader.write_held()  # what the store's commit runs first


def test_a_small_file_at_the_end_of_the_body_is_hashed_and_held_for_the_commit(store, partial_dir):
    data = os.urandom(20_000)
    reader = executor_reader(store)
    reader.feed(form_body([file_part(data, "a.bin", name="files")]))
    reader.close()
    [target] = reader.files
    assert target.sha256 == hashlib.sha256(data).hexdigest()  # known before the commit
    assert target.job is None and list(partial_dir.iterdir()) == []  # no thread, no file yet
    reader.write_held()
    target.sink.close()
    assert Path(target.sink.path).read_bytes() == data


def test_a_held_file_goes_to_a_writer_thread_when_another_part_begins(store, partial_dir):
    first, second = os.urandom(10_000), os.urandom(10_000)
    body = form_body([file_part(first, "1.bin", name="files"), file_part(second, "2.bin", name="files")])
    reader = executor_reader(store)
    cut = body.index(b"2.bin")
    reader.feed(body[:cut])  # the first file ended, the next part's headers not yet whole: held
    assert reader.files[0].job is None
    reader.feed(body[cut:])
    assert reader.files[0].job is not None  # handed off, not held for the rest of the body
    reader.close()
    finish_writing(reader)
    for target, data in zip(reader.files, (first, second)):
        target.sink.close()
        assert Path(target.sink.path).read_bytes() == data


def test_many_small_files_are_not_all_held_in_memory(store, partial_dir):
    files = [os.urandom(30_000) for _ in range(40)]
    body = form_body([file_part(data, f"{i}.bin", name="files") for i, data in enumerate(files)])
    reader = executor_reader(store)
    most_held = 0
    for chunk in chunks_of(body, 64 * 1024):
        reader.feed(chunk)
        while (job := reader.write_backlog()) is not None:
            job.result()
        most_held = max(most_held, sum(len(t._held) for t in reader.files))
    reader.close()
    finish_writing(reader)
    assert most_held <= 30_000  # one file at a time, not the form
    for target, data in zip(reader.files, files):
        assert target.sha256 == hashlib.sha256(data).hexdigest()
        target.sink.close()
        assert Path(target.sink.path).read_bytes() == data


def test_an_empty_file_is_created_by_the_commit(store, partial_dir):
    reader = executor_reader(store)
    reader.feed(form_body([file_part(b"", "empty.txt", name="files")]))
    reader.close()
    finish_writing(reader)
    [target] = reader.files
    target.sink.close()
    assert Path(target.sink.path).read_bytes() == b""


def test_aborting_a_held_file_leaves_nothing(store, partial_dir):
    reader = executor_reader(store)
    reader.feed(form_body([file_part(b"x" * 1000, "a.bin", name="files")]))
    reader.abort()
    reader.abort()
    assert list(partial_dir.iterdir()) == []


# -- part headers ----------------------------------------------------------------


def test_a_form_is_read_without_the_email_package_parsing_its_part_headers(store, partial_dir, monkeypatch):
    """The framer reads part headers itself: none reaches the email package (once a third of a small upload's CPU)."""
    from email.parser import Parser

    def no_parse(*args, **kwargs):
        raise AssertionError("a part header line was parsed by the email package")

    monkeypatch.setattr(Parser, "parsestr", no_parse)
    body, files = multi_body()
    reader = reader_for(store)
    reader.feed(body)
    reader.close()
    assert reader.field("description") == "three files"
    assert [(t.filename, t.sha256) for t in reader.files] == [(n, hashlib.sha256(d).hexdigest()) for n, _, d in files]
    reader.abort()

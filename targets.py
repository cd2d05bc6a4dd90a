"""The form's targets (streaming-form-data's `BaseTarget`), and the reader that drives them.

Nothing here knows ASGI. `FormReader` takes a request body chunk by chunk: the
`framing.Framer` finds each part's headers and body, in one scan, and the reader hands
each part to the target its headers chose. A file part's `UploadFileTarget` hashes
and counts it and writes it, block by block on a writer thread, into a `FileSink` of
the store; nothing is visible until the store commits.
"""

from __future__ import annotations

import hashlib
import threading
from concurrent.futures import Future
from dataclasses import dataclass

from streaming_form_data.targets import BaseTarget

from upload_service.blocks import BlockQueue
from upload_service.errors import FormError, LimitExceeded, NoFile
from upload_service.framing import (
    Framer, PartInfo, clean_filename, field_charset, parse_header_params, read_in_charset, transfer_decoder,
)
from upload_service.storage import FileSink, Store
from upload_service.threads import WriterPool
from upload_service.units import KiB

# A file that ends before a block was handed off and is at most this big is hashed on
# the event loop (tens of µs) and held: if it is the last part, the store's commit
# writes it in its own thread job (one thread hand-off for a small upload instead of
# two); when another part begins, it goes to the executor like any block.
HELD_FILE_SIZE = 64 * KiB
# RFC 7578 §4.6: a field of this name says the charset of the text fields that declare none.
CHARSET_FIELD = "_charset_"


# -- targets ------------------------------------------------------------------


class UploadFileTarget(BaseTarget):
    """Stream one file part into a store's sink, hashing and counting on the way.

    Without an executor each chunk is hashed and written as it comes. With one, the
    chunks are collected into 1 MiB blocks that a writer thread hashes and writes in
    order while the reader goes on (`blocks.BlockQueue`): `write_backlog` returns the
    job to wait for before feeding more. A small file (HELD_FILE_SIZE) is hashed when
    it ends and held, for `write_held` (the store's commit) or `hand_off_held`.
    """

    def __init__(self, sink: FileSink, info: PartInfo, max_size: int, executor: WriterPool | None = None) -> None:
        super().__init__()
        self.sink = sink
        self.id = sink.id
        self.raw_filename = info.filename or ""
        self.filename = clean_filename(self.raw_filename)
        self._name_in_form_charset = info.filename_as_sent
        self.content_type = info.content_type
        self.max_size = max_size
        self.size = 0
        self.finished = False
        self._hash = hashlib.sha256()
        self._sink_open = False  # opened with the first block, on the writer thread
        self._blocks = BlockQueue(executor, self._hash_and_write) if executor is not None else None
        self._held = b""  # a small file's bytes, hashed, for `write_held`

    @property
    def job(self) -> Future[None] | None:
        """The last write job: done once every block is written (or one failed)."""
        return self._blocks.last if self._blocks is not None else None

    @property
    def sha256(self) -> str:
        """The digest; with an executor, only once `job` is done."""
        return self._hash.hexdigest()

    def on_data_received(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_size:
            raise LimitExceeded(
                "file_size",
                self.max_size,
                f"file {self.filename!r} is larger than {self.max_size} bytes",
            )
        if self._blocks is None:
            self._hash_and_write(chunk)
        else:
            self._blocks.add(chunk)

    def on_finish(self) -> None:
        self.finished = True
        blocks = self._blocks
        if blocks is not None and blocks.last is None and self.size <= HELD_FILE_SIZE:
            self._held = blocks.take()
            self._hash.update(self._held)
        elif blocks is not None:
            blocks.end()
        elif self.size == 0 and not self._sink_open:
            self._open_sink()  # an empty file: no chunk created it

    def record_filename(self, form_charset: str | None) -> str:
        """The filename for the record: a name as sent read in the form's charset (`_charset_`)."""
        decoded = read_in_charset(self.raw_filename, form_charset if self._name_in_form_charset else None)
        return self.filename if decoded is self.raw_filename else clean_filename(decoded)

    def write_held(self) -> None:
        """Create the file if no block did, and write the bytes held for the commit (blocking)."""
        data, self._held = self._held, b""
        self._write(data)

    def hand_off_held(self) -> None:
        """Another part begins: write a held file on the executor, not holding it in memory longer."""
        if self._held:
            data, self._held = self._held, b""
            self._blocks.submit(self._write, data)

    def write_backlog(self) -> Future[None] | None:
        """The job to wait for before feeding more: a full block (or the last one) waits on it."""
        return self._blocks.backlog()

    @property
    def written(self) -> bool:
        """The part has ended and every byte of it is hashed and written."""
        return self.finished and not self._held and self._blocks.written

    def _hash_and_write(self, data: bytes, started: threading.Event | None = None) -> None:
        """Hash and write a block (on an executor thread) or a chunk (inline), in order."""
        if started is not None:
            started.set()  # WriterPool: the loop may go on; we let go of the GIL now
        self._hash.update(data)
        self._write(data)

    def _write(self, data: bytes, started: threading.Event | None = None) -> None:
        if not self._sink_open:
            self._open_sink()  # here, off the loop: creating a file costs a few syscalls
        if data:
            self.sink.write(data)

    def _open_sink(self) -> None:
        self.sink.open()
        self._sink_open = True

    def abort(self) -> None:
        """Stop writing and remove what was written; safe to call more than once."""
        self._held = b""
        if self._blocks is not None:
            self._blocks.cancel()  # the writer no longer uses the file when this returns
        self.sink.abort()


class FieldTarget(BaseTarget):
    """Keep a text field in memory, up to `max_size` bytes; `charset`: the one its part declared."""

    def __init__(self, name: str, max_size: int, charset: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.max_size = max_size
        self.charset = charset
        self._value = bytearray()

    def on_data_received(self, chunk: bytes) -> None:
        if len(self._value) + len(chunk) > self.max_size:
            raise LimitExceeded(
                "field_size",
                self.max_size,
                f"field {self.name!r} is larger than {self.max_size} bytes",
            )
        self._value += chunk

    def text(self, form_charset: str | None = None) -> str:
        """The value, read in its part's charset, else the form's (`_charset_`), else UTF-8."""
        charset = self.charset or form_charset or "utf-8"
        try:
            return self._value.decode(charset)
        except UnicodeError:
            raise FormError(f"field {self.name!r} is not valid {charset}") from None


class SkippedPartTarget(BaseTarget):
    """Count and drop a part nobody asked for, bounded like a text field.

    In the file field (`in_file_field`): the part of an empty file input (`filename=""`), whose
    content would be a file without a name (requests' `('', data)`, `curl -F 'f=@x;filename='`):
    422 at once, whatever its size; or a text part (`no_filename`), as FilePond sends its item's
    metadata (`file={}`) before the file: dropped when small, a 422 past the field limit (a file
    sent without its filename), not a 413."""

    def __init__(self, name: str, max_size: int, in_file_field: bool = False, no_filename: bool = True) -> None:
        super().__init__()
        self.name = name
        self.max_size = max_size
        self.empty_input = in_file_field and not no_filename
        self.text_in_file_field = in_file_field and no_filename
        self.size = 0

    def on_data_received(self, chunk: bytes) -> None:
        if self.empty_input and chunk:
            raise NoFile(f"the part named {self.name!r} has content but an empty filename: name the file")
        self.size += len(chunk)
        if self.size > self.max_size:
            if self.text_in_file_field:
                raise NoFile(f"the part named {self.name!r} has no filename: it is not a file")
            raise LimitExceeded(
                "field_size",
                self.max_size,
                f"unexpected part {self.name!r} is larger than {self.max_size} bytes",
            )


class DecodedTarget(BaseTarget):
    """Hand `target` a part's body with its Content-Transfer-Encoding undone."""

    def __init__(self, target: BaseTarget, encoding: str) -> None:
        super().__init__()
        self.target = target
        self._decoder = transfer_decoder(encoding)

    def on_start(self) -> None:
        self.target.start()

    def on_data_received(self, chunk: bytes) -> None:
        if data := self._decoder.decode(chunk):
            self.target.data_received(data)

    def on_finish(self) -> None:
        if data := self._decoder.flush():
            self.target.data_received(data)
        self.target.finish()


# -- the form reader ----------------------------------------------------------


@dataclass
class FormLimits:
    max_file_size: int
    max_field_size: int
    max_files: int
    max_parts: int


class FormReader:
    """Read one multipart/form-data body into partial files and text fields.

    `file_field` names the file parts; `text_fields` the fields kept in memory;
    every other part is read and dropped. Call `feed` per chunk, `close` at the end
    of the body (raises FormError if it was cut short), `abort` on any failure.

    With an `executor`, files are hashed and written on its threads: after each
    `feed`, wait for `write_backlog()` until it is None; after `close`, wait for
    every file's `job` before reading its digest, and have the commit run `write_held`.
    `charset`: the codec the request's Content-Type names, for a form without `_charset_`.
    """

    def __init__(
        self,
        boundary: bytes,
        store: Store,
        limits: FormLimits,
        file_field: str,
        text_fields: tuple[str, ...],
        executor: WriterPool | None = None,
        charset: str | None = None,
    ) -> None:
        self.files: list[UploadFileTarget] = []
        self._request_charset = charset
        self._executor = executor
        self._writing: list[UploadFileTarget] = []  # files not yet fully written
        self.fields: dict[str, FieldTarget] = {}
        self._store = store
        self._limits = limits
        self._file_field = file_field
        self._text_fields = text_fields
        self._framer = Framer(boundary, limits.max_parts, self)
        self._part: BaseTarget | None = None  # the target of the part being read, if any

    def feed(self, chunk: bytes) -> None:
        self._framer.feed(chunk)

    def close(self) -> None:
        """Check that the body was whole: the closing boundary was read."""
        if not self._framer.found_boundary:
            # Most often a body whose lines end in LF alone (RFC 2046 §5.1.1: CRLF).
            raise FormError("the body has no boundary line ('--' and the boundary, then CRLF)")
        if not self._framer.complete:
            raise FormError("the body ended before the closing boundary")

    # framing.PartHandler: the framer's parts, each to the target its headers chose

    def part_started(self, info: PartInfo | None) -> None:
        if info is not None:
            self._part = self._open_target(info)
            self._part.start()

    def part_data(self, data: bytes) -> None:
        if self._part is not None:
            self._part.on_data_received(data)  # BaseTarget.data_received, without its validator (none is set)

    def part_ended(self) -> None:
        if self._part is not None:
            self._part.finish()
            self._part = None

    def write_backlog(self) -> Future[None] | None:
        """A write job to wait for before feeding more, or None.

        Each file has at most `blocks.BLOCKS_IN_FLIGHT` blocks with the writers and one
        collected; and while an ended file's last block is still with a writer, the
        next file to end waits for it: so a form of many files holds at most ~5
        blocks, however slow the disk.
        """
        for target in self._writing:
            job = target.write_backlog()
            if job is not None:
                return job
        if len(self._writing) < 2:
            return None  # one file (the common case, per chunk): no other to wait behind
        self._writing = [t for t in self._writing if not t.written]
        ended = [t for t in self._writing if t.finished]
        return ended[0].job if len(ended) > 1 else None

    def write_held(self) -> None:
        """Write what the files hold for the commit (blocking: the store's commit runs it)."""
        for target in self.files:
            target.write_held()

    def abort(self) -> None:
        for target in self.files:
            target.abort()

    def field(self, name: str) -> str | None:
        target = self.fields.get(name)
        return None if target is None else target.text(self.form_charset())

    def form_charset(self) -> str | None:
        """The codec of the charset the form's `_charset_` field names, else the request's Content-Type."""
        named = self.fields.get(CHARSET_FIELD)
        return (field_charset(named.text("latin-1")) if named else None) or self._request_charset

    def _open_target(self, info: PartInfo) -> BaseTarget:
        for held in self._writing:  # another part follows: a file held for the commit is written now
            held.hand_off_held()
        limits = self._limits
        target: BaseTarget
        in_file_field = is_field(info.name, self._file_field)
        if in_file_field and info.filename:
            if len(self.files) >= limits.max_files:
                raise LimitExceeded(
                    "files", limits.max_files, f"the form has more than {limits.max_files} files"
                )
            target = UploadFileTarget(self._store.new_file(), info, limits.max_file_size, self._executor)
            self.files.append(target)
            if self._executor is not None:
                self._writing.append(target)
        elif info.name in self._text_fields or info.name == CHARSET_FIELD:
            # with a filename too (curl -F sha256=@digest.txt)
            if info.name in self.fields:  # each would be held in memory
                raise FormError(f"field {info.name!r} is given more than once")
            charset = field_charset(parse_header_params(info.content_type)[1].get("charset"))
            target = FieldTarget(info.name, limits.max_field_size, charset)
            self.fields[info.name] = target
        else:  # an empty file input, a text part where the file belongs, or a part nobody asked for
            target = SkippedPartTarget(info.name, limits.max_field_size, in_file_field, info.filename is None)
        if info.transfer_encoding and not isinstance(target, SkippedPartTarget):
            target = DecodedTarget(target, info.transfer_encoding)
        return target


def is_field(name: str, field: str) -> bool:
    """Whether a part named `name` is `field`: by that name, or PHP's `field[]` and `field[0]`,
    which upload widgets send by default (Uppy's bundled XHR uploads, Dropzone's `uploadMultiple`)."""
    if name == field:
        return True
    if not (name.startswith(f"{field}[") and name.endswith("]")):
        return False
    index = name[len(field) + 1 : -1]
    return index == "" or (index.isascii() and index.isdigit())

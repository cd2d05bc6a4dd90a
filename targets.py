"""What streaming-form-data drives: the targets, and the form reader that feeds it.

Nothing here knows ASGI. `FormReader` takes a request body chunk by chunk: the
`framing.Framer` reads the multipart structure, streaming-form-data finds where each
part's body ends, and `PartRouter` hands each part to its target. A file part's
`UploadFileTarget` hashes and counts it and writes it, block by block on a writer
thread, into a `FileSink` of the store; nothing is visible until the store commits.
"""

from __future__ import annotations

import hashlib
import threading
from collections import deque
from concurrent.futures import Future
from concurrent.futures import wait as wait_for_futures
from email.message import Message
from email.parser import Parser as EmailParser
from email.policy import HTTP
from dataclasses import dataclass
from typing import Callable

import streaming_form_data._parser as sfd_parser
from streaming_form_data import ParseFailedException, StreamingFormDataParser
from streaming_form_data._parser import _Parser
from streaming_form_data.targets import BaseTarget

from upload_service.errors import FormError, LimitExceeded, NoFile
from upload_service.framing import (
    NAMED_PART_HEADERS, UNNAMED_PART_HEADERS, Framer, PartInfo, clean_filename, field_charset,
    parse_header_params, transfer_decoder,
)
from upload_service.storage import FileSink, Store
from upload_service.threads import InOrder, WriterPool
from upload_service.units import KiB, MiB

# With an executor, a file's bytes are hashed and written in blocks of this size, in
# order, one at a time: at most one thread hand-off per MiB instead of one per 64 KiB
# read (bench/ measured 256 KiB to 4 MiB), and at most ~3 blocks per upload in memory
# (~5 for a form of many files, FormReader).
WRITE_BLOCK_SIZE = 1 * MiB
# A file's blocks with the writer at once: one being written, the next waiting, so that
# the writer goes on to it without waiting for the event loop (threads.InOrder).
BLOCKS_IN_FLIGHT = 2
# A file that ends before a block was handed off and is at most this big is hashed on
# the event loop (16 KiB: ~10 µs) and held: if it is the last part, the store's commit
# writes it in its own thread job (one thread hand-off for a small upload instead of
# two); when another part begins, it goes to the executor like any block.
HELD_FILE_SIZE = 64 * KiB
# RFC 7578 §4.6: a field of this name says the charset of the text fields that declare none.
CHARSET_FIELD = "_charset_"


# -- targets ------------------------------------------------------------------


class UploadFileTarget(BaseTarget):
    """Stream one file part into a store's sink, hashing and counting on the way.

    Without an executor each chunk is hashed and written as it comes. With one, the
    chunks are collected into blocks of WRITE_BLOCK_SIZE that a writer thread hashes
    and writes in order, one at a time, while the parser's thread goes on: when a
    full block is waiting and BLOCKS_IN_FLIGHT are with the writer, `write_backlog`
    returns the oldest one's job to wait for before feeding more. A small file
    (HELD_FILE_SIZE) is hashed when it ends and held, for `write_held` (the store's
    commit) or `hand_off_held`.
    """

    def __init__(self, sink: FileSink, info: PartInfo, max_size: int, executor: WriterPool | None = None) -> None:
        super().__init__()
        self.sink = sink
        self.id = sink.id
        self.filename = clean_filename(info.filename or "")
        self.content_type = info.content_type
        self.max_size = max_size
        self.size = 0
        self.finished = False
        self._hash = hashlib.sha256()
        self._sink_open = False  # opened with the first block, on the writer thread
        self._writer = InOrder(executor) if executor is not None else None
        self._chunks: list[bytes] = []  # received, not yet handed to the executor
        self._buffered = 0
        self._jobs: deque[Future[None]] = deque()  # blocks with the writer, oldest first
        self._held = b""  # a small file's bytes, hashed, for `write_held`

    @property
    def job(self) -> Future[None] | None:
        """The last block handed to the writer: done once every block is (threads.InOrder fails
        it too when an earlier one failed)."""
        return self._jobs[-1] if self._jobs else None

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
        if self._writer is None:
            self._store(chunk)
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= WRITE_BLOCK_SIZE:
            self.hand_off()

    def on_finish(self) -> None:
        self.finished = True
        if self._writer is not None and self.job is None and self.size <= HELD_FILE_SIZE:
            self._held = b"".join(self._chunks)
            self._chunks, self._buffered = [], 0
            self._hash.update(self._held)
        elif self.size == 0 and not self._sink_open:
            self._open_sink()  # an empty file: no block will create it
        elif self._writer is not None:
            self.hand_off()

    def write_held(self) -> None:
        """Create the file if no block did, and write the bytes held for the commit (blocking)."""
        data, self._held = self._held, b""
        self._write(data)

    def hand_off_held(self) -> None:
        """Another part begins: write a held file on the executor, not holding it in memory longer."""
        if self._held:
            data, self._held = self._held, b""
            self._jobs.append(self._writer.submit(self._write, data, handshake=False))

    def hand_off(self) -> None:
        """Give a full block (or the last one) to the writer, unless it has BLOCKS_IN_FLIGHT of ours."""
        if not self._block_ready:
            return
        while self._jobs and self._jobs[0].done():
            self._jobs.popleft().result()  # a failed write (ENOSPC) raises here, on the parser's side
        if len(self._jobs) >= BLOCKS_IN_FLIGHT:
            return
        # Joined here: the GIL is held for the copy wherever it runs, and here it is off
        # the writer's path (hashing and writing, without the GIL, once each a block).
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        block = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        self._jobs.append(self._writer.submit(self._store, block, handshake=not self.finished))

    def write_backlog(self) -> Future[None] | None:
        """The job to wait for before feeding more: a full block (or the last one) waits on it."""
        self.hand_off()
        return self._jobs[0] if self._block_ready else None

    @property
    def _block_ready(self) -> bool:
        return self._buffered >= WRITE_BLOCK_SIZE or (self.finished and bool(self._chunks))

    @property
    def written(self) -> bool:
        """The part has ended and every byte of it is hashed and written."""
        return self.finished and not self._chunks and not self._held and all(job.done() for job in self._jobs)

    def _store(self, data: bytes, started: threading.Event | None = None) -> None:
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

    def _wait_for_jobs(self) -> None:
        """Make sure the writer no longer uses our file descriptor: cancel or wait."""
        self._chunks, self._buffered, self._held = [], 0, b""
        for job in reversed(self._jobs):  # the waiting ones first: they never run
            job.cancel()
        wait_for_futures(self._jobs)  # at most one block's hash and write

    def abort(self) -> None:
        """Stop writing and remove what was written; safe to call more than once."""
        self._wait_for_jobs()
        self.sink.abort()


class FieldTarget(BaseTarget):
    """Keep a text field in memory, up to `max_size` bytes; `charset`: the one its part declared."""

    def __init__(self, name: str, max_size: int, charset: str | None = None) -> None:
        super().__init__()
        self.name = name
        self.max_size = max_size
        self.charset = charset
        self.finished = False
        self._value = bytearray()

    def on_data_received(self, chunk: bytes) -> None:
        if len(self._value) + len(chunk) > self.max_size:
            raise LimitExceeded(
                "field_size",
                self.max_size,
                f"field {self.name!r} is larger than {self.max_size} bytes",
            )
        self._value += chunk

    def on_finish(self) -> None:
        self.finished = True

    def text(self, form_charset: str | None = None) -> str:
        """The value, read in its part's charset, else the form's (`_charset_`), else UTF-8."""
        charset = self.charset or form_charset or "utf-8"
        try:
            return self._value.decode(charset)
        except UnicodeError:
            raise FormError(f"field {self.name!r} is not valid {charset}") from None


class SkippedPartTarget(BaseTarget):
    """Count and drop a part nobody asked for, bounded like a text field.

    `empty_input`: the file part of an empty file input (`filename=""`); content in it is
    a file without a name (requests' `('', data)`, `curl -F 'f=@x;filename='`): 422 at once,
    whatever its size, as for a file part without a filename."""

    def __init__(self, name: str, max_size: int, empty_input: bool = False) -> None:
        super().__init__()
        self.name = name
        self.max_size = max_size
        self.empty_input = empty_input
        self.size = 0
        self.finished = False

    def on_data_received(self, chunk: bytes) -> None:
        if self.empty_input and chunk:
            raise NoFile(f"the part named {self.name!r} has content but an empty filename: name the file")
        self.size += len(chunk)
        if self.size > self.max_size:
            raise LimitExceeded(
                "field_size",
                self.max_size,
                f"unexpected part {self.name!r} is larger than {self.max_size} bytes",
            )

    def on_finish(self) -> None:
        self.finished = True


class DecodedTarget(BaseTarget):
    """Hand `target` a part's body with its Content-Transfer-Encoding undone."""

    def __init__(self, target: BaseTarget, encoding: str) -> None:
        super().__init__()
        self.target = target
        self._decoder = transfer_decoder(encoding)

    @property
    def finished(self) -> bool:
        return self.target.finished

    def on_start(self) -> None:
        self.target.start()

    def on_data_received(self, chunk: bytes) -> None:
        if data := self._decoder.decode(chunk):
            self.target.data_received(data)

    def on_finish(self) -> None:
        if data := self._decoder.flush():
            self.target.data_received(data)
        self.target.finish()


class PartRouter(BaseTarget):
    """The one target the parser knows: each part goes to the target its headers chose.

    The parser calls `start` for every part that has a name; the framer has queued
    that part's `PartInfo` just before, so the two stay in step.
    """

    def __init__(self, parts: deque[PartInfo], open_target: Callable[[PartInfo], BaseTarget]) -> None:
        super().__init__()
        self._parts = parts
        self._open_target = open_target
        self.current: BaseTarget | None = None
        self.sizes: list[int] = []  # bytes the parser gave each part

    def on_start(self) -> None:
        if not self._parts or self.current is not None:
            raise FormError("the parts of the form cannot be told apart")
        self.current = self._open_target(self._parts.popleft())
        self.sizes.append(0)
        self.current.start()

    def on_data_received(self, chunk: bytes) -> None:
        self.sizes[-1] += len(chunk)
        self.current.data_received(chunk)

    def on_finish(self) -> None:
        if self.current is not None:
            self.current.finish()
            self.current = None


# -- the form reader ----------------------------------------------------------


class KnownBoundaryParser(StreamingFormDataParser):
    """streaming-form-data's parser, given the boundary we already read from the request.

    Its own constructor parses a Content-Type again with the email package: two email
    parses a request (a tenth of a small upload's time), and a legal boundary such as
    "=?utf-8?q?x?=" would be read there as an RFC 2047 word and become another one.
    """

    def __init__(self, boundary: bytes) -> None:  # mirrors StreamingFormDataParser.__init__ (2.x)
        self.headers = {}
        self._parser = _Parser(b"\r\n--" + boundary + b"\r\n", b"\r\n--" + boundary + b"--", False)
        self._running = False


class KnownLinesParser:
    """Stands in for `email.parser.Parser` inside streaming-form-data's parser.

    It parses each part header line with the email package, and the header again on
    every read of it: a third of a small upload's CPU. The framer feeds it only two
    lines of its own (`framing.NAMED_PART_HEADERS`, `UNNAMED_PART_HEADERS`): those are
    parsed once, kept with their values parsed, and shared (the parser only reads
    them). Any other text, from another user of streaming-form-data in this
    process, goes to the email package as before.
    """

    known: dict[str, Message] = {}

    def __init__(self, policy: object = HTTP) -> None:
        self.policy = policy

    def parsestr(self, text: str, headersonly: bool = False) -> Message:
        if self.policy is HTTP and (message := self.known.get(text)) is not None:
            return message
        return EmailParser(policy=self.policy).parsestr(text, headersonly)


class KeptMessage(Message):
    """A parsed header block that is only read: `name in message` from a set, not a list built per call."""

    _names: frozenset[str] | None = None

    def __contains__(self, name: str) -> bool:
        if self._names is None:
            self._names = frozenset(key.lower() for key in self.keys())
        return name.lower() in self._names


def parse_for_keeps(line: str) -> Message:
    """Parse a header line once, storing its parsed header objects (a read returns them as they are)."""
    message = EmailParser(KeptMessage, policy=HTTP).parsestr(line)
    for name, value in message.items():
        message.replace_header(name, value)
    return message


for _block in (NAMED_PART_HEADERS, UNNAMED_PART_HEADERS):
    for _line in _block.decode().splitlines(keepends=True)[:-1]:  # the header lines, not the blank one
        KnownLinesParser.known[_line] = parse_for_keeps(_line)
sfd_parser.Parser = KnownLinesParser  # the name its parser calls, looked up at each call


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
    """

    def __init__(
        self,
        boundary: bytes,
        store: Store,
        limits: FormLimits,
        file_field: str,
        text_fields: tuple[str, ...],
        executor: WriterPool | None = None,
    ) -> None:
        self.files: list[UploadFileTarget] = []
        self._executor = executor
        self._writing: list[UploadFileTarget] = []  # files not yet fully written
        self.fields: dict[str, FieldTarget] = {}
        self._store = store
        self._limits = limits
        self._file_field = file_field
        self._text_fields = text_fields
        self._framer = Framer(boundary, limits.max_parts)
        self._router = PartRouter(self._framer.parts, self._open_target)
        self._opened: list[BaseTarget] = []
        self._parser = KnownBoundaryParser(boundary)
        self._parser.register("*", self._router, matches=lambda _registered, _name: True)

    def feed(self, chunk: bytes) -> None:
        try:
            for piece in self._framer.feed(chunk):
                self._parser.data_received(piece)
        except ParseFailedException as exc:
            raise FormError(f"malformed multipart body ({exc})") from None

    def close(self) -> None:
        """Check that the body was whole: closing boundary read, every part ended."""
        if not self._framer.complete:
            raise FormError("the body ended before the closing boundary")
        if self._framer.parts or not all(t.finished for t in self._opened):
            raise FormError("the parts of the form cannot be told apart")
        # streaming-form-data can drop body bytes next to a "\r\n--boundary" that is
        # not a delimiter (RFC 2046 forbids it in a body, but it must not give a short
        # file and a 201): every part must have got exactly what the framing says.
        if self._router.sizes != self._framer.body_sizes:
            raise FormError("the parts of the form cannot be told apart")

    def write_backlog(self) -> Future[None] | None:
        """A write job to wait for before feeding more, or None.

        Each file has at most BLOCKS_IN_FLIGHT blocks with the writers and one
        collected; and while an ended file's last block is still with a writer, the
        next file to end waits for it: so a form of many files holds at most ~5
        blocks, however slow the disk.
        """
        for target in self._writing:
            job = target.write_backlog()
            if job is not None:
                return job
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
        if target is None:
            return None
        form_charset = self.fields.get(CHARSET_FIELD)
        return target.text(field_charset(form_charset.text("latin-1")) if form_charset else None)

    def _open_target(self, info: PartInfo) -> BaseTarget:
        for held in self._writing:  # another part follows: a file held for the commit is written now
            held.hand_off_held()
        limits = self._limits
        target: BaseTarget
        if info.name == self._file_field and info.filename is None:
            # A text part where the file belongs: refused now, whatever its size (read as a
            # skipped part, a large one would be a 413 and a small one a 422).
            raise NoFile(f"the part named {info.name!r} has no filename: it is not a file")
        if info.name == self._file_field and info.filename:
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
        else:  # an empty file input, or a part nobody asked for
            empty_input = info.name == self._file_field
            target = SkippedPartTarget(info.name, limits.max_field_size, empty_input)
        if info.transfer_encoding and not isinstance(target, SkippedPartTarget):
            target = DecodedTarget(target, info.transfer_encoding)
        self._opened.append(target)
        return target

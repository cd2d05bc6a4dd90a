"""Bytes to disk: the streaming-form-data targets, and the form reader that drives them.

Nothing here knows ASGI. `FormReader` takes the request body chunk by chunk and
leaves behind partial files under `<upload dir>/.partial/`; `commit_files` moves them
into the upload dir with a JSON sidecar each, `abort` removes them.

streaming-form-data 2.x does the per-byte work (finding where each part's body ends)
but misses some of the structure around it, so a `Framer` reads that structure
first with `bytes.find` (cheap next to SHA-256: ~14 GB/s against ~2 GB/s here):

- it rejects any preamble before the first boundary (RFC 2046 allows one);
- it drops a part's Content-Type that comes before its Content-Disposition;
- it buffers a header line until it sees CRLF, without bound;
- it has no end-of-input check, so a truncated body looks like a short one;
- it hands `MultipleTargets` the content type where the filename belongs.

The framer therefore parses every part's headers itself, feeds the parser only what
it has understood, and keeps a queue of `PartInfo` that `PartRouter`, the one
target registered with the parser, pops as each part starts.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import secrets
import unicodedata
from collections import deque
import threading
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for_futures
from dataclasses import dataclass
from email.parser import Parser
from email.policy import HTTP
from pathlib import Path
from typing import Any, Callable, Iterator
from urllib.parse import unquote

from streaming_form_data import ParseFailedException, StreamingFormDataParser
from streaming_form_data.parser import parse_content_boundary
from streaming_form_data.targets import BaseTarget

KiB = 1024
MiB = 1024 * KiB

# RFC 2046 §5.1.1 allows a preamble before the first boundary; nothing real sends
# more than a line, so 64 KiB is generous and keeps a hostile one from costing time.
MAX_PREAMBLE = 64 * KiB
# Browsers send two or three header lines of well under 1 KiB per part; h11 allows
# 16 KiB for a whole request head by default, so we allow the same per part.
MAX_PART_HEADER_BYTES = 16 * KiB
MAX_PART_HEADER_LINES = 32
# A display name longer than any filesystem's NAME_MAX (255) is not a real filename.
MAX_FILENAME_CHARS = 255
DEFAULT_CONTENT_TYPE = "application/octet-stream"
# With an executor, a file's bytes are hashed and written in blocks of this size, one
# block at a time: one thread handoff per MiB instead of one per 64 KiB read (bench/
# measured 256 KiB to 4 MiB), and at most ~3 blocks per upload in memory (FormReader).
WRITE_BLOCK_SIZE = 1 * MiB
PARTIAL_DIR_NAME = ".partial"

CRLF = b"\r\n"
# The parser reads each header line with the email package; we read them the same
# way so that the two always agree on which parts exist.
_HEADER_LINE_PARSER = Parser(policy=HTTP)
# The email package parses Content-Type and Content-Disposition in time quadratic in
# the special characters and runs of white space outside quoted strings, quotes
# included (16 K of ";" or of '"' in one 16 KiB line: ~2 s for us and as long again
# for the parser, per part), and nested comments recursively. A real part header has
# a handful: more than this many is refused before either parses it. White space
# inside quoted strings costs too (a 16 KiB filename of "a a a ...": 0.13 s a part),
# so a quoted value may hold more runs of it than a 255-character name can. "(" is
# counted quoted or not: inside a comment a quote does not hide the next "("; and so
# are RFC 2047 encoded words ("=?", decoded even inside quotes: 56 ms a part).
MAX_HEADER_SPECIALS = 64
MAX_HEADER_SPACE_RUNS = 2 * MAX_FILENAME_CHARS
_STRUCTURED_HEADERS = ("content-type", "content-disposition")
_QUOTED_RE = re.compile(r'"(?:[^"\\]|\\.)*"?')
_SPECIAL_RE = re.compile(r'[;,:<>@\[\]\\()"]|\s+')  # RFC 5322 specials, quotes, white space
_SPACE_RUN_RE = re.compile(r"\s+")


class FormError(Exception):
    """The body is not multipart/form-data we can read (400)."""


class LimitExceeded(Exception):
    """A configured limit was passed while streaming (413)."""

    def __init__(self, limit: str, maximum: int, detail: str) -> None:
        super().__init__(detail)
        self.limit = limit
        self.maximum = maximum


# -- small pure helpers ----------------------------------------------------------


def parse_header_params(value: str) -> tuple[str, dict[str, str]]:
    """Split `type; a=b; c="d"` into its first token and parameters (first one wins).

    Inside a quoted string only `\\"` and `\\\\` are escapes: a Windows path such as
    `C:\\Users\\a.txt`, which old browsers sent unescaped, keeps its separators.
    """
    head, _, rest = value.partition(";")
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        start = i
        while i < n and rest[i] not in "=;":
            i += 1
        key = rest[start:i].strip().lower()
        if i >= n or rest[i] == ";":
            if key:
                params.setdefault(key, "")
            continue
        i += 1  # the "="
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            i += 1
            chars = []
            while i < n and rest[i] != '"':
                if rest[i] == "\\" and i + 1 < n and rest[i + 1] in '"\\':
                    i += 1
                chars.append(rest[i])
                i += 1
            i += 1  # the closing quote, if any
            param = "".join(chars)
            while i < n and rest[i] != ";":
                i += 1
        else:
            start = i
            while i < n and rest[i] != ";":
                i += 1
            param = rest[start:i].strip()
        if key:
            params.setdefault(key, param)
    return head.strip().lower(), params


def decode_ext_value(value: str) -> str:
    """Decode an RFC 5987 `charset'language'percent-encoded` value."""
    charset, _, rest = value.partition("'")
    _, _, encoded = rest.partition("'")
    # RFC 5987 §3.2.1 names these two; any other (or none) is read as UTF-8, never
    # handed to a codec of the client's choosing (idna, punycode... raise on bad input).
    encoding = "iso-8859-1" if charset.strip().lower() == "iso-8859-1" else "utf-8"
    return unquote(encoded, encoding=encoding, errors="replace")


def clean_filename(raw: str) -> str:
    """Keep the last path component of a client's filename, for display only."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c) != "Cc").strip()
    if name in (".", ".."):
        name = ""
    return name[:MAX_FILENAME_CHARS] or "unnamed"


def new_file_id() -> str:
    """Return a fresh stored-file id: 128 random bits, safe as a file name."""
    return secrets.token_hex(16)


@dataclass(frozen=True)
class PartInfo:
    """What a part's headers say about it."""

    name: str
    filename: str | None  # None for a text field; "" for an empty file input
    content_type: str


def read_part_headers(block: bytes) -> PartInfo | None:
    """Parse one part's header block (without its final blank line).

    Returns None for a part the parser will skip (no Content-Disposition, or no
    name). Raises FormError for what the parser would choke on.
    """
    lines = block.split(CRLF)
    if len(lines) > MAX_PART_HEADER_LINES:
        raise FormError(f"a part has more than {MAX_PART_HEADER_LINES} header lines")
    disposition = content_type = None
    parser_sees_name = False
    for raw_line in lines:
        if b"\r" in raw_line or b"\n" in raw_line or raw_line[:1] in (b" ", b"\t"):
            raise FormError("a part header line is malformed (bare CR/LF or folded)")
        try:
            line = raw_line.decode("utf-8")
        except UnicodeDecodeError:
            raise FormError("a part header is not valid UTF-8") from None
        header_name, _, raw_value = line.partition(":")
        if header_name.strip().lower() in _STRUCTURED_HEADERS:
            refuse_costly_value(raw_value)
        message = _HEADER_LINE_PARSER.parsestr(line + "\r\n")
        value = raw_value.strip()
        if "content-disposition" in message:
            if disposition is not None:
                raise FormError("a part has two Content-Disposition headers")
            try:
                kind = message.get_content_disposition()
                parser_sees_name = bool(message["content-disposition"].params.get("name"))
            except (UnicodeError, LookupError):  # RFC 2231 values in a charset it cannot decode
                raise FormError("a part's Content-Disposition cannot be decoded") from None
            if kind != "form-data":
                raise FormError("a part's Content-Disposition is not form-data")
            disposition = value
        elif "content-type" in message and content_type is None:
            content_type = value
    if disposition is None:
        return None
    _, params = parse_header_params(disposition)
    name = params.get("name", "")
    if bool(name) != parser_sees_name:
        raise FormError("a part's name cannot be read unambiguously")
    if not name:
        return None
    if "filename" in params:  # RFC 7578 §4.2: filename* is not for form data
        filename: str | None = params["filename"]
    elif "filename*" in params:
        filename = decode_ext_value(params["filename*"])
    else:
        filename = None
    content_type = "".join(c for c in content_type or "" if c.isprintable()).strip()
    return PartInfo(name, filename, content_type or DEFAULT_CONTENT_TYPE)


def refuse_costly_value(value: str) -> None:
    """Refuse a structured header value the email package would take long to parse."""
    unquoted = _QUOTED_RE.sub('""', value)  # each quoted string counts as its two quotes
    if (
        len(_SPECIAL_RE.findall(unquoted)) > MAX_HEADER_SPECIALS
        or value.count("(") > MAX_HEADER_SPECIALS
        or value.count("=?") > MAX_HEADER_SPECIALS
        or len(_SPACE_RUN_RE.findall(value)) > MAX_HEADER_SPACE_RUNS
    ):
        raise FormError("a part's Content-Type or Content-Disposition is too intricate to read")


# -- framing ------------------------------------------------------------------


def refuse_padding(after_marker: bytes) -> None:
    """Refuse "--boundary" followed by spaces or tabs.

    RFC 2046 §5.1.1 lets a sender pad a boundary line with white space, but
    streaming-form-data reads such a line as body bytes, which would make one file of
    two parts. Where it is not padding, it is the delimiter inside content, which the
    RFC forbids too. Nothing real sends either.
    """
    if after_marker[:1] in (b" ", b"\t"):
        raise FormError("a boundary line has white space after the boundary (transport padding)")


def find_boundary_line(data: bytes, marker: bytes, start: int = 0) -> tuple[int, bytes]:
    """Find the first `marker` ("\r\n--boundary") at or after `start` that begins a
    boundary line: followed by CRLF (a delimiter) or "--" (the close delimiter).

    Return (index, those two bytes); (index, b"") when `data` ends before they can be
    told; (-1, b"") when there is none. A marker followed by anything else is content.
    """
    n = len(marker)
    i = data.find(marker, start)
    while i >= 0:
        after = data[i + n : i + n + 2]
        refuse_padding(after)
        if len(after) < 2:
            return i, b""
        if after in (CRLF, b"--"):
            return i, after
        i = data.find(marker, i + 1)
    return -1, b""


class Framer:
    """Read the multipart structure around the parts' bodies.

    `feed(data)` yields the pieces of `data` the parser may have, in order: the
    preamble and epilogue are cut away, and a header block is held back until it
    is complete and parsed, so that its `PartInfo` is queued before the parser
    starts that part. Body bytes go through whole (no copy).
    """

    PREAMBLE, HEADERS, BODY, EPILOGUE = range(4)

    def __init__(self, boundary: bytes, max_parts: int) -> None:
        self.marker = b"\r\n--" + boundary
        self.max_parts = max_parts
        self.parts: deque[PartInfo] = deque()
        self.part_count = 0
        self.state = self.PREAMBLE
        # The stream is read as if it began with CRLF, so the first boundary is
        # found like every other; the parser never sees that CRLF.
        self._held = CRLF
        self._carry = b""  # the last bytes of body seen, for a marker split over chunks
        self._preamble_bytes = -len(CRLF)
        # Body sizes of the queued parts, as the framing says: FormReader checks that
        # the parser handed out exactly these (see `close`).
        self.body_sizes: list[int] = []
        self._body_size = 0
        self._queued = False

    @property
    def complete(self) -> bool:
        """True once the closing boundary has been read."""
        return self.state == self.EPILOGUE

    def feed(self, data: bytes) -> Iterator[bytes]:
        if self.state == self.EPILOGUE:
            return
        if self._held:
            data, self._held = self._held + data, b""
        fed = pos = 0
        while True:
            if self.state == self.BODY:
                start = pos
                found = self._find_body_end(data, pos)
                if found is None:
                    self._body_size += len(data) - start
                    self._remember_tail(data)
                    break
                pos, closing = found
                # The delimiter may have begun in the last chunk (then this is negative).
                self._body_size += pos - len(self.marker) - 2 - start
                if self._queued:
                    self.body_sizes.append(self._body_size)
                self._body_size = 0
                self._carry = b""
                self.state = self.EPILOGUE if closing else self.HEADERS
                if closing:
                    yield data[fed:pos]
                    return
            elif self.state == self.HEADERS:
                end = self._find_headers_end(data, pos)
                # Hold the block until a few body bytes follow it (a body is always
                # followed by a delimiter, so they come). streaming-form-data keeps
                # the "\r\n" of the previous delimiter in its close-delimiter finder;
                # fed a body that starts with "-" at the very end of a chunk, it
                # underflows and fails (or ends the form early). With these bytes
                # in the same chunk it skips ahead and resets that state. It also
                # keeps header bytes out of the carry of `_remember_tail`.
                if end >= 0 and len(data) - (end + 4) < len(self.marker) + 2:
                    end = -1
                if end < 0:
                    if pos > fed:
                        yield data[fed:pos]
                    self._held = data[pos:]
                    return
                self._read_headers(data[pos:end])
                pos = end + 4
                self.state = self.BODY
            else:  # PREAMBLE
                start = self._skip_preamble(data)
                if start < 0:
                    return
                fed = start
                pos = start + len(self.marker) - 2  # past "--boundary"
                if data[pos : pos + 2] == b"--":
                    self.state = self.EPILOGUE  # an empty form
                    return
                pos += 2
                self.state = self.HEADERS
        if len(data) > fed:
            yield data if fed == 0 else data[fed:]

    def _find_body_end(self, data: bytes, start: int) -> tuple[int, bool] | None:
        """Find the next delimiter or close delimiter; return where it ends."""
        n = len(self.marker)
        if start == 0 and self._carry:  # a boundary line that began in the last chunk
            window = self._carry + data[: n + 2]
            i, after = find_boundary_line(window, self.marker)
            if 0 <= i < len(self._carry):
                return (i + n + 2 - len(self._carry), after == b"--") if after else None
        i, after = find_boundary_line(data, self.marker, start)
        if not after:
            return None  # none, or decided on the next chunk through the carry
        return i + n + 2, after == b"--"

    def _remember_tail(self, data: bytes) -> None:
        keep = len(self.marker) + 1
        self._carry = (self._carry + data)[-keep:] if len(data) < keep else data[-keep:]

    def _find_headers_end(self, data: bytes, start: int) -> int:
        if len(data) - start >= 2 and data[start : start + 2] == CRLF:
            raise FormError("a part has no headers")
        end = data.find(b"\r\n\r\n", start, start + MAX_PART_HEADER_BYTES + 4)
        if end < 0 and len(data) - start > MAX_PART_HEADER_BYTES:
            raise FormError(f"a part's headers are longer than {MAX_PART_HEADER_BYTES} bytes")
        return end

    def _read_headers(self, block: bytes) -> None:
        self.part_count += 1
        if self.part_count > self.max_parts:
            raise LimitExceeded(
                "parts", self.max_parts, f"the form has more than {self.max_parts} parts"
            )
        info = read_part_headers(block)
        self._queued = info is not None
        if info is not None:
            self.parts.append(info)

    def _skip_preamble(self, data: bytes) -> int:
        """Return where the first boundary starts, or -1 and hold a tail."""
        i, after = find_boundary_line(data, self.marker)
        if after:
            self._count_preamble(i)
            return i + 2
        keep = len(data) - i if i >= 0 else min(len(data), len(self.marker) + 1)
        self._count_preamble(len(data) - keep)
        self._held = data[len(data) - keep :]
        return -1

    def _count_preamble(self, size: int) -> None:
        self._preamble_bytes += size
        if self._preamble_bytes > MAX_PREAMBLE:
            raise FormError(f"more than {MAX_PREAMBLE} bytes before the first boundary")


# -- targets ------------------------------------------------------------------


class WriterPool:
    """Threads that hash and write file blocks, knowing how many of them are busy.

    The event loop holds the GIL while it parses. A writer thread needs the GIL for
    a moment to begin a block (then hashlib and os.write let go of it), and would get
    it only when the loop next blocks: the two would take turns instead of working
    side by side (in process, CPU time = wall time). So when a thread is free,
    `submit` waits, off the GIL and for at most HANDSHAKE_SECONDS, until the job says
    it is about to hash. With every thread busy it does not wait: the loop must never
    stall behind other uploads' blocks. Measured in process: 850 -> 1200 MB/s, CPU
    1.45x wall; through hypercorn no change (its loop blocks on every read anyway).
    """

    HANDSHAKE_SECONDS = 0.002

    def __init__(self, threads: int) -> None:
        self.threads = threads
        self._executor = ThreadPoolExecutor(threads, thread_name_prefix="upload-asgi-write")
        self._lock = threading.Lock()
        self._busy = 0

    def submit(self, fn: Callable[..., None], *args: Any) -> Future[None]:
        """Run `fn(*args, started=event)`; `fn` sets the event just before it lets go of the GIL."""
        with self._lock:
            idle = self._busy < self.threads
            self._busy += 1
        started = threading.Event()
        future = self._executor.submit(self._run, fn, args, started)
        # Done or cancelled before it ran (an aborted upload): either way, no longer busy.
        future.add_done_callback(self._job_over)
        if idle:
            started.wait(self.HANDSHAKE_SECONDS)
        return future

    @property
    def busy(self) -> int:
        """Jobs submitted and not yet over (running or queued)."""
        return self._busy

    def _run(self, fn: Callable[..., None], args: tuple[Any, ...], started: threading.Event) -> None:
        try:
            fn(*args, started=started)
        finally:
            started.set()

    def _job_over(self, _future: Future[None]) -> None:
        with self._lock:
            self._busy -= 1



class UploadFileTarget(BaseTarget):
    """Stream one file part into `.partial/<id>`, hashing and counting on the way.

    Without an executor each chunk is hashed and written as it comes. With one, the
    chunks are collected into blocks of WRITE_BLOCK_SIZE that the executor hashes
    and writes in order, one at a time, while the parser's thread goes on: when a
    full block is waiting for the previous one, `write_backlog` returns the job to
    wait for before feeding more.
    """

    def __init__(self, partial_dir: Path, info: PartInfo, max_size: int, executor: Executor | None = None) -> None:
        super().__init__()
        self.id = new_file_id()
        self.path = partial_dir / self.id
        self.filename = clean_filename(info.filename or "")
        self.content_type = info.content_type
        self.max_size = max_size
        self.size = 0
        self.finished = False
        self._hash = hashlib.sha256()
        self._fd: int | None = None
        self._executor = executor
        self._chunks: list[bytes] = []  # received, not yet handed to the executor
        self._buffered = 0
        self.job: Future[None] | None = None  # the last block handed to the executor

    @property
    def sha256(self) -> str:
        """The digest; with an executor, only once `job` is done."""
        return self._hash.hexdigest()

    def on_start(self) -> None:
        self._fd = create_locked(self.path)

    def on_data_received(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_size:
            raise LimitExceeded(
                "file_size",
                self.max_size,
                f"file {self.filename!r} is larger than {self.max_size} bytes",
            )
        if self._executor is None:
            self._store([chunk])
            return
        self._chunks.append(chunk)
        self._buffered += len(chunk)
        if self._buffered >= WRITE_BLOCK_SIZE:
            self.hand_off()

    def on_finish(self) -> None:
        self.finished = True
        if self._executor is not None:
            self.hand_off()

    def hand_off(self) -> None:
        """Give a full block (or the last one) to the executor, unless it still has our last block."""
        if not self._block_ready or (self.job is not None and not self.job.done()):
            return
        if self.job is not None:
            self.job.result()  # a failed write (ENOSPC) raises here, on the parser's side
        chunks, self._chunks, self._buffered = self._chunks, [], 0
        self.job = self._executor.submit(self._store, chunks)

    def write_backlog(self) -> Future[None] | None:
        """The job to wait for before feeding more: a full block (or the last one) waits on it."""
        self.hand_off()
        return self.job if self._block_ready else None

    @property
    def _block_ready(self) -> bool:
        return self._buffered >= WRITE_BLOCK_SIZE or (self.finished and bool(self._chunks))

    @property
    def written(self) -> bool:
        """The part has ended and every byte of it is hashed and written."""
        return self.finished and not self._chunks and (self.job is None or self.job.done())

    def _store(self, chunks: list[bytes], started: threading.Event | None = None) -> None:
        """Hash and write chunks, in order (on an executor thread, or inline)."""
        # One join copy per block: hashlib and os.write then run once each, without the GIL.
        data = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()  # the list is ours alone now: free the chunks before the work
        if started is not None:
            started.set()  # WriterPool: the loop may go on; we let go of the GIL now
        self._hash.update(data)
        write_all(self._fd, data)

    def _wait_for_job(self) -> None:
        """Make sure the executor no longer uses our file descriptor: cancel or wait."""
        self._chunks, self._buffered = [], 0
        if self.job is not None and not self.job.cancel():
            wait_for_futures([self.job])  # at most one block's hash and write

    def sync(self, fsync: bool) -> None:
        """Flush to the device (if asked); the file stays open and locked in `.partial/`."""
        if self.job is not None:
            self.job.result()  # done by now (the reader awaited it); raises a failed write
        if fsync and self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the file (and so drop its lock); safe to call more than once."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # the number is freed even if this raises: never close it twice

    def abort(self) -> None:
        """Close and remove the partial file; safe to call more than once."""
        self._wait_for_job()
        self.close()
        remove_quietly(self.path)


class FieldTarget(BaseTarget):
    """Keep a text field in memory, up to `max_size` bytes."""

    def __init__(self, name: str, max_size: int) -> None:
        super().__init__()
        self.name = name
        self.max_size = max_size
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

    @property
    def value(self) -> str:
        try:
            return self._value.decode("utf-8")
        except UnicodeDecodeError:
            raise FormError(f"field {self.name!r} is not valid UTF-8") from None


class SkippedPartTarget(BaseTarget):
    """Count and drop a part nobody asked for, bounded like a text field."""

    def __init__(self, name: str, max_size: int) -> None:
        super().__init__()
        self.name = name
        self.max_size = max_size
        self.size = 0
        self.finished = False

    def on_data_received(self, chunk: bytes) -> None:
        self.size += len(chunk)
        if self.size > self.max_size:
            raise LimitExceeded(
                "field_size",
                self.max_size,
                f"unexpected part {self.name!r} is larger than {self.max_size} bytes",
            )

    def on_finish(self) -> None:
        self.finished = True


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
    every file's `job` before reading its digest.
    """

    def __init__(
        self,
        boundary: bytes,
        partial_dir: Path,
        limits: FormLimits,
        file_field: str,
        text_fields: tuple[str, ...],
        executor: Executor | None = None,
    ) -> None:
        self.files: list[UploadFileTarget] = []
        self._executor = executor
        self._writing: list[UploadFileTarget] = []  # files not yet fully written
        self.fields: dict[str, FieldTarget] = {}
        self._partial_dir = partial_dir
        self._limits = limits
        self._file_field = file_field
        self._text_fields = text_fields
        self._framer = Framer(boundary, limits.max_parts)
        self._router = PartRouter(self._framer.parts, self._open_target)
        self._opened: list[BaseTarget] = []
        headers = {"Content-Type": f'multipart/form-data; boundary="{boundary.decode()}"'}
        # The parser reads the boundary with the email package, which decodes RFC 2047
        # words: a legal boundary such as "=?utf-8?q?x?=" would become "x" there.
        if parse_content_boundary(headers) != boundary:
            raise FormError("this multipart boundary cannot be read unambiguously; use another")
        self._parser = StreamingFormDataParser(headers=headers)
        self._parser.register("*", self._router, matches=lambda _registered, _name: True)

    def feed(self, chunk: bytes) -> None:
        try:
            for piece in self._framer.feed(chunk):
                self._parser.data_received(piece)
        except ParseFailedException as exc:
            raise FormError(f"malformed multipart body ({exc})") from None
        except UnicodeError:
            raise FormError("a part header cannot be decoded") from None
        except RecursionError:  # the email package on nested comments (a backstop: see refuse_costly_value)
            raise FormError("a part header is nested too deeply to read") from None

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

        Each file has at most one block with the executor and one collected; and
        while an ended file's last block is still with the executor, the next file
        to end waits for it: so a form of many files holds at most ~3 blocks,
        however slow the disk.
        """
        for target in self._writing:
            job = target.write_backlog()
            if job is not None:
                return job
        self._writing = [t for t in self._writing if not t.written]
        ended = [t for t in self._writing if t.finished]
        return ended[0].job if len(ended) > 1 else None

    def abort(self) -> None:
        for target in self.files:
            target.abort()

    def field(self, name: str) -> str | None:
        target = self.fields.get(name)
        return None if target is None else target.value

    def _open_target(self, info: PartInfo) -> BaseTarget:
        limits = self._limits
        target: BaseTarget
        if info.name == self._file_field and info.filename:
            if len(self.files) >= limits.max_files:
                raise LimitExceeded(
                    "files", limits.max_files, f"the form has more than {limits.max_files} files"
                )
            target = UploadFileTarget(self._partial_dir, info, limits.max_file_size, self._executor)
            self.files.append(target)
            if self._executor is not None:
                self._writing.append(target)
        elif info.name in self._text_fields:  # with a filename too (curl -F sha256=@digest.txt)
            if info.name in self.fields:  # each would be held in memory
                raise FormError(f"field {info.name!r} is given more than once")
            target = FieldTarget(info.name, limits.max_field_size)
            self.fields[info.name] = target
        else:  # an empty file input, or a part nobody asked for
            target = SkippedPartTarget(info.name, limits.max_field_size)
        self._opened.append(target)
        return target


# -- disk ------------------------------------------------------------------------


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a short write is legal)."""
    written = os.write(fd, data)
    if written < len(data):
        view = memoryview(data)
        while written < len(data):
            written += os.write(fd, view[written:])


def create_locked(path: Path) -> int:
    """Create `path` and hold an exclusive flock on it while it is being written.

    The lock tells a starting worker's sweep that the file is alive: a lock is
    released when its process dies, so an unlocked partial file is stale.
    """
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        # Blocking: a sweep that opened the file before we locked it holds the lock only
        # to unlink it (LOCK_NB would fail this upload with EWOULDBLOCK).
        fcntl.flock(fd, fcntl.LOCK_EX)
        removed = os.fstat(fd).st_nlink == 0  # a sweep removed it before we locked it
    except BaseException:
        os.close(fd)
        remove_quietly(path)
        raise
    if removed:
        os.close(fd)
        return create_locked(path)
    return fd


def remove_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def prepare_upload_dir(upload_dir: Path) -> Path:
    """Create the upload dir and its `.partial/`, sweep stale partial files, return it."""
    partial_dir = upload_dir / PARTIAL_DIR_NAME
    partial_dir.mkdir(parents=True, exist_ok=True)
    sweep_stale_partials(partial_dir)
    return partial_dir


def sweep_stale_partials(partial_dir: Path) -> int:
    """Remove partial files no live process holds a lock on; return how many."""
    removed = 0
    for entry in os.scandir(partial_dir):
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # another worker is writing it
        else:
            remove_quietly(Path(entry.path))
            removed += 1
        finally:
            os.close(fd)
    return removed


def sidecar_path(upload_dir: Path, file_id: str) -> Path:
    return upload_dir / f"{file_id}.json"


def commit_files(
    upload_dir: Path, partial_dir: Path, files: list[tuple[UploadFileTarget, dict[str, Any]]], fsync: bool
) -> None:
    """Move every finished partial file into the upload dir with its sidecar: all or none.

    Blocking (fsync): run it off the event loop.
    """
    # Each file stays open, and so locked, until it has left .partial/: closed there,
    # a worker starting now would sweep it as stale (SPEC §8).
    for target, _ in files:
        target.sync(fsync)
    moved: list[Path] = []
    try:
        for target, record in files:
            final = upload_dir / target.id
            os.rename(target.path, final)
            moved.append(final)
            sidecar = sidecar_path(upload_dir, target.id)
            write_sidecar(partial_dir / f"{target.id}.json", sidecar, record, fsync)
            moved.append(sidecar)
        if fsync:
            sync_dir(upload_dir)
        for target, _ in files:
            target.close()  # a close can report a write error (NFS): then store none
    except BaseException:
        for path in moved:
            remove_quietly(path)
        for target, _ in files:
            target.abort()
        raise


def uncommit_files(upload_dir: Path, files: list[UploadFileTarget]) -> None:
    """Remove files that `commit_files` stored, and their sidecars."""
    for target in files:
        remove_quietly(upload_dir / target.id)
        remove_quietly(sidecar_path(upload_dir, target.id))


def write_sidecar(tmp: Path, final: Path, record: dict[str, Any], fsync: bool) -> None:
    """Write the record as JSON beside the stored file, atomically (temp + rename)."""
    body = json.dumps(record, ensure_ascii=False, indent=1).encode()
    fd = create_locked(tmp)
    try:
        write_all(fd, body)
        if fsync:
            os.fsync(fd)
        os.rename(tmp, final)
    except BaseException:
        remove_quietly(tmp)
        raise
    finally:
        os.close(fd)


def sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

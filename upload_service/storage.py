"""The storage seam: everything the request path asks of wherever files go.

The request path talks only to a `Store` (like tusd's `DataStore`); `localstore`
implements it on a directory, and other backends (S3) implement the same. Optional
abilities (resumable uploads) are separate small interfaces a store may also offer.

Writing a form's files: `new_file()` gives a `FileSink` per file part; its `open`,
`write` and `abort` block and run where the caller puts them (`write` on a writer
thread, one block at a time, in order, or in the commit's `before`); `commit` stores
a request's files and their records all or none, and undoes itself if cancelled.
"""

from __future__ import annotations

import hashlib
import json
import re
import secrets
import threading
import time
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from upload_service.units import MiB

Record = dict[str, Any]

# 128 random bits as lowercase hex: what `new_file_id` makes and all an id may be.
FILE_ID_RE = re.compile(r"[0-9a-f]{32}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")
DECLARED_SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")  # a digest a client declares: either case
TEXT_FIELDS = ("filename", "content_type", "description", "created")  # each a string or null in a record


def new_file_id() -> str:
    """Return a fresh stored-file id: 128 random bits, safe as a file name or key."""
    return secrets.token_hex(16)


# One line (`indent` takes the pure-Python encoder), one encoder (json.dumps with arguments makes one a call).
_encode_record = json.JSONEncoder(ensure_ascii=False).encode


def record_json(record: Record) -> bytes:
    """A record as its stored JSON."""
    return _encode_record(record).encode()


def is_file_id(text: str) -> bool:
    """Whether `text` is an id this server could have made (checked before any lookup)."""
    return FILE_ID_RE.fullmatch(text) is not None


class BadCursor(ValueError):
    """A list cursor this store did not give out (the client sees a 400)."""


CURSOR_RE = re.compile(r"([0-9]{1,20})-([0-9a-f]{32})")


def parse_cursor(cursor: str | None) -> tuple[int, str] | None:
    """A cursor is `<time>-<id>` of the last record of the previous page (the time in the
    store's own unit: nanoseconds locally, seconds on S3)."""
    if not cursor:
        return None
    match = CURSOR_RE.fullmatch(cursor)
    if match is None:
        raise BadCursor("not a cursor this server made")
    return int(match[1]), match[2]


def format_cursor(key: tuple[int, str]) -> str:
    return f"{key[0]}-{key[1]}"


class UnreadableRecord(ValueError):
    """A stored record that is not a JSON object with a size and a sha256 (a crash with UPLOAD_FSYNC=0 can leave it empty)."""


def parse_record(data: bytes) -> Record:
    """A record from its stored JSON; raise UnreadableRecord for anything else."""
    try:
        record = json.loads(data)
    except ValueError as exc:  # not JSON, or not UTF-8
        raise UnreadableRecord(f"not JSON: {exc}") from None
    if not isinstance(record, dict):
        raise UnreadableRecord(f"not a JSON object but {type(record).__name__}")
    sha256, size = record.get("sha256"), record.get("size")
    if not isinstance(sha256, str) or not SHA256_RE.fullmatch(sha256):
        raise UnreadableRecord("no sha256 of 64 hexadecimal digits")  # every answer about the file reads it
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise UnreadableRecord("no size of 0 or more")
    if not all(is_text_or_none(record.get(key)) for key in TEXT_FIELDS):
        raise UnreadableRecord(f"one of {', '.join(TEXT_FIELDS)} is not text")
    metadata = record.get("metadata")  # a resumable upload's
    if metadata is not None and not (isinstance(metadata, dict) and all(map(is_text, [*metadata, *metadata.values()]))):
        raise UnreadableRecord("metadata is not an object of text values")
    return record


def is_text_or_none(value: Any) -> bool:
    return value is None or is_text(value)


def is_text(value: Any) -> bool:
    """A string that is all Unicode text (JSON's `\\udc80` decodes to a lone surrogate)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


class FileSink(ABC):
    """One file on its way into the store; nothing of it is visible until `commit`."""

    id: str

    @abstractmethod
    def open(self) -> None:
        """Begin the file (create the partial file; S3 starts its multipart upload at the first part)."""

    @abstractmethod
    def write(self, data: bytes) -> None:
        """Append a block; blocking, called on a writer thread, in order."""

    @abstractmethod
    def abort(self) -> None:
        """Remove whatever was written; safe at any point, more than once."""


class StoredFile(ABC):
    """A stored file opened for reading: the record and its bytes as they are now.

    Once opened, a concurrent delete never tears what it serves.
    """

    record: Record
    size: int

    @abstractmethod
    def chunks(self, start: int = 0, stop: int | None = None) -> AsyncIterator[bytes]:
        """Yield bytes `start` to `stop` (exclusive), in bounded chunks."""

    @abstractmethod
    async def close(self) -> None:
        """Let go of the file."""


# A page of the listing ends early once its records pass this many bytes (as stored): a record
# may hold a 64 KiB description, and a page of 1000 of them was hundreds of MiB in memory.
PAGE_BYTES = 1 * MiB


@dataclass(frozen=True)
class Page:
    """One page of records, newest first, and the cursor of the next (None: the last)."""

    records: list[Record]
    next_cursor: str | None


class Store(ABC):
    """Where files go: the seam between the request path and a storage backend."""

    @abstractmethod
    def prepare(self) -> None:
        """Make the store ready and sweep a crashed process's leftovers (at lifespan startup, or
        at first use when a host skips lifespan). Called before each use: a no-op once ready."""

    @abstractmethod
    def new_file(self) -> FileSink:
        """A sink for one file, with a fresh id."""

    @abstractmethod
    async def commit(self, files: Sequence[tuple[FileSink, Record]], before: Callable[[], None] | None = None) -> None:
        """Store every file with its record, all or none; if cancelled, store none.

        `before` is blocking work the files still need (writing a small file's bytes,
        at most targets.HELD_FILE_SIZE): it runs first, off the loop unless the store
        knows it is cheap (the local store: in the commit's thread job, or on the loop
        when the commit is that cheap; S3: on a thread, before the commit).
        """

    @abstractmethod
    async def open(self, file_id: str) -> StoredFile | None:
        """Open a stored file for reading, or None if there is none (or it is not an id).

        Raises UnreadableRecord if its record is there but not one.
        """

    @abstractmethod
    async def record(self, file_id: str) -> Record | None:
        """The record of a stored file, or None; raises UnreadableRecord as `open` does."""

    @abstractmethod
    async def list(self, limit: int, cursor: str | None = None) -> Page:
        """Records newest first, `limit` (1 or more) at most, after `cursor`; never all in memory.
        A page ends early once its records pass PAGE_BYTES as stored (at least one record).

        Raises `BadCursor` for a cursor this store did not make.
        """

    @abstractmethod
    async def delete(self, file_id: str) -> bool:
        """Remove a stored file and its record (readable or not); False if there was none."""

    @abstractmethod
    async def health(self) -> dict[str, Any]:
        """Facts for /health; raise OSError if the store cannot be used."""

    def describe_problem(self, exc: OSError) -> str:
        """Say what is wrong with the store, naming the setting to fix."""
        return str(exc)


# -- resumable uploads (an optional ability, like tusd's LengthDeferrer or Locker) -----


class UploadBusy(Exception):
    """Another request (in any worker) is writing this upload now."""


@dataclass
class UploadInfo:
    """What a resumable upload is, besides its bytes.

    `metadata` holds tus Upload-Metadata as sent (key -> base64 value, "" for a bare
    key): the protocol decodes it, the store only keeps it. `length` None means
    deferred (tus creation-defer-length, or a draft upload of unknown length).
    """

    id: str
    length: int | None
    offset: int
    metadata: dict[str, str]
    expires: float  # POSIX seconds
    sha256: str | None = None  # the whole-file digest the client declared (hex), checked before finish

    @property
    def complete(self) -> bool:
        return self.length is not None and self.offset == self.length


class ResumableUpload(ABC):
    """One resumable upload held for writing: this request is its only writer until `release`.

    Every method blocks; call them off the event loop (`append` on a writer thread, in
    order). The SHA-256 of everything before `info.offset` is kept here: handed over
    by the store when this process wrote those bytes last, else re-read once, on the
    first `append` or `sha256()`, from what is stored (`rehashed_bytes` says how much).
    A backend that cannot read its bytes back before the upload is complete (S3) sets
    `defers_hash`: then the hash is only kept while known, and `sha256()` re-reads at the end.
    """

    defers_hash = False

    def __init__(self, info: UploadInfo, digest: Any | None) -> None:
        self.info = info
        self._hash = digest  # hashlib.sha256 of bytes [0, info.offset), or None: re-read them
        self._mark: tuple[int, Any] | None = None
        self.rehashed_bytes = 0
        self.rehash_seconds = 0.0

    def append(self, data: bytes) -> None:
        """Write `data` at `info.offset` and count it into the whole-file SHA-256."""
        if not self.defers_hash:
            self._ensure_hash()
        try:
            self._write(data)
        except BaseException:
            self._hash = None  # how much was written is unknown: re-read it when needed
            raise
        if self._hash is not None:
            self._hash.update(data)
        self.info.offset += len(data)

    def stop_asked(self) -> bool:
        """Whether a request in another process asked the one holding this upload to let go
        (`ResumableStore.ask_to_stop`). Cheap: called on the event loop about once a second."""
        return False

    def mark(self, durable: bool = False) -> None:
        """Begin a piece that `discard` can take back (a chunk with a checksum, a body that may overflow).

        `durable`: a crash before `keep` or `discard` discards it too (an unverified chunk
        must never count as received).
        """
        if not self.defers_hash:
            self._ensure_hash()
        self._mark = (self.info.offset, None if self._hash is None else self._hash.copy())
        if durable:
            self._save_mark(self.info.offset)

    def keep(self) -> None:
        """The piece since `mark` is good: it stays."""
        if self._mark is not None:
            self._mark = None
            self._save_mark(None)

    def discard(self) -> None:
        """Take back every byte since `mark`; the offset is where it was."""
        if self._mark is None:
            return
        offset, digest = self._mark
        self._truncate(offset)
        self.info.offset, self._hash, self._mark = offset, digest, None
        self._save_mark(None)

    def sha256(self) -> str:
        """The hex SHA-256 of the bytes so far."""
        self._ensure_hash()
        return self._hash.hexdigest()

    @property
    def hash_unknown(self) -> bool:
        """Whether hashing re-reads the bytes so far first (slow for a big upload)."""
        return self._hash is None and self.info.offset > 0

    def _ensure_hash(self) -> None:
        if self._hash is None:
            started = time.monotonic()
            digest = hashlib.sha256()
            for block in self._read(0, self.info.offset):
                digest.update(block)
            self.rehashed_bytes = self.info.offset
            self.rehash_seconds = time.monotonic() - started
            self._hash = digest

    @property
    def digest_state(self) -> Any | None:
        """The hash object of bytes [0, offset), if known (a store keeps it between requests)."""
        return self._hash

    # -- what a backend provides --

    @abstractmethod
    def _write(self, data: bytes) -> None:
        """Append `data` after `info.offset` bytes."""

    @abstractmethod
    def _read(self, start: int, stop: int) -> Iterator[bytes]:
        """Yield the stored bytes `start` to `stop` in bounded blocks (to re-hash them)."""

    @abstractmethod
    def _truncate(self, offset: int) -> None:
        """Drop every byte from `offset` on."""

    @abstractmethod
    def _save_mark(self, offset: int | None) -> None:
        """Remember durably that bytes from `offset` on are unverified (None: forget it)."""

    @abstractmethod
    def save_info(self, durable: bool = True) -> None:
        """Store `info` as it is now (a declared length, a new expiry); `durable`: fsync it
        (a new expiry need not survive a power cut)."""

    @abstractmethod
    def finish(self, record: Record) -> None:
        """Make the complete upload a stored file with `record`, atomically; the upload is gone."""

    @abstractmethod
    def terminate(self) -> None:
        """Remove the upload and its bytes."""

    @abstractmethod
    def release(self) -> None:
        """Let go of the upload (another request may write it now); safe more than once."""


class DigestCache:
    """SHA-256 states of uploads this process wrote, kept between requests (~400 bytes each);
    one not kept is re-read from the store. Past `size`, the one cheapest to re-read goes (the
    smallest offset; of those, the oldest): creations nobody pays for cannot push out the state
    of a big upload in progress."""

    def __init__(self, size: int = 1024) -> None:
        self._size = size
        self._kept: OrderedDict[str, tuple[int, Any]] = OrderedDict()
        self._lock = threading.Lock()

    def keep(self, upload_id: str, offset: int, digest: Any | None) -> None:
        if digest is None:
            return
        with self._lock:
            self._kept[upload_id] = (offset, digest)
            self._kept.move_to_end(upload_id)
            if len(self._kept) > self._size:
                cheapest = min(self._kept, key=lambda kept_id: self._kept[kept_id][0])
                del self._kept[cheapest]

    def take(self, upload_id: str, offset: int) -> Any | None:
        """The kept state if it covers exactly `offset` bytes (else someone else wrote since)."""
        with self._lock:
            kept = self._kept.pop(upload_id, None)
        return kept[1] if kept is not None and kept[0] == offset else None

    def forget(self, upload_id: str) -> None:
        with self._lock:
            self._kept.pop(upload_id, None)


class ResumableStore(ABC):
    """Resumable uploads of a `Store`: staged until complete, then stored like a form's file.

    Every method blocks; call them off the event loop.
    """

    @abstractmethod
    def create(self, length: int | None, metadata: dict[str, str], expires: float, sha256: str | None) -> ResumableUpload:
        """A new upload with a fresh id, already held for writing."""

    @abstractmethod
    def acquire(self, upload_id: str) -> ResumableUpload | None:
        """Hold an upload for writing, or None if there is none; raise UploadBusy if held elsewhere."""

    def ask_to_stop(self, upload_id: str) -> None:
        """Ask the request in another process that holds this upload to let go (its
        `stop_asked()` then says so). A store that cannot leaves it to the idle timeout."""

    @abstractmethod
    def peek(self, upload_id: str) -> UploadInfo | None:
        """The info of an upload as it is now, without holding it; None if there is none."""

    @abstractmethod
    def sweep(self, now: float) -> int:
        """Remove uploads that expired before `now` (and a crash's leftovers); return how many."""

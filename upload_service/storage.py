"""The storage seam: everything the request path asks of wherever files go.

The request path talks only to a `Store` (like tusd's `DataStore`); `localstore`
implements it on a directory, and other backends (S3) implement the same. Optional
abilities (resumable uploads) are separate small interfaces a store may also offer.

Writing a form's files: `new_file()` gives a `FileSink` per file part; its `open`,
`write` and `abort` block and run where the caller puts them (`write` on a writer
thread, one block at a time, in order); `commit` stores a request's files and their
records all or none, and undoes itself if cancelled.
"""

from __future__ import annotations

import secrets
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

Record = dict[str, Any]

# 128 random bits as lowercase hex: what `new_file_id` makes and all an id may be.
FILE_ID_RE = re.compile(r"[0-9a-f]{32}")


def new_file_id() -> str:
    """Return a fresh stored-file id: 128 random bits, safe as a file name or key."""
    return secrets.token_hex(16)


def is_file_id(text: str) -> bool:
    """Whether `text` is an id this server could have made (checked before any lookup)."""
    return FILE_ID_RE.fullmatch(text) is not None


class BadCursor(ValueError):
    """A list cursor this store did not give out (the client sees a 400)."""


class FileSink(ABC):
    """One file on its way into the store; nothing of it is visible until `commit`."""

    id: str

    @abstractmethod
    def open(self) -> None:
        """Begin the file (create the partial file, start the multipart upload)."""

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


@dataclass(frozen=True)
class Page:
    """One page of records, newest first, and the cursor of the next (None: the last)."""

    records: list[Record]
    next_cursor: str | None


class Store(ABC):
    """Where files go: the seam between the request path and a storage backend."""

    @abstractmethod
    def prepare(self) -> None:
        """Make the store ready and sweep a crashed process's leftovers; blocking, at startup."""

    @abstractmethod
    def new_file(self) -> FileSink:
        """A sink for one file of a request, with a fresh id."""

    @abstractmethod
    async def commit(self, files: Sequence[tuple[FileSink, Record]]) -> None:
        """Store every file with its record, all or none; if cancelled, store none."""

    @abstractmethod
    async def open(self, file_id: str) -> StoredFile | None:
        """Open a stored file for reading, or None if there is none (or it is not an id)."""

    @abstractmethod
    async def record(self, file_id: str) -> Record | None:
        """The record of a stored file, or None."""

    @abstractmethod
    async def list(self, limit: int, cursor: str | None = None) -> Page:
        """Records newest first, `limit` (1 or more) at most, after `cursor`; never all in memory.

        Raises `BadCursor` for a cursor this store did not make.
        """

    @abstractmethod
    async def delete(self, file_id: str) -> bool:
        """Remove a stored file and its record; False if there was none."""

    @abstractmethod
    async def health(self) -> dict[str, Any]:
        """Facts for /health; raise OSError if the store cannot be used."""

    def describe_problem(self, exc: OSError) -> str:
        """Say what is wrong with the store, naming the setting to fix."""
        return str(exc)

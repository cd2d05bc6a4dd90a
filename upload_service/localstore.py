"""The local backend: files in a directory, written under `.partial/`, moved in whole.

A file is written to `<dir>/.partial/<id>` under an exclusive flock (a live writer's
mark: a starting worker's sweep removes only unlocked partial files), fsynced, and
renamed to `<dir>/<id>` with its record beside it as `<dir>/<id>.json` (written to
`.partial/` and renamed too). A reader of the directory never sees half a file. A
request's files are committed under a locked `.partial/<id>.commit` listing them all: a
process killed inside the commit leaves it unlocked, and the next start removes every
file it names (all or none), then any stored file without its record that no one holds.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import heapq
import logging
import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Sequence

from upload_service.storage import (
    PAGE_BYTES, FileSink, Page, Record, Store, StoredFile, format_cursor, is_file_id, new_file_id, parse_cursor,
    parse_record, record_json,
)
from upload_service.threads import wait_through_cancel
from upload_service.units import MiB

logger = logging.getLogger("upload_asgi")

PARTIAL_DIR_NAME = ".partial"
RESUMABLE_DIR_NAME = ".resumable"  # localresumable's: an upload being finished is not a leftover
READ_CHUNK_SIZE = 1 * MiB  # a download's reads: one thread hop per MiB
# Without fsync, a commit of this many files and bytes (at most one small file's bytes
# still to write: targets.HELD_FILE_SIZE) is a few metadata syscalls, and runs on the
# event loop: a hand-off to a thread costs more than the work (bench/README). The bytes
# bound: on NFS a close flushes what the file still has in the page cache.
INLINE_COMMIT_FILES = 4
INLINE_COMMIT_BYTES = 1 * MiB


class LocalSink(FileSink):
    """`.partial/<id>`, open and locked from `open` until it is committed or aborted."""

    def __init__(self, partial_dir: str) -> None:
        self.id = new_file_id()
        self.path = f"{partial_dir}/{self.id}"  # a str: per small upload, pathlib cost ~20 µs
        self._fd: int | None = None
        self._created = False

    def open(self) -> None:
        try:
            self._fd = create_locked(self.path)
        except FileNotFoundError:  # the upload dir or .partial/ was removed under us: make it again
            prepare_upload_dir(Path(self.path).parent.parent)
            self._fd = create_locked(self.path)
        self._created = True

    def write(self, data: bytes) -> None:
        write_all(self._fd, data)

    def sync(self) -> None:
        if self._fd is not None:
            os.fsync(self._fd)

    def close(self) -> None:
        """Close the file (and so drop its lock); safe to call more than once."""
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)  # the number is freed even if this raises: never close it twice

    def abort(self) -> None:
        self.close()
        if self._created:  # (a file never made is not unlinked: on a read-only mount that fails too)
            remove_quietly(self.path)


class LocalFile(StoredFile):
    """A stored file held open: a delete meanwhile unlinks it, the open fd still reads it whole."""

    def __init__(self, fd: int, record: Record) -> None:
        self._fd = fd
        self.record = record
        self.size = os.fstat(fd).st_size

    async def chunks(self, start: int = 0, stop: int | None = None) -> AsyncIterator[bytes]:
        loop = asyncio.get_running_loop()
        position, stop = start, self.size if stop is None else stop
        while position < stop:
            size = min(READ_CHUNK_SIZE, stop - position)
            data = await loop.run_in_executor(None, os.pread, self._fd, size, position)
            if not data:
                return
            position += len(data)
            yield data

    async def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class LocalStore(Store):
    """Files in `upload_dir`, as the module docstring says."""

    def __init__(self, upload_dir: Path, fsync: bool = True) -> None:
        self.upload_dir = upload_dir
        self.partial_dir = upload_dir / PARTIAL_DIR_NAME
        self.fsync = fsync
        self._prepared = False
        self._scanner: ThreadPoolExecutor | None = None

    def prepare(self) -> None:
        """Create the dirs and sweep stale partial files, once: at lifespan startup, or on
        first use when a host does not forward lifespan to a mounted app. (Dirs removed
        later are made again by the next file or /health, not checked per request.)"""
        if not self._prepared:
            prepare_upload_dir(self.upload_dir)
            self._prepared = True

    def describe_problem(self, exc: OSError) -> str:
        return f"UPLOAD_DIR: cannot use {self.upload_dir}: {exc.strerror or exc}"

    def new_file(self) -> LocalSink:
        return LocalSink(str(self.partial_dir))

    async def commit(self, files: Sequence[tuple[FileSink, Record]], before: Callable[[], None] | None = None) -> None:
        """Run `before` and `commit_files` in one thread job (it fsyncs); if cancelled meanwhile, undo it.

        Without fsync and with few small files, on the loop instead (INLINE_COMMIT_FILES).

        A thread cannot be stopped: cleaning up on the loop while it still renames and
        closes the same files would race it. So wait for it, however often this task is
        cancelled meanwhile, then remove what it stored (a request stores all its files
        or none). A plain executor future, not a task: a server shutting down cancels
        every task, and a cancelled task would no longer say whether the commit happened.
        """
        if self.cheap_to_commit(files):
            self.commit_files(files, before)
            return
        loop = asyncio.get_running_loop()
        commit = loop.run_in_executor(None, self.commit_files, files, before)
        if await wait_through_cancel(commit):
            if commit.exception() is None:
                undo = loop.run_in_executor(None, self.uncommit_files, [sink.id for sink, _ in files])
                await wait_through_cancel(undo)
                if undo.exception() is not None:
                    logger.error("a cancelled upload stays stored: undoing its commit failed", exc_info=undo.exception())
            raise asyncio.CancelledError
        commit.result()  # a failed commit (ENOSPC) raises here

    def cheap_to_commit(self, files: Sequence[tuple[FileSink, Record]]) -> bool:
        return (
            not self.fsync
            and len(files) <= INLINE_COMMIT_FILES
            and sum(record["size"] for _, record in files) <= INLINE_COMMIT_BYTES
        )

    def commit_files(
        self, files: Sequence[tuple[LocalSink, Record]], before: Callable[[], None] | None = None
    ) -> None:
        """Move every partial file into the upload dir with its sidecar: all or none (blocking)."""
        if before is not None:
            before()
        # Each file stays open, and so locked, until it has left .partial/: closed there,
        # a worker starting now would sweep it as stale (SPEC §8).
        if self.fsync:
            for sink, _ in files:
                sink.sync()
        moved: list[str] = []
        upload_dir, partial_dir = str(self.upload_dir), str(self.partial_dir)
        marker = self.begin_commit([sink.id for sink, _ in files]) if len(files) > 1 else None
        try:
            for sink, record in files:
                final = f"{upload_dir}/{sink.id}"
                os.rename(sink.path, final)
                moved.append(final)
                sidecar = f"{final}.json"
                write_sidecar(f"{partial_dir}/{sink.id}.json", sidecar, record, self.fsync)
                moved.append(sidecar)
            if self.fsync:
                sync_dir(self.upload_dir)
            for sink, _ in files:
                sink.close()  # a close can report a write error (NFS): then store none
        except BaseException:
            for path in moved:
                remove_quietly(path)
            for sink, _ in files:
                sink.abort()
            raise
        finally:
            if marker is not None:
                end_commit(*marker)

    def begin_commit(self, ids: list[str]) -> tuple[int, str]:
        """Name a request's files in `.partial/<first id>.commit`, held locked while they are moved
        in: a process killed meanwhile leaves it unlocked, for the next start to undo (all or none)."""
        path = f"{self.partial_dir}/{ids[0]}.commit"
        fd = create_locked(path)
        try:
            write_all(fd, "\n".join(ids).encode())
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            end_commit(fd, path)
            raise
        return fd, path

    def uncommit_files(self, ids: list[str]) -> None:
        """Remove files that `commit_files` stored, and their sidecars."""
        for file_id in ids:
            remove_quietly(self.upload_dir / file_id)
            remove_quietly(self.sidecar_path(file_id))

    def sidecar_path(self, file_id: str) -> Path:
        return self.upload_dir / f"{file_id}.json"

    async def open(self, file_id: str) -> LocalFile | None:
        if not is_file_id(file_id):
            return None
        return await asyncio.to_thread(self._open, file_id)

    def _open(self, file_id: str) -> LocalFile | None:
        try:
            fd = os.open(self.upload_dir / file_id, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            record = read_record(self.sidecar_path(file_id))
        except BaseException:
            os.close(fd)
            raise
        if record is None:
            os.close(fd)
            return None
        return LocalFile(fd, record)

    async def record(self, file_id: str) -> Record | None:
        if not is_file_id(file_id):
            return None
        return await asyncio.to_thread(read_record, self.sidecar_path(file_id))

    async def list(self, limit: int, cursor: str | None = None) -> Page:
        # One scan at a time, on a thread of its own: with many files, listings in the default
        # pool took all its threads, and downloads, deletes, /health and resumable uploads
        # waited behind them.
        if self._scanner is None:
            self._scanner = ThreadPoolExecutor(1, thread_name_prefix="upload-asgi-list")
        return await asyncio.get_running_loop().run_in_executor(self._scanner, self._list, limit, cursor)

    def _list(self, limit: int, cursor: str | None) -> Page:
        """Newest first by (mtime_ns, id) of the sidecars, in one pass over the directory.

        Memory holds a heap of `limit + 1` keys, never the directory: os.scandir reads
        entries in batches and heapq.nlargest keeps the newest; then records up to PAGE_BYTES.
        A record deleted or unreadable meanwhile is left out of the page (the cursor still
        moves past it).
        """
        if limit < 1:
            raise ValueError(f"limit must be 1 or more, not {limit}")
        newest = heapq.nlargest(limit + 1, self._sidecar_keys(parse_cursor(cursor)))
        records: list[Record] = []
        size = taken = 0
        for key in newest[:limit]:
            if size >= PAGE_BYTES:
                break
            taken += 1
            found = self._listed_record(key)
            if found is not None:
                records.append(found[0])
                size += found[1]
        next_cursor = format_cursor(newest[taken - 1]) if taken < len(newest) else None
        return Page(records, next_cursor)

    def _listed_record(self, key: tuple[int, str]) -> tuple[Record, int] | None:
        """A record and its size as stored; None when it is gone or unreadable."""
        try:
            data = read_sidecar(self.sidecar_path(key[1]))
            return None if data is None else (parse_record(data), len(data))
        except (OSError, ValueError) as exc:  # a corrupt sidecar must not hide every other file
            logger.warning("listing skips file %s: its record cannot be read: %s", key[1], exc)
            return None

    def _sidecar_keys(self, before: tuple[int, str] | None) -> Iterator[tuple[int, str]]:
        try:
            entries = os.scandir(self.upload_dir)
        except FileNotFoundError:  # removed while the app runs: no file there (the next upload makes it again)
            return
        with entries:
            for entry in entries:
                name = entry.name
                if not name.endswith(".json") or not is_file_id(name[:-5]):
                    continue
                try:
                    key = (entry.stat(follow_symlinks=False).st_mtime_ns, name[:-5])
                except FileNotFoundError:  # deleted since the directory was read
                    continue
                if before is None or key < before:
                    yield key

    async def delete(self, file_id: str) -> bool:
        if not is_file_id(file_id):
            return False
        return await asyncio.to_thread(self._delete, file_id)

    def _delete(self, file_id: str) -> bool:
        # The record first: a lister that still sees the file finds no record and skips it. Its
        # removal decides, so of two DELETEs at once one gets 204 (a file left without a record
        # by a crash is the startup sweep's).
        if not remove_quietly(self.sidecar_path(file_id)):
            return False
        remove_quietly(self.upload_dir / file_id)
        return True

    async def health(self) -> dict[str, Any]:
        return await asyncio.to_thread(self._health)

    def _health(self) -> dict[str, Any]:
        """Make the dirs again if they went (a restore, an `rm -r`), then say whether files can be
        written there and how much room is left."""
        self.prepare()
        if not self.partial_dir.is_dir():
            prepare_upload_dir(self.upload_dir)
        if not os.access(self.partial_dir, os.W_OK):  # a read-only mount, a chmod: say which
            code = errno.EROFS if os.statvfs(self.partial_dir).f_flag & os.ST_RDONLY else errno.EACCES
            raise OSError(code, os.strerror(code))
        return {"free_bytes": shutil.disk_usage(self.partial_dir).free}


def read_record(path: Path) -> Record | None:
    data = read_sidecar(path)
    return None if data is None else parse_record(data)


def read_sidecar(path: Path) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


# -- disk ------------------------------------------------------------------------


def write_all(fd: int, data: bytes) -> None:
    """os.write until every byte is written (a short write is legal)."""
    written = os.write(fd, data)
    if written < len(data):
        view = memoryview(data)
        while written < len(data):
            written += os.write(fd, view[written:])


def create_locked(path: str | Path, access: int = os.O_WRONLY) -> int:
    """Create `path` and hold an exclusive flock on it while it is being written.

    The lock tells a sweep (a starting worker's, or the resumable uploads') that the
    file is alive: a lock is released when its process dies, so an unlocked file
    without its record or info is stale.
    """
    fd = os.open(path, access | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
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
        return create_locked(path, access)
    return fd


def remove_quietly(path: str | Path) -> bool:
    """Remove a file if it is there; return whether it was."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return False
    return True


def end_commit(fd: int, path: str) -> None:
    remove_quietly(path)
    os.close(fd)


def prepare_upload_dir(upload_dir: Path) -> Path:
    """Create the upload dir and its `.partial/`, sweep what a killed process left, return it."""
    partial_dir = upload_dir / PARTIAL_DIR_NAME
    partial_dir.mkdir(parents=True, exist_ok=True)
    check_commits_work(upload_dir, partial_dir)
    undo_dead_commits(upload_dir, partial_dir)
    sweep_stale_partials(partial_dir)
    sweep_files_without_records(upload_dir)
    return partial_dir


def check_commits_work(upload_dir: Path, partial_dir: Path) -> None:
    """Raise (at startup, not at every upload) unless a file can be created in `.partial/` and
    renamed into the upload dir: a dir left read-only for this user, `.partial/` on another file system."""
    name = new_file_id()
    probe, moved = f"{partial_dir}/{name}", f"{upload_dir}/{name}"
    fd = create_locked(probe)  # held to the end: another worker starting now sweeps unlocked files
    try:
        os.rename(probe, moved)
        os.unlink(moved)
    finally:
        remove_quietly(probe)
        os.close(fd)


def lock_if_unheld(path: str) -> int | None:
    """An fd holding `path`'s exclusive flock if no live process holds it (close it), else None.

    None too for a file removed between the open and the lock: its holder was done with it
    (a commit marker is removed, then unlocked), not killed.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_nlink > 0:
            return fd
    except BlockingIOError:
        pass
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def undo_dead_commits(upload_dir: Path, partial_dir: Path) -> None:
    """Remove every file (and record) named by a commit marker no live process holds."""
    for entry in os.scandir(partial_dir):
        if not entry.name.endswith(".commit") or (fd := lock_if_unheld(entry.path)) is None:
            continue
        try:
            ids = [i for i in os.read(fd, 1 << 20).decode("ascii", "replace").split("\n") if is_file_id(i)]
            for file_id in ids:
                remove_quietly(upload_dir / f"{file_id}.json")
                remove_quietly(upload_dir / file_id)
            remove_quietly(entry.path)
            if ids:  # else a marker just created, not locked yet: its committer makes another
                logger.warning("undid the commit of %d file(s) a killed process left half done", len(ids))
        finally:
            os.close(fd)


def sweep_files_without_records(upload_dir: Path) -> None:
    """Remove stored files without their record (a process killed between the two renames),
    unless a live process is committing them, or it is a resumable upload being finished."""
    names = {entry.name for entry in os.scandir(upload_dir)}
    for name in names:
        if not is_file_id(name) or f"{name}.json" in names:
            continue
        if os.path.exists(upload_dir / RESUMABLE_DIR_NAME / f"{name}.info"):
            continue  # localresumable's sweep moves it back
        if (fd := lock_if_unheld(str(upload_dir / name))) is not None:
            try:
                if not (upload_dir / f"{name}.json").exists():
                    remove_quietly(upload_dir / name)
            finally:
                os.close(fd)


def sweep_stale_partials(partial_dir: Path) -> int:
    """Remove partial files no live process holds a lock on; return how many."""
    removed = 0
    for entry in os.scandir(partial_dir):
        if (fd := lock_if_unheld(entry.path)) is not None:  # else another worker is writing it
            remove_quietly(entry.path)
            removed += 1
            os.close(fd)
    return removed


def write_sidecar(tmp: str | Path, final: str | Path, record: Record, fsync: bool) -> None:
    """Write the record as JSON beside the stored file, atomically (temp + rename)."""
    body = record_json(record)
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

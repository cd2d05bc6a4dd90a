"""Resumable uploads on the local backend: staged under `<upload dir>/.resumable/`.

An upload is two files: `<id>` (the bytes so far: its size is the offset) and
`<id>.info` (JSON: length, metadata, expiry, declared digest, and where unverified
bytes begin while a body that may be refused whole is written: one with a checksum, or
of no declared length). A request writes an upload only while it holds an exclusive
flock on `<id>`, taken without waiting: a second writer, in this worker or another, is
refused (`UploadBusy`), and the lock goes when its process dies, so a crash never leaves
an upload locked. A request in
another worker asks the holder to let go by creating `<id>.stop`. Nothing here
lives in memory but the SHA-256 state of uploads this process wrote last, so an
upload survives a restart and a switch of worker. `finish` moves the bytes into
the upload dir with a sidecar, like `LocalStore.commit_files`.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from upload_service.localstore import (
    RESUMABLE_DIR_NAME, create_locked, lock_if_unheld, remove_quietly, sync_dir, write_all, write_sidecar,
)
from upload_service.storage import (
    DigestCache,
    Record,
    ResumableStore,
    ResumableUpload,
    UploadBusy,
    UploadInfo,
    is_file_id,
    new_file_id,
)
from upload_service.units import MiB

logger = logging.getLogger("upload_asgi")

READ_BLOCK_SIZE = 1 * MiB  # re-hashing on resume: one pread per MiB
# SHA-256 states kept between requests, per process (~400 bytes each): enough for
# every upload a worker is likely to see resumed; one not kept is re-read from disk.
KEPT_DIGESTS = 1024
# A temporary info file older than this was left by a crash (one lives for a rename).
STALE_TEMP_SECONDS = 3600
# How long a request waits for an upload that is being finished (its data file is moved into
# the upload dir before its record is written) before it takes it as gone.
RECORD_WAIT_SECONDS = 2.0


class LocalUpload(ResumableUpload):
    """`.resumable/<id>` held open and flocked until `release`."""

    def __init__(self, store: LocalResumableStore, info: UploadInfo, fd: int, digest: Any | None) -> None:
        super().__init__(info, digest)
        self._store = store
        self._fd: int | None = fd
        self._unverified_from: int | None = None
        self.gone = False  # finished or terminated

    @property
    def path(self) -> Path:
        return self._store.data_path(self.info.id)

    def stop_asked(self) -> bool:
        return os.path.exists(self._store.stop_path(self.info.id))

    def _write(self, data: bytes) -> None:
        offset = self.info.offset
        written = os.pwrite(self._fd, data, offset)
        if written < len(data):
            view = memoryview(data)
            while written < len(data):
                written += os.pwrite(self._fd, view[written:], offset + written)

    def _read(self, start: int, stop: int) -> Iterator[bytes]:
        position = start
        while position < stop:
            block = os.pread(self._fd, min(READ_BLOCK_SIZE, stop - position), position)
            if not block:
                raise OSError(f"resumable upload {self.info.id} is shorter than its offset")
            position += len(block)
            yield block

    def _truncate(self, offset: int) -> None:
        os.ftruncate(self._fd, offset)

    def _save_mark(self, offset: int | None) -> None:
        if offset != self._unverified_from:
            self._unverified_from = offset
            self.save_info()

    def save_info(self, durable: bool = True) -> None:
        self._store.write_info(self.info, self._unverified_from, durable)

    def finish(self, record: Record) -> None:
        store = self._store
        upload_id = self.info.id
        if store.fsync:
            os.fsync(self._fd)
        final = store.upload_dir / upload_id
        os.rename(self.path, final)
        try:
            write_sidecar(store.resumable_dir / f"{upload_id}.json", store.upload_dir / f"{upload_id}.json", record, store.fsync)
            if store.fsync:
                sync_dir(store.upload_dir)
        except BaseException:
            os.rename(final, self.path)  # still resumable: the client may try again
            raise
        remove_quietly(store.info_path(upload_id))
        remove_quietly(store.stop_path(upload_id))
        self.gone = True
        self.release()

    def terminate(self) -> None:
        # The data file first: a request that opened it meanwhile finds it unlinked once it holds the lock.
        remove_quietly(self.path)
        remove_quietly(self._store.info_path(self.info.id))
        remove_quietly(self._store.stop_path(self.info.id))
        self.gone = True
        self.release()

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is None:
            return
        if not self.gone:
            self._store.digests.keep(self.info.id, self.info.offset, self.digest_state)
        os.close(fd)  # drops the flock


class LocalResumableStore(ResumableStore):
    """Resumable uploads staged in `<upload dir>/.resumable/`, finished into a `LocalStore`."""

    def __init__(self, upload_dir: Path, fsync: bool) -> None:
        self.upload_dir = upload_dir
        self.fsync = fsync
        self.resumable_dir = upload_dir / RESUMABLE_DIR_NAME
        self.digests = DigestCache(KEPT_DIGESTS)  # SHA-256 states of uploads this process wrote last

    def data_path(self, upload_id: str) -> Path:
        return self.resumable_dir / upload_id

    def info_path(self, upload_id: str) -> Path:
        return self.resumable_dir / f"{upload_id}.info"

    def stop_path(self, upload_id: str) -> str:
        return os.path.join(self.resumable_dir, f"{upload_id}.stop")

    # -- the interface --

    def create(self, length: int | None, metadata: dict[str, str], expires: float, sha256: str | None) -> LocalUpload:
        # Made here, not at startup: a server that never sees a resumable upload has no such dir.
        self.resumable_dir.mkdir(parents=True, exist_ok=True)
        info = UploadInfo(new_file_id(), length, 0, dict(metadata), expires, sha256)
        # Locked before the info exists: a sweep that got there first takes it for a crash's
        # leftover, and create_locked then starts over.
        fd = create_locked(self.data_path(info.id), os.O_RDWR)
        try:
            self.write_info(info, None)
        except BaseException:
            os.close(fd)
            remove_quietly(self.data_path(info.id))
            raise
        return LocalUpload(self, info, fd, hashlib.sha256())

    def acquire(self, upload_id: str) -> LocalUpload | None:
        if not is_file_id(upload_id):
            return None
        try:
            fd = os.open(self.data_path(upload_id), os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            return self.acquire(upload_id) if self.wait_out_finishing(upload_id) else None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise UploadBusy(upload_id) from None
            if os.fstat(fd).st_nlink == 0:  # finished or terminated while we waited for the lock
                os.close(fd)
                return None
            remove_quietly(self.stop_path(upload_id))  # asked of the holder before us
            saved = self.read_info(upload_id)
            if saved is None:
                os.close(fd)
                return None
            info, unverified_from = saved
            if unverified_from is not None:
                # Its process died while writing a body that may be refused whole: never verified.
                os.ftruncate(fd, unverified_from)
                self.write_info(info, None)
            info.offset = os.fstat(fd).st_size
        except BaseException:
            os.close(fd)
            raise
        return LocalUpload(self, info, fd, self.digests.take(upload_id, info.offset))

    def ask_to_stop(self, upload_id: str) -> None:
        if not is_file_id(upload_id):
            return
        stop = self.stop_path(upload_id)
        try:
            os.close(os.open(stop, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
        except FileNotFoundError:  # no resumable dir: nothing to stop
            return
        # A holder that finished or terminated the upload just before removed its stop file
        # already (after its data file): this one would stay behind until a sweep.
        if not os.path.exists(self.data_path(upload_id)):
            remove_quietly(stop)

    def peek(self, upload_id: str) -> UploadInfo | None:
        if not is_file_id(upload_id):
            return None
        saved = self.read_info(upload_id)
        if saved is None:
            return None
        info, unverified_from = saved
        try:
            size = os.stat(self.data_path(upload_id)).st_size
        except FileNotFoundError:
            return self.peek(upload_id) if self.wait_out_finishing(upload_id) else None
        info.offset = size if unverified_from is None else min(size, unverified_from)
        return info

    def wait_out_finishing(self, upload_id: str) -> bool:
        """An upload with an info but no data file is being finished or terminated: wait until
        that is done (its info removed), then say whether it is still an upload (a finish that
        failed moves the data back). Not answering at once: a stored file without its record yet
        would be a 404, and a tus client takes a 404 as gone and sends the whole file anew."""
        deadline = time.monotonic() + RECORD_WAIT_SECONDS
        while self.info_path(upload_id).exists() and time.monotonic() < deadline:
            if self.data_path(upload_id).exists():
                return True
            time.sleep(0.002)
        return self.data_path(upload_id).exists()

    def sweep(self, now: float) -> int:
        """Remove expired uploads nobody holds, data files without info, old temporary files."""
        try:
            entries = list(os.scandir(self.resumable_dir))
        except FileNotFoundError:
            return 0
        names = {entry.name for entry in entries}
        removed = 0
        for entry in entries:
            name = entry.name
            if name.endswith(".tmp"):
                try:
                    if now - entry.stat().st_mtime > STALE_TEMP_SECONDS:
                        remove_quietly(Path(entry.path))
                except FileNotFoundError:
                    pass
                continue
            if not is_file_id(name):
                continue
            if f"{name}.info" in names:
                saved = self.read_info(name)
                if saved is not None and saved[0].expires > now:
                    continue
            if self._remove_unheld(name, now):
                removed += 1
        for name in names:  # an info, stop request or record whose data file is gone
            stem, _, suffix = name.partition(".")
            if suffix not in ("info", "stop", "json") or stem in names or not is_file_id(stem):
                continue
            if self.data_path(stem).exists() or (f"{stem}.info" in names and self._finishing_or_restored(stem)):
                continue
            remove_quietly(self.resumable_dir / name)
        return removed

    def _finishing_or_restored(self, upload_id: str) -> bool:
        """Whether the bytes of an upload with an info are in the upload dir without their record:
        being finished now (held), or left so by a process killed inside `finish`; then move them
        back (the upload is whole again, and its next HEAD or PATCH finishes it). Workers starting
        together sweep at once: each step allows for another worker's sweep or finish meanwhile."""
        final = self.upload_dir / upload_id
        record = self.upload_dir / f"{upload_id}.json"
        if record.exists():
            return False
        if not final.exists():
            return self.data_path(upload_id).exists()  # moved back since
        if (fd := lock_if_unheld(str(final))) is None:
            return True  # being finished now
        try:
            if record.exists():  # finished between the look and the lock
                return False
            os.rename(final, self.data_path(upload_id))
        except FileNotFoundError:
            return True  # moved back first by another worker's sweep
        finally:
            os.close(fd)
        remove_quietly(self.resumable_dir / f"{upload_id}.json")
        logger.warning("resumable upload %s: its finishing was cut short; it is whole again", upload_id)
        return True

    def _remove_unheld(self, upload_id: str, now: float) -> bool:
        """Remove an upload nobody holds if its info, read under its lock, expired before `now` (or is none)."""
        try:
            fd = os.open(self.data_path(upload_id), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False  # being written now: its request renews the expiry
        else:
            # Read again: the sweep's read may predate a PATCH that renewed the expiry and let go since.
            saved = self.read_info(upload_id)
            if os.fstat(fd).st_nlink == 0 or (saved is not None and saved[0].expires > now):
                return False
            remove_quietly(self.data_path(upload_id))
            remove_quietly(self.info_path(upload_id))
            remove_quietly(self.stop_path(upload_id))
            self.digests.forget(upload_id)
            return True
        finally:
            os.close(fd)

    # -- the info file --

    def write_info(self, info: UploadInfo, unverified_from: int | None, durable: bool = True) -> None:
        """Replace `<id>.info` atomically (temp + rename); fsynced if `durable` (and UPLOAD_FSYNC)."""
        body = json.dumps({
            "id": info.id,
            "length": info.length,
            "metadata": info.metadata,
            "expires": info.expires,
            "sha256": info.sha256,
            "unverified_from": unverified_from,
        }).encode()
        tmp = self.resumable_dir / f"{info.id}.info.{os.getpid()}.{threading.get_ident()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            write_all(fd, body)
            if self.fsync and durable:
                os.fsync(fd)
            os.rename(tmp, self.info_path(info.id))
        except BaseException:
            remove_quietly(tmp)
            raise
        finally:
            os.close(fd)

    def read_info(self, upload_id: str) -> tuple[UploadInfo, int | None] | None:
        try:
            with open(self.info_path(upload_id), "rb") as f:
                saved = json.loads(f.read())
        except FileNotFoundError:
            return None
        info = UploadInfo(
            id=upload_id,
            length=saved["length"],
            offset=0,
            metadata=saved["metadata"],
            expires=saved["expires"],
            sha256=saved.get("sha256"),
        )
        return info, saved.get("unverified_from")

"""Resumable uploads on the S3 backend: bounded memory, resumable through any server sharing the bucket.

An upload's bytes go straight into an S3 multipart upload on its final key
`<prefix>/<id>`, in parts of `UPLOAD_S3_PART_SIZE`; what is left at the end of a
request (less than a part) is kept as a tail object. Under `<prefix>/.resumable/`:

    <id>.info      JSON: the UploadInfo fields, the multipart UploadId, the committed
                   parts (number, ETag, size), the tail (key, size), a generation. The
                   commit point: written (If-Match its last ETag) only after the parts
                   and the tail it names are in the bucket; offset = parts + tail.
    <id>.tail-<g>-<t>  the bytes after the last part; a new one per generation (<g>)
                   and writer (<t>, random), so the one the info names is never
                   overwritten; the old one goes after the commit.
    <id>.lock      the lease: one writer at a time across servers, and
    <id>.stop      a request elsewhere asking its holder to let go (`s3leases.py`).

A request reads the tail back at its first write and commits (tail, then info) when
its piece is kept (`keep`); until then the info in the bucket is the state before
the piece, so `discard` and a crash both return to it (parts sent meanwhile are left
out of the completion; a multipart upload begun meanwhile is aborted). Parts of an
incomplete multipart upload cannot be read back, so the SHA-256 is deferred when this
process does not hold its state (another server wrote last, a restart): `sha256()`
then completes the multipart upload (the object, still without a record, is
invisible) and streams it back once. `finish` writes the record last, as forms do.

The blocking methods run on the request's threads and hand coroutines to this
store's own event loop (one thread), where aiobotocore works: the app's loop may be
busy or, at startup, be the caller.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import json
import logging
import secrets
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Iterator, TypeVar

from upload_service.errors import StorageRefused, StorageUnavailable, UploadLocked
from upload_service.s3client import (
    CONFLICT_CODES, MISSING_CODES, UNSUPPORTED_CODES, BotoCoreError, Conflict, PartBody, aiohttp, error_code,
)
from upload_service import s3io
from upload_service.s3io import THREAD_WAIT_SECONDS, wait_for_room
from upload_service.s3leases import Leases
from upload_service.s3store import RESUMABLE_DIR, S3Store
from upload_service.storage import (
    DigestCache, Record, ResumableStore, ResumableUpload, UploadBusy, UploadInfo, is_file_id, new_file_id, record_json,
)
from upload_service.units import MiB

logger = logging.getLogger("upload_asgi")

T = TypeVar("T")

READ_BLOCK_SIZE = 1 * MiB  # the deferred hash reads the object back a MiB at a time
# A tail or lease without an info this old was left by a crash (create writes both within a moment).
STALE_LEFTOVER_SECONDS = 3600.0


@dataclass
class Saved:
    """An upload as its info object says (the committed state)."""

    upload_id: str | None = None  # the multipart upload, once a part was sent
    parts: list[tuple[int, str, int]] = field(default_factory=list)  # (number, ETag, size)
    tail: tuple[str, int] | None = None  # (key, size)
    generation: int = 0
    completed: bool = False  # the multipart upload is completed: the object is there (no record yet)
    etag: str | None = None  # of the info object

    @property
    def offset(self) -> int:
        return sum(size for _, _, size in self.parts) + (self.tail[1] if self.tail else 0)


class S3Upload(ResumableUpload):
    """One upload held (by its lease) for writing; see the module docstring."""

    defers_hash = True

    def __init__(self, store: S3ResumableStore, info: UploadInfo, saved: Saved, lease: str, digest: Any | None) -> None:
        super().__init__(info, digest)
        self._store = store
        self._saved = saved
        self._info_saved = replace(info)  # the info as the bucket has it
        self._lease: str | None = lease  # the lease object's ETag while held
        self._lease_at = time.monotonic()
        self._leases = {lease}  # every ETag our lease had: a stop names one of them
        self._stop_check: concurrent.futures.Future[str | None] | None = None
        self._stopped = False  # a stop named our lease: ours to remove
        self._upload_id = saved.upload_id
        self._parts: list[tuple[int, concurrent.futures.Future[str], int]] = []  # sent since the commit
        self._next_part = max((number for number, _, _ in saved.parts), default=0) + 1
        self._chunks: list[bytes] = []  # bytes after the last part (the tail read back, then new ones)
        self._buffered = 0
        self._tail_loaded = False
        self._dirty = False  # bytes written since the commit
        self.gone = False

    @property
    def key(self) -> str:
        return self._store.s3.key(self.info.id)

    # -- writing --

    def _write(self, data: bytes) -> None:
        self._load_tail()
        self._dirty = True
        self._chunks.append(data)
        self._buffered += len(data)
        part_size = self._store.s3.part_size
        while self._buffered >= part_size:
            self._send_part(self._take(part_size))
        self._renew_lease()

    def _load_tail(self) -> None:
        if self._tail_loaded:
            return
        if self._saved.tail is not None and not self._saved.completed:
            data = self._store.run(self._store.read_object(self._saved.tail[0]))
            if len(data) != self._saved.tail[1]:
                raise StorageUnavailable(f"the tail of resumable upload {self.info.id} is not as its info says")
            self._chunks, self._buffered = [data], len(data)
        self._tail_loaded = True

    def _take(self, size: int) -> PartBody:
        """The first `size` bytes of the buffer as a part (the block at the cut is split)."""
        blocks, taken = [], 0
        while taken < size:
            block = self._chunks.pop(0)
            if taken + len(block) > size:
                cut = size - taken
                self._chunks.insert(0, block[cut:])
                block = block[:cut]
            blocks.append(block)
            taken += len(block)
        self._buffered -= taken
        return PartBody(blocks)

    def _send_part(self, part: PartBody) -> None:
        """Hand a part to the loop; block while parts_in_flight parts are in memory (the filling one counts)."""
        store = self._store
        self._raise_failed()
        self._renew_lease()  # before each part: a writer held up past its lease stops here
        if self._upload_id is None:
            self._upload_id = store.run(store.s3.start_multipart(self.key))
        number, size = self._next_part, len(part)
        self._next_part += 1
        self._parts.append((number, store.submit(store.s3.upload_part(self.key, self._upload_id, number, part)), size))
        del part
        wait_for_room([future for _, future, _ in self._parts], store.s3.parts_in_flight)
        self._raise_failed()

    def _raise_failed(self) -> None:
        for _, future, _ in self._parts:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def _sent_parts(self) -> list[tuple[int, str, int]]:
        """Wait for the parts sent since the commit; the committed parts and them, with ETags."""
        done = [(number, future.result(THREAD_WAIT_SECONDS), size) for number, future, size in self._parts]
        return self._saved.parts + done

    def _renew_lease(self, force: bool = False) -> None:
        if self._lease is None or (not force and time.monotonic() - self._lease_at < self._store.leases.seconds / 4):
            return
        self._lease = self._store.run(self._store.leases.renew(self.info.id, self._lease))
        self._lease_at = time.monotonic()
        self._leases.add(self._lease)

    def stop_asked(self) -> bool:
        """Whether `<id>.stop` names our lease. Never waits (it is called on the app's loop): it
        answers from the last read and starts the next one on our loop."""
        check, self._stop_check = self._stop_check, None
        if check is not None and not check.done():
            self._stop_check = check
            return False
        if check is not None and check.exception() is None and check.result() in self._leases:
            self._stopped = True
            return True
        self._stop_check = self._store.submit(self._store.leases.read_stop(self.info.id))
        return False

    def skip_part_numbers(self, count: int) -> None:
        self._next_part += count

    # -- committing and taking back --

    def _save_mark(self, offset: int | None) -> None:
        # While a piece is marked the info stays as before it (a crash discards the piece,
        # as a durable mark asks); keep and discard both end here with None.
        if offset is None:
            self._commit()

    def _commit(self) -> None:
        """Make the bytes written since the last commit count: tail, then info, then drop the old tail."""
        if not self._dirty:
            return
        store, saved = self._store, self._saved
        parts = self._sent_parts()
        self._renew_lease()
        new = Saved(self._upload_id, parts, None, saved.generation + 1)
        if self._buffered:
            new.tail = (store.tail_key(self.info.id, new.generation), self._buffered)
            store.run(store.s3.call("put_object", Key=new.tail[0], Body=PartBody(list(self._chunks))))
        try:
            self._write_info(new)
        except BaseException:
            if not self._info_landed(new):
                if new.tail is not None:
                    store.run_quietly(store.delete(new.tail[0]))
                raise
        if saved.tail is not None:
            store.run_quietly(store.delete(saved.tail[0]))
        self._parts, self._dirty = [], False

    def _write_info(self, new: Saved) -> None:
        new.etag = self._store.run(self._store.write_info(self.info, new, self._saved.etag))
        self._saved, self._info_saved = new, replace(self.info)

    def _info_landed(self, new: Saved) -> bool:
        """Whether a failed info write landed after all (a retried PUT whose first answer was lost)."""
        try:
            found = self._store.run(self._store.read_info(self.info.id))
        except StorageUnavailable:
            return False
        if found is None or (found[1].generation, found[1].tail) != (new.generation, new.tail):
            return False
        self._saved, self._info_saved = found[1], replace(self.info)
        return True

    def _truncate(self, offset: int) -> None:
        """Back to the committed state (`offset` is its offset: a mark is only set right after a commit)."""
        self._settle_parts()
        if self._upload_id is not None and self._saved.upload_id is None:  # begun by the piece taken back
            self._store.abort_quietly(self.key, self._upload_id)
        self._upload_id = self._saved.upload_id
        self._chunks, self._buffered, self._tail_loaded, self._dirty = [], 0, False, False
        if offset != self._saved.offset and not self._saved.completed:
            raise StorageUnavailable(f"resumable upload {self.info.id}: cannot go back to {offset}")

    def _settle_parts(self) -> None:
        """Let the parts being sent end (not cancelled: a part cut off could land later)."""
        concurrent.futures.wait([future for _, future, _ in self._parts], THREAD_WAIT_SECONDS)
        self._parts = []

    def save_info(self, durable: bool = True) -> None:
        self._commit()
        if self.info == self._info_saved:
            return  # the commit wrote it as it is (a PATCH's bytes and its new expiry: one PUT)
        new = Saved(self._saved.upload_id, self._saved.parts, self._saved.tail, self._saved.generation + 1,
                    self._saved.completed)
        self._write_info(new)

    # -- finishing --

    def _complete_object(self) -> None:
        """Make the object `<prefix>/<id>` of every byte (no record yet: it is invisible)."""
        if self._saved.completed:
            return
        store = self._store
        self._renew_lease()
        try:
            self._send_the_rest()
        except StorageUnavailable as exc:
            # Completed already: a crash came before the info could say so.
            gone = error_code(exc.__cause__) == "NoSuchUpload"
            if not gone or store.run(store.s3.object_size(self.key)) != self.info.offset:
                raise
        old_tail = self._saved.tail
        self._parts, self._chunks, self._buffered, self._dirty, self._upload_id = [], [], 0, False, None
        self._write_info(Saved(None, [], None, self._saved.generation + 1, completed=True))
        if old_tail is not None:
            store.run_quietly(store.delete(old_tail[0]))

    def _send_the_rest(self) -> None:
        """The tail and any bytes since as the last part, then complete (or one PUT if no part was sent)."""
        store = self._store
        self._load_tail()
        if self._upload_id is None:
            store.run(store.s3.call("put_object", Key=self.key, Body=PartBody(self._chunks)))
            return
        if self._buffered or not (self._saved.parts or self._parts):
            self._send_part(self._take(self._buffered))
        parts = self._sent_parts()
        listed = [{"PartNumber": number, "ETag": etag} for number, etag, _ in parts]
        store.run(store.s3.call("complete_multipart_upload", Key=self.key, UploadId=self._upload_id,
                                MultipartUpload={"Parts": listed}))

    def sha256(self) -> str:
        if self._hash is None:  # deferred: read the whole object back once
            self._complete_object()
        return super().sha256()

    def _read(self, start: int, stop: int) -> Iterator[bytes]:
        """The completed object's bytes (an incomplete multipart upload cannot be read)."""
        if not self._saved.completed:
            raise StorageUnavailable(f"resumable upload {self.info.id} cannot be read before it is complete")
        if start >= stop:
            return
        store = self._store
        body = store.run(store.s3.call("get_object", Key=self.key, Range=f"bytes={start}-{stop - 1}"))["Body"]
        try:
            while block := store.run(store.read_block(body)):
                self._renew_lease()
                yield block
        finally:
            store.run(close_body(body))  # on its loop: aiohttp is not thread-safe

    def finish(self, record: Record) -> None:
        self._complete_object()
        store = self._store
        body = record_json(record)
        store.run(store.s3.call("put_object", Key=store.s3.key(f"{self.info.id}.json"), Body=body,
                                ContentType="application/json"))
        store.run_quietly(store.delete(store.info_key(self.info.id)))
        self.gone = True
        self.release()

    def terminate(self) -> None:
        """The info first (the upload is gone at once), then its bytes; a crash leaves orphans for the sweeps."""
        store = self._store
        self._settle_parts()
        store.run(store.delete(store.info_key(self.info.id)))
        self.gone = True
        store.run_quietly(store.remove_bytes(self.info.id, self._saved, self._upload_id))
        self._chunks, self._buffered = [], 0
        self.release()

    def release(self) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        self._settle_parts()
        if self._upload_id is not None and self._saved.upload_id is None and not self.gone:
            self._store.abort_quietly(self.key, self._upload_id)  # never committed
        if not self.gone and not self._dirty:
            self._store.digests.keep(self.info.id, self.info.offset, self.digest_state)
        self._chunks, self._buffered = [], 0
        if self._stopped:  # ours, unless another request has put one for the next holder since
            self._store.run_quietly(self._store.leases.drop_stop(self.info.id, lambda named: named in self._leases))
        self._store.leases.let_go(self.info.id, lease, self.gone)


class S3ResumableStore(ResumableStore):
    """Resumable uploads of an `S3Store`, in its bucket; see the module docstring."""

    def __init__(self, s3: S3Store, lease_seconds: float, expiry: float = 0.0) -> None:
        self.s3 = s3
        self.leases = Leases(self, lease_seconds)
        # Whether a DELETE with If-Match is refused when the ETag differs (None: not known yet);
        # without it (LocalStack, older stores) leases are marked released, other deletes read the ETag first.
        self.conditional_deletes: bool | None = None
        self.expiry = expiry  # an info written less than this ago cannot have expired: the sweep skips it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_lock = threading.Lock()
        self._closed = False
        self.digests = DigestCache()  # hash states of uploads this process wrote last

    # -- keys --

    def _name(self, upload_id: str, suffix: str) -> str:
        return self.s3.key(f"{RESUMABLE_DIR}/{upload_id}{suffix}")

    def info_key(self, upload_id: str) -> str:
        return self._name(upload_id, ".info")

    def lock_key(self, upload_id: str) -> str:
        return self._name(upload_id, ".lock")

    def stop_key(self, upload_id: str) -> str:
        return self._name(upload_id, ".stop")

    def tail_key(self, upload_id: str, generation: int) -> str:
        # The generation, and a token of this writer: a writer that lost its lease
        # unnoticed never names (nor deletes) the tail of the one that took over.
        return self._name(upload_id, f".tail-{generation}-{secrets.token_hex(4)}")

    # -- our loop, on a thread of its own --

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._loop_lock:
            if self._closed:
                raise StorageUnavailable("the resumable store is closed")
            if self._loop is None:
                self._loop = asyncio.new_event_loop()
                threading.Thread(target=self._loop.run_forever, name="s3-resumable", daemon=True).start()
            return self._loop

    def submit(self, work: Awaitable[T]) -> concurrent.futures.Future[T]:
        loop = self.loop()
        return asyncio.run_coroutine_threadsafe(work, loop)  # type: ignore[arg-type]

    def run(self, work: Awaitable[T]) -> T:
        """Run a coroutine on our loop and wait for it (blocking)."""
        try:
            return self.submit(work).result(THREAD_WAIT_SECONDS)
        except concurrent.futures.TimeoutError:
            raise StorageUnavailable("the object store did not answer in time") from None

    def run_quietly(self, work: Awaitable[Any]) -> None:
        """A cleanup: a failure is logged (the sweeps remove what it left)."""
        try:
            self.run(work)
        except Exception as exc:
            logger.warning("resumable cleanup in %s failed (the sweep will retry): %s", self.s3.url, exc)

    def abort_quietly(self, key: str, upload_id: str) -> None:
        """Abort a multipart upload no info names. If the store is not there, try again in the
        background: the sweep leaves an upload's key alone while its info is there."""
        try:
            self.run(self.s3.abort_multipart(key, upload_id, within=s3io.CLEANUP_WAIT_SECONDS))
        except Exception as exc:
            logger.warning("aborting multipart upload %s failed (tried again later): %s", key, exc)
            with contextlib.suppress(StorageUnavailable, RuntimeError):  # closed: nothing runs any more
                self.loop().call_soon_threadsafe(self.s3.retry_abort_later, key, upload_id)

    def close(self) -> None:
        """Let the work under way end, close the client, stop our loop's thread (tests; a server just exits)."""
        with self._loop_lock:
            loop, self._loop, self._closed = self._loop, None, True
        if loop is not None:
            asyncio.run_coroutine_threadsafe(self._wind_down(), loop).result(THREAD_WAIT_SECONDS)
            loop.call_soon_threadsafe(loop.stop)

    async def _wind_down(self) -> None:
        await self.s3.stop_retries()
        while others := asyncio.all_tasks() - {asyncio.current_task()}:
            await asyncio.wait(others)
        await self.s3.aclose()

    # -- S3 calls (coroutines, on our loop) --

    async def read_object(self, key: str) -> bytes:
        body = (await self.s3.call("get_object", Key=key))["Body"]
        async with body:
            return await self.read_block(body, None)

    async def read_block(self, body: Any, size: int | None = READ_BLOCK_SIZE) -> bytes:
        try:
            return await (body.read() if size is None else body.read(size))
        except (aiohttp.ClientError, BotoCoreError, OSError, asyncio.TimeoutError) as exc:
            raise self.s3.problem(exc, "reading") from exc

    async def get_bytes(self, key: str) -> tuple[bytes, str] | None:
        answer = await self.s3.call_or_none("get_object", Key=key)
        if answer is None:
            return None
        async with answer["Body"] as body:
            return await self.read_block(body, None), answer["ETag"]

    async def get_json(self, key: str) -> tuple[dict[str, Any], str] | None:
        found = await self.get_bytes(key)
        return None if found is None else (json.loads(found[0]), found[1])

    async def put_json(self, key: str, value: dict[str, Any], if_match: str | None) -> str:
        """PUT `value`; only over ETag `if_match`, or (None) only if there is none. Conflict if not so.

        A condition that fails with exactly these bytes in place is our own PUT landing twice: its
        answer was lost and botocore sent it again. Then it is done. (If-Match on a key that is
        gone: AWS answers 404, SeaweedFS 412; both are a conflict.)"""
        body = json.dumps(value).encode()
        condition = {"IfMatch": if_match} if if_match else {"IfNoneMatch": "*"}
        try:
            answer = await self.s3.call("put_object", Key=key, Body=body, ContentType="application/json", **condition)
        except StorageUnavailable as exc:
            code = error_code(exc.__cause__)
            if code not in CONFLICT_CODES and not (if_match and code in MISSING_CODES):
                raise
            landed = await self.get_bytes(key)
            if landed is not None and landed[0] == body:
                return landed[1]
            raise Conflict(key) from None
        return answer["ETag"]

    async def delete(self, key: str, if_match: str | None = None) -> bool:
        """Delete `key` (only as it is at ETag `if_match`, if given); False if that no longer matches."""
        if if_match and self.conditional_deletes is False:
            return await self._delete_if_unchanged(key, if_match)
        try:
            await self.s3.call("delete_object", Key=key, **({"IfMatch": if_match} if if_match else {}))
        except StorageUnavailable as exc:
            code = error_code(exc.__cause__)
            if if_match and code in UNSUPPORTED_CODES:
                self.lacks_conditional_deletes()
                return await self._delete_if_unchanged(key, if_match)
            if code not in CONFLICT_CODES | MISSING_CODES:  # taken over, or gone
                raise
            return False
        return True

    def lacks_conditional_deletes(self) -> None:
        if self.conditional_deletes is not False:
            self.conditional_deletes = False
            logger.warning("%s does not honour If-Match on DELETE: leases are let go by marking them released, "
                           "stop objects and expired infos deleted after reading their ETag", self.s3.url)

    async def _delete_if_unchanged(self, key: str, if_match: str) -> bool:
        """Without conditional deletes: delete `key` if its ETag is still `if_match`. A write between
        the read and the delete is lost: never used for a lease (`Leases.remove`), only for a stop (put
        again at each poll) and an expired info (the sweep holds the upload's lease)."""
        answer = await self.s3.call_or_none("head_object", Key=key)
        if answer is None or answer["ETag"] != if_match:
            return False
        await self.s3.call("delete_object", Key=key)
        return True

    async def probe_conditional_delete(self, key: str) -> None:
        """Whether a DELETE whose If-Match fails leaves `key` in place (the store refuses it)."""
        try:
            await self.s3.call("delete_object", Key=key, IfMatch='"not-its-etag"')
        except StorageUnavailable as exc:
            code = error_code(exc.__cause__)
            if code in CONFLICT_CODES:
                self.conditional_deletes = True
                return
            if code not in UNSUPPORTED_CODES and not isinstance(exc, StorageRefused):
                raise  # the store is down: the probe is tried again at the next lease
        self.lacks_conditional_deletes()  # refused (501, or 400 as a header it does not take), or deleted anyway

    async def write_info(self, info: UploadInfo, saved: Saved, etag: str | None) -> str:
        value = {
            "id": info.id, "length": info.length, "metadata": info.metadata, "expires": info.expires,
            "sha256": info.sha256, "upload_id": saved.upload_id, "parts": saved.parts, "tail": saved.tail,
            "generation": saved.generation, "completed": saved.completed,
        }
        try:
            return await self.put_json(self.info_key(info.id), value, etag)
        except Conflict:
            raise UploadLocked(f"resumable upload {info.id} was changed by another writer") from None

    async def read_info(self, upload_id: str) -> tuple[UploadInfo, Saved] | None:
        found = await self.get_json(self.info_key(upload_id))
        if found is None:
            return None
        value, etag = found
        tail = value.get("tail")
        saved = Saved(value.get("upload_id"), [tuple(p) for p in value.get("parts", [])],  # type: ignore[misc]
                      tuple(tail) if tail else None, value.get("generation", 0),  # type: ignore[arg-type]
                      value.get("completed", False), etag)
        length = value["length"]
        offset = length if saved.completed else saved.offset
        info = UploadInfo(upload_id, length, offset, value["metadata"], value["expires"], value.get("sha256"))
        return info, saved

    async def remove_bytes(self, upload_id: str, saved: Saved, multipart: str | None) -> None:
        """Everything of an upload but its info: the multipart upload or object, the tail, the lease."""
        if saved.completed:
            await self.delete(self.s3.key(upload_id))
        for started in {multipart, saved.upload_id} - {None}:
            await self.s3.abort_multipart(self.s3.key(upload_id), started)  # type: ignore[arg-type]
        if saved.tail is not None:
            await self.delete(saved.tail[0])

    # -- the interface --

    def create(self, length: int | None, metadata: dict[str, str], expires: float, sha256: str | None) -> S3Upload:
        info = UploadInfo(new_file_id(), length, 0, dict(metadata), expires, sha256)
        lease, _ = self.run(self.leases.take(info.id))
        saved = Saved()
        try:
            saved.etag = self.run(self.write_info(info, saved, None))
        except BaseException:
            self.run_quietly(self.leases.remove(info.id, None))
            raise
        return S3Upload(self, info, saved, lease, hashlib.sha256())

    def acquire(self, upload_id: str) -> S3Upload | None:
        if not is_file_id(upload_id) or self.run(self.read_info(upload_id)) is None:
            self.leases.forget_stop(upload_id, lambda named: True)  # gone: a stop we put there is no one's
            return None
        lease, taken_over = self.run(self.leases.take(upload_id))
        try:
            found = self.run(self.read_info(upload_id))  # as it is now that we hold it
        except BaseException:
            self.run_quietly(self.leases.remove(upload_id, lease))
            raise
        if found is None or (found[1].completed and self.run(self.s3.record(upload_id)) is not None):
            if found is not None:  # finished, but its process died before removing the info
                self.run_quietly(self.delete(self.info_key(upload_id)))
            self.run_quietly(self.leases.remove(upload_id, lease, gone=True))
            self.leases.forget_stop(upload_id, lambda named: True)
            return None
        info, saved = found
        self.leases.forget_stop(upload_id, lambda named: named != lease)  # one naming us is for us
        upload = S3Upload(self, info, saved, lease, self.digests.take(upload_id, info.offset))
        if taken_over:
            # A holder held up past its lease (a slow store) may still land the parts it
            # was sending, numbered after the committed ones: never reuse those numbers.
            upload.skip_part_numbers(self.s3.parts_in_flight + 1)
        return upload

    def ask_to_stop(self, upload_id: str) -> None:
        self.leases.ask_to_stop(upload_id)

    def peek(self, upload_id: str) -> UploadInfo | None:
        if not is_file_id(upload_id):
            return None
        found = self.run(self.read_info(upload_id))
        if found is None or (found[1].completed and self.run(self.s3.record(upload_id)) is not None):
            return None
        return found[0]

    def sweep(self, now: float) -> int:
        """Blocking, on our loop; but called on an event loop (the app's, at startup) it only starts
        the sweep and returns 0: startup must not wait for a store that may be down (as `S3Store.prepare`)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            self.submit(self._sweep(now)).add_done_callback(log_sweep)
            return 0
        try:
            return self.run(self._sweep(now))
        except StorageUnavailable as exc:
            logger.warning("sweeping expired resumable uploads in %s failed: %s", self.s3.url, exc)
            return 0

    async def _sweep(self, now: float) -> int:
        """Remove expired uploads nobody holds, and tails and leases a crash left without an info."""
        removed = 0
        group: list[tuple[str, float]] = []  # one upload's objects (keys sort by id)
        async for name, modified in self._objects():
            if group and group[0][0].split(".")[0] != name.split(".")[0]:
                removed += await self._sweep_one(group, now)
                group = []
            group.append((name, modified))
        if group:
            removed += await self._sweep_one(group, now)
        return removed

    async def _sweep_one(self, group: list[tuple[str, float]], now: float) -> int:
        upload_id = group[0][0].split(".")[0]
        if not is_file_id(upload_id):
            return 0
        written = [modified for name, modified in group if name.endswith(".info")]
        if written:
            if now - written[0] < self.expiry:
                return 0
            found = await self.read_info(upload_id)
            if found is None or found[0].expires > now:
                return 0
            try:
                lease, _ = await self.leases.take(upload_id)
            except UploadBusy:
                return 0  # being written now: its request renews the expiry
            removed = 0
            try:
                removed = await self._remove_expired(upload_id, now)
            finally:
                await self.leases.remove(upload_id, lease, gone=removed == 1)
            return removed
        for name, modified in group:
            if now - modified > STALE_LEFTOVER_SECONDS:
                await self.delete(self._name(upload_id, name[len(upload_id):]))
        return 0

    async def _remove_expired(self, upload_id: str, now: float) -> int:
        """Under the upload's lease: remove it if its info, read again now, expired before `now`."""
        # The sweep's first read may predate a PATCH that renewed the expiry and let go since;
        # and only the version read here goes (If-Match), never one a late writer put since.
        found = await self.read_info(upload_id)
        if found is None or found[0].expires > now:
            return 0
        saved = found[1]
        if not await self.delete(self.info_key(upload_id), if_match=saved.etag):
            return 0
        if not (saved.completed and await self.s3.record(upload_id) is not None):
            await self.remove_bytes(upload_id, saved, None)  # (else finished: the info only stayed)
        self.digests.forget(upload_id)
        return 1

    async def _objects(self) -> Any:
        """(name after `.resumable/`, LastModified) of every object there, in key order."""
        prefix = self.s3.key(f"{RESUMABLE_DIR}/")
        token: dict[str, str] = {}
        while True:
            page = await self.s3.call("list_objects_v2", Prefix=prefix, **token)
            for item in page.get("Contents", []):
                yield item["Key"][len(prefix):], item["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}


def log_sweep(future: concurrent.futures.Future[int]) -> None:
    if future.exception() is not None:
        logger.warning("sweeping expired resumable uploads failed: %s", future.exception())
    elif future.result():
        logger.info("swept %d expired resumable upload(s)", future.result())


async def close_body(body: Any) -> None:
    body.close()

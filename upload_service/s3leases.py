"""One writer at a time per S3 resumable upload, across servers: the lease and stop objects.

Under `<prefix>/.resumable/`:

    <id>.lock   the lease: created (If-None-Match: *), renewed (If-Match its last ETag)
                while written, taken over (If-Match) once stale, deleted (If-Match) when let go.
    <id>.stop   a request elsewhere asks the lease's holder to let go. It names the lease's
                ETag as the asker read it; the holder reads it about once a second while it
                reads a body. It is removed only as read (If-Match), by a request done with
                the lease it names, or by its asker once the upload is gone; the asker puts
                it again at each poll, so one removed meanwhile is never lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Callable

from upload_service.errors import StorageRefused, StorageUnavailable, UploadLocked
from upload_service.s3client import Conflict
from upload_service import s3io
from upload_service.storage import UploadBusy, is_file_id, new_file_id

if TYPE_CHECKING:
    from upload_service.s3resumable import S3ResumableStore

logger = logging.getLogger("upload_asgi")

MAX_ASKED = 1000


def refused_for_conditions() -> StorageRefused:
    return StorageRefused(
        "the object store ignores conditional writes (If-None-Match, If-Match), which resumable "
        "uploads need to keep one writer at a time"
    )


class Leases:
    """The lease and stop objects of an `S3ResumableStore`'s uploads. Coroutines run on the
    store's loop; `let_go`, `ask_to_stop` and `forget_stop` block (the request's threads)."""

    def __init__(self, store: S3ResumableStore, seconds: float) -> None:
        self._store = store
        self.seconds = seconds
        self._conditions_hold: bool | None = None  # whether the store refuses a failed If-None-Match / If-Match
        self._asked: set[str] = set()  # uploads we put a stop for, until we hold them (or they are gone)

    def _new(self) -> dict[str, object]:
        return {"holder": secrets.token_hex(8), "expires": time.time() + self.seconds}

    # -- the lease --

    async def take(self, upload_id: str) -> tuple[str, bool]:
        """Create the lease object, or take over a stale one; UploadBusy if another writer holds it.

        Returns its ETag, and whether it was taken over (its holder may not be dead after all).
        """
        store = self._store
        await self.check_conditional_writes()
        key = store.lock_key(upload_id)
        for _ in range(2):
            try:
                return await store.put_json(key, self._new(), None), False
            except Conflict:
                pass
            held = await store.get_json(key)
            if held is None:
                continue  # released meanwhile
            released = held[0].get("released", False)  # (on a store without conditional deletes)
            if not released and held[0].get("expires", 0) > time.time():
                raise UploadBusy(upload_id)
            try:  # let go, or its holder died: take it over
                return await store.put_json(key, self._new(), held[1]), not released
            except Conflict:
                raise UploadBusy(upload_id) from None
        raise UploadBusy(upload_id)

    async def check_conditional_writes(self) -> None:
        """Once: make sure the store refuses a PUT whose If-None-Match or If-Match fails. Some
        S3-compatible stores ignore both, and then two writers could hold one lease (SPEC §10).
        Also find out whether it refuses such a DELETE (`S3ResumableStore.conditional_deletes`)."""
        if self._conditions_hold is False:
            raise refused_for_conditions()
        if self._conditions_hold:
            return
        store = self._store
        key = store.lock_key(new_file_id())  # a lease without an info: the sweep removes it if left
        await store.put_json(key, {"probe": 0}, None)
        try:
            for step, if_match in enumerate((None, '"not-its-etag"'), 1):
                try:
                    await store.put_json(key, {"probe": step}, if_match)
                except Conflict:
                    continue
                logger.error("%s ignores conditional writes: resumable uploads are refused", store.s3.url)
                self._conditions_hold = False
                raise refused_for_conditions()
            await store.probe_conditional_delete(key)
        finally:
            await store.delete(key)
        self._conditions_hold = True

    async def renew(self, upload_id: str, etag: str) -> str:
        try:
            return await self._store.put_json(self._store.lock_key(upload_id), self._new(), etag)
        except Conflict:
            raise UploadLocked(f"resumable upload {upload_id} was taken over by another writer") from None

    async def remove(self, upload_id: str, lease: str | None, gone: bool = False) -> None:
        """Let go of the lease: delete it, only while it is `lease` (None: whatever it is). On a store
        without conditional deletes, while the upload is not `gone`, mark it released with a
        conditional PUT instead: a DELETE after reading the ETag could remove a lease another server
        took over in between, and a third writer would then share the upload with it. (Once the
        upload is gone a newcomer finds no info and lets go: any delete will do.)"""
        store = self._store
        key = store.lock_key(upload_id)
        if lease is None or gone or store.conditional_deletes is not False:
            await store.delete(key, if_match=None if gone else lease)
            return
        with contextlib.suppress(Conflict):  # taken over meanwhile: no longer ours
            await store.put_json(key, {"released": True}, lease)

    def let_go(self, upload_id: str, lease: str, gone: bool = False) -> None:
        """Let go of our lease (blocking). If the store is not there, try again in the background until
        the lease would be stale anyway: the upload must not stay locked (423) after a blip."""
        store = self._store
        try:
            store.run(asyncio.wait_for(self.remove(upload_id, lease, gone), s3io.CLEANUP_WAIT_SECONDS))
        except Exception as exc:
            logger.warning("releasing the lease of resumable upload %s failed (tried again later): %s", upload_id, exc)
            what = f"releasing the lease of resumable upload {upload_id}"
            with contextlib.suppress(StorageUnavailable, RuntimeError):  # closed: nothing runs any more
                store.loop().call_soon_threadsafe(
                    store.s3.retry_later, what, lambda: self.remove(upload_id, lease, gone), self.seconds
                )

    # -- the stop --

    def ask_to_stop(self, upload_id: str) -> None:
        """Put `<id>.stop` naming the lease as it is now, for its holder in whatever process (a
        lease renewed since is still its own; one taken over is another's, and not asked). A store
        that fails here leaves the holder to the idle timeout, as before."""
        if not is_file_id(upload_id):
            return
        store = self._store
        try:
            held = store.run(store.get_json(store.lock_key(upload_id)))
            if held is not None:  # put again at each poll: a holder's clean-up may have removed it
                store.run(store.s3.call("put_object", Key=store.stop_key(upload_id), Body=held[1].encode()))
                if len(self._asked) > MAX_ASKED:  # asks never followed by an acquire
                    self._asked.clear()
                self._asked.add(upload_id)
        except StorageUnavailable as exc:
            logger.warning("asking the writer of resumable upload %s to stop failed: %s", upload_id, exc)

    async def read_stop(self, upload_id: str) -> str | None:
        """The lease ETag a stop names, if any."""
        found = await self._stop_and_etag(upload_id)
        return None if found is None else found[0]

    async def drop_stop(self, upload_id: str, done_with: Callable[[str], bool]) -> None:
        """Delete the stop if `done_with(the lease it names)`, and only as read (If-Match): one put
        since, asking the next holder, stays."""
        found = await self._stop_and_etag(upload_id)
        if found is not None and done_with(found[0]):
            await self._store.delete(self._store.stop_key(upload_id), if_match=found[1])

    def forget_stop(self, upload_id: str, done_with: Callable[[str], bool]) -> None:
        """Remove the stop this process put (its holder let go without seeing it, or died)."""
        if upload_id in self._asked:
            self._asked.discard(upload_id)
            self._store.run_quietly(self.drop_stop(upload_id, done_with))

    async def _stop_and_etag(self, upload_id: str) -> tuple[str, str] | None:
        store = self._store
        answer = await store.s3.call_or_none("get_object", Key=store.stop_key(upload_id))
        if answer is None:
            return None
        async with answer["Body"] as body:
            return (await store.read_block(body, None)).decode("ascii", "replace"), answer["ETag"]

"""One file's bytes into and out of the S3 bucket: `S3Sink` writes it, `S3File` reads it back.

Writing: a file's bytes come to `S3Sink.write` on a writer thread, in blocks. The sink
gathers them into parts of `UPLOAD_S3_PART_SIZE` and hands each to the event loop
(`run_coroutine_threadsafe`), where aiobotocore sends it as a part of a multipart
upload; the writer thread blocks only when `UPLOAD_S3_PARTS_IN_FLIGHT` parts (the one
filling included) are in memory, and that blocking is the backpressure that pauses
the client. A file smaller than a part never starts a multipart upload: it is one PUT
at commit, where `S3Store.commit` sends the last parts and completes the upload.

Reading: each `S3File.chunks` call is one ranged GET, streamed in 1 MiB pieces.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable

from upload_service.errors import NotFound, StorageUnavailable
from upload_service.s3client import BotoCoreError, PartBody, aiohttp, error_code
from upload_service.storage import FileSink, Record, StoredFile, new_file_id
from upload_service.units import MiB

if TYPE_CHECKING:
    from upload_service.s3store import S3Store

logger = logging.getLogger("upload_asgi")

READ_CHUNK_SIZE = 1 * MiB  # a download's reads from the GET's stream
# A request waits this long for each of its clean-up calls (aborting a multipart upload,
# letting go of a lease: the store may be what failed); then they go on in the background.
CLEANUP_WAIT_SECONDS = 5.0
# A writer thread waits for the loop's S3 calls at most this long: a call ends sooner
# (s3store.CALL_SECONDS); this only frees the thread if the loop is gone.
THREAD_WAIT_SECONDS = 600.0


def wait_for_room(parts: list[concurrent.futures.Future[Any]], parts_in_flight: int) -> None:
    """Block while `parts_in_flight` parts are being sent: the part to fill next counts as one in memory."""
    while True:
        sending = [future for future in parts if not future.done()]
        if len(sending) < parts_in_flight:
            return
        done, _ = concurrent.futures.wait(sending, THREAD_WAIT_SECONDS, concurrent.futures.FIRST_COMPLETED)
        if not done:
            raise StorageUnavailable("the object store did not take a part in time")


class S3Sink(FileSink):
    """One file on its way into the bucket; see the module docstring."""

    def __init__(self, store: S3Store, loop: asyncio.AbstractEventLoop) -> None:
        self.id = new_file_id()
        self.key = store.key(self.id)
        self._store = store
        self._loop = loop
        self._chunks: list[bytes] = []  # the part being filled
        self._buffered = 0
        self._upload_id: str | None = None
        self._parts: list[concurrent.futures.Future[str]] = []  # each part's ETag, in order
        self._over = False  # completed or aborted: nothing more to do
        self.size = 0

    def open(self) -> None:
        """Nothing to do yet: the multipart upload starts with the first full part.

        (Called by the parser or a writer thread: it must not wait for S3 here.)
        """

    def write(self, data: bytes) -> None:
        self._chunks.append(data)
        self._buffered += len(data)
        self.size += len(data)
        if self._buffered >= self._store.part_size:
            self._send_part()

    def _send_part(self) -> None:
        """Hand the filled part to the loop; block while the parts in memory are at the bound."""
        if self._on_loop():
            raise RuntimeError("S3Sink.write blocks: call it on a writer thread, not the event loop")
        part = self._take_buffer()
        self._raise_failed()
        if self._upload_id is None:
            self._upload_id = self._wait(self._store.start_multipart(self.key))
        self._parts.append(self._submit(self._store.upload_part(self.key, self._upload_id, len(self._parts) + 1, part)))
        del part  # the coroutine holds it until sent
        wait_for_room(self._parts, self._store.parts_in_flight)
        self._raise_failed()

    def _take_buffer(self) -> PartBody:
        blocks, self._chunks, self._buffered = self._chunks, [], 0
        return PartBody(blocks)

    def _raise_failed(self) -> None:
        for future in self._parts:
            if future.done() and future.exception() is not None:
                raise future.exception()

    def _on_loop(self) -> bool:
        try:
            return asyncio.get_running_loop() is self._loop
        except RuntimeError:
            return False

    def _submit(self, work: Awaitable[Any]) -> concurrent.futures.Future[Any]:
        return asyncio.run_coroutine_threadsafe(work, self._loop)  # type: ignore[arg-type]

    def _wait(self, work: Awaitable[Any]) -> Any:
        try:
            return self._submit(work).result(THREAD_WAIT_SECONDS)
        except concurrent.futures.TimeoutError:
            raise StorageUnavailable("the object store did not answer in time") from None

    # -- on the loop, from commit --------------------------------------------------

    async def finish(self) -> None:
        """Wait for the parts sent, and send the last one (if this is a multipart upload)."""
        for future in self._parts:
            await asyncio.wrap_future(future)
        if self._upload_id is not None and self._buffered:
            last = self._store.upload_part(self.key, self._upload_id, len(self._parts) + 1, self._take_buffer())
            self._parts.append(self._submit(last))  # a thread's future like the others, for `complete`
            await asyncio.wrap_future(self._parts[-1])

    async def complete(self) -> None:
        """Make the object appear: complete the multipart upload, or PUT a small file whole."""
        if self._upload_id is None:
            await self._store.call("put_object", Key=self.key, Body=self._take_buffer())
        else:
            etags = [future.result() for future in self._parts]
            try:
                await self._store.complete_multipart(self.key, self._upload_id, etags)
            except StorageUnavailable as exc:
                # botocore's retry of a completion whose answer was lost finds the upload gone: done?
                if error_code(exc.__cause__) != "NoSuchUpload" or await self._store.object_size(self.key) != self.size:
                    raise
        self._over = True

    async def abort_upload(self) -> None:
        """Abort the multipart upload from the loop (commit's cleanup)."""
        if self._over:
            return
        self._over = True
        self._chunks, self._buffered = [], 0
        if self._parts:
            await asyncio.wait([asyncio.wrap_future(f) for f in self._parts])
        if self._upload_id is not None:
            try:
                await self._store.abort_multipart(self.key, self._upload_id, within=CLEANUP_WAIT_SECONDS)
            except StorageUnavailable:
                self._store.retry_abort_later(self.key, self._upload_id)
                raise

    def abort(self) -> None:
        """Drop the part being filled, let the parts being sent end, abort the multipart upload."""
        if self._over:
            return
        if self._on_loop():  # cannot block here: leave it to a task
            self._store.keep(self._loop.create_task(self.abort_upload()))
            return
        self._over = True
        self._chunks, self._buffered = [], 0
        # Waited for, not cancelled: a part cut off mid-send could outlive the abort on
        # some stores. At most parts_in_flight parts, each with botocore's timeouts.
        concurrent.futures.wait(self._parts, THREAD_WAIT_SECONDS)
        if self._upload_id is not None:
            try:
                self._wait(self._store.abort_multipart(self.key, self._upload_id, within=CLEANUP_WAIT_SECONDS))
            except Exception as exc:
                logger.warning("aborting multipart upload %s failed (tried again later): %s", self.key, exc)
                with contextlib.suppress(RuntimeError):  # the loop is closed: then it is the sweep's
                    self._loop.call_soon_threadsafe(self._store.retry_abort_later, self.key, self._upload_id)


class S3File(StoredFile):
    """A stored object opened for reading; each `chunks` call is one ranged GET, streamed."""

    def __init__(self, store: S3Store, file_id: str, record: Record) -> None:
        self._store = store
        self._key = store.key(file_id)
        self.record = record
        self.size = int(record["size"])

    async def chunks(self, start: int = 0, stop: int | None = None) -> AsyncIterator[bytes]:
        stop = self.size if stop is None else min(stop, self.size)
        if start >= stop:
            return
        response = await self._store.call_or_none("get_object", Key=self._key, Range=f"bytes={start}-{stop - 1}")
        if response is None:  # deleted since its record was read
            raise NotFound(f"file {self.record.get('id')} was deleted")
        body = response["Body"]
        pieces: list[bytes] = []  # gathered to READ_CHUNK_SIZE: one send per MiB, as locally
        gathered = 0
        try:
            while True:
                try:
                    data = await body.read(READ_CHUNK_SIZE - gathered)  # what the socket has, up to that
                except (aiohttp.ClientError, BotoCoreError, OSError, asyncio.TimeoutError) as exc:
                    raise self._store.problem(exc, "reading") from exc
                if data:
                    pieces.append(data)
                    gathered += len(data)
                if pieces and (gathered >= READ_CHUNK_SIZE or not data):
                    yield pieces[0] if len(pieces) == 1 else b"".join(pieces)
                    pieces, gathered = [], 0
                if not data:
                    return
        finally:
            body.close()

    async def close(self) -> None:
        pass

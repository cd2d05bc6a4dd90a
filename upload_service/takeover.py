"""One writer per resumable upload, and taking an upload over from a holder gone silent.

A request writes an upload only while it holds it (the store's lock, or on S3 its lease). A
connection that dropped unseen (a phone changing networks, a NAT forgetting it) leaves its
`PATCH` waiting for bytes that never come, holding the upload until the idle timeout, while its
client has already come back. So, as tusd does, a `PATCH` or `DELETE` of a held upload asks the
holder to stop: the holder's body read ends (`UploadInterrupted`), it keeps what it got and lets
go. In this process it is asked directly; in another worker (or on S3 another server) through
the store (`ResumableStore.ask_to_stop`), which the holder checks about once a second.
"""

from __future__ import annotations

import asyncio
import time

from upload_service.asgi import Receive
from upload_service.body import BodyConsumer, BodyProgress, Interrupt, read_body
from upload_service.errors import UploadLocked
from upload_service.storage import ResumableStore, ResumableUpload, UploadBusy
from upload_service.threads import run_blocking

# How long a request waits for the holder to let go (polling), and how often a holder checks
# for a request from another worker.
TAKEOVER_WAIT_SECONDS = 5.0
TAKEOVER_POLL_SECONDS = 0.2
STOP_CHECK_SECONDS = 1.0


class Holders:
    """The body reads of the uploads this process writes, each ready to be asked to stop."""

    def __init__(self, store: ResumableStore) -> None:
        self.store = store
        self._reading: dict[str, Interrupt] = {}  # upload id -> its holder's body read

    async def take_over(self, file_id: str) -> ResumableUpload | None:
        """Hold the upload (None if there is none), asking a request that holds it to stop. 423 if
        it has not let go within a few seconds (it is storing the file, or the store could not
        pass the request on: it lets go at the idle timeout)."""
        deadline = time.monotonic() + TAKEOVER_WAIT_SECONDS
        while True:
            try:
                return await run_blocking(self.store.acquire, file_id)
            except UploadBusy:
                if time.monotonic() >= deadline:
                    raise UploadLocked(f"upload {file_id} is being written by another request; retry later") from None
            if (reading := self._reading.get(file_id)) is not None:
                reading.request()
            else:
                await run_blocking(self.store.ask_to_stop, file_id)
            await asyncio.sleep(TAKEOVER_POLL_SECONDS)

    async def read_body(
        self, receive: Receive, upload: ResumableUpload, consumer: BodyConsumer, progress: BodyProgress,
        limit: int, idle: float, min_rate: int, promised: int | None = None,
    ) -> None:
        """`body.read_body` onto the upload, until the body ends or another request asks for the upload."""
        interrupt = Interrupt()
        file_id = upload.info.id
        self._reading[file_id] = interrupt
        interrupt.watch(upload.stop_asked, STOP_CHECK_SECONDS)
        try:
            await read_body(receive, consumer, progress, limit, idle, min_rate, interrupt, promised)
        finally:
            interrupt.unwatch()
            if self._reading.get(file_id) is interrupt:
                del self._reading[file_id]

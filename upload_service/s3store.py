"""The S3 backend (SPEC §11): files in an S3-compatible bucket, under a prefix.

Keys: the file is `<prefix>/<id>`, its record `<prefix>/<id>.json`, written after the
file; a lister or reader goes by the records, so a file without one is not there yet.

Writing and reading one file: `s3io` (a sink's parts handed from the writer threads to the
loop, completed at commit; ranged GETs). `commit` completes every multipart upload (only then
does an object appear), then PUTs the records; a failure or cancellation anywhere removes what
appeared and aborts the rest. What a crashed server left (multipart uploads, a file whose record
never came) goes in the sweep, at startup and hourly, once older than `UPLOAD_S3_SWEEP_AFTER`.

Every S3 error becomes a `StorageUnavailable` (503: unreachable, failing) or a
`StorageRefused` (502: bucket missing, access denied): both OSErrors, so /health
reports them, and both UploadErrors, so an upload answers them (`s3client`).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import threading
import time
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

from upload_service.errors import StorageUnavailable
from upload_service.s3client import (
    MISSING_CODES,
    UNSUPPORTED_CODES,
    BotoCoreError,
    ClientError,
    PartBody,
    aiohttp,
    describe_failure,
    error_code,
    open_client,
)
from upload_service.s3io import S3File, S3Sink
from upload_service.storage import (
    PAGE_BYTES, FileSink, Page, Record, Store, format_cursor, is_file_id, parse_cursor, parse_record, record_json,
)
from upload_service.threads import wait_through_cancel
from upload_service.units import MiB

logger = logging.getLogger("upload_asgi")

HEALTH_TTL = 5.0  # seconds a HeadBucket answer (or failure) stands for /health
# A load balancer's probe gives up after a few seconds: a store that hangs is unavailable by then
# (the client's own timeouts and retries would take minutes).
HEALTH_TIMEOUT = 3.0
SWEEP_INTERVAL = 3600.0  # seconds between sweeps of abandoned multipart uploads
# Every S3 call ends once this long passed with no answer and none of its body taken, retries
# included: botocore's read timeout never fires while a write waits for `100 Continue` (aiohttp
# sends no body before it), so a store that accepts and then hangs held an upload for as long.
CALL_SECONDS = 90.0
COMPLETE_SECONDS = 540.0  # S3 may take minutes to complete a big multipart upload (AWS says so)
RECORD_READS = 16  # records fetched at once for a page of the listing
# A cleanup the store was not there for (an abort, a lease's release) is tried again in the
# background, first after this many seconds, then less often, until it works or its time is up.
CLEANUP_RETRY_SECONDS = 5.0
CLEANUP_RETRY_MAX_SECONDS = 60.0
ABORT_RETRY_FOR_SECONDS = 3600.0  # then an abandoned multipart upload is the sweep's
COMMIT_CALLS = 8  # a request's files completed (and their records written) at once
RESUMABLE_DIR = ".resumable"  # under the prefix: resumable uploads under way (s3resumable)


class S3Store(Store):
    """Files in `s3://<bucket>/<prefix>`, as the module docstring says."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        endpoint_url: str | None = None,
        part_size: int = 8 * MiB,
        parts_in_flight: int = 2,
        sweep_after: float = 24 * 3600.0,
        max_connections: int = 64,
    ) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.part_size = part_size
        self.parts_in_flight = parts_in_flight
        self.sweep_after = sweep_after
        self.max_connections = max_connections
        self._clients: dict[asyncio.AbstractEventLoop, asyncio.Future[Any]] = {}
        self._sweepers: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}
        self._health: tuple[float, dict[str, Any] | OSError] | None = None
        self._health_probes: dict[asyncio.AbstractEventLoop, asyncio.Task[None]] = {}  # one HeadBucket at a time
        self._tasks: set[asyncio.Task[Any]] = set()  # cleanups left running: held until done
        self._retries: set[asyncio.Task[None]] = set()  # failed cleanups tried again (retry_later)
        self._lister: asyncio.AbstractEventLoop | None = None  # listings' loop, on a thread of its own
        self._lister_lock = threading.Lock()

    def keep(self, task: asyncio.Task[Any]) -> None:
        """Hold a background task until it is done (the loop keeps only weak references)."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    @property
    def key_prefix(self) -> str:
        """What every key of ours starts with (listing and the sweep look only there)."""
        return f"{self.prefix}/" if self.prefix else ""

    # -- the client, one per event loop ------------------------------------------------

    async def client(self) -> Any:
        loop = asyncio.get_running_loop()
        made = self._clients.get(loop)
        failed = made is not None and made.done() and (made.cancelled() or made.exception() is not None)
        if made is None or failed:  # made again after a failure
            made = self._clients[loop] = loop.create_task(self._make_client())
        return await asyncio.shield(made)

    async def _make_client(self) -> Any:
        return await open_client(self.endpoint_url, self.max_connections)

    async def aclose(self) -> None:
        """Close this loop's client and stop its sweeper, and the listings' loop (tests; a server just exits)."""
        await self.stop_retries()
        loop = asyncio.get_running_loop()
        sweeper = self._sweepers.pop(loop, None)
        if sweeper is not None:
            sweeper.cancel()
            await asyncio.wait([sweeper])
        await self.close_client()
        with self._lister_lock:
            lister, self._lister = self._lister, None
        if lister is not None:
            await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self.close_client(), lister))
            lister.call_soon_threadsafe(lister.stop)

    async def close_client(self) -> None:
        """Close the running loop's client, if it made one."""
        made = self._clients.pop(asyncio.get_running_loop(), None)
        if made is not None and made.done() and not made.cancelled() and made.exception() is None:
            await made.result().__aexit__(None, None, None)

    async def call(self, operation: str, **params: Any) -> Any:
        """One S3 call on this bucket; any failure as a StorageUnavailable or StorageRefused."""
        seconds = COMPLETE_SECONDS if operation == "complete_multipart_upload" else CALL_SECONDS
        try:
            client = await self.client()
            async with asyncio.timeout(None) as deadline:
                loop = asyncio.get_running_loop()

                def moved() -> None:  # the store took a piece of the body: not hung
                    deadline.reschedule(loop.time() + seconds)

                moved()
                body = params.get("Body")
                if isinstance(body, PartBody):
                    body.on_sent = moved
                try:
                    return await getattr(client, operation)(Bucket=self.bucket, **params)
                finally:
                    if isinstance(body, PartBody):
                        body.on_sent = None  # a later call's deadline is its own
        except (ClientError, BotoCoreError, aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            if isinstance(exc, StorageUnavailable):
                raise
            raise self.problem(exc, operation) from exc

    async def call_or_none(self, operation: str, **params: Any) -> Any:
        """`call`, or None when the key is not there."""
        try:
            return await self.call(operation, **params)
        except StorageUnavailable as exc:
            if error_code(exc.__cause__) in MISSING_CODES:
                return None
            raise

    def problem(self, exc: BaseException, operation: str) -> StorageUnavailable:
        """Say what went wrong with the store, naming what to fix."""
        return describe_failure(exc, operation, self.bucket, self.url, self.endpoint_url)

    async def retry_cleanup(self, what: str, cleanup: Callable[[], Awaitable[Any]], for_seconds: float) -> None:
        """Try a cleanup that failed (the store was unreachable) again until it works or
        `for_seconds` have gone by (a background task: `retry_later`)."""
        deadline = time.monotonic() + for_seconds
        wait = CLEANUP_RETRY_SECONDS
        while time.monotonic() + wait < deadline:
            await asyncio.sleep(wait)
            try:
                await cleanup()
            except StorageUnavailable as exc:
                logger.debug("%s failed again: %s", what, exc)
                wait = min(wait * 2, CLEANUP_RETRY_MAX_SECONDS)
                continue
            logger.info("%s done on a later try", what)
            return
        logger.warning("%s kept failing; left to the sweep", what)

    def retry_later(self, what: str, cleanup: Callable[[], Awaitable[Any]], for_seconds: float) -> None:
        """On the running loop: try a cleanup that failed again in the background (retry_cleanup)."""
        task = asyncio.get_running_loop().create_task(self.retry_cleanup(what, cleanup, for_seconds))
        self._retries.add(task)
        task.add_done_callback(self._retries.discard)

    def retry_abort_later(self, key: str, upload_id: str) -> None:
        self.retry_later(f"aborting multipart upload {key}", lambda: self.abort_multipart(key, upload_id),
                         ABORT_RETRY_FOR_SECONDS)

    async def stop_retries(self) -> None:
        """Cancel this loop's retries (closing)."""
        loop = asyncio.get_running_loop()
        retries = [task for task in self._retries if task.get_loop() is loop]
        for task in retries:
            task.cancel()
        if retries:
            await asyncio.wait(retries)

    # -- multipart uploads (coroutines the sinks hand to the loop) --------------------------

    async def start_multipart(self, key: str) -> str:
        return (await self.call("create_multipart_upload", Key=key))["UploadId"]

    async def upload_part(self, key: str, upload_id: str, number: int, part: PartBody) -> str:
        answer = await self.call("upload_part", Key=key, UploadId=upload_id, PartNumber=number, Body=part)
        return answer["ETag"]

    async def complete_multipart(self, key: str, upload_id: str, etags: list[str]) -> None:
        parts = [{"PartNumber": n, "ETag": etag} for n, etag in enumerate(etags, 1)]
        await self.call("complete_multipart_upload", Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts})

    async def object_size(self, key: str) -> int | None:
        head = await self.call_or_none("head_object", Key=key)
        return None if head is None else head["ContentLength"]

    async def abort_multipart(self, key: str, upload_id: str, within: float | None = None) -> None:
        try:
            async with asyncio.timeout(within):
                await self.call("abort_multipart_upload", Key=key, UploadId=upload_id)
        except TimeoutError as exc:
            raise StorageUnavailable(f"aborting {key} took over {within:g} s") from exc
        except StorageUnavailable as exc:
            if error_code(exc.__cause__) != "NoSuchUpload":  # already gone (a sweep, a retry)
                raise

    # -- the Store interface -----------------------------------------------------------

    def prepare(self) -> None:
        """Start this loop's sweeper (a sweep now, then hourly); no S3 call waits here.

        The store may be briefly unreachable at startup: the app starts anyway and
        /health says unavailable until it answers.
        """
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if loop not in self._sweepers:
            self._sweepers[loop] = loop.create_task(self._sweep_forever())

    async def _sweep_forever(self) -> None:
        while True:
            try:
                swept = await self.sweep()
                if swept:
                    logger.info("swept %d abandoned multipart uploads and objects without a record under %s",
                                swept, self.url)
            except StorageUnavailable as exc:
                logger.warning("sweeping %s failed: %s", self.url, exc)
            await asyncio.sleep(SWEEP_INTERVAL)

    async def sweep(self, now: float | None = None) -> int:
        """Remove what crashed servers left, older than `sweep_after`; return how many things.

        Multipart uploads under the prefix are aborted; a file whose record never came (a
        crash between completing it and writing the record, or mid-delete) is deleted.
        """
        cutoff = (time.time() if now is None else now) - self.sweep_after
        try:
            aborted = await self._sweep_uploads(cutoff)
        except StorageUnavailable as exc:  # some stores have no ListMultipartUploads: the rest still goes
            if error_code(exc.__cause__) not in UNSUPPORTED_CODES:
                raise
            logger.warning("%s cannot list multipart uploads (%s): none are swept", self.url, exc)
            aborted = 0
        return aborted + await self._sweep_orphans(cutoff)

    async def _is_resumable(self, name: str) -> bool:
        """Whether `name` is a resumable upload under way (its own sweep expires it)."""
        return await self.call_or_none("head_object", Key=self.key(f"{RESUMABLE_DIR}/{name}.info")) is not None

    async def _sweep_uploads(self, cutoff: float) -> int:
        swept = 0
        marker: dict[str, str] = {}
        while True:
            page = await self.call("list_multipart_uploads", Prefix=self.key_prefix, **marker)
            for upload in page.get("Uploads", []):
                name = upload["Key"][len(self.key_prefix):]
                if is_file_id(name) and upload["Initiated"].timestamp() < cutoff:
                    if await self._is_resumable(name):
                        continue
                    await self.abort_multipart(upload["Key"], upload["UploadId"])
                    swept += 1
            if not page.get("IsTruncated"):
                return swept
            marker = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    async def _sweep_orphans(self, cutoff: float) -> int:
        """Delete files without a record, in one pass over the listing and O(1) memory.

        Keys come in order, and `<id>.json` sorts after `<id>` with nothing of ours between:
        a file whose next key of ours is past `<id>.json` has no record.
        """
        swept = 0
        waiting: tuple[str, float] | None = None  # a file seen, its record not yet

        async def settle(name: str | None) -> None:
            nonlocal waiting, swept
            if waiting is None:
                return
            record_name = f"{waiting[0]}.json"
            if name == record_name:
                waiting = None
            elif name is None or name > record_name:
                # A resumable upload completed, its record not yet written, is not an orphan.
                if waiting[1] < cutoff and not await self._is_resumable(waiting[0]):
                    await self.call("delete_object", Key=self.key(waiting[0]))
                    swept += 1
                waiting = None

        async for name, modified in self._our_objects():
            await settle(name)
            if is_file_id(name):
                waiting = (name, modified)
        await settle(None)
        return swept

    def new_file(self) -> S3Sink:
        return S3Sink(self, asyncio.get_running_loop())

    async def commit(self, files: Sequence[tuple[FileSink, Record]], before: Callable[[], None] | None = None) -> None:
        """Store every file and record, all or none, even if this task is cancelled meanwhile."""
        if before is not None:  # its writes wait on this loop: a thread of its own
            writing = asyncio.get_running_loop().run_in_executor(None, before)
            if await wait_through_cancel(writing):
                if writing.exception() is not None:  # the caller aborts the sinks either way
                    logger.debug("writing before a cancelled commit failed", exc_info=writing.exception())
                raise asyncio.CancelledError
            writing.result()
        work = asyncio.ensure_future(self._commit(files))  # type: ignore[arg-type]  # our sinks
        if await wait_through_cancel(work):
            if not work.cancelled() and work.exception() is None:
                undo = asyncio.ensure_future(self._remove([sink.id for sink, _ in files]))
                await wait_through_cancel(undo)
                if undo.exception() is not None:
                    logger.error(
                        "a cancelled upload stays stored: undoing its commit failed", exc_info=undo.exception()
                    )
            raise asyncio.CancelledError
        work.result()

    async def _commit(self, files: Sequence[tuple[S3Sink, Record]]) -> None:
        begun: list[str] = []  # ids whose completion began: their object may be there (a failure may have landed)

        async def complete(sink: S3Sink) -> None:
            begun.append(sink.id)
            await sink.complete()

        async def put_record(sink: S3Sink, record: Record) -> None:
            body = record_json(record)
            await self.call("put_object", Key=self.key(f"{sink.id}.json"), Body=body, ContentType="application/json")

        try:
            # Each step for every file before the next: no record before every object is there.
            await all_of([sink.finish() for sink, _ in files])
            await all_of([complete(sink) for sink, _ in files])
            await all_of([put_record(sink, record) for sink, record in files])
        except BaseException:
            cleanup = asyncio.ensure_future(self._undo(files, begun))
            await wait_through_cancel(cleanup)
            raise

    async def _undo(self, files: Sequence[tuple[S3Sink, Record]], begun: list[str]) -> None:
        for sink, _ in files:
            try:
                await sink.abort_upload()
            except StorageUnavailable as exc:
                logger.warning("aborting multipart upload %s failed (tried again later): %s", sink.key, exc)
        try:
            await self._remove(begun)
        except StorageUnavailable as exc:
            # Its records (a PUT whose answer was lost may have landed) would show it as stored.
            logger.warning("removing the files of a failed upload from %s failed (tried again later): %s", self.url, exc)
            self.retry_later(f"removing the files of a failed upload {begun}", lambda: self._remove(begun),
                             ABORT_RETRY_FOR_SECONDS)

    async def _remove(self, ids: list[str]) -> None:
        """Delete files and their records: the records first (a reader goes by them)."""
        for file_id in ids:
            await self.call("delete_object", Key=self.key(f"{file_id}.json"))
            await self.call("delete_object", Key=self.key(file_id))

    async def open(self, file_id: str) -> S3File | None:
        record = await self.record(file_id)
        return None if record is None else S3File(self, file_id, record)

    async def record(self, file_id: str) -> Record | None:
        data = await self._record_data(file_id)
        return None if data is None else parse_record(data)

    async def _record_data(self, file_id: str) -> bytes | None:
        if not is_file_id(file_id):
            return None
        answer = await self.call_or_none("get_object", Key=self.key(f"{file_id}.json"))
        if answer is None:
            return None
        async with answer["Body"] as body:
            try:
                data = await body.read()
            except (aiohttp.ClientError, BotoCoreError, OSError, asyncio.TimeoutError) as exc:
                raise self.problem(exc, "reading a record") from exc
        return data

    async def list(self, limit: int, cursor: str | None = None) -> Page:
        # Every page reads the whole listing (parsing S3's XML): on a loop of its own, on its own
        # thread, so that clients paging at once do not hold up this loop's requests.
        with self._lister_lock:
            if self._lister is None:
                self._lister = asyncio.new_event_loop()
                threading.Thread(target=self._lister.run_forever, name="s3-list", daemon=True).start()
            lister = self._lister
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(self._list(limit, cursor), lister))

    async def _list(self, limit: int, cursor: str | None) -> Page:
        """Newest first by (LastModified of the record, id); keeps only `limit + 1` keys, then
        reads records, RECORD_READS at once, up to PAGE_BYTES.

        S3 lists keys by name, so every page reads the whole listing (ListObjectsV2,
        1000 keys a call), as the local store scans the whole directory. LastModified
        is to the second on S3 and SeaweedFS: records of the same second go by id.
        """
        if limit < 1:
            raise ValueError(f"limit must be 1 or more, not {limit}")
        before = parse_cursor(cursor)  # BadCursor for one we did not make
        newest: list[tuple[int, str]] = []  # a min-heap of the limit + 1 newest keys
        async for stamp, file_id in self._record_keys():
            key = (stamp, file_id)
            if before is not None and key >= before:
                continue
            if len(newest) <= limit:
                heapq.heappush(newest, key)
            elif key > newest[0]:
                heapq.heapreplace(newest, key)
        newest.sort(reverse=True)
        records: list[Record] = []
        size = taken = 0
        while taken < min(limit, len(newest)) and size < PAGE_BYTES:
            batch = newest[taken:min(limit, taken + RECORD_READS)]
            for found in await asyncio.gather(*(self._listed_record(file_id) for _, file_id in batch)):
                taken += 1
                if found is not None:
                    records.append(found[0])
                    size += found[1]
                if size >= PAGE_BYTES:
                    break
        next_cursor = format_cursor(newest[taken - 1]) if taken < len(newest) else None
        return Page(records, next_cursor)

    async def _listed_record(self, file_id: str) -> tuple[Record, int] | None:
        """A record and its size as stored; None when it is gone or unreadable."""
        try:
            data = await self._record_data(file_id)
            return None if data is None else (parse_record(data), len(data))
        except ValueError as exc:  # a corrupt record must not hide every other file
            logger.warning("listing skips file %s: its record cannot be read: %s", file_id, exc)
            return None

    async def _record_keys(self) -> AsyncIterator[tuple[int, str]]:
        """(LastModified in microseconds, id) of every record under the prefix."""
        async for name, modified in self._our_objects():
            if name.endswith(".json") and is_file_id(name[:-5]):
                yield int(modified * 1_000_000), name[:-5]

    async def _our_objects(self) -> AsyncIterator[tuple[str, float]]:
        """(name after the prefix, LastModified as POSIX seconds) of every object, in key order."""
        token: dict[str, str] = {}
        while True:
            page = await self.call("list_objects_v2", Prefix=self.key_prefix, **token)
            for item in page.get("Contents", []):
                yield item["Key"][len(self.key_prefix):], item["LastModified"].timestamp()
            if not page.get("IsTruncated"):
                return
            token = {"ContinuationToken": page["NextContinuationToken"]}

    async def delete(self, file_id: str) -> bool:
        if not is_file_id(file_id):
            return False
        # Whether the record is there, not what it says: an unreadable one goes too.
        if await self.call_or_none("head_object", Key=self.key(f"{file_id}.json")) is None:
            return False
        await self._remove([file_id])
        return True

    async def health(self) -> dict[str, Any]:
        """HeadBucket, its answer (or failure) kept HEALTH_TTL seconds; callers meanwhile share one."""
        now = time.monotonic()
        if self._health is None or now - self._health[0] > HEALTH_TTL:
            loop = asyncio.get_running_loop()
            probe = self._health_probes.get(loop)
            if probe is None or probe.done():
                probe = self._health_probes[loop] = loop.create_task(self._probe_bucket())
            await asyncio.shield(probe)
        result = self._health[1]
        if isinstance(result, OSError):
            raise result
        return dict(result)

    async def _probe_bucket(self) -> None:
        try:
            async with asyncio.timeout(HEALTH_TIMEOUT):
                await self.call("head_bucket")
            result: dict[str, Any] | OSError = {"storage": self.url}
        except StorageUnavailable as exc:
            result = exc
        except TimeoutError:
            result = StorageUnavailable(f"{self.url} did not answer within {HEALTH_TIMEOUT:g} s")
        self._health = (time.monotonic(), result)


async def all_of(calls: list[Awaitable[Any]]) -> None:
    """Run S3 calls COMMIT_CALLS at a time; wait for every one, then raise the first failure.

    (Not gather's first-failure-returns: a cleanup must not run while calls still land.)
    """
    slots = asyncio.Semaphore(COMMIT_CALLS)

    async def one(call: Awaitable[Any]) -> Any:
        async with slots:
            return await call

    results = await asyncio.gather(*(one(call) for call in calls), return_exceptions=True)
    for result in results:
        if isinstance(result, BaseException):
            raise result

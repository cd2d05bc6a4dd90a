"""Resumable uploads on `/files`: tus 1.0.0 and the IETF draft, one request path for both.

    OPTIONS /files[/<id>]  what the server speaks (Tus-Version, Tus-Extension, Tus-Max-Size)
    POST    /files         create an upload (tus creation, creation-with-upload,
                           creation-defer-length; the draft's creation with its first bytes)
    HEAD    /files/<id>    where it stands (Upload-Offset, Upload-Length, Upload-Expires); to a
                           request that speaks neither protocol, as GET
    PATCH   /files/<id>    append at Upload-Offset (tus: application/offset+octet-stream,
                           the draft: application/partial-upload)
    DELETE  /files/<id>    terminate it (or delete the stored file)
    GET     /files/<id>    409 upload_incomplete while it is one (410 once expired); to the
                           draft's version 9, as HEAD

A request carrying an `Upload-Draft-Interop-Version` we speak (3 to 9, `tus.DRAFT_VERSIONS`) speaks
the draft; any other, tus (and so needs `Tus-Resumable: 1.0.0`). The bytes go through the same
body reader as a form (limits, idle timeout, rate floor, backpressure) into a
`ResumableUpload` held for this request alone; once all of them are there, the
upload is checked against any digest the client declared and stored like a
form's file (same ids, records, `/files/<id>`, metrics). A protocol header sent on
two lines is read as one value joined with ", " (RFC 9110 §5.3): two values are a
malformed one, never the first line's (a proxy may read the last).
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Callable, TypeVar

from upload_service import tus
from upload_service.appending import AppendBody
from upload_service.asgi import (
    Receive,
    Scope,
    Send,
    bearer_token_matches,
    body_known_empty,
    check_declared_size,
    check_write_token,
    declared_length,
    header,
    list_header,
    promised_length,
    route_path,
    says_body,
    send_empty,
    send_error,
    send_json,
    utf8_header,
)
from upload_service.body import BodyProgress, has_bytes
from upload_service.dialects import Dialect, completes, protocol_headers
from upload_service.errors import (
    ClientGone,
    IncompleteBody,
    NotFound,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedMediaType,
    UploadError,
    UploadInterrupted,
    UploadLocked,
    as_upload_error,
    cut,
    shown,
)
from upload_service.files import FilesResource, check_preconditions, has_preconditions, mount_url, send_stored
from upload_service.forms import utc_now
from upload_service.framing import clean_content_type, clean_filename
from upload_service.metrics import is_server_fault
from upload_service.storage import Record, ResumableStore, ResumableUpload, UploadBusy, UploadInfo
from upload_service.takeover import Holders
from upload_service.threads import run_blocking

if TYPE_CHECKING:
    from upload_asgi import UploadApp

logger = logging.getLogger("upload_asgi")

Headers = list[tuple[bytes, bytes]]

SWEEP_INTERVAL_SECONDS = 60.0  # expired uploads are swept at most this often, when resumable requests come
# A HEAD of a complete upload another request holds waits this long for it to be stored.
FINISH_WAIT_SECONDS = 2.0
FINISH_POLL_SECONDS = 0.05
# Threads that re-read uploads to hash them again: hashing lets go of the GIL, one a core here.
REHASH_THREADS = 2

T = TypeVar("T")


def record_of(info: UploadInfo, size: int, sha256: str) -> Record:
    """The stored file's record: tus `filename`/`filetype` metadata (or the draft's headers),
    cleaned as a form part's filename and Content-Type are (SPEC §10: the same records); and
    all the upload's metadata as text, for the embedding app's hooks and for tus' HEAD."""
    filename = tus.metadata_text(info.metadata, "filename")
    content_type = tus.metadata_text(info.metadata, "filetype")
    description = tus.metadata_text(info.metadata, "description")
    return {
        "id": info.id,
        "filename": clean_filename(filename) if filename is not None else "unnamed",
        "content_type": clean_content_type(content_type or ""),
        "size": size,
        "sha256": sha256,
        "description": description,
        "created": utc_now(),
        "metadata": {key: tus.metadata_text(info.metadata, key) for key in info.metadata},
    }


class ResumableHandlers:
    """The handlers of `/files` for resumable uploads, on an app's store, config and metrics."""

    def __init__(self, app: UploadApp, store: ResumableStore, files: FilesResource) -> None:
        self.app = app
        self.store = store
        self.files = files  # a stored file (a finished upload) is served and deleted by it
        self._last_sweep = float("-inf")
        self.holders = Holders(store)  # one writer per upload, and taking an upload over
        self._rehasher: ThreadPoolExecutor | None = None

    @property
    def config(self):
        return self.app.config

    # -- the expiry sweep --

    def sweep(self) -> int:
        """Remove expired uploads now (blocking; at startup)."""
        self._last_sweep = time.monotonic()
        removed = self.store.sweep(time.time())
        if removed:
            logger.info("swept %d expired resumable upload(s)", removed)
        return removed

    def maybe_sweep(self) -> None:
        """Sweep in the background when the last sweep is SWEEP_INTERVAL_SECONDS old."""
        if time.monotonic() - self._last_sweep < SWEEP_INTERVAL_SECONDS:
            return
        self._last_sweep = time.monotonic()
        future = asyncio.get_running_loop().run_in_executor(None, self.sweep)
        future.add_done_callback(log_sweep_failure)

    # -- the handlers --

    async def handle_options(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False, **_: Any) -> None:
        config = self.config
        headers = [
            (b"tus-resumable", tus.TUS_VERSION.encode()),
            (b"tus-version", tus.TUS_VERSION.encode()),
            (b"tus-extension", tus.TUS_EXTENSIONS.encode()),
            (b"tus-max-size", str(config.max_file_size).encode()),
            (b"tus-checksum-algorithm", ",".join(tus.CHECKSUM_ALGORITHMS).encode()),
        ]
        dialect = Dialect.of(scope)
        if dialect.draft is not None:
            headers.append((b"upload-draft-interop-version", dialect.draft.encode()))
            headers.append((b"upload-limit", self.format_upload_limit(dialect.draft, config.resumable_expiry)))
            headers.append((b"accept-patch", tus.DRAFT_CONTENT_TYPE.encode()))
        await send_empty(send, 204, headers)

    async def handle_create(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False) -> None:
        dialect = Dialect.of(scope)
        await self.run(scope, receive, send, dialect, self.create, dialect)

    async def handle_head(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False, file_id: str = "") -> None:
        dialect = Dialect.of(scope)
        await self.run(scope, receive, send, dialect, self.head, dialect, file_id, counted=False)

    async def handle_patch(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False, file_id: str = "") -> None:
        dialect = Dialect.of(scope)
        await self.run(scope, receive, send, dialect, self.patch, dialect, file_id)

    async def handle_delete(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False, file_id: str = "") -> None:
        dialect = Dialect.of(scope)
        await self.run(scope, receive, send, dialect, self.delete, dialect, file_id, counted=False)

    async def handle_get(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False, file_id: str = "") -> None:
        """GET /files/<id>: the file, or 409 upload_incomplete while it is an upload under way (410 once
        expired). To a draft client of version 9, which may retrieve an offset by GET, as HEAD answers."""
        dialect = Dialect.of(scope)
        if dialect.gets_offset and not head_only:
            return await self.run(scope, receive, send, dialect, self.head, dialect, file_id, True, counted=False)
        try:
            return await self.files.handle_download(scope, receive, send, head_only=head_only, file_id=file_id)
        except NotFound as missing:
            # Only an id with no file costs a look for an upload (on S3, a GET of its info).
            try:
                info = await run_blocking(self.store.peek, file_id)
                if info is not None and info.expires <= time.time():
                    info = await self.expire(file_id, info)  # 410 and removed, as HEAD and PATCH answer
                if info is not None:
                    raise not_complete_yet(file_id) from None
                if not await self.files.is_stored(file_id):
                    raise missing
            except UploadError as exc:  # a refusal: the protocol's headers, as every resumable answer has
                exc.headers = (*exc.headers, *protocol_headers(scope, refusal=True))
                raise
        # It was being finished (peek waited for that): a file now.
        await self.files.handle_download(scope, receive, send, head_only=head_only, file_id=file_id)

    # -- one request: check, run, count, answer or say why --

    async def run(
        self, scope: Scope, receive: Receive, send: Send, dialect: Dialect, step: Callable[..., Any], *args: Any,
        counted: bool = True,
    ) -> None:
        started = time.monotonic()
        # Only an upload (creation, PATCH) reads its body; the front door read the others' already.
        progress = BodyProgress(complete=not counted or body_known_empty(scope))
        error: BaseException | None = None
        outcome = Outcome()
        try:
            self.maybe_sweep()
            await step(scope, receive, send, progress, outcome, *args)
        except ClientGone as exc:
            error = exc
        except Exception as exc:
            error = exc
            # A HEAD that speaks neither protocol is answered as GET would be: without them.
            plain_head = scope["method"] == "HEAD" and Dialect.spoken(scope) is None
            headers = [] if plain_head else self.headers_for_error(exc, dialect)
            if counted:  # an upload: creation, PATCH
                await self.app.answer_error(receive, send, exc, progress, scope, headers)
            else:
                await self.answer_failure(scope, receive, send, exc, progress, headers)
        except BaseException as exc:
            error = exc
            raise
        finally:
            if counted and (outcome.kept_bytes or error is not None or outcome.stored):
                stored = [outcome.stored] if outcome.stored else []
                self.app.record_outcome(error, started, progress, stored, partial=error is None and not stored)

    def headers_for_error(self, exc: Exception, dialect: Dialect) -> Headers:
        """The protocol's headers on an error; the draft's 413 for a limit of ours also names the
        size limits (not the time left: a refused PATCH does not renew the upload); versions 7 and 9
        say whose answer it is (`Upload-Complete`, `Dialect.refusals_say_incomplete`)."""
        says_complete = any(name == b"upload-complete" for name, _ in getattr(exc, "headers", ()))
        headers = dialect.headers() if says_complete else dialect.refusal_headers()  # a 422 is the file's: ?1
        if dialect.draft is not None and isinstance(exc, PayloadTooLarge):
            headers.append((b"upload-limit", self.format_upload_limit(dialect.draft)))
        return headers

    def format_upload_limit(self, draft: str, expires_in: float | None = None) -> bytes:
        """The draft's Upload-Limit: the file limit, a smaller request limit, the seconds left."""
        config = self.config
        max_append = config.max_request_size if config.max_request_size < config.max_file_size else None
        return tus.format_limit(draft, config.max_file_size, max_append, expires_in).encode()

    async def answer_failure(
        self, scope: Scope, receive: Receive, send: Send, exc: Exception, progress: BodyProgress, headers: Headers
    ) -> None:
        """Answer a HEAD or DELETE that failed: logged as that request, never as a failed upload."""
        answer = as_upload_error(exc, unexpected="the server failed to answer")
        if is_server_fault(answer):  # a traceback for the unexpected, not for a store that is down
            logger.error("%s %s failed: %s", scope["method"], route_path(scope), answer.detail,
                         exc_info=exc if answer is not exc else None)
        if scope["method"] == "HEAD":  # the error's status and headers, no body
            await send_error(send, answer, headers=headers, head_only=True)
        else:
            await self.app.answer_draining(receive, send, answer, progress, scope, headers)

    def check_writer(self, scope: Scope, dialect: Dialect) -> None:
        """What every write (create, PATCH, DELETE) must show: the token, the protocol version."""
        check_write_token(scope, self.config.token)
        if dialect.draft is None:
            tus.check_tus_resumable(list_header(scope, b"tus-resumable"))

    def check_length(self, length: int) -> None:
        if length > self.config.max_file_size:
            raise PayloadTooLarge(
                f"Upload-Length {length} is larger than the file limit of {self.config.max_file_size} bytes",
                limit="file_size", max=self.config.max_file_size,
            )

    def storable(self, info: UploadInfo) -> bool:
        """Whether the upload's length (or offset so far) fits the file limit, which may have been
        lowered since it began (a restart with a smaller UPLOAD_MAX_FILE_SIZE): if not, it can
        never be stored, and neither a PATCH nor a HEAD stores it."""
        return (info.length if info.length is not None else info.offset) <= self.config.max_file_size

    def check_still_storable(self, info: UploadInfo) -> None:
        if not self.storable(info):
            size, what = (info.length, "length") if info.length is not None else (info.offset, "offset")
            raise PayloadTooLarge(
                f"the upload's {what} {size} is over the file limit of {self.config.max_file_size} bytes",
                limit="file_size", max=self.config.max_file_size,
            )

    async def create(
        self, scope: Scope, receive: Receive, send: Send, progress: BodyProgress, outcome: Outcome, dialect: Dialect
    ) -> None:
        self.check_writer(scope, dialect)
        repr_digest = header(scope, b"repr-digest")
        if dialect.draft is None:
            length, metadata, with_upload = self.tus_creation(scope)
            if not with_upload and (says_body(scope) or not progress.complete and await has_bytes(receive, progress)):
                raise UnsupportedMediaType(f"a creation request's body must be {tus.TUS_CONTENT_TYPE}")
            will_complete = None
        else:
            length, metadata, will_complete = self.draft_creation(scope, dialect)
            with_upload = True
        sha256 = tus.declared_sha256(metadata, repr_digest)
        check_declared_size(scope, self.config.max_request_size)
        await self.app.ask_before_upload(scope)
        self.app.check_capacity()
        expires = time.time() + self.config.resumable_expiry
        self.app.prepare()
        upload = await run_blocking(self.store.create, length, metadata, expires, sha256)
        location = mount_url(scope, f"/files/{upload.info.id}").encode()
        try:
            if with_upload and not progress.complete:
                await self.append(scope, receive, upload, progress, outcome, dialect, will_complete)
            elif will_complete:  # the draft's complete upload with an empty body
                if upload.info.length is None:
                    upload.info.length = 0
                if not upload.info.complete:
                    raise tus.inconsistent_length(f"said complete with no body, Upload-Length {upload.info.length}")
            if completes(upload.info, will_complete, dialect):
                await self.finish(scope, upload, outcome, dialect)
        except BaseException:
            # Nobody knows its Location yet: an upload whose creation failed is no one's.
            await run_blocking(upload.terminate)
            raise
        finally:
            await run_blocking(upload.release)
        headers = [*dialect.headers(), (b"location", location),
                   *self.state_headers(upload.info, dialect, stored=bool(outcome.stored))]
        if outcome.stored and dialect.draft is not None:
            await send_json(send, 201, outcome.stored, headers)
        else:
            await send_empty(send, 201, headers)

    def tus_creation(self, scope: Scope) -> tuple[int | None, dict[str, str], bool]:
        if list_header(scope, b"upload-concat") is not None:  # as tusd without concatenation
            raise tus.ConcatenationUnsupported("Upload-Concat is not supported: this server has no concatenation")
        length_text = list_header(scope, b"upload-length")
        defer = list_header(scope, b"upload-defer-length")
        if (length_text is None) == (defer is None):
            raise tus.InvalidHeader("give exactly one of Upload-Length and Upload-Defer-Length: 1")
        if defer is not None and defer.strip() != "1":
            raise tus.InvalidHeader("Upload-Defer-Length must be 1")
        length = None if length_text is None else tus.parse_number(length_text, "Upload-Length")
        if length is not None:
            self.check_length(length)
        metadata = tus.parse_metadata(list_header(scope, b"upload-metadata"))
        with_upload = tus.media_type_of(header(scope, b"content-type")) == tus.TUS_CONTENT_TYPE
        return length, metadata, with_upload

    def draft_creation(self, scope: Scope, dialect: Dialect) -> tuple[int | None, dict[str, str], bool | None]:
        will_complete = dialect.will_complete(scope, appending=False)
        length_text = list_header(scope, b"upload-length")
        length = None if length_text is None else tus.parse_number(length_text, "Upload-Length", structured=True)
        body_length = declared_length(scope)
        if will_complete and body_length is not None:
            if length is not None and length != body_length:
                raise tus.inconsistent_length("Upload-Length and the Content-Length of a complete upload differ")
            length = body_length
        if length is not None:
            self.check_length(length)
        # The representation's own headers name it; tus-js-client's draft mode sends
        # Upload-Metadata instead (and the append type as the Content-Type). Kept as the record
        # will keep them (bounded: unlike Upload-Metadata's 8 KiB, a header may be megabytes).
        values = {}
        filename = tus.filename_of(utf8_header(scope, b"content-disposition"))
        if filename:
            values["filename"] = clean_filename(filename)
        content_type = header(scope, b"content-type")
        if content_type and tus.media_type_of(content_type) != tus.DRAFT_CONTENT_TYPE:
            values["filetype"] = clean_content_type(content_type)  # as a form part's: its parameters kept
        metadata = tus.parse_metadata(list_header(scope, b"upload-metadata"))
        return length, {**metadata, **tus.encode_metadata(values)}, will_complete

    async def head(
        self, scope: Scope, receive: Receive, send: Send, progress: BodyProgress, outcome: Outcome,
        dialect: Dialect, file_id: str, with_file: bool = False,
    ) -> None:
        """Where an upload stands; a stored file's headers (`with_file`: a GET, and its bytes too)."""
        if dialect.draft is None and (version := list_header(scope, b"tus-resumable")) is not None:
            tus.check_tus_resumable(version)
        # Whoever may write uploads may ask where one stands (a client resuming without the read
        # token); anyone else must be a reader, checked before the id is looked at.
        writer = Dialect.spoken(scope) is not None and self.may_write(scope)
        if not writer:
            self.files.check_read(scope)
        info = await run_blocking(self.store.peek, file_id)
        if info is not None and info.expires <= time.time():
            info = await self.expire(file_id, info)
        if info is not None and Dialect.spoken(scope) is None:  # not a resumable client: as GET answers
            raise not_complete_yet(file_id)
        if info is not None and info.complete and dialect.completes_at_length and self.may_write(scope) \
                and self.storable(info):
            info = await self.finish_cut_short(scope, outcome, dialect, file_id)
        if info is not None:
            headers = [*dialect.headers(), (b"cache-control", b"no-store"), *self.state_headers(info, dialect)]
            if dialect.draft is None and info.metadata:
                headers.append((b"upload-metadata", tus.format_metadata(info.metadata).encode()))
            await send_empty(send, 200 if dialect.draft is None else 204, headers)
            return
        # A stored file: the download headers (HEAD is GET without the body), and for a
        # tus or draft client where the upload stands (it may be resuming a finished one).
        if writer:
            self.files.check_read(scope)
        stored = await self.files.open_file(file_id)
        try:
            extra = self.finished_headers(stored.record, dialect) if Dialect.spoken(scope) else []
            await send_stored(scope, receive, send, stored, head_only=not with_file, extra_headers=extra)
        finally:
            await stored.close()

    def finished_headers(self, record: Record, dialect: Dialect) -> Headers:
        """Where a finished upload stands, for a client that asks in its protocol: all there."""
        size = str(record["size"]).encode()
        # tus 1.0.0 HEAD: "MUST prevent the client and/or proxies from caching the response";
        # this replaces the files resource's no-cache.
        headers = [*dialect.headers(), (b"cache-control", b"no-store")]
        headers += [(b"upload-offset", size), (b"upload-length", size)]
        if dialect.draft is not None:
            headers.append(dialect.completeness(True))
            headers.append((b"upload-limit", self.format_upload_limit(dialect.draft)))  # the draft: a HEAD MUST
        elif metadata := stored_metadata(record):  # tus: a HEAD MUST say the upload's metadata
            headers.append((b"upload-metadata", metadata.encode()))
        return headers

    def may_write(self, scope: Scope) -> bool:
        return self.config.token is None or bearer_token_matches(scope, self.config.token)

    async def finish_cut_short(self, scope: Scope, outcome: Outcome, dialect: Dialect, file_id: str) -> UploadInfo | None:
        """Every byte is in but the file is not stored: its request died while finishing it (a
        crash, the store failing). Store it now, or a client that HEADs it, sees every byte there
        and stops, would leave it to expire. Returns the upload's info, or None once stored."""
        try:
            upload = await run_blocking(self.store.acquire, file_id)
        except UploadBusy:
            return await self.wait_for_finishing(file_id)
        if upload is None:  # stored meanwhile
            return None
        try:
            if not upload.info.complete:
                return upload.info
            await self.finish(scope, upload, outcome, dialect)
        finally:
            await run_blocking(upload.release)
        return None

    async def wait_for_finishing(self, file_id: str) -> None:
        """A complete upload another request holds: its own last request storing it now, or (S3) one
        that died with the store down, whose lease outlives it. Wait a little for the file; else 423,
        never "all there" for a file not stored (the client would stop, and the upload expire)."""
        deadline = time.monotonic() + FINISH_WAIT_SECONDS
        while time.monotonic() < deadline:
            await asyncio.sleep(FINISH_POLL_SECONDS)
            if await run_blocking(self.store.peek, file_id) is None:
                return None
        raise UploadLocked(f"upload {file_id} has every byte but is held by another request; retry shortly")

    async def patch(
        self, scope: Scope, receive: Receive, send: Send, progress: BodyProgress, outcome: Outcome,
        dialect: Dialect, file_id: str,
    ) -> None:
        will_complete, offset, new_length = await self.check_patch(scope, receive, progress, dialect)
        await self.app.ask_before_upload(scope)
        self.app.check_capacity()
        try:
            upload = await self.acquire(file_id, dialect, offset, progress)
        except tus.UploadComplete as complete:
            if offset != complete.extra["offset"] or not progress.complete:
                raise
            # Nothing appended at the end of a stored upload: where it stands (as tusd answers).
            await send_empty(send, 204, [*dialect.headers(), *complete.headers])
            return
        except StoredAtLength as stored:
            await send_json(send, 200, stored.record, self.finished_headers(stored.record, dialect))
            return
        try:
            await self.write_patch(scope, receive, upload, progress, outcome, dialect, offset, new_length, will_complete)
        finally:
            await run_blocking(upload.release)
        headers = [*dialect.headers(), *self.state_headers(upload.info, dialect, stored=bool(outcome.stored))]
        if outcome.stored and dialect.draft is not None:
            await send_json(send, 200, outcome.stored, headers)
        else:
            await send_empty(send, 204, headers)

    async def check_patch(
        self, scope: Scope, receive: Receive, progress: BodyProgress, dialect: Dialect
    ) -> tuple[bool | None, int, str | None]:
        """Refuse what a PATCH's headers already tell; return whether it says it completes the
        upload, its offset, and the length it declares (unparsed: it counts only once held)."""
        self.check_writer(scope, dialect)
        media_type = tus.media_type_of(header(scope, b"content-type"))
        wanted = dialect.append_media_type
        if wanted is not None and media_type != wanted:
            raise UnsupportedMediaType(f"a PATCH body must be {wanted}, not {shown(media_type)}")
        will_complete = dialect.will_complete(scope, appending=True)
        offset = tus.parse_number(list_header(scope, b"upload-offset"), "Upload-Offset", dialect.draft is not None)
        new_length = list_header(scope, b"upload-length")
        if not progress.complete and declared_length(scope) == 0 and await has_bytes(receive, progress):
            # HTTP/2: its end read here (asgi.body_known_empty); h2 itself refuses bytes past the length.
            raise tus.InvalidHeader("Content-Length is 0 but the body has bytes")
        check_declared_size(scope, self.config.max_request_size)
        return will_complete, offset, new_length

    async def write_patch(
        self, scope: Scope, receive: Receive, upload: ResumableUpload, progress: BodyProgress, outcome: Outcome,
        dialect: Dialect, offset: int, new_length: str | None, will_complete: bool | None,
    ) -> None:
        """The held upload: check it still takes this PATCH, append its body, store it when complete."""
        if upload.info.expires <= time.time():
            await run_blocking(upload.terminate)
            raise tus.UploadExpired(f"upload {upload.info.id} expired and was removed")
        if offset != upload.info.offset:
            raise tus.offset_mismatch(dialect.draft is not None, upload.info.offset, offset)
        declared = False
        if new_length is not None:
            length = tus.parse_number(new_length, "Upload-Length", dialect.draft is not None)
            # tus: declared whatever becomes of the body (as tusd); the draft: with the body, as a
            # refused request's lengths must not stay ("their indicated lengths MUST match").
            declared = self.declare_length(upload.info, length, dialect) and dialect.draft is None
            if declared:
                await run_blocking(upload.save_info)
        try:
            await self.append(scope, receive, upload, progress, outcome, dialect, will_complete)
        except UploadError:
            if declared and completes(upload.info, will_complete, dialect):
                # The length that stays made the upload complete by itself: store it now (no
                # PATCH could add a byte, and a file with every byte must not wait for a HEAD).
                await self.finish(scope, upload, outcome, dialect)
            raise
        if completes(upload.info, will_complete, dialect):
            await self.finish(scope, upload, outcome, dialect)

    async def acquire(self, file_id: str, dialect: Dialect, offset: int, progress: BodyProgress) -> ResumableUpload:
        """Hold the upload for this request, or say why not (busy, complete, unknown)."""
        upload = await self.holders.take_over(file_id)
        if upload is not None:
            return upload
        try:
            record = await self.files.read_record(file_id)
        except NotFound:
            raise NotFound(f"no upload {cut(file_id)}") from None
        detail = f"upload {file_id} is already complete ({record['size']} bytes)"
        if dialect.draft is None:
            error = tus.UploadComplete(detail, offset=record["size"])
            error.headers = ((b"upload-offset", str(record["size"]).encode()),)
            raise error
        if dialect.replays_final_answer and progress.complete and offset == record["size"]:
            raise StoredAtLength(record)
        completed = dialect.completed_upload_status
        if completed == 400:  # drafts -01 to -08: any other append
            raise tus.Problem(400, "completed-upload", detail)
        # Drafts -09 on: bytes appended, or a body of unknown length, are an inconsistent length; no
        # bytes are 410 completed-upload (version 8), or in 9, which dropped that type, at another offset 409.
        if not progress.complete:
            raise tus.inconsistent_length(detail)
        if completed is not None:
            raise tus.Problem(completed, "completed-upload", detail)
        raise tus.offset_mismatch(True, record["size"], offset)

    def declare_length(self, info: UploadInfo, length: int, dialect: Dialect) -> bool:
        """tus creation-defer-length (or the draft's Upload-Length): a PATCH names the length once.
        Return whether it is new (repeating the known one is allowed, and changes nothing)."""
        draft = dialect.draft is not None
        if info.length is not None:
            if info.length != length:
                raise tus.length_conflict(draft, f"Upload-Length is already {info.length}")
            return False
        if length < info.offset:
            raise tus.length_conflict(draft, f"Upload-Length {length} is below the offset {info.offset}")
        self.check_length(length)
        info.length = length
        return True

    async def append(
        self, scope: Scope, receive: Receive, upload: ResumableUpload, progress: BodyProgress, outcome: Outcome,
        dialect: Dialect, will_complete: bool | None,
    ) -> None:
        """Read this request's body onto the end of the upload; take all of it back if it is wrong."""
        info, config = upload.info, self.config
        limit, body_length = self.check_append(info, scope, dialect, will_complete)
        checksum = tus.parse_checksum(list_header(scope, b"upload-checksum")) if dialect.draft is None else None
        # A body that may yet be refused whole (a checksum; no length, so it may pass the
        # limit) is marked durably: meanwhile a HEAD says the offset before it, so the offset
        # it said never goes back (the draft: MUST NOT), and a crash takes the body back.
        await self.run_store_work(upload, upload.mark, checksum is not None or body_length is None)
        consumer = AppendBody(upload, self.app.write_executor(), checksum[0] if checksum else None)
        self.app.metrics.in_flight += 1
        try:
            try:
                await self.holders.read_body(receive, upload, consumer, progress, min(limit, config.max_request_size),
                                             config.idle_timeout, config.min_rate, promised_length(scope))
                await consumer.flush()
            except (ClientGone, IncompleteBody, RequestTimeout, UploadInterrupted, asyncio.CancelledError) as exc:
                await self.keep_what_arrived(exc, upload, consumer, outcome, checksum is not None, body_length is not None)
                raise
            except PayloadTooLarge:
                if progress.received > limit:
                    raise tus.past_length(dialect.draft is not None, info.length, limit, config.max_file_size) from None
                raise
            if checksum is not None and consumer.checksum.digest() != checksum[1]:
                raise tus.ChunkChecksumMismatch(f"the chunk does not match its Upload-Checksum ({checksum[0]})")
            if will_complete and info.length is None:
                info.length = info.offset
            if will_complete and not info.complete:
                raise tus.inconsistent_length(f"said complete at offset {info.offset} of {info.length}")
            await self.keep(upload, outcome)
        except BaseException:
            await consumer.settle()
            await run_blocking(upload.discard)  # nothing (after a keep) or this request's bytes
            raise
        finally:
            self.app.metrics.in_flight -= 1
            self.count_rehash(upload)

    def check_append(
        self, info: UploadInfo, scope: Scope, dialect: Dialect, will_complete: bool | None
    ) -> tuple[int, int | None]:
        """Refuse on its headers a body that cannot fit; return the room left and the body's length."""
        config = self.config
        self.check_still_storable(info)
        limit = (info.length if info.length is not None else config.max_file_size) - info.offset
        body_length = declared_length(scope)
        if body_length is not None and body_length > limit:
            raise tus.past_length(dialect.draft is not None, info.length, limit, config.max_file_size)
        if will_complete and info.length is not None and body_length is not None \
                and info.offset + body_length != info.length:
            raise tus.inconsistent_length(
                f"said complete with {body_length} bytes at offset {info.offset} of {info.length}")
        return limit, body_length

    async def keep_what_arrived(
        self, exc: BaseException, upload: ResumableUpload, consumer: AppendBody, outcome: Outcome,
        checksummed: bool, counted: bool,
    ) -> None:
        """A body cut short: the client left (granian ends an HTTP/2 body the client reset short of
        its length), another request took over, or the server stopped (cancelled at its graceful
        timeout). What arrived stays, and the upload resumes from there; but not a chunk with a
        checksum, nor a body HEAD has not counted (no length) that another request took over from:
        the newcomer resumes at the offset HEAD gave, which the draft says MUST be accepted."""
        taken_over = isinstance(exc, UploadInterrupted)
        if not checksummed and not (taken_over and not counted):
            await consumer.flush()
            await self.keep(upload, outcome)
        elif taken_over:
            raise UploadInterrupted("another request for this upload took it over; this one's chunk (with an"
                                    " Upload-Checksum, or without a length) is dropped") from None

    async def keep(self, upload: ResumableUpload, outcome: Outcome) -> None:
        """Keep this request's bytes, however it ended; the upload expires UPLOAD_RESUMABLE_EXPIRY from now."""
        # Renewed here, not at the request's start: a body that took longer than the
        # expiry (or was cut off after it) must not leave an upload already expired.
        upload.info.expires = time.time() + self.config.resumable_expiry
        await run_blocking(upload.keep)
        outcome.kept_bytes = True
        await run_blocking(upload.save_info, False)

    async def finish(self, scope: Scope, upload: ResumableUpload, outcome: Outcome, dialect: Dialect) -> None:
        """All bytes are there: check the declared digest, store the file like a form's."""
        info = upload.info
        started = time.monotonic()
        sha256 = await self.run_store_work(upload, upload.sha256, finishing=True)
        self.count_rehash(upload)
        if info.sha256 is not None and info.sha256 != sha256:
            await run_blocking(upload.terminate)
            detail = f"the file's SHA-256 is {sha256}, not {info.sha256}; the upload was removed"
            if dialect.draft is None:
                raise tus.DigestMismatch(detail, sha256=sha256)
            problem = tus.Problem(422, "digest-mismatched-values", detail, sha256=sha256)  # SPEC §10: 422
            problem.headers = (dialect.completeness(True),)  # the draft: an answer about the whole file
            raise problem
        record = record_of(info, info.offset, sha256)
        await run_blocking(upload.finish, record)
        outcome.stored = record
        self.app.metrics.files_stored += 1
        self.app.metrics.bytes_stored += record["size"]
        logger.debug("resumable upload %s stored in %.3f s", info.id, time.monotonic() - started)
        await self.app.notify([record], scope)

    async def run_store_work(self, upload: ResumableUpload, fn: Callable[..., T], *args: Any, finishing: bool = False) -> T:
        """Run store work `fn` on a thread: on threads of their own if it first re-reads the whole
        upload to hash it (written by another worker or before a restart; on S3 when finishing), so
        that re-reads of big uploads never fill the default executor every request's file work shares."""
        rereads = upload.hash_unknown and (finishing or not upload.defers_hash)
        if rereads and self._rehasher is None:
            self._rehasher = ThreadPoolExecutor(REHASH_THREADS, thread_name_prefix="upload-asgi-rehash")
        return await run_blocking(fn, *args, executor=self._rehasher if rereads else None)

    def count_rehash(self, upload: ResumableUpload) -> None:
        """Count (once) the bytes this request re-read to rebuild the upload's SHA-256."""
        if upload.rehashed_bytes:
            logger.info(
                "resumable upload %s: re-read %d bytes to hash in %.3f s",
                upload.info.id, upload.rehashed_bytes, upload.rehash_seconds,
            )
            self.app.metrics.rehashed_bytes += upload.rehashed_bytes
            upload.rehashed_bytes = 0

    async def delete(
        self, scope: Scope, receive: Receive, send: Send, progress: BodyProgress, outcome: Outcome,
        dialect: Dialect, file_id: str,
    ) -> None:
        """tus termination of an upload under way; a stored file is deleted as the files resource does."""
        if await run_blocking(self.store.peek, file_id) is None:
            await self.files.handle_delete(scope, receive, send, file_id=file_id, headers=protocol_headers(scope))
            return
        self.check_writer(scope, dialect)
        if has_preconditions(scope):  # as for a stored file; an upload under way has no entity tag yet
            check_preconditions(scope, None, None)
        upload = await self.holders.take_over(file_id)
        if upload is None:  # finished or terminated meanwhile
            await self.files.handle_delete(scope, receive, send, file_id=file_id, headers=protocol_headers(scope))
            return
        try:
            await run_blocking(upload.terminate)
        finally:
            await run_blocking(upload.release)
        await send_empty(send, 204, dialect.headers())

    async def expire(self, file_id: str, info: UploadInfo) -> UploadInfo | None:
        """`info` says the upload expired: remove it and say so (410). Unless a request holds it, or
        renewed it since `info` was read: then its info as it is now (None once stored or gone)."""
        try:
            upload = await run_blocking(self.store.acquire, file_id)
        except UploadBusy:  # being written: its request renews the expiry, at its end
            return replace(info, expires=time.time() + self.config.resumable_expiry)
        if upload is None:
            return None
        try:
            # Decided on the info read under the lock: a PATCH may have renewed it and let go since.
            if upload.info.expires > time.time():
                return upload.info
            await run_blocking(upload.terminate)
        finally:
            await run_blocking(upload.release)
        raise tus.UploadExpired(f"upload {file_id} expired and was removed")

    def state_headers(self, info: UploadInfo, dialect: Dialect, stored: bool = False) -> Headers:
        """Where an upload stands: its offset, length, expiry (or the draft's completeness, limits)."""
        headers = [(b"upload-offset", str(info.offset).encode())]
        if info.length is not None:
            headers.append((b"upload-length", str(info.length).encode()))
        elif dialect.draft is None:
            headers.append((b"upload-defer-length", b"1"))
        if dialect.draft is not None:
            headers.append(dialect.completeness(stored))
            headers.append((b"upload-limit", self.format_upload_limit(dialect.draft, info.expires - time.time())))
        elif not info.complete:
            headers.append((b"upload-expires", tus.format_expires(info.expires).encode()))
        return headers


def not_complete_yet(file_id: str) -> tus.UploadIncomplete:
    """What GET, and a HEAD that speaks neither protocol, answer for an upload under way."""
    return tus.UploadIncomplete(f"upload {file_id} is not complete yet; HEAD it with Tus-Resumable for its offset")


def stored_metadata(record: Record) -> str:
    """A stored file's Upload-Metadata: as its creation sent it, or a form's file's from its record."""
    values = record.get("metadata")
    if values is None:
        fields = {"filename": record.get("filename"), "filetype": record.get("content_type"),
                  "description": record.get("description")}
        values = {key: value for key, value in fields.items() if value}
    return tus.bounded_metadata(values)


class StoredAtLength(Exception):
    """An empty append at the end of a stored upload, in interop versions 3 to 6 (which store an
    upload at its length: its client's "complete" may come after) and 9 (a client whose final answer
    was lost): answered as the append that stored it."""

    def __init__(self, record: Record) -> None:
        super().__init__(record["id"])
        self.record = record


def log_sweep_failure(future: asyncio.Future[int]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.warning("sweeping expired resumable uploads failed", exc_info=future.exception())


@dataclass
class Outcome:
    """What a request did, for metrics and the log: bytes appended, a file stored."""

    kept_bytes: bool = False
    stored: Record | None = None




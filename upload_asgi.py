"""upload-asgi: a raw ASGI app that streams uploads to storage, hashing them on the way.

Routes, relative to `scope["root_path"]`:

    GET  /                 the upload page (HTML)
    GET  /health           200 {"status": "ok", "free_bytes": N, "uploads_in_flight": N, ...}
                           (503 {"status": "unavailable", ...} if the store is unusable)
    GET  /metrics          Prometheus text
    POST /upload           one file part "file", optional "description" and "sha256"
                           -> 201 record
    POST /upload-multiple  file parts "files", optional "description"
                           -> 201 {"files": [record, ...], "count": N, "total_size": N}
    GET  /files/<id>       the stored bytes (Range, ETag, If-None-Match...); DELETE -> 204
    GET  /files/<id>/record  the record
    GET  /files            records newest first, ?limit= and ?cursor= (upload_service/files.py)
    OPTIONS, POST /files; HEAD, PATCH, DELETE /files/<id>
                           resumable uploads: tus 1.0.0 and the IETF draft (upload_service/resumable.py);
                           GET /files/<id> of one under way -> 409 upload_incomplete; on /files and
                           /files/<id> a POST with X-HTTP-Method-Override: PATCH or DELETE is that method

A 201 carries `Location: <root_path>/files/<id>` (the first file's). A record is
{"id", "filename", "content_type", "size", "sha256", "description", "created"};
`id` names the stored file `<upload dir>/<id>` (sidecar `<id>.json`), or with
UPLOAD_STORAGE=s3://<bucket>/<prefix> the objects `<prefix>/<id>` and `<prefix>/<id>.json`.

Errors are {"error": code, "detail": text}:

    400 malformed body, no boundary         401 token missing or wrong
        (or a bad ?limit=, ?cursor=)        403 a CORS preflight from an origin not allowed
    404 unknown path or file                405 other method on a known path
    408 client idle or too slow             412 a /files/<id> precondition failed
    413 a limit passed                      415 not multipart/form-data
    416 a range outside the file            422 no file, or sha256 mismatch
    431 header fields too large
    500 unexpected (logged)                 503 too many uploads at once
    507 no space left on the device (or the file too large for it)
    502/503 the S3 store refused / the store is unreachable or read-only
    resumable: 409 offset mismatch or incomplete, 410 expired, 412 tus version,
    423 another request writes it, 460 checksum mismatch (README "Resumable uploads")

An embedding app's `before_upload` hook may refuse a request with any 4xx/5xx
(`UploadRefused`) before a body byte is read.

A refused or failed form upload leaves nothing stored (unless the `on_upload` hook fails
after the commit: 500, the files stay); a resumable PATCH keeps the bytes that arrived.
A client that disconnects gets no answer.
The concerns live in `upload_service/` (README "Architecture"); this module routes
requests to them and turns every error into its answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Awaitable, Callable

from upload_service import hooks
from upload_service.asgi import (
    Message,
    Receive,
    Scope,
    Send,
    body_known_empty,
    came_through_a_proxy,
    check_declared_size,
    check_framing,
    check_write_token,
    header,
    promised_length,
    route_path,
    send_body,
    send_error,
    send_json,
)
from upload_service.body import BodyProgress
from upload_service.cors import Cors, is_preflight
from upload_service.early_answer import answer_before_body_end, discard_body
from upload_service.errors import (
    ClientGone,
    ConfigError,
    InternalError,
    MethodNotAllowed,
    NotFound,
    ServiceUnavailable,
    UploadError,
    UploadRefused,
    as_upload_error,
    cut,
)
from upload_service.files import FilesResource, mount_url
from upload_service.forms import UPLOAD_MULTIPLE_ROUTE, UPLOAD_ROUTE, FormType, UploadRoute, form_answer, form_type_of, store_form
from upload_service.hooks import BeforeUpload, UploadCallback
from upload_service.lifespan import fail_startup, finish_uploads_on_sigterm
from upload_service.logs import set_up_logging
from upload_service.metrics import Metrics, is_server_fault, log_outcome, outcome_of
from upload_service.metricsdir import shared_dir
from upload_service.page import PAGE_CSP, render_page
from upload_service.dialects import method_override, protocol_headers
from upload_service.resumable import ResumableHandlers
from upload_service.routing import Routes, allowed_methods, pick_handler
from upload_service.settings import Config
from upload_service.storage import Record, Store
from upload_service.stores import make_resumable_store, make_store
from upload_service.threads import WRITE_THREADS, WriterPool

__all__ = ["Config", "ConfigError", "UploadApp", "UploadError", "UploadRefused", "app", "create_app"]

Handler = Callable[..., Awaitable[None]]

logger = logging.getLogger("upload_asgi")

# /health logs a store problem when it starts or changes, then at most this often while it lasts:
# a load balancer probing every second would fill the log.
UNAVAILABLE_LOG_SECONDS = 60.0
# At lifespan shutdown, how long requests the server cancelled may take to remove what they wrote.
CLEANUP_SECONDS = 10.0


class UploadApp:
    """The ASGI callable. Build it with `create_app`."""

    def __init__(
        self,
        config: Config | None,
        on_upload: UploadCallback | None = None,
        config_error: str | None = None,
        before_upload: BeforeUpload | None = None,
    ) -> None:
        self.config = config
        self.on_upload = on_upload
        self.on_upload_takes_scope = on_upload is not None and hooks.takes_scope(on_upload)
        self.before_upload = before_upload
        self.cors = Cors(config.cors_origins) if config is not None and config.cors_origins else None
        self.config_error = config_error
        self.metrics = Metrics(shared_dir())
        self.started = False  # by lifespan startup, or by the first request without it
        self.requests: set[asyncio.Task[Any]] = set()  # HTTP requests being handled
        self.unavailable: tuple[str, float] | None = None  # the store problem /health last logged, and when
        self.store: Store | None = None if config is None else make_store(config)
        self.writer: WriterPool | None = None  # started on the first upload
        files = FilesResource(config, self.prepare)
        self.resumable: ResumableHandlers | None = None
        if self.store is not None:
            self.resumable = ResumableHandlers(self, make_resumable_store(config, self.store), files)
        resumable = self.resumable or ResumableHandlers(self, None, files)  # misconfigured: the routes answer 500
        collection = {"GET": files.handle_list, "POST": resumable.handle_create, "OPTIONS": resumable.handle_options}
        # Path template -> method -> handler; a {name} segment is passed as a keyword.
        # HEAD is answered by GET unless a route names its own (/files/<id>: the tus HEAD).
        self.routes = Routes({
            "/": {"GET": self.handle_page},
            "/health": {"GET": self.handle_health},
            "/metrics": {"GET": self.handle_metrics},
            "/upload": {"POST": self.handle_upload},
            "/upload-multiple": {"POST": self.handle_upload_multiple},
            "/files": collection,
            "/files/": collection,  # tusd's base path: tus clients' examples name the endpoint so
            "/files/{file_id}": {
                "GET": resumable.handle_get,
                "HEAD": resumable.handle_head,
                "PATCH": resumable.handle_patch,
                "DELETE": resumable.handle_delete,
                "OPTIONS": resumable.handle_options,
            },
            "/files/{file_id}/record": {"GET": files.handle_record},
            # OPTIONS * (RFC 9110 §9.3.7): every creation route here has the same limits.
            "*": {"OPTIONS": resumable.handle_options},
        })
        # The handlers that read a request's body; any other route's is read and dropped first.
        self.body_readers = {
            self.handle_upload, self.handle_upload_multiple,
            resumable.handle_create, resumable.handle_patch,
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            if not self.started:  # a host that never forwards lifespan (Starlette's Mount)
                self.start()
            task = asyncio.current_task()
            self.requests.add(task)  # type: ignore[arg-type]
            try:
                await self.handle_http(scope, receive, send)
            finally:
                self.requests.discard(task)  # type: ignore[arg-type]
        elif kind == "lifespan":
            await self.handle_lifespan(receive, send)
        elif kind == "websocket":
            # asgiref www.rst: closing before accept makes the server answer 403.
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1003, "reason": "upload-asgi speaks HTTP only"})

    async def handle_lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    self.prepare()
                    self.resumable.sweep()
                except (ConfigError, OSError) as exc:
                    reason = str(exc)
                    if isinstance(exc, OSError):
                        reason = self.store.describe_problem(exc)
                    logger.error("upload-asgi cannot start: %s", reason)
                    await fail_startup(send, reason)
                    return
                self.start()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # The writer threads stay: an upload still running may need them, and
                # idle threads cost nothing (they are joined at interpreter exit).
                await self.let_cancelled_requests_clean_up()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def let_cancelled_requests_clean_up(self) -> None:
        """uvicorn cancels the requests still running at its graceful timeout, sends
        `lifespan.shutdown`, then exits: give them the time to remove their partial files."""
        cancelled = [task for task in self.requests if task.cancelling()]
        if cancelled:
            await asyncio.wait(cancelled, timeout=CLEANUP_SECONDS)

    def start(self) -> None:
        """What startup does besides the store (which `prepare` makes ready on first use)."""
        self.started = True
        if self.config is not None:
            warn_of_open_writes(self.config)
        finish_uploads_on_sigterm()

    def prepare(self) -> Store:
        """Make the store ready (at startup, or on first use when a host skips lifespan)."""
        if self.store is None:
            raise ConfigError(self.config_error or "no configuration")
        self.store.prepare()
        return self.store

    async def handle_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        plain_send = send
        if self.cors is not None:
            send = self.cors.wrap_send(header(scope, b"origin"), send)
        path = route_path(scope)
        try:
            check_framing(scope)
            if (override := method_override(scope, path)) is not None:
                scope = {**scope, "method": override}
        except UploadError as exc:
            if self.is_upload(path, scope["method"]):  # counted and logged as an upload refused
                self.record_outcome(exc, time.monotonic(), BodyProgress(), [])
            await self.answer_draining(receive, send, exc, BodyProgress(), scope, protocol_headers(scope, refusal=True))
            return
        route = self.routes.match(path)
        method = scope["method"]
        handler = None if route is None else pick_handler(route[0], method)
        if handler not in self.body_readers and not body_known_empty(scope) and (error := await discard_body(receive)):
            await self.answer_draining(receive, send, error, BodyProgress(), scope)
            return
        if self.cors is not None and (origin := header(scope, b"origin")) is not None and is_preflight(scope):
            await self.cors.answer_preflight(scope, plain_send, origin)
            return
        head_only = method == "HEAD"
        if route is None:
            await send_error(send, NotFound(f"no route for {cut(path)}"), head_only=head_only)
            return
        methods, params = route
        if handler is None:
            await send_error(
                send,
                MethodNotAllowed(f"{cut(method, 40)} is not allowed on {cut(path)}"),
                headers=[(b"allow", allowed_methods(methods).encode()), *protocol_headers(scope, refusal=True)],
                head_only=head_only,
            )
            return
        if self.config is None:
            logger.error("upload-asgi is misconfigured: %s", self.config_error)
            await send_error(send, InternalError("the server is misconfigured"), head_only=head_only)
            return
        await self.run_handler(handler, scope, receive, send, head_only, params)

    def is_upload(self, path: str, method: str) -> bool:
        route = self.routes.match(path)
        return route is not None and pick_handler(route[0], method) in self.body_readers

    async def run_handler(
        self, handler: Handler, scope: Scope, receive: Receive, send: Send, head_only: bool, params: dict[str, str]
    ) -> None:
        """Run a handler; answer an error it raises before its answer began.

        The upload and resumable handlers answer their own errors (they drain a body
        first, and add the protocol's headers), but for a GET of /files/<id>, which
        raises as the files resource's handlers do. An error after the answer began
        goes up: the server then cuts the connection, so a client never takes a short
        body for a whole one.
        """
        started = False

        async def send_tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await handler(scope, receive, send_tracked, head_only=head_only, **params)
        except Exception as exc:
            if started:
                raise
            error = exc if isinstance(exc, UploadError) else InternalError("the server failed to answer")
            if error is not exc:
                logger.error("%s %s failed", scope["method"], route_path(scope), exc_info=exc)
            await send_error(send, error, head_only=head_only)

    async def handle_page(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False) -> None:
        config = self.config
        body = render_page(scope.get("root_path") or "", config.token is not None, config.read_token is not None)
        headers = ((b"content-security-policy", PAGE_CSP), (b"x-content-type-options", b"nosniff"))
        await send_body(send, 200, body, b"text/html; charset=utf-8", headers, head_only)

    async def handle_health(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False) -> None:
        # A load balancer reads the status: a store that cannot be used (an upload dir
        # not creatable, removed since, read-only) would fail every upload, so it is a 503.
        try:
            facts, status = await self.store.health(), "ok"
        except OSError as exc:
            self.log_unavailable(self.store.describe_problem(exc))
            facts, status = {"reason": public_reason(exc)}, "unavailable"
        else:
            if self.unavailable is not None:
                logger.warning("upload-asgi is available again")
                self.unavailable = None
        payload = {
            "status": status,
            "free_bytes": None,
            **facts,
            "uploads_in_flight": self.metrics.in_flight,
            "max_concurrent": self.config.max_concurrent,
            "max_file_size": self.config.max_file_size,
            "max_request_size": self.config.max_request_size,
            "token_required": self.config.token is not None,
        }
        await send_json(send, 200 if status == "ok" else 503, payload, head_only=head_only)

    def log_unavailable(self, problem: str) -> None:
        now, last = time.monotonic(), self.unavailable
        if last is None or last[0] != problem or now - last[1] >= UNAVAILABLE_LOG_SECONDS:
            logger.warning("upload-asgi is unavailable: %s", problem)
            self.unavailable = (problem, now)

    async def handle_metrics(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False) -> None:
        body = self.metrics.exposition().encode()
        await send_body(send, 200, body, b"text/plain; version=0.0.4; charset=utf-8", head_only=head_only)

    async def handle_upload(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False) -> None:
        await self.receive_upload(scope, receive, send, UPLOAD_ROUTE)

    async def handle_upload_multiple(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False) -> None:
        await self.receive_upload(scope, receive, send, UPLOAD_MULTIPLE_ROUTE)

    async def receive_upload(self, scope: Scope, receive: Receive, send: Send, route: UploadRoute) -> None:
        """Check the request, stream its body into the store, commit, answer; or clean up and say why."""
        started = time.monotonic()
        progress = BodyProgress()
        error: BaseException | None = None
        stored: list[Record] = []
        try:
            try:
                form = self.check_request(scope)
                await self.ask_before_upload(scope)
                self.check_capacity()
                # Only uploads that are being stored count against UPLOAD_MAX_CONCURRENT:
                # a refused request (a missing token, say), answered while the rest of its
                # body is drained, must not take an uploader's place.
                self.metrics.in_flight += 1
                try:
                    stored = await store_form(
                        self.config, self.prepare(), self.write_executor(), form, receive, route, progress,
                        promised_length(scope),
                    )
                finally:
                    self.metrics.in_flight -= 1
                self.metrics.files_stored += len(stored)
                self.metrics.bytes_stored += sum(r["size"] for r in stored)
                await self.notify(stored, scope)
            except BaseException as exc:
                error = exc
                raise
            finally:
                # Counted and logged before the answer: a scrape that follows it sees it.
                self.record_outcome(error, started, progress, stored)
            location = mount_url(scope, f"/files/{stored[0]['id']}").encode()
            await send_json(send, 201, form_answer(stored, route), [(b"location", location)])
        except ClientGone:
            pass
        except Exception as exc:
            await self.answer_error(receive, send, exc, progress, scope)

    def record_outcome(
        self, error: BaseException | None, started: float, progress: BodyProgress, stored: list[Record],
        partial: bool = False,
    ) -> None:
        """Count and log an upload's end (`partial`: a PATCH that appended without finishing)."""
        seconds = time.monotonic() - started
        self.metrics.bytes_received += progress.received
        self.metrics.observe("partial" if partial else outcome_of(error), seconds)
        log_outcome(error, progress.received, seconds, stored)

    def check_request(self, scope: Scope) -> FormType:
        """Refuse what the headers alone already tell, before any body byte; return the form's type."""
        check_write_token(scope, self.config.token)
        form = form_type_of(header(scope, b"content-type"))
        check_declared_size(scope, self.config.max_request_size)
        return form

    async def ask_before_upload(self, scope: Scope) -> None:
        """Let the embedding app refuse the request (UploadRefused) before any body byte."""
        try:
            await hooks.before_upload(self.before_upload, scope)
        except UploadError:
            raise
        except Exception:
            logger.exception("before_upload hook failed")
            raise InternalError("the server's before_upload hook failed") from None

    def check_capacity(self) -> None:
        if self.metrics.in_flight >= self.config.max_concurrent:
            raise ServiceUnavailable(f"more than {self.config.max_concurrent} uploads in flight; retry soon")

    def write_executor(self) -> WriterPool:
        if self.writer is None:
            self.writer = WriterPool(WRITE_THREADS)
        return self.writer

    async def notify(self, records: list[Record], scope: Scope) -> None:
        """Give each stored record (and the request's scope) to the embedding app's callback, if any."""
        if self.on_upload is None:
            return
        for record in records:
            try:
                await hooks.on_upload(self.on_upload, self.on_upload_takes_scope, record, scope)
            except Exception:
                logger.exception("on_upload callback failed for stored file %s", record["id"])
                raise InternalError(
                    "the files were stored but the server's upload hook failed",
                    ids=[r["id"] for r in records],
                ) from None

    async def answer_error(
        self, receive: Receive, send: Send, exc: BaseException, progress: BodyProgress, scope: Scope,
        headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = (),
    ) -> None:
        """The error-to-response boundary of an upload: log a failure as the upload's, and answer."""
        error = as_upload_error(exc)
        if is_server_fault(error):
            logger.error("upload failed: %s", error.detail, exc_info=exc if error is not exc else None)
        await self.answer_draining(receive, send, error, progress, scope, headers)

    async def answer_draining(
        self, receive: Receive, send: Send, error: UploadError, progress: BodyProgress, scope: Scope,
        headers: tuple[tuple[bytes, bytes], ...] | list[tuple[bytes, bytes]] = (),
    ) -> None:
        """Answer with `error`; drain a body not read to its end."""
        if progress.complete:
            await send_error(send, error, headers=headers)
            return
        config = self.config
        await answer_before_body_end(
            receive, send, error, scope.get("http_version", "1.1"), config.min_rate, config.idle_timeout,
            tuple(headers), hold_last_byte=not came_through_a_proxy(scope),
        )


def public_reason(exc: OSError) -> str:
    """Why /health says unavailable, as an upload answer would say it: a store's own error
    says what to fix; an OSError from the upload dir says what failed, not the path (logged)."""
    if isinstance(exc, UploadError):
        return exc.detail
    return f"the store cannot be used: {exc.strerror or type(exc).__name__}"


def warn_of_open_writes(config: Config) -> None:
    """A read token alone looks like a locked-down server, but uploads and deletes stay open."""
    if config.read_token is not None and config.token is None:
        logger.warning("UPLOAD_READ_TOKEN is set but UPLOAD_TOKEN is not: anyone who can reach"
                       " the server may still upload and delete files")


def create_app(
    config: Config | None = None,
    on_upload: UploadCallback | None = None,
    before_upload: BeforeUpload | None = None,
) -> UploadApp:
    """Return an independent upload app; with no config, read it from the environment.

    `before_upload(scope, headers)` may refuse a request by raising `UploadRefused`;
    `on_upload(record)` or `on_upload(record, scope)` is called for each stored file
    (README "Embedding").

    A bad environment does not raise here (that would only show as an import
    traceback), nor is it logged (a host that builds its own app in code would see
    the module-level `app`'s error): the app fails lifespan startup with the message,
    or logs it and answers 500 if a host never runs lifespan.
    """
    if config is None:
        try:
            config = Config.from_env()
            set_up_logging(config.log_level)
            # In the try too: the store can refuse the settings (the S3 client not installed).
            return UploadApp(config, on_upload, before_upload=before_upload)
        except ConfigError as exc:
            set_up_logging("info")
            return UploadApp(None, on_upload, config_error=str(exc), before_upload=before_upload)
    set_up_logging(config.log_level)
    return UploadApp(config, on_upload, before_upload=before_upload)


app = create_app()


if __name__ == "__main__":  # python -m upload_asgi: run hypercorn with the README's defaults
    from upload_service.cli import main

    raise SystemExit(main())

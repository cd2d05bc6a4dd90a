"""upload-asgi: a raw ASGI app that streams multipart/form-data uploads to disk.

Routes, relative to `scope["root_path"]`:

    GET  /                 the upload page (HTML)
    GET  /health           200 {"status": "ok", "free_bytes": N, "uploads_in_flight": N, ...}
                           (503 {"status": "unavailable", ...} if the upload dir is unusable)
    GET  /metrics          Prometheus text
    POST /upload           one file part "file", optional "description" and "sha256"
                           -> 201 record
    POST /upload-multiple  file parts "files", optional "description"
                           -> 201 {"files": [record, ...], "count": N, "total_size": N}

A record is {"id", "filename", "content_type", "size", "sha256", "description"};
`id` names the stored file `<upload dir>/<id>` (sidecar `<id>.json`).

Errors are {"error": code, "detail": text}:

    400 malformed body or no boundary       401 token missing or wrong
    405 other method on a known path        404 unknown path
    408 client idle or too slow             413 a limit passed
    415 not multipart/form-data             422 no file, or sha256 mismatch
    500 unexpected (logged)                 503 too many uploads at once
    507 no space left on the device

A failed request leaves nothing on disk; a client that disconnects gets no answer.
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import html
import inspect
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable, Mapping, MutableMapping

from targets import (
    FormError,
    FormLimits,
    FormReader,
    LimitExceeded,
    UploadFileTarget,
    WriterPool,
    commit_files,
    parse_header_params,
    prepare_upload_dir,
    uncommit_files,
)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Record = dict[str, Any]
UploadCallback = Callable[[Record], Any]

logger = logging.getLogger("upload_asgi")

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Defaults: generous for real files, bounded for everything that lives in memory.
DEFAULT_MAX_FILE_SIZE = 10 * GiB  # an ISO or a disk image; not "any size you like"
DEFAULT_MAX_REQUEST_SIZE = 10 * GiB + 1 * MiB  # one maximal file plus its form around it
DEFAULT_MAX_FILES = 100
DEFAULT_MAX_PARTS = 200  # files and fields together
DEFAULT_MAX_FIELD_SIZE = 64 * KiB  # text fields are held in memory
DEFAULT_IDLE_TIMEOUT = 60.0  # seconds; a browser on a bad link stalls for less
# Bytes per second a body must average once its first idle-timeout has passed: a client
# trickling a byte a minute would otherwise hold an upload slot for ever, and
# UPLOAD_MAX_CONCURRENT of them would shut everyone else out. 1 KiB/s is far below any
# real link; 0 turns the check off.
DEFAULT_MIN_RATE = 1 * KiB
DEFAULT_MAX_CONCURRENT = 64  # each upload holds an fd and up to ~3 MiB of write blocks
# Threads that hash and write files (targets.WRITE_BLOCK_SIZE blocks), per app: the
# event loop parses while they work, mostly without the GIL. No more than the cores:
# on 2 cores, 32 uploads at once went 744 MB/s with 2 threads, 628 with 4 (bench/).
WRITE_THREADS = min(4, os.cpu_count() or 1)
# After an early error answer, how much of the rest of the body we read and drop
# so that the server can still deliver the answer (SPEC §8), and for how long.
DRAIN_LIMIT_BYTES = 16 * MiB
DRAIN_LIMIT_SECONDS = 2.0
RETRY_AFTER_SECONDS = 1

# RFC 2046 §5.1.1: 1-70 characters from bchars, not ending in a space.
BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
SHA256_RE = re.compile(r"[0-9a-fA-F]{64}")
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


# -- errors -------------------------------------------------------------------


class UploadError(Exception):
    status = 400
    code = "bad_request"
    headers: tuple[tuple[bytes, bytes], ...] = ()

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class MalformedBody(UploadError):
    status, code = 400, "malformed_multipart"


class MissingBoundary(UploadError):
    status, code = 400, "missing_boundary"


class Unauthorized(UploadError):
    status, code = 401, "unauthorized"
    headers = ((b"www-authenticate", b'Bearer realm="upload"'),)


class NotFound(UploadError):
    status, code = 404, "not_found"


class MethodNotAllowed(UploadError):
    status, code = 405, "method_not_allowed"


class RequestTimeout(UploadError):
    status, code = 408, "request_timeout"


class PayloadTooLarge(UploadError):
    status, code = 413, "payload_too_large"


class UnsupportedMediaType(UploadError):
    status, code = 415, "unsupported_media_type"


class NoFile(UploadError):
    status, code = 422, "no_file"


class InvalidField(UploadError):
    status, code = 422, "invalid_field"


class ChecksumMismatch(UploadError):
    status, code = 422, "sha256_mismatch"


class ServiceUnavailable(UploadError):
    status, code = 503, "too_many_uploads"
    headers = ((b"retry-after", str(RETRY_AFTER_SECONDS).encode()),)


class InsufficientStorage(UploadError):
    status, code = 507, "insufficient_storage"


class InternalError(UploadError):
    status, code = 500, "internal_error"


class ClientGone(Exception):
    """The client left: clean up, send nothing."""


class ConfigError(ValueError):
    """A setting has a bad value; the message names its environment variable."""


def as_upload_error(exc: BaseException) -> UploadError:
    """Translate any exception from the upload path into the error the client sees."""
    if isinstance(exc, UploadError):
        return exc
    if isinstance(exc, LimitExceeded):
        return PayloadTooLarge(str(exc), limit=exc.limit, max=exc.maximum)
    if isinstance(exc, FormError):
        return MalformedBody(str(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage("no space left on the upload device")
    return InternalError("the server failed to store the upload")


# -- configuration --------------------------------------------------------------

SIZE_RE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE)
SIZE_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": 1024 * GiB}


def parse_size(text: str) -> int:
    """Parse `123`, `64K`, `500M`, `10G` (binary units: 1M = 2**20 bytes)."""
    match = SIZE_RE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a size like 1048576, 64K, 500M or 10G")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not 1 or 0")


def parse_seconds(text: str) -> float:
    value = float(text)
    if not value > 0 or value != value or value == float("inf"):
        raise ValueError(f"{text!r} is not a positive number of seconds")
    return value


def parse_count(text: str) -> int:
    return int(text.strip())


def parse_dir(text: str) -> Path:
    # An empty UPLOAD_DIR would silently mean the working directory.
    if not text.strip() or "\0" in text:
        raise ValueError(f"{text!r} is not a directory path")
    return Path(text)


def parse_token(text: str) -> str:
    # RFC 6750 §2.1: a bearer token is visible ASCII; anything else could never match a header.
    if any(not "!" <= c <= "~" for c in text):
        raise ValueError("the token must be visible ASCII characters without spaces")
    return text


@dataclass(frozen=True)
class Config:
    upload_dir: Path = Path("uploads")
    max_file_size: int = DEFAULT_MAX_FILE_SIZE
    max_request_size: int = DEFAULT_MAX_REQUEST_SIZE
    max_files: int = DEFAULT_MAX_FILES
    max_parts: int = DEFAULT_MAX_PARTS
    max_field_size: int = DEFAULT_MAX_FIELD_SIZE
    token: str | None = None
    fsync: bool = True
    idle_timeout: float = DEFAULT_IDLE_TIMEOUT
    max_concurrent: int = DEFAULT_MAX_CONCURRENT
    min_rate: int = DEFAULT_MIN_RATE

    def __post_init__(self) -> None:
        # Values given in code are held to the same rules as the environment's.
        for name, variable in ENV_VARS.items():
            try:
                object.__setattr__(self, name, SETTING_CHECKS[name](getattr(self, name)))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{variable}: {exc}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read every setting from its environment variable; unset means default."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name, variable in ENV_VARS.items():
            text = environ.get(variable)
            if text is None:
                continue
            try:
                values[name] = ENV_PARSERS[name](text)
            except ValueError as exc:
                raise ConfigError(f"{variable}: {exc}") from None
        return cls(**values)

    @property
    def limits(self) -> FormLimits:
        return FormLimits(
            max_file_size=self.max_file_size,
            max_field_size=self.max_field_size,
            max_files=self.max_files,
            max_parts=self.max_parts,
        )


ENV_VARS = {
    "upload_dir": "UPLOAD_DIR",
    "max_file_size": "UPLOAD_MAX_FILE_SIZE",
    "max_request_size": "UPLOAD_MAX_REQUEST_SIZE",
    "max_files": "UPLOAD_MAX_FILES",
    "max_parts": "UPLOAD_MAX_PARTS",
    "max_field_size": "UPLOAD_MAX_FIELD_SIZE",
    "token": "UPLOAD_TOKEN",
    "fsync": "UPLOAD_FSYNC",
    "idle_timeout": "UPLOAD_IDLE_TIMEOUT",
    "max_concurrent": "UPLOAD_MAX_CONCURRENT",
    "min_rate": "UPLOAD_MIN_RATE",
}
ENV_PARSERS: dict[str, Callable[[str], Any]] = {
    "upload_dir": parse_dir,
    "max_file_size": parse_size,
    "max_request_size": parse_size,
    "max_files": parse_count,
    "max_parts": parse_count,
    "max_field_size": parse_size,
    "token": parse_token,
    "fsync": parse_bool,
    "idle_timeout": parse_seconds,
    "max_concurrent": parse_count,
    "min_rate": parse_size,
}
POSITIVE_SETTINGS = {
    "max_file_size", "max_request_size", "max_files", "max_parts",
    "max_field_size", "idle_timeout", "max_concurrent",
}


def check_dir(value: Any) -> Path:
    if isinstance(value, str):
        return parse_dir(value)
    if not isinstance(value, os.PathLike):
        raise TypeError(f"{value!r} is not a directory path")
    path = Path(value)
    if "\0" in str(path):
        raise ValueError(f"{value!r} is not a directory path")
    return path


def as_whole(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():  # 2e9 in code means 2000000000
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not a whole number")
    return value


def check_whole(value: Any) -> int:
    value = as_whole(value)
    if value <= 0:
        raise ValueError(f"must be positive, got {value!r}")
    return value


def check_rate(value: Any) -> int:
    value = as_whole(value)
    if value < 0:
        raise ValueError(f"must be 0 (off) or more, got {value!r}")
    return value


def check_seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{value!r} is not a number of seconds")
    if not 0 < value < float("inf"):  # NaN fails both
        raise ValueError(f"must be a positive number of seconds, got {value!r}")
    return float(value)


def check_flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{value!r} is not True or False")
    return value


def check_token(value: Any) -> str | None:
    if value is None or value == "":  # no token
        return None
    if not isinstance(value, str):
        raise TypeError("the token must be a string")
    return parse_token(value)


SETTING_CHECKS: dict[str, Callable[[Any], Any]] = {
    "upload_dir": check_dir,
    "token": check_token,
    "fsync": check_flag,
    "idle_timeout": check_seconds,
    "min_rate": check_rate,
    **{name: check_whole for name in POSITIVE_SETTINGS - {"idle_timeout"}},
}


# -- small pure helpers -----------------------------------------------------------


def header(scope: Scope, name: bytes) -> str | None:
    """Return the first value of a request header (names are lowercase in ASGI)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def route_path(scope: Scope) -> str:
    """Return the path relative to the mount point.

    Hosts disagree on whether `path` includes `root_path` (Starlette's Mount and
    hypercorn's DispatcherMiddleware keep it, `hypercorn --root-path` behind a
    prefix-stripping proxy does not), so strip it only when it is there, at a `/`
    boundary.
    """
    path = scope.get("path") or "/"
    root = scope.get("root_path") or ""
    if root and (path == root or path.startswith(root.rstrip("/") + "/")):
        path = path[len(root.rstrip("/")):]
    return path or "/"


def boundary_of(content_type: str | None) -> bytes:
    """Return the multipart boundary of a request Content-Type, or raise the error."""
    if not content_type:
        raise UnsupportedMediaType("Content-Type must be multipart/form-data")
    media_type, params = parse_header_params(content_type)
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(f"Content-Type must be multipart/form-data, not {media_type!r}")
    boundary = params.get("boundary")
    if not boundary:
        raise MissingBoundary("the multipart/form-data Content-Type has no boundary")
    if not BOUNDARY_RE.fullmatch(boundary):
        raise MissingBoundary("the multipart boundary is not valid (RFC 2046 §5.1.1)")
    return boundary.encode("ascii")


def declared_length(scope: Scope) -> int | None:
    text = header(scope, b"content-length")
    text = (text or "").strip()
    return int(text) if text.isascii() and text.isdigit() else None


def bearer_token_matches(scope: Scope, token: str) -> bool:
    """Compare the request's bearer token with ours in constant time."""
    scheme, _, given = (header(scope, b"authorization") or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def json_bytes(payload: Any) -> bytes:
    return json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode()


def error_payload(error: UploadError) -> dict[str, Any]:
    return {"error": error.code, "detail": error.detail, **error.extra}


def make_record(target: UploadFileTarget, description: str | None) -> Record:
    return {
        "id": target.id,
        "filename": target.filename,
        "content_type": target.content_type,
        "size": target.size,
        "sha256": target.sha256,
        "description": description,
    }


# -- responses ------------------------------------------------------------------


Headers = Iterable[tuple[bytes, bytes]]


async def send_body(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: Headers = (),
    head_only: bool = False,
    more_body: bool = False,
) -> None:
    """Answer with an exact content-length; `more_body` leaves the response open."""
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", content_type),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    })
    await send({"type": "http.response.body", "body": b"" if head_only else body, "more_body": more_body})


async def send_json(send: Send, status: int, payload: Any, headers: Headers = (), head_only: bool = False) -> None:
    await send_body(send, status, json_bytes(payload), b"application/json", headers, head_only)


async def send_error(
    send: Send, error: UploadError, headers: Headers = (), head_only: bool = False, more_body: bool = False
) -> None:
    body = json_bytes(error_payload(error))
    headers = (*error.headers, *headers)
    await send_body(send, error.status, body, b"application/json", headers, head_only, more_body)


def upload_dir_problem(upload_dir: Path, exc: OSError) -> str:
    return f"UPLOAD_DIR: cannot use {upload_dir}: {exc.strerror or exc}"


# -- metrics --------------------------------------------------------------------


@dataclass
class Metrics:
    """Counters for /metrics; one set per app (per worker process)."""

    outcomes: dict[str, int] = field(default_factory=dict)
    bytes_received: int = 0
    bytes_stored: int = 0
    files_stored: int = 0
    in_flight: int = 0
    duration_counts: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    duration_sum: float = 0.0
    duration_count: int = 0

    def observe(self, outcome: str, seconds: float) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.duration_sum += seconds
        self.duration_count += 1
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.duration_counts[i] += 1

    def exposition(self) -> str:
        lines = [
            "# HELP upload_asgi_uploads_total Upload requests by outcome.",
            "# TYPE upload_asgi_uploads_total counter",
        ]
        for outcome in sorted(set(self.outcomes) | {"stored", "rejected", "failed", "disconnected"}):
            lines.append(f'upload_asgi_uploads_total{{outcome="{outcome}"}} {self.outcomes.get(outcome, 0)}')
        lines += [
            "# HELP upload_asgi_received_bytes_total Request body bytes received by upload routes.",
            "# TYPE upload_asgi_received_bytes_total counter",
            f"upload_asgi_received_bytes_total {self.bytes_received}",
            "# HELP upload_asgi_stored_bytes_total Bytes of files stored.",
            "# TYPE upload_asgi_stored_bytes_total counter",
            f"upload_asgi_stored_bytes_total {self.bytes_stored}",
            "# HELP upload_asgi_stored_files_total Files stored.",
            "# TYPE upload_asgi_stored_files_total counter",
            f"upload_asgi_stored_files_total {self.files_stored}",
            "# HELP upload_asgi_uploads_in_flight Uploads being received now.",
            "# TYPE upload_asgi_uploads_in_flight gauge",
            f"upload_asgi_uploads_in_flight {self.in_flight}",
            "# HELP upload_asgi_upload_duration_seconds Time from request start to answer.",
            "# TYPE upload_asgi_upload_duration_seconds histogram",
        ]
        for bound, count in zip(DURATION_BUCKETS, self.duration_counts):
            lines.append(f'upload_asgi_upload_duration_seconds_bucket{{le="{bound}"}} {count}')
        lines += [
            f'upload_asgi_upload_duration_seconds_bucket{{le="+Inf"}} {self.duration_count}',
            f"upload_asgi_upload_duration_seconds_sum {self.duration_sum:.6f}",
            f"upload_asgi_upload_duration_seconds_count {self.duration_count}",
        ]
        return "\n".join(lines) + "\n"


def outcome_of(error: BaseException | None) -> str:
    if error is None:
        return "stored"
    if isinstance(error, (ClientGone, asyncio.CancelledError)):  # cancelled: the server let go
        return "disconnected"
    return "failed" if is_server_fault(as_upload_error(error)) else "rejected"


def is_server_fault(error: UploadError) -> bool:
    """A 5xx for something that went wrong here; too_many_uploads is load shed on purpose."""
    return error.status >= 500 and not isinstance(error, ServiceUnavailable)


# -- the application -----------------------------------------------------------------


@dataclass(frozen=True)
class UploadRoute:
    """What an upload endpoint reads: its file field, how many files, its text fields."""

    file_field: str
    single: bool
    text_fields: tuple[str, ...]


UPLOAD_ROUTE = UploadRoute("file", single=True, text_fields=("description", "sha256"))
UPLOAD_MULTIPLE_ROUTE = UploadRoute("files", single=False, text_fields=("description",))


class UploadApp:
    """The ASGI callable. Build it with `create_app`."""

    def __init__(
        self,
        config: Config | None,
        on_upload: UploadCallback | None = None,
        config_error: str | None = None,
    ) -> None:
        self.config = config
        self.on_upload = on_upload
        self.config_error = config_error
        self.metrics = Metrics()
        self.partial_dir: Path | None = None
        self.writer: WriterPool | None = None  # started on the first upload
        self.routes: dict[str, dict[str, Callable[..., Awaitable[None]]]] = {
            "/": {"GET": self.handle_page},
            "/health": {"GET": self.handle_health},
            "/metrics": {"GET": self.handle_metrics},
            "/upload": {"POST": self.handle_upload},
            "/upload-multiple": {"POST": self.handle_upload_multiple},
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self.handle_http(scope, receive, send)
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
                except (ConfigError, OSError) as exc:
                    reason = str(exc)
                    if isinstance(exc, OSError):  # only the upload dir is touched here
                        reason = upload_dir_problem(self.config.upload_dir, exc)
                    logger.error("upload-asgi cannot start: %s", reason)
                    await send({"type": "lifespan.startup.failed", "message": reason})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                # The writer threads stay: an upload still running may need them, and
                # idle threads cost nothing (they are joined at interpreter exit).
                await send({"type": "lifespan.shutdown.complete"})
                return

    def prepare(self) -> Path:
        """Create the upload dirs and sweep stale partial files; again if they were removed.

        Called at lifespan startup, or on first use when a host does not forward
        lifespan to a mounted app; then checked (one stat) on every upload and /health.
        """
        if self.config is None:
            raise ConfigError(self.config_error or "no configuration")
        if self.partial_dir is None or not self.partial_dir.is_dir():
            self.partial_dir = prepare_upload_dir(self.config.upload_dir)
        return self.partial_dir

    async def handle_http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = route_path(scope)
        methods = self.routes.get(path)
        method = scope["method"]
        head_only = method == "HEAD"
        if methods is None:
            await send_error(send, NotFound(f"no route for {path}"), head_only=head_only)
            return
        handler = methods.get("GET" if head_only else method)
        if handler is None:
            allowed = sorted({*methods, *(["HEAD"] if "GET" in methods else [])})
            await send_error(
                send,
                MethodNotAllowed(f"{method} is not allowed on {path}"),
                headers=[(b"allow", ", ".join(allowed).encode())],
                head_only=head_only,
            )
            return
        if self.config is None:
            logger.error("upload-asgi is misconfigured: %s", self.config_error)
            await send_error(send, InternalError("the server is misconfigured"), head_only=head_only)
            return
        await handler(scope, receive, send, head_only=head_only)

    async def handle_page(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False) -> None:
        body = render_page(scope.get("root_path") or "", self.config.token is not None)
        headers = ((b"content-security-policy", PAGE_CSP), (b"x-content-type-options", b"nosniff"))
        await send_body(send, 200, body, b"text/html; charset=utf-8", headers, head_only)

    async def handle_health(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False) -> None:
        # A load balancer reads the status: an upload dir that cannot be used (not
        # creatable, removed since) would fail every upload, so it is a 503.
        try:
            partial_dir = self.prepare()
            if not os.access(partial_dir, os.W_OK):  # a read-only mount, a chmod
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))
            free = shutil.disk_usage(partial_dir).free
        except OSError as exc:
            logger.warning("upload-asgi is unavailable: %s", upload_dir_problem(self.config.upload_dir, exc))
            free = None
        payload = {
            "status": "ok" if free is not None else "unavailable",
            "free_bytes": free,
            "uploads_in_flight": self.metrics.in_flight,
            "max_concurrent": self.config.max_concurrent,
            "max_file_size": self.config.max_file_size,
            "max_request_size": self.config.max_request_size,
            "token_required": self.config.token is not None,
        }
        await send_json(send, 200 if free is not None else 503, payload, head_only=head_only)

    async def handle_metrics(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False) -> None:
        body = self.metrics.exposition().encode()
        await send_body(send, 200, body, b"text/plain; version=0.0.4; charset=utf-8", head_only=head_only)

    async def handle_upload(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False) -> None:
        await self.receive_upload(scope, receive, send, UPLOAD_ROUTE)

    async def handle_upload_multiple(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False) -> None:
        await self.receive_upload(scope, receive, send, UPLOAD_MULTIPLE_ROUTE)

    async def receive_upload(self, scope: Scope, receive: Receive, send: Send, route: UploadRoute) -> None:
        """Check the request, stream its body to disk, commit, answer; or clean up and say why."""
        started = time.monotonic()
        progress = BodyProgress()
        error: BaseException | None = None
        stored: list[Record] = []
        try:
            boundary = self.check_request(scope)
            # Only uploads that are being stored count against UPLOAD_MAX_CONCURRENT:
            # a refused request (a missing token, say), answered while the rest of its
            # body is drained, must not take an uploader's place.
            self.metrics.in_flight += 1
            try:
                stored = await self.store_form(boundary, receive, route, progress)
            finally:
                self.metrics.in_flight -= 1
            await send_json(send, 201, self.answer(stored, route))
        except ClientGone as exc:
            error = exc
        except Exception as exc:
            error = exc
            await self.answer_error(receive, send, exc, progress, scope.get("http_version", "1.1"))
        except BaseException as exc:  # cancelled, or the process is stopping
            error = exc
            raise
        finally:
            self.metrics.bytes_received += progress.received
            self.metrics.observe(outcome_of(error), time.monotonic() - started)
            self.log_outcome(error, progress, time.monotonic() - started, stored)

    def check_request(self, scope: Scope) -> bytes:
        """Refuse what the headers alone already tell, before any body byte; return the boundary."""
        config = self.config
        if config.token is not None and not bearer_token_matches(scope, config.token):
            raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")
        boundary = boundary_of(header(scope, b"content-type"))
        length = declared_length(scope)
        if length is not None and length > config.max_request_size:
            raise PayloadTooLarge(
                f"the request body is larger than {config.max_request_size} bytes",
                limit="request_size", max=config.max_request_size,
            )
        if self.metrics.in_flight >= config.max_concurrent:
            raise ServiceUnavailable(f"more than {config.max_concurrent} uploads in flight; retry soon")
        return boundary

    async def store_form(
        self, boundary: bytes, receive: Receive, route: UploadRoute, progress: BodyProgress
    ) -> list[Record]:
        config = self.config
        partial_dir = self.prepare()
        limits = config.limits
        if route.single:
            limits = replace(limits, max_files=1)
        reader = FormReader(
            boundary,
            partial_dir,
            limits,
            file_field=route.file_field,
            text_fields=route.text_fields,
            executor=self.write_executor(),
        )
        try:
            await self.read_body(receive, reader, progress)
            reader.close()
            for target in reader.files:  # the last block of each file
                if target.job is not None:
                    await asyncio.wrap_future(target.job)
            records = self.check_form(reader, route)
            pairs = list(zip(reader.files, records))
            await commit_in_thread(config.upload_dir, partial_dir, pairs, config.fsync)
        except BaseException as exc:
            # Off the loop: abort waits for a writer thread's block (a slow disk must
            # not stall every other request), and is waited for even if cancelled again.
            aborting = asyncio.get_running_loop().run_in_executor(None, reader.abort)
            cancelled = await wait_through_cancel(aborting)
            if aborting.exception() is not None:  # a close that failed; the upload failed anyway
                logger.warning("cleaning up a failed upload failed", exc_info=aborting.exception())
            if cancelled and not isinstance(exc, asyncio.CancelledError):
                raise asyncio.CancelledError from exc
            raise
        self.metrics.files_stored += len(records)
        self.metrics.bytes_stored += sum(r["size"] for r in records)
        await self.notify(records)
        return records

    def write_executor(self) -> WriterPool:
        if self.writer is None:
            self.writer = WriterPool(WRITE_THREADS)
        return self.writer

    async def read_body(self, receive: Receive, reader: FormReader, progress: BodyProgress) -> None:
        """Feed every http.request body chunk to the reader, within the limits."""
        limit = self.config.max_request_size
        idle = self.config.idle_timeout
        loop = asyncio.get_running_loop()
        floor = RateFloor(self.config.min_rate, grace=idle, started=loop.time())
        try:
            async with asyncio.timeout(idle) as deadline:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        raise ClientGone()
                    chunk = message.get("body", b"")
                    progress.received += len(chunk)
                    if progress.received > limit:
                        raise PayloadTooLarge(
                            f"the request body is larger than {limit} bytes",
                            limit="request_size", max=limit,
                        )
                    if chunk:
                        reader.feed(chunk)
                        if (job := reader.write_backlog()) is not None:
                            deadline.reschedule(None)  # a slow disk is not an idle client
                            waiting_since = loop.time()
                            while job is not None:  # backpressure: the disk is behind
                                await asyncio.wrap_future(job)
                                job = reader.write_backlog()
                            floor.paused += loop.time() - waiting_since  # nor a slow one
                    # www.rst: more_body defaults to False.
                    if not message.get("more_body", False):
                        progress.complete = True
                        return
                    now = loop.time()
                    floor.check(progress.received, now)
                    deadline.reschedule(now + idle)
        except TimeoutError:
            if deadline.expired():  # ours, not an OSError with ETIMEDOUT from below
                raise RequestTimeout(f"the client sent no body bytes for {idle:g} seconds") from None
            raise

    def check_form(self, reader: FormReader, route: UploadRoute) -> list[Record]:
        """Validate a complete form and build the records of its files."""
        if not reader.files:
            raise NoFile(f"the form has no file part named {route.file_field!r} with a filename")
        description = reader.field("description")
        records = [make_record(target, description) for target in reader.files]
        expected = reader.field("sha256") if "sha256" in route.text_fields else None
        if expected is not None:
            # The field, or a digest file's first word (`sha256sum` writes "<hex>  <name>").
            expected = (expected.split() or [""])[0]
            if not SHA256_RE.fullmatch(expected):
                raise InvalidField("the sha256 field must be 64 hexadecimal digits")
            if expected.lower() != records[0]["sha256"]:
                raise ChecksumMismatch(
                    f"the file's SHA-256 is {records[0]['sha256']}, not {expected.lower()}",
                    sha256=records[0]["sha256"],
                )
        return records

    async def notify(self, records: list[Record]) -> None:
        """Give each stored record to the embedding app's callback, if any."""
        if self.on_upload is None:
            return
        for record in records:
            try:
                result = self.on_upload(dict(record))
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("on_upload callback failed for stored file %s", record["id"])
                raise InternalError(
                    "the files were stored but the server's upload hook failed",
                    ids=[r["id"] for r in records],
                ) from None

    def answer(self, records: list[Record], route: UploadRoute) -> Any:
        if route.single:
            return records[0]
        return {"files": records, "count": len(records), "total_size": sum(r["size"] for r in records)}

    async def answer_error(
        self, receive: Receive, send: Send, exc: BaseException, progress: BodyProgress, http_version: str
    ) -> None:
        """Answer an error; if the body was not read to its end, close the connection."""
        error = as_upload_error(exc)
        if is_server_fault(error):
            logger.error("upload failed: %s", error.detail, exc_info=exc if error is not exc else None)
        if progress.complete:
            await send_error(send, error)
            return
        if http_version == "2":
            # Hypercorn 0.18 forgets an HTTP/2 stream as soon as its response ends, and
            # a DATA frame the client still sends then raises KeyError in its h2
            # protocol and drops the whole connection, other uploads included (a
            # browser's parallel uploads, or every client behind an HTTP/2 proxy). So
            # the answer stays open while we read and drop the rest of the body for as
            # long as it keeps coming, within what a valid request may send and one
            # idle timeout (a refused client must not hold a stream for ever); a client
            # that stopped when it saw the answer gets the end of it 2 s later.
            await send_error(send, error, more_body=True)
            await drain_body(
                receive,
                max_bytes=max(self.config.max_request_size - progress.received, 0),
                seconds=max(self.config.idle_timeout, DRAIN_LIMIT_SECONDS),
                pause=DRAIN_LIMIT_SECONDS,
            )
            await send({"type": "http.response.body", "body": b""})
            return
        # Keep receiving while we answer: hypercorn 0.18 puts http.disconnect into the
        # receive queue inside our final send and blocks there while that queue (10
        # messages) is full (SPEC §8), as it is whenever something awaited between our
        # last receive() and this answer (a middleware's send, say). Once the answer is
        # out, read a bounded rest so that the server can deliver it and close.
        reading = asyncio.ensure_future(read_to_end(receive))
        try:
            await send_error(send, error, headers=((b"connection", b"close"),))
        finally:
            reading.cancel()  # nothing if it saw the end already
        await asyncio.wait([reading])
        if reading.cancelled():
            await drain_body(receive, DRAIN_LIMIT_BYTES, DRAIN_LIMIT_SECONDS)
        elif reading.exception() is not None:
            logger.debug("reading the rest of a refused body failed", exc_info=reading.exception())

    def log_outcome(
        self, error: BaseException | None, progress: BodyProgress, seconds: float, stored: list[Record]
    ) -> None:
        """Log one line per stored file, or one line for a request that stored nothing."""
        if error is None:
            rate = progress.received / seconds / 1e6 if seconds > 0 else 0.0
            for record in stored:
                logger.info(
                    "upload stored: id=%s size=%d sha256=%s in %.3f s (%.1f MB/s)",
                    record["id"], record["size"], record["sha256"], seconds, rate,
                )
        elif isinstance(error, ClientGone):
            logger.info("upload abandoned by the client after %d bytes", progress.received)
        elif isinstance(error, asyncio.CancelledError):
            logger.info("upload cancelled by the server after %d bytes", progress.received)
        else:
            failure = as_upload_error(error)
            logger.info(
                "upload refused: %d %s after %d bytes: %s",
                failure.status, failure.code, progress.received, failure.detail,
            )


async def commit_in_thread(
    upload_dir: Path, partial_dir: Path, pairs: list[tuple[UploadFileTarget, Record]], fsync: bool
) -> None:
    """Run `commit_files` on a thread (it fsyncs); if cancelled meanwhile, undo it.

    A thread cannot be stopped: cleaning up on the loop while it still renames and
    closes the same files would race it. So wait for it, however often this task is
    cancelled meanwhile, then remove what it stored (a request stores all its files
    or none). A plain executor future, not a task: a server shutting down cancels
    every task, and a cancelled task would no longer say whether the commit happened.
    """
    loop = asyncio.get_running_loop()
    commit = loop.run_in_executor(None, commit_files, upload_dir, partial_dir, pairs, fsync)
    if await wait_through_cancel(commit):
        if commit.exception() is None:
            undo = loop.run_in_executor(None, uncommit_files, upload_dir, [target for target, _ in pairs])
            await wait_through_cancel(undo)
            if undo.exception() is not None:
                logger.error("a cancelled upload stays stored: undoing its commit failed", exc_info=undo.exception())
        raise asyncio.CancelledError
    commit.result()  # a failed commit (ENOSPC) raises here


async def wait_through_cancel(future: asyncio.Future[Any]) -> bool:
    """Wait until `future` (work on a thread, which cannot be stopped) is done, even if
    this task is cancelled meanwhile; return whether it was, for the caller to re-raise."""
    cancelled = False
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError:
            cancelled = True
    return cancelled


@dataclass
class RateFloor:
    """UPLOAD_MIN_RATE: once `grace` seconds have passed, a body must have averaged
    `rate` bytes a second since `started`, not counting the time we made it wait."""

    rate: int
    grace: float
    started: float
    paused: float = 0.0

    def check(self, received: int, now: float) -> None:
        elapsed = now - self.started - self.paused
        if self.rate and elapsed > self.grace and received < self.rate * (elapsed - self.grace):
            raise RequestTimeout(
                f"the client sent {received} bytes in {elapsed:.1f} s, slower than {self.rate} bytes"
                f" a second after the first {self.grace:g} s"
            )


@dataclass
class BodyProgress:
    received: int = 0
    complete: bool = False


async def read_to_end(receive: Receive) -> None:
    """Read and drop body messages until the body ends or the client leaves."""
    while True:
        message = await receive()
        if message["type"] != "http.request" or not message.get("more_body", False):
            return


async def drain_body(receive: Receive, max_bytes: int, seconds: float, pause: float | None = None) -> None:
    """Read and drop what is left of a body until it ends, passes `max_bytes`, `seconds`
    have gone by, or (with `pause`) it stops coming for that long (SPEC §8).

    Hypercorn 0.18 stops reading a connection whose app returned while its receive
    queue was full; draining lets it deliver our answer and then close. Over HTTP/2
    it also keeps hypercorn from dropping the connection (see answer_error).
    """
    drained = 0
    try:
        async with asyncio.timeout(seconds):
            while drained < max_bytes:
                async with asyncio.timeout(pause):  # None: no bound per message
                    message = await receive()
                if message["type"] != "http.request" or not message.get("more_body", False):
                    return
                drained += len(message.get("body", b""))
    except TimeoutError:
        pass


def create_app(config: Config | None = None, on_upload: UploadCallback | None = None) -> UploadApp:
    """Return an independent upload app; with no config, read it from the environment.

    A bad environment does not raise here (that would only show as an import
    traceback); the app logs it, fails lifespan startup with the message, and
    answers 500 if a host never runs lifespan.
    """
    if config is None:
        try:
            config = Config.from_env()
        except ConfigError as exc:
            logger.error("upload-asgi configuration error: %s", exc)
            return UploadApp(None, on_upload, config_error=str(exc))
    return UploadApp(config, on_upload)


# -- the upload page ------------------------------------------------------------------


# The page is self-contained: it may only talk to this server and post its form here.
# Inline script and style are its own (it puts client data in the DOM with textContent
# only); the policy keeps anything else from loading or sending data elsewhere.
PAGE_CSP = (
    b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    b"img-src data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


def render_page(root_path: str, token_required: bool) -> bytes:
    """Return the upload page, with its URLs under `root_path`."""
    root = root_path.rstrip("/")
    settings = json_bytes({"root": root, "tokenRequired": token_required}).decode()
    # Keep "</script>" or "<!--" in a value from ending the inline script; \u003c is
    # the same character to JSON. U+2028/9 are escaped for engines older than ES2019.
    settings = settings.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    slots = {"__SETTINGS__": settings, "__ROOT__": html.escape(root, quote=True)}
    # One pass, so a root_path containing "__ROOT__" is not substituted twice.
    return re.sub("__SETTINGS__|__ROOT__", lambda m: slots[m.group()], PAGE_HTML).encode()


# --- page start (the upload page; edited as one block) ---
PAGE_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<link rel="icon" href="data:,">
<title>Upload files</title>
<style>
:root {
  --bg: #ffffff; --fg: #1b1c1f; --muted: #4d5059; --line: #c4c7cf; --zone: #f2f5fb;
  --accent: #0b57d0; --on-accent: #ffffff; --error: #a8201a; --ok: #12652a; --focus: #0b57d0;
  --mono: ui-monospace, "SFMono-Regular", "DejaVu Sans Mono", Menlo, Consolas, monospace;
}
@media (prefers-color-scheme: dark) {
  :root {
    --bg: #131417; --fg: #e8e8ec; --muted: #b6b8c0; --line: #4a4d55; --zone: #1d2029;
    --accent: #a8c7fa; --on-accent: #0a2a5e; --error: #ffb4ab; --ok: #7ddc97; --focus: #a8c7fa;
  }
}
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--fg);
  font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; }
main { max-width: 76rem; margin: 0 auto; padding: 1.5rem 1rem 3rem; }
h1 { font-size: 1.6rem; margin: 0 0 .25rem; }
h2 { font-size: 1.2rem; margin: 0; }
p { margin: 0; }
code { font-family: var(--mono); font-size: .875rem; }
.lead, .help { color: var(--muted); }
.help { font-size: .875rem; }
.fields { display: flex; flex-wrap: wrap; gap: 1rem; margin: 1.25rem 0 1rem; }
.field { flex: 1 1 18rem; max-width: 40rem; display: flex; flex-direction: column; gap: .25rem; }
.field[hidden] { display: none; }
label { font-weight: 600; }
.optional { font-weight: 400; color: var(--muted); }
input[type=text], input[type=password] { font: inherit; color: inherit; background: var(--bg);
  border: 1px solid var(--muted); border-radius: .375rem; padding: .5rem .625rem; width: 100%; }
button { font: inherit; font-size: .875rem; cursor: pointer; border-radius: .375rem; padding: .3rem .75rem;
  border: 1px solid var(--accent); background: var(--bg); color: var(--fg); }
button.primary { background: var(--accent); color: var(--on-accent); }
:focus-visible { outline: 3px solid var(--focus); outline-offset: 2px; }
.zone { position: relative; border: 2px dashed var(--muted); border-radius: .75rem; background: var(--zone);
  text-align: center; padding: 2.25rem 1rem; }
.zone:focus-within { outline: 3px solid var(--focus); outline-offset: 3px; }
.zone.over { border-style: solid; border-color: var(--accent); }
.zone label { display: block; font-size: 1.15rem; }
.zone .link { color: var(--accent); text-decoration: underline; }
/* The real file input covers the zone: a click anywhere opens the picker, and it
   keeps the keyboard (Tab, then Enter or Space) and screen readers working. */
.picker { position: absolute; inset: 0; width: 100%; height: 100%; opacity: 0; cursor: pointer; }
.status { min-height: 1.5rem; margin: .75rem 0; font-weight: 600; }
.results[hidden] { display: none; }
.results header { display: flex; align-items: center; justify-content: space-between; gap: 1rem; margin: 1rem 0 .5rem; }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; vertical-align: top; padding: .6rem .5rem; border-bottom: 1px solid var(--line); }
thead th { font-size: .875rem; color: var(--muted); border-bottom: 2px solid var(--line); }
tbody th { font-weight: 600; overflow-wrap: anywhere; min-width: 6rem; }
td.size { white-space: nowrap; }
td.state { min-width: 12rem; }
td.sha, td.id { overflow-wrap: anywhere; }
/* Two even lines each: 64 hex digits as 2 x 32, a 32-digit id as 2 x 16. */
td.sha code { display: block; width: 32ch; }
td.id code { display: block; width: 16ch; }
progress { width: 100%; height: .75rem; accent-color: var(--accent); vertical-align: middle; }
.bar { display: flex; align-items: center; gap: .5rem; }
.bar progress { flex: 1; }
.pct { font-variant-numeric: tabular-nums; min-width: 3.5em; text-align: right; font-size: .875rem; }
.stats { font-size: .875rem; color: var(--muted); font-variant-numeric: tabular-nums; }
.msg { font-size: .9rem; }
tr[data-state=error] .msg { color: var(--error); font-weight: 600; }
tr[data-state=done] .msg { color: var(--ok); font-weight: 600; }
.actions { margin-top: .35rem; display: flex; gap: .5rem; flex-wrap: wrap; }
.actions button[hidden], .copy[hidden] { display: none; }
.copy { margin-top: .35rem; }
.visually-hidden { position: absolute; width: 1px; height: 1px; margin: -1px; padding: 0; overflow: hidden;
  clip: rect(0 0 0 0); white-space: nowrap; border: 0; }
/* Narrow windows: each upload becomes a block, each cell says what it is. */
@media (max-width: 56rem) {
  thead { position: absolute; width: 1px; height: 1px; overflow: hidden; clip: rect(0 0 0 0); }
  table, tbody, tr, th, td { display: block; }
  tr { border: 1px solid var(--line); border-radius: .5rem; margin-bottom: .75rem; padding: .25rem .5rem; }
  th, td { border: 0; padding: .3rem 0; min-width: 0; }
  td.state { min-width: 0; }
  td[data-label]::before { content: attr(data-label); display: block; font-size: .8rem; font-weight: 600; color: var(--muted); }
  td.sha code, td.id code { width: auto; }
  tr:not([data-state=done]) td.sha, tr:not([data-state=done]) td.id { display: none; }
}
</style>
</head>
<body>
<main>
<h1>Upload files</h1>
<p class="lead">Each file is streamed to the server and stored with its SHA-256.</p>
<form id="form" method="post" action="__ROOT__/upload" enctype="multipart/form-data">
  <div class="fields">
    <div class="field" id="token-field" hidden>
      <label for="token">Upload token</label>
      <input id="token" type="password" autocomplete="off" spellcheck="false" aria-describedby="token-help">
      <p id="token-help" class="help">This server asks for a token; it is sent as an <code>Authorization: Bearer</code> header.</p>
    </div>
    <div class="field">
      <label for="description">Description <span class="optional">(optional)</span></label>
      <input id="description" name="description" type="text" aria-describedby="description-help">
      <p id="description-help" class="help">Stored with every file you add after typing it.</p>
    </div>
  </div>
  <div class="zone" id="zone">
    <input class="picker" id="picker" type="file" name="file" aria-describedby="zone-help">
    <label for="picker"><span aria-hidden="true">&#x2B06;&#xFE0E; </span>Drop files here or <span class="link">choose files</span></label>
    <p class="help" id="zone-help">One file or many. Uploads start as soon as you add them.</p>
  </div>
  <noscript><p class="status">Without JavaScript: one file at a time, no progress, and the answer is JSON.
    <button type="submit" class="primary">Upload</button></p></noscript>
</form>
<p class="status" id="status" role="status" aria-live="polite"></p>
<section class="results" id="results" aria-labelledby="results-title" hidden>
  <header><h2 id="results-title">Uploads</h2><button type="button" id="clear">Clear finished</button></header>
  <table role="table">
    <thead role="rowgroup"><tr role="row">
      <th role="columnheader" scope="col">File</th><th role="columnheader" scope="col">Size</th>
      <th role="columnheader" scope="col">Status</th><th role="columnheader" scope="col">SHA-256</th>
      <th role="columnheader" scope="col">ID</th>
    </tr></thead>
    <tbody role="rowgroup" id="rows"></tbody>
  </table>
</section>
</main>
<script>
(function () {
  "use strict";
  // {"root": root_path without its trailing slash, "tokenRequired": bool}
  var SETTINGS = __SETTINGS__;
  // Two uploads at a time: the link stays busy between requests and a small file
  // need not wait behind a big one, without splitting the bandwidth many ways.
  var PARALLEL = 2;
  var STATUS_WORDS = {
    400: "The server could not read the upload", 401: "Not authorized", 403: "Forbidden",
    404: "No upload service at this address", 405: "Not allowed", 408: "Timed out",
    413: "Too large", 415: "Not accepted", 422: "Refused", 500: "Server error",
    502: "Bad gateway", 503: "The server is busy; retry in a moment", 504: "Gateway timeout",
    507: "The server's disk is full"
  };

  function $(id) { return document.getElementById(id); }
  var picker = $("picker"), zone = $("zone"), rows = $("rows"), results = $("results");
  var statusLine = $("status"), tokenField = $("token-field"), tokenInput = $("token");
  var descriptionInput = $("description"), clearButton = $("clear");
  var uploads = [], waiting = [], running = 0, limits = null, baseTitle = document.title;
  var batch = { stored: 0, failed: 0, cancelled: 0 };

  picker.multiple = true;  // without JavaScript the form posts one file to /upload
  if (SETTINGS.tokenRequired) { tokenField.hidden = false; }

  function url(path) { return SETTINGS.root + path; }

  function formatBytes(n) {
    if (n < 1024) { return Math.round(n) + " B"; }
    var units = ["KiB", "MiB", "GiB", "TiB", "PiB"], value = n / 1024, i = 0;
    while (value >= 1024 && i < units.length - 1) { value /= 1024; i += 1; }
    return (value >= 100 ? value.toFixed(0) : value.toFixed(1)) + " " + units[i];
  }

  function formatDuration(seconds) {
    if (!isFinite(seconds) || seconds < 0) { return "\u2013"; }
    if (seconds < 0.1) { return "under 0.1 s"; }
    if (seconds < 10) { return seconds.toFixed(1) + " s"; }
    seconds = Math.ceil(seconds);
    if (seconds < 60) { return seconds + " s"; }
    var minutes = Math.floor(seconds / 60);
    if (minutes < 60) { return minutes + " min " + (seconds % 60) + " s"; }
    return Math.floor(minutes / 60) + " h " + (minutes % 60) + " min";
  }

  function say(text) { statusLine.textContent = text; }

  function element(tag, className, text) {
    var node = document.createElement(tag);
    if (className) { node.className = className; }
    if (text !== undefined) { node.textContent = text; }
    return node;
  }

  function cell(label, className) {
    var td = element("td", className);
    td.setAttribute("role", "cell");
    td.setAttribute("data-label", label);
    return td;
  }

  function makeRow(item) {
    var tr = element("tr");
    tr.setAttribute("role", "row");
    var name = element("th", "name", item.name);
    name.setAttribute("role", "rowheader");
    name.setAttribute("scope", "row");
    var size = cell("Size", "size");
    size.textContent = formatBytes(item.size);
    size.title = item.size.toLocaleString("en") + " bytes";
    var state = cell("Status", "state");
    var bar = element("div", "bar");
    var progress = element("progress");
    progress.max = 100;
    progress.value = 0;
    progress.setAttribute("aria-label", "Upload progress of " + item.name);
    var pct = element("span", "pct", "0%");
    bar.append(progress, pct);
    var stats = element("div", "stats", "Waiting\u2026");
    var msg = element("div", "msg");
    var actions = element("div", "actions");
    var cancel = element("button", "cancel", "Cancel");
    cancel.type = "button";
    cancel.setAttribute("aria-label", "Cancel upload of " + item.name);
    var retry = element("button", "retry", "Retry");
    retry.type = "button";
    retry.hidden = true;
    retry.setAttribute("aria-label", "Retry upload of " + item.name);
    actions.append(cancel, retry);
    state.append(bar, stats, msg, actions);
    var sha = cell("SHA-256", "sha");
    var shaCode = element("code");
    var copy = element("button", "copy", "Copy");
    copy.type = "button";
    copy.hidden = true;
    copy.setAttribute("aria-label", "Copy the SHA-256 of " + item.name);
    sha.append(shaCode, copy);
    var id = cell("ID", "id");
    var idCode = element("code");
    id.append(idCode);
    tr.append(name, size, state, sha, id);
    cancel.addEventListener("click", function () { cancelUpload(item); });
    retry.addEventListener("click", function () { enqueue(item); });
    copy.addEventListener("click", function () { copyText(shaCode.textContent, copy, shaCode); });
    item.ui = { row: tr, size: size, progress: progress, pct: pct, stats: stats, msg: msg,
                cancel: cancel, retry: retry, sha: shaCode, copy: copy, id: idCode };
    return tr;
  }

  function setState(item, state, message) {
    item.state = state;
    item.ui.row.setAttribute("data-state", state);
    item.ui.msg.textContent = message || "";
    var finished = state === "done" || state === "error" || state === "cancelled";
    item.ui.cancel.hidden = finished;
    item.ui.retry.hidden = !(state === "error" || state === "cancelled");
  }

  function addFiles(files) {
    var description = descriptionInput.value;
    var added = 0;
    for (var i = 0; i < files.length; i += 1) {
      var file = files[i];
      var item = { file: file, name: file.name, size: file.size, description: description };
      uploads.push(item);
      rows.append(makeRow(item));
      added += 1;
      var refusal = tooLarge(file.size);
      if (refusal) {
        setState(item, "error", refusal);
        item.ui.stats.textContent = "Not sent.";
        batch.failed += 1;
      } else {
        enqueue(item);
      }
    }
    if (added) {
      results.hidden = false;
      if (running || waiting.length) { say("Uploading " + (running + waiting.length) + " file(s)\u2026"); }
      else { summarize(); }
    }
  }

  function maxSize() {
    if (!limits || typeof limits.max_file_size !== "number") { return null; }
    var request = typeof limits.max_request_size === "number" ? limits.max_request_size : Infinity;
    return Math.min(limits.max_file_size, request);
  }

  function tooLarge(size) {
    var max = maxSize();
    if (max === null || size <= max) { return null; }
    return "Too large: the server takes files up to " + formatBytes(max) + " (" +
      max.toLocaleString("en") + " bytes).";
  }

  function enqueue(item) {
    item.loaded = 0;
    item.ui.progress.value = 0;
    item.ui.pct.textContent = "0%";
    item.ui.stats.textContent = "Waiting\u2026";
    setState(item, "queued");
    waiting.push(item);
    pump();
  }

  function pump() {
    while (running < PARALLEL && waiting.length) { send(waiting.shift()); }
    updateTitle();
  }

  function send(item) {
    var xhr = new XMLHttpRequest();
    var form = new FormData();
    if (item.description) { form.append("description", item.description); }
    form.append("file", item.file, item.file.name);
    item.xhr = xhr;
    item.started = performance.now();
    item.samples = [[item.started, 0]];
    item.shown = 0;
    setState(item, "uploading");
    item.ui.stats.textContent = "Starting\u2026";
    xhr.upload.onprogress = function (event) { showProgress(item, event.loaded, event.total); };
    xhr.upload.onload = function () {
      showProgress(item, 1, 1);
      if (item.state === "uploading") { item.ui.stats.textContent = "All sent; the server is storing the file\u2026"; }
    };
    xhr.onload = function () { answered(item, xhr); };
    xhr.onerror = function () {
      failed(item, "The connection failed before the server answered (the network, or the server closed it).");
    };
    xhr.onabort = function () {
      setState(item, "cancelled", "Cancelled; the server discards what it received.");
      batch.cancelled += 1;
    };
    xhr.onloadend = function () { item.xhr = null; running -= 1; pump(); summarize(); };
    try {
      xhr.open("POST", url("/upload"));
      xhr.setRequestHeader("Accept", "application/json");
      var token = tokenInput.value.trim();
      if (token) { xhr.setRequestHeader("Authorization", "Bearer " + token); }
      xhr.send(form);
    } catch (err) {
      failed(item, "Not sent: " + (token ? "the token has characters a header cannot carry." : err.message));
      item.xhr = null;
      updateTitle();
      return;
    }
    running += 1;
  }

  function showProgress(item, loaded, total) {
    var fraction = total > 0 ? Math.min(1, loaded / total) : 0;
    var sent = Math.round(fraction * item.size);
    item.loaded = sent;
    item.ui.progress.value = fraction * 100;
    item.ui.pct.textContent = Math.floor(fraction * 100) + "%";
    var now = performance.now();
    item.samples.push([now, sent]);
    while (item.samples.length > 2 && now - item.samples[0][0] > 3000) { item.samples.shift(); }
    // Four text updates a second are readable; the bar follows every event.
    if (fraction < 1 && now - item.shown < 250) { return; }
    item.shown = now;
    var first = item.samples[0], span = (now - first[0]) / 1000;
    var text = formatBytes(sent) + " of " + formatBytes(item.size);
    if (span >= 0.3 && sent > first[1]) {
      var speed = (sent - first[1]) / span;
      text += " \u00b7 " + formatBytes(speed) + "/s \u00b7 " + formatDuration((item.size - sent) / speed) + " left";
    }
    item.ui.stats.textContent = text;
    updateTitle();
  }

  function answered(item, xhr) {
    var payload = null;
    try { payload = JSON.parse(xhr.responseText); } catch (err) { payload = null; }
    if (xhr.status === 201 && payload && typeof payload.sha256 === "string") {
      var seconds = (performance.now() - item.started) / 1000;
      item.ui.progress.value = 100;
      item.ui.pct.textContent = "100%";
      item.ui.sha.textContent = payload.sha256;
      item.ui.id.textContent = String(payload.id);
      item.ui.copy.hidden = false;
      if (typeof payload.size === "number") {
        item.ui.size.textContent = formatBytes(payload.size);
        item.ui.size.title = payload.size.toLocaleString("en") + " bytes";
      }
      item.ui.stats.textContent = formatBytes(item.size) + " in " + formatDuration(seconds) +
        (seconds >= 0.1 ? " \u00b7 " + formatBytes(item.size / seconds) + "/s" : "");
      // The server keeps a cleaned name (last path component, no control characters;
      // browsers send " as %22): say so when it differs from the name picked.
      var stored = typeof payload.filename === "string" ? payload.filename : item.name;
      setState(item, "done", "\u2713 Stored" + (stored === item.name ? "" : " as \u201c" + stored + "\u201d"));
      batch.stored += 1;
      return;
    }
    var detail = payload && typeof payload.detail === "string" ? payload.detail : "";
    var words = STATUS_WORDS[xhr.status] || "The server answered";
    var message = words + " (" + xhr.status + ")" + (detail ? ": " + detail : ".");
    if (xhr.status === 401) {
      tokenField.hidden = false;
      message += " Enter the token above, then Retry.";
    }
    failed(item, message);
  }

  function failed(item, message) {
    setState(item, "error", message);
    item.ui.stats.textContent = "Not stored.";
    batch.failed += 1;
    say(item.name + ": " + message);
  }

  function cancelUpload(item) {
    if (item.xhr) { item.xhr.abort(); return; }  // onabort and onloadend do the rest
    var at = waiting.indexOf(item);
    if (at >= 0) {
      waiting.splice(at, 1);
      setState(item, "cancelled", "Cancelled before it started.");
      item.ui.stats.textContent = "Not sent.";
      batch.cancelled += 1;
      summarize();
    }
  }

  function summarize() {
    updateTitle();
    if (running || waiting.length) { return; }
    var parts = [];
    if (batch.stored) { parts.push(batch.stored + " stored"); }
    if (batch.failed) { parts.push(batch.failed + " failed"); }
    if (batch.cancelled) { parts.push(batch.cancelled + " cancelled"); }
    if (parts.length) { say("Finished: " + parts.join(", ") + "."); }
    batch = { stored: 0, failed: 0, cancelled: 0 };
  }

  function updateTitle() {
    var total = 0, sent = 0;
    uploads.forEach(function (item) {
      if (item.state === "queued" || item.state === "uploading") { total += item.size; sent += item.loaded || 0; }
    });
    document.title = total > 0 ? Math.floor(sent / total * 100) + "% \u00b7 " + baseTitle : baseTitle;
  }

  function copyText(text, button, source) {
    function copied() {
      button.textContent = "Copied";
      say("SHA-256 copied.");
      setTimeout(function () { button.textContent = "Copy"; }, 1500);
    }
    function fallback() {
      var range = document.createRange();
      range.selectNodeContents(source);
      var selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      var ok = false;
      try { ok = document.execCommand("copy"); } catch (err) { ok = false; }
      if (ok) { copied(); } else { say("Selected: press Ctrl+C (or \u2318C) to copy."); }
    }
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(copied, fallback);
    } else {
      fallback();
    }
  }

  picker.addEventListener("change", function () {
    addFiles(Array.prototype.slice.call(picker.files));
    picker.value = "";  // choosing the same file again still fires "change"
  });

  function carriesFiles(event) {
    return event.dataTransfer && Array.prototype.indexOf.call(event.dataTransfer.types, "Files") >= 0;
  }
  // A drop anywhere on the page counts, so a near miss never navigates away to the file.
  window.addEventListener("dragover", function (event) {
    if (!carriesFiles(event)) { return; }
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    zone.classList.add("over");
  });
  window.addEventListener("dragleave", function (event) {
    if (!event.relatedTarget) { zone.classList.remove("over"); }
  });
  window.addEventListener("drop", function (event) {
    if (!carriesFiles(event)) { return; }
    event.preventDefault();
    zone.classList.remove("over");
    var files = [], folders = [], items = event.dataTransfer.items;
    for (var i = 0; items && i < items.length; i += 1) {
      if (items[i].kind !== "file") { continue; }
      var entry = items[i].webkitGetAsEntry ? items[i].webkitGetAsEntry() : null;
      var file = items[i].getAsFile();
      if (entry && entry.isDirectory) { folders.push(entry.name); } else if (file) { files.push(file); }
    }
    if (!items) { files = Array.prototype.slice.call(event.dataTransfer.files); }
    addFiles(files);
    if (folders.length) { say("Folders are not uploaded (" + folders.join(", ") + "): open them and pick their files."); }
  });

  clearButton.addEventListener("click", function () {
    uploads = uploads.filter(function (item) {
      var keep = item.state === "queued" || item.state === "uploading";
      if (!keep) { item.ui.row.remove(); }
      return keep;
    });
    if (!uploads.length) { results.hidden = true; }
    say("");
  });

  window.addEventListener("beforeunload", function (event) {
    if (running || waiting.length) { event.preventDefault(); event.returnValue = ""; }
  });

  // The server's limits, so a file it would refuse is not sent at all; without
  // them (an old server, a proxy in the way) the server's answer says it.
  var health = new XMLHttpRequest();
  health.open("GET", url("/health"));
  health.onload = function () {
    try {
      var facts = JSON.parse(health.responseText);
      if (health.status === 200 && facts && typeof facts.max_file_size === "number") {
        limits = facts;
        $("zone-help").textContent = "One file or many, up to " + formatBytes(maxSize()) +
          " each. Uploads start as soon as you add them.";
      }
    } catch (err) { limits = null; }
  };
  health.send();
})();
</script>
</body>
</html>
"""
# --- page end ---


app = create_app()

"""Errors that carry their own status and machine code, so one boundary answers any of them.

`FormError` and `LimitExceeded` come from reading a body (no HTTP in them);
`as_upload_error` (below) turns them, and anything else, into an `UploadError`.
"""

from __future__ import annotations

import errno
import re
from typing import Any, Iterable

# Seconds a client told 503 waits before trying again.
RETRY_AFTER_SECONDS = 1


class UploadError(Exception):
    status = 400
    code = "bad_request"
    headers: tuple[tuple[bytes, bytes], ...] = ()
    content_type = b"application/json"

    def __init__(self, detail: str, **extra: Any) -> None:
        super().__init__(detail)
        self.detail = detail
        self.extra = extra


class MalformedBody(UploadError):
    status, code = 400, "malformed_multipart"


class HeadersTooLarge(UploadError):
    """The request's header fields pass MAX_HEADER_BYTES (uvicorn and granian pass megabytes on)."""

    status, code = 431, "request_header_fields_too_large"


class AmbiguousLength(UploadError):
    """RFC 9112 §6.1: both Transfer-Encoding and Content-Length, a sign of request smuggling
    (hypercorn 0.18 takes the chunked body and keeps the connection): refused, the connection closed."""

    status, code = 400, "ambiguous_length"
    headers = ((b"connection", b"close"),)


class IncompleteBody(UploadError):
    """The server ended the body short of its Content-Length (uvicorn's httptools passes none of the
    body of a request with `Upgrade`): what arrived is not what the client sent."""

    status, code = 400, "incomplete_body"


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


class PreconditionFailed(UploadError):
    status, code = 412, "precondition_failed"


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


class UploadInterrupted(UploadError):
    """Another request for a resumable upload asked this one, which was writing it, to stop (as tusd does)."""

    status, code = 400, "upload_interrupted"


class UploadLocked(UploadError):
    """Another request, on this server or another, is writing the upload (423)."""

    status, code = 423, "upload_locked"


class ServiceUnavailable(UploadError):
    status, code = 503, "too_many_uploads"
    headers = ((b"retry-after", str(RETRY_AFTER_SECONDS).encode()),)


class InsufficientStorage(UploadError):
    status, code = 507, "insufficient_storage"


class StorageUnavailable(UploadError, OSError):
    """The object store cannot be reached or is failing (503). An OSError too: the
    seam's way for a store to say it cannot be used (/health then says unavailable)."""

    status, code = 503, "storage_unavailable"
    headers = ((b"retry-after", str(RETRY_AFTER_SECONDS).encode()),)


class StorageRefused(StorageUnavailable):
    """The object store answered but refused us: bucket missing, access denied (502)."""

    status, code = 502, "storage_refused"
    headers = ()


class InternalError(UploadError):
    status, code = 500, "internal_error"


class UploadRefused(UploadError):
    """Raised by an embedding app's `before_upload` hook to refuse a request.

    The client gets `status` with `{"error": code, "detail": detail}` and `headers`
    (for example `WWW-Authenticate`, `Retry-After`); nothing of the body is stored.
    """

    code = "refused"

    def __init__(
        self,
        status: int,
        detail: str,
        code: str = "refused",
        headers: Iterable[tuple[str | bytes, str | bytes]] = (),
    ) -> None:
        if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
            raise ValueError(f"a refusal needs a 4xx or 5xx status, not {status!r}")
        super().__init__(str(detail))
        self.status = status
        self.code = str(code)
        self.headers = tuple(refusal_header(name, value) for name, value in headers)


# The app frames its JSON answer itself; these would contradict it (RFC 9110 §7.6.1, RFC 9112 §6).
FRAMING_HEADERS = frozenset({
    b"content-length", b"content-type", b"transfer-encoding", b"connection", b"keep-alive", b"te",
    b"trailer", b"upgrade", b"proxy-connection",
})
# RFC 9110 §5.6.2: a token (header names, media types, parameter names and values).
TOKEN = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
HEADER_NAME_RE = re.compile(TOKEN.encode())
HEADER_VALUE_RE = re.compile(rb"[^\x00-\x08\x0a-\x1f\x7f]*")


def refusal_header(name: str | bytes, value: str | bytes) -> tuple[bytes, bytes]:
    """A header a refusal may add: a valid one, and none that frames the answer."""
    name, value = as_latin1(name).lower(), as_latin1(value).strip(b" \t")
    if not HEADER_NAME_RE.fullmatch(name) or not HEADER_VALUE_RE.fullmatch(value):
        raise ValueError(f"a refusal's header must be a valid one, not {name!r}: {value!r}")
    if name in FRAMING_HEADERS:
        raise ValueError(f"a refusal cannot set {name.decode()}: the app frames its answer itself")
    return name, value


def shown(text: str | None, most: int = 40) -> str:
    """`text` quoted for an error's detail, cut after `most` characters: a header may be megabytes."""
    return repr(text if text is None else cut(text, most))


def cut(text: str, most: int = 200) -> str:
    """`text` for an error's detail, cut after `most` characters (a path may be 60 KB)."""
    return text if len(text) <= most else text[:most] + "..."


def as_latin1(text: str | bytes) -> bytes:
    return text if isinstance(text, bytes) else text.encode("latin-1")


class ClientGone(Exception):
    """The client left: clean up, send nothing."""


class ConfigError(ValueError):
    """A setting has a bad value; the message names its environment variable."""


class FormError(Exception):
    """The body is not multipart/form-data we can read (400)."""


class LimitExceeded(Exception):
    """A configured limit was passed while streaming (413)."""

    def __init__(self, limit: str, maximum: int, detail: str) -> None:
        super().__init__(detail)
        self.limit = limit
        self.maximum = maximum


def as_upload_error(exc: BaseException, unexpected: str = "the server failed to store the upload") -> UploadError:
    """Translate any exception from the upload path into the error the client sees.

    `unexpected` is the detail of a 500: a request that stores nothing (HEAD, DELETE) says so.
    """
    if isinstance(exc, UploadError):
        return exc
    if isinstance(exc, LimitExceeded):
        return PayloadTooLarge(str(exc), limit=exc.limit, max=exc.maximum)
    if isinstance(exc, FormError):
        return MalformedBody(str(exc))
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return InsufficientStorage("no space left on the upload device")
    if isinstance(exc, OSError) and exc.errno == errno.EFBIG:  # the file system's or `ulimit -f`'s limit
        return InsufficientStorage("the file is larger than the upload device can hold")
    if isinstance(exc, OSError) and exc.errno in (errno.EROFS, errno.EACCES):  # a remount, a chmod: retry later
        return StorageUnavailable("the upload dir is read-only or this server may not use it")
    return InternalError(unexpected)

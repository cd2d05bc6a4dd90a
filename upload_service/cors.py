"""CORS (Fetch standard, "CORS protocol"): let pages on other origins upload and read answers.

Configured by `UPLOAD_CORS_ORIGINS` (a comma list of origins, or `*`); with none, the
app sends no CORS header at all and an OPTIONS request is routed like any other.

- A preflight (`OPTIONS` with `Origin` and `Access-Control-Request-Method`) is
  answered here, for every path of the app, with the methods and request headers
  the upload, files and resumable (tus, IETF draft) routes use, and any other header
  the page asks to send (for the embedding app's hooks). A plain `OPTIONS`
  without `Access-Control-Request-Method` (tus's capability request) is not a
  preflight: it goes to the routes.
- Every other answer to an allowed `Origin` carries `Access-Control-Allow-Origin`
  and `Access-Control-Expose-Headers` (what a client must read: `Location`, `ETag`,
  the tus and digest headers...), errors included, so a page can read why.

No `Access-Control-Allow-Credentials`: uploads are authorized by a bearer token
(a request header, which CORS allows), not by cookies.
"""

from __future__ import annotations

import re
from typing import Any, Iterable
from urllib.parse import urlsplit

from upload_service.asgi import Scope, Send, header, list_header, send_empty, send_error
from upload_service.errors import TOKEN, UploadError

ALLOW_METHODS = b"GET, HEAD, POST, PATCH, DELETE, OPTIONS"
ALLOW_HEADERS = b", ".join([
    b"Authorization", b"Content-Type", b"X-Requested-With", b"X-HTTP-Method-Override",
    b"X-Request-ID",  # tus-js-client's addRequestId
    b"Content-Disposition",  # a draft creation's filename
    # tus 1.0.0
    b"Tus-Resumable", b"Upload-Length", b"Upload-Offset", b"Upload-Metadata", b"Upload-Checksum",
    b"Upload-Defer-Length", b"Upload-Concat",
    # IETF resumable uploads draft, digests (RFC 9530)
    b"Upload-Complete", b"Upload-Incomplete", b"Upload-Draft-Interop-Version", b"Repr-Digest", b"Content-Digest",
    b"Want-Repr-Digest",
    # downloads
    b"Range", b"If-None-Match", b"If-Match", b"If-Modified-Since", b"If-Unmodified-Since", b"If-Range",
])
EXPOSE_HEADERS = b", ".join([
    b"Location", b"ETag", b"Last-Modified", b"Content-Disposition", b"Content-Range", b"Accept-Ranges",
    b"Content-Length", b"Link", b"Retry-After", b"WWW-Authenticate",
    b"Tus-Resumable", b"Tus-Version", b"Tus-Extension", b"Tus-Max-Size", b"Tus-Checksum-Algorithm",
    b"Upload-Offset", b"Upload-Length", b"Upload-Expires", b"Upload-Metadata", b"Upload-Defer-Length",
    b"Upload-Concat", b"Upload-Complete", b"Upload-Incomplete", b"Upload-Draft-Interop-Version", b"Upload-Limit",
    b"Repr-Digest", b"Content-Digest", b"Accept-Patch",
])
ALLOWED_NAMES = frozenset(name.strip().lower() for name in ALLOW_HEADERS.split(b","))
# Access-Control-Request-Headers: a comma list of header names (Fetch standard).
REQUEST_HEADERS_RE = re.compile(rf"[ \t]*{TOKEN}(?:[ \t]*,[ \t]*{TOKEN})*[ \t]*")
# How long a browser may reuse a preflight's answer (Chromium caps it at 2 hours).
MAX_AGE_SECONDS = b"600"
DEFAULT_PORTS = {"http": 80, "https": 443}


def allow_headers(scope: Scope) -> bytes:
    """The headers the routes read, and any other the page asks to send: an embedding app's
    hooks may read a header of its own. Without credentials the origin is what CORS checks."""
    requested = list_header(scope, b"access-control-request-headers")
    if requested is None or not REQUEST_HEADERS_RE.fullmatch(requested):
        return ALLOW_HEADERS
    names = dict.fromkeys(name.strip().lower().encode() for name in requested.split(","))
    return b", ".join([ALLOW_HEADERS, *(name for name in names if name not in ALLOWED_NAMES)])


class CorsRefused(UploadError):
    status, code = 403, "cors_origin_not_allowed"


def parse_origins(text: str) -> tuple[str, ...]:
    """Read `https://a.example, http://localhost:8080` or `*` into normalized origins."""
    items = [item.strip() for item in text.split(",") if item.strip()]
    if "*" in items:
        if len(items) > 1:
            raise ValueError("'*' allows every origin: give it alone")
        return ("*",)
    return tuple(dict.fromkeys(normalize_origin(item) for item in items))


def normalize_origin(text: str) -> str:
    """`HTTPS://A.example:443/` -> `https://a.example`, as a browser sends it in `Origin`."""
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ValueError(f"{text!r} is not an origin like https://example.com:8443") from None
    if (
        parts.scheme.lower() not in DEFAULT_PORTS
        or not parts.hostname
        or parts.username is not None
        or parts.path not in ("", "/")
        or parts.query
        or parts.fragment
    ):
        raise ValueError(f"{text!r} is not an origin like https://example.com:8443")
    scheme = parts.scheme.lower()
    host = parts.hostname.lower()
    if ":" in host:  # IPv6, bracketed again as in an Origin header
        host = f"[{host}]"
    if port is not None and port != DEFAULT_PORTS[scheme]:
        return f"{scheme}://{host}:{port}"
    return f"{scheme}://{host}"


def check_origins(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return parse_origins(value)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) for v in value):
        raise TypeError(f"{value!r} is not a list of origins")
    return parse_origins(",".join(value))


class Cors:
    """The CORS side of every answer, for the configured origins."""

    def __init__(self, origins: Iterable[str]) -> None:
        self.origins = frozenset(origins)
        self.any_origin = "*" in self.origins

    def allowed(self, origin: str) -> bool:
        return self.any_origin or origin in self.origins

    def origin_headers(self, origin: str) -> list[tuple[bytes, bytes]]:
        if self.any_origin:
            return [(b"access-control-allow-origin", b"*")]
        # The answer depends on the request's Origin: caches must keep them apart.
        return [(b"access-control-allow-origin", origin.encode("latin-1")), (b"vary", b"Origin")]

    async def answer_preflight(self, scope: Scope, send: Send, origin: str) -> None:
        if not self.allowed(origin):
            vary = [] if self.any_origin else [(b"vary", b"Origin")]  # as wrap_send says on every answer
            await send_error(send, CorsRefused(f"the origin {origin} may not use this service"), headers=vary)
            return
        headers = [
            *self.origin_headers(origin),
            (b"access-control-allow-methods", ALLOW_METHODS),
            (b"access-control-allow-headers", allow_headers(scope)),
            (b"access-control-max-age", MAX_AGE_SECONDS),
        ]
        await send_empty(send, 204, headers)

    def wrap_send(self, origin: str | None, send: Send) -> Send:
        """A send that adds the origin's CORS headers to the response head. With a list of
        origins every answer says `Vary: Origin`, also to no Origin or an unlisted one: a
        shared cache must not give their answer (no CORS headers) to a listed origin's page."""
        if origin is not None and self.allowed(origin):
            extra = [*self.origin_headers(origin), (b"access-control-expose-headers", EXPOSE_HEADERS)]
        elif not self.any_origin:
            extra = [(b"vary", b"Origin")]
        else:
            return send

        async def send_with_cors(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", ()), *extra]}
            await send(message)

        return send_with_cors


def is_preflight(scope: Scope) -> bool:
    """A CORS preflight: OPTIONS asking for a method (a tus OPTIONS does not)."""
    return scope["method"] == "OPTIONS" and header(scope, b"access-control-request-method") is not None

"""ASGI plumbing: the types, reading request headers, and one way to answer."""

from __future__ import annotations

import hmac
import json
from typing import Any, Awaitable, Callable, Iterable, MutableMapping
from urllib.parse import quote

from upload_service.errors import AmbiguousLength, HeadersTooLarge, PayloadTooLarge, Unauthorized, UploadError

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
Headers = Iterable[tuple[bytes, bytes]]

# Header fields in all, names and values: about hypercorn's own limit (h11's 64 KiB); other
# servers pass megabytes on, and the headers the app parses cost CPU on the loop per byte.
MAX_HEADER_BYTES = 64 * 1024


def url_root(root_path: str | None) -> str:
    """The mount point as a URL path: percent-encoded (the root path is decoded text, and may hold
    `?`, `%`, `#`, spaces or non-ASCII), no trailing slash, and one leading slash (`//host` would be
    another server's URL)."""
    root = quote((root_path or "").rstrip("/"), safe="/:@!$&'()*+,;=-._~")
    return "/" + root.lstrip("/") if root else ""


def header(scope: Scope, name: bytes) -> str | None:
    """Return the first value of a request header (names are lowercase in ASGI)."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def list_header(scope: Scope, name: bytes) -> str | None:
    """Return every line of a list-valued request header as one value (RFC 9110 §5.3: joined with ", ")."""
    values = [value.decode("latin-1") for key, value in scope.get("headers", ()) if key == name]
    return ", ".join(values) if values else None


def utf8_header(scope: Scope, name: bytes) -> str | None:
    """A request header read as UTF-8 when its bytes are UTF-8 (how clients send a non-ASCII
    filename), else as latin-1, as `header` reads every header."""
    for key, value in scope.get("headers", ()):
        if key == name:
            try:
                return value.decode("utf-8")
            except UnicodeDecodeError:
                return value.decode("latin-1")
    return None


def route_path(scope: Scope) -> str:
    """Return the path relative to the mount point.

    Hosts disagree on whether `path` includes `root_path` (Starlette's Mount,
    hypercorn's DispatcherMiddleware, `hypercorn --root-path` and uvicorn keep it;
    older servers do not), so strip it only when it is there, at a `/` boundary.
    """
    path = scope.get("path") or "/"
    if not path.startswith("/"):
        path = path_of_absolute_form(path)
    root = scope.get("root_path") or ""
    base = root.rstrip("/")
    if root and (path == base or path.startswith(base + "/")):
        path = path[len(base):]
        joined = "/" * (len(root) - len(base) + 1)  # `uvicorn --root-path /up/` makes `/up//health`
        if path.startswith(joined):
            path = path[len(joined) - 1:]
    return path or "/"


def path_of_absolute_form(target: str) -> str:
    """The path of `http://host/path` (RFC 9112 §3.2.2: a server MUST accept the absolute
    form; hypercorn passes it through as the path). Any other target is left as it is."""
    scheme, sep, rest = target.partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return target
    return "/" + rest.partition("/")[2]


def declared_length(scope: Scope) -> int | None:
    text = header(scope, b"content-length")
    text = (text or "").strip()
    if not (text.isascii() and text.isdigit()):
        return None
    digits = text.lstrip("0") or "0"  # leading zeros are allowed, as many as a server lets through
    return int(digits) if len(digits) <= 18 else 10**18  # past any limit (int() refuses 4301 digits)


def promised_length(scope: Scope) -> int | None:
    """The fewest body bytes the request's headers promise: its Content-Length, or one for a chunked
    body that asks to switch protocols (uvicorn's httptools passes none of such a body on)."""
    length = declared_length(scope)
    if length is None and header(scope, b"upgrade") is not None and header(scope, b"transfer-encoding") is not None:
        return 1
    return length


def says_body(scope: Scope) -> bool:
    """Whether the request says it carries a body: a Content-Length above 0, or chunked coding."""
    length = declared_length(scope)
    if length is not None:
        return length > 0
    return header(scope, b"transfer-encoding") is not None


def check_framing(scope: Scope) -> None:
    """Refuse header fields past MAX_HEADER_BYTES (431), and a request that says both
    Transfer-Encoding and Content-Length (RFC 9112 §6.1)."""
    if sum(len(name) + len(value) for name, value in scope["headers"]) > MAX_HEADER_BYTES:
        raise HeadersTooLarge(f"the request's header fields pass {MAX_HEADER_BYTES} bytes")
    if scope.get("http_version") != "2" and header(scope, b"transfer-encoding") is not None \
            and header(scope, b"content-length") is not None:
        raise AmbiguousLength("the request has both Transfer-Encoding and Content-Length")


# What reverse proxies add to a request they pass on (nginx as configured in the README; HAProxy's
# forwardfor, Caddy, Apache, Traefik by default).
PROXY_HEADERS = frozenset((b"forwarded", b"x-forwarded-for", b"x-forwarded-proto", b"x-real-ip", b"via"))


def came_through_a_proxy(scope: Scope) -> bool:
    return any(name in PROXY_HEADERS for name, _ in scope.get("headers", ()))


def body_known_empty(scope: Scope) -> bool:
    """Whether the request has no body at all, its end included. Over HTTP/2, never before it is read:
    a body needs no Content-Length, and after `content-length: 0` the stream may end in a DATA frame of
    its own (httpx does so), which reaching hypercorn 0.18 after the answer drops the connection."""
    return scope.get("http_version") != "2" and not says_body(scope)


def bearer_token_matches(scope: Scope, token: str) -> bool:
    """Compare the request's bearer token with ours in constant time."""
    scheme, _, given = (header(scope, b"authorization") or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def check_write_token(scope: Scope, token: str | None) -> None:
    """What every write (an upload, a PATCH, a DELETE) must show when UPLOAD_TOKEN is set."""
    if token is not None and not bearer_token_matches(scope, token):
        raise Unauthorized("a valid 'Authorization: Bearer <token>' header is required")


def check_declared_size(scope: Scope, limit: int) -> None:
    """A body whose Content-Length is over UPLOAD_MAX_REQUEST_SIZE: refused on its headers."""
    length = declared_length(scope)
    if length is not None and length > limit:
        raise PayloadTooLarge(f"the request body is larger than {limit} bytes", limit="request_size", max=limit)


# One encoder for every answer: json.dumps with arguments builds a new one each call.
_encode_json = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def json_bytes(payload: Any) -> bytes:
    return _encode_json(payload).encode()


def error_payload(error: UploadError) -> dict[str, Any]:
    return {"error": error.code, "detail": error.detail, **error.extra}


# -- answers ------------------------------------------------------------------


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


async def send_empty(send: Send, status: int, headers: Headers = ()) -> None:
    """An answer without a body (RFC 9110 §8.6: a 204 has no Content-Length)."""
    headers = list(headers)
    if status != 204:
        headers.append((b"content-length", b"0"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": b""})


async def send_error(
    send: Send, error: UploadError, headers: Headers = (), head_only: bool = False, more_body: bool = False
) -> None:
    body = json_bytes(error_payload(error))
    headers = (*error.headers, *headers)
    await send_body(send, error.status, body, error.content_type, headers, head_only, more_body)

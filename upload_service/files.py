"""The files resource (SPEC §9): a stored file back, its record, the list, delete.

Routes, relative to `scope["root_path"]`:

    GET|HEAD /files/<id>          the bytes, with validators, preconditions and single-range support
    GET|HEAD /files/<id>/record   the record as JSON
    GET|HEAD /files               records newest first: ?limit=, ?cursor=, Link rel="next"
    DELETE   /files/<id>          204, then 404 (If-Match, If-Unmodified-Since, If-None-Match: 412)

An id is checked with `storage.is_file_id` before the store sees it: anything else is
404. Reads need `UPLOAD_READ_TOKEN` or `UPLOAD_TOKEN` when `UPLOAD_READ_TOKEN` is set;
a delete needs `UPLOAD_TOKEN` when it is set. Errors are raised as `UploadError`s and
answered by the front door. The header helpers are pure functions, tested on their own.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import re
import unicodedata
from datetime import datetime, timezone
from email.utils import format_datetime, parsedate_to_datetime
from typing import Any, AsyncIterator, Awaitable, Callable
from urllib.parse import parse_qs, quote

from upload_service.asgi import (
    Headers, Message, Receive, Scope, Send, bearer_token_matches, check_write_token, header, list_header, send_empty,
    send_json, url_root,
)
from upload_service.errors import TOKEN, NotFound, PreconditionFailed, Unauthorized, UploadError
from upload_service.settings import Config
from upload_service.storage import BadCursor, Record, Store, StoredFile, UnreadableRecord, is_file_id

logger = logging.getLogger("upload_asgi")

DEFAULT_LIST_LIMIT = 100  # records per page when ?limit= is not given
MAX_LIST_LIMIT = 1000  # a page is built in memory: bound it
# Sizes are below 2**63; a number with more digits is only ever "larger than the file".
MAX_RANGE_DIGITS = 18
FALLBACK_FILENAME = "download"
# The ASCII filename= is at most as long as a stored name may be: NFKD makes up to 18
# characters of one (U+FDFA), so 255 of those would be 4.6 KB of it.
MAX_FALLBACK_CHARS = 255
# Kept out of the ASCII fallback: `"` and `\` (the quoted-string), `%` (RFC 6266 appendix D:
# some clients percent-decode it), `/`, `\` and `:` (path separators NFKD can make of `／`, `：`).
FALLBACK_UNSAFE_CHARS = '"\\%/:'

# RFC 9110 §8.3.1 media type: token "/" token, then parameters; anything else (a
# non-ASCII or broken type a client sent) is served as application/octet-stream.
QUOTED_STRING = r'"(?:[\t !#-\[\]-~]|\\[\t -~])*"'
PARAMETER = rf"{TOKEN}=(?:{TOKEN}|{QUOTED_STRING})"
# Parameters read strictly: `text/plain;a=b, text/html` is two types to a browser (Fetch splits on commas).
MEDIA_TYPE_RE = re.compile(rf"{TOKEN}/{TOKEN}(?:[ \t]*;[ \t]*(?:{PARAMETER})?)*")
RANGE_SPEC_RE = re.compile(r"([0-9]*)-([0-9]*)")  # ASCII digits: \d takes any script's
# RFC 8187 attr-char: what may stay unescaped in filename*=UTF-8''...
ATTR_CHAR_SAFE = "!#$&+-.^_`|~"
# The bytes are the uploader's: never let a browser sniff or run them in our origin.
UNTRUSTED_CONTENT_HEADERS = (
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'none'; sandbox"),
)


class RangeNotSatisfiable(UploadError):
    status, code = 416, "range_not_satisfiable"

    def __init__(self, size: int) -> None:
        super().__init__(f"the range is outside the file's {size} bytes", size=size)
        self.headers = ((b"content-range", f"bytes */{size}".encode()),)  # RFC 9110 §15.5.17


class InvalidQuery(UploadError):
    status, code = 400, "invalid_query"


# -- pure helpers -----------------------------------------------------------------


def parse_range(value: str | None, size: int) -> tuple[int, int] | None:
    """The (start, stop) of a single satisfiable byte range, or None for the whole file.

    RFC 9110 §14.2: a Range header we do not understand (another unit, bad syntax, a
    last position before the first) is ignored, and so are several ranges (we answer
    200 with the whole file rather than a multipart/byteranges body). A single range
    that starts past the end (any `first-` range of an empty file) or a `-0` suffix raises
    `RangeNotSatisfiable` (416); a suffix of an empty file is satisfiable (§14.1.1) but
    no range of nothing can be sent, so it is the whole (empty) file.
    """
    if value is None:
        return None
    unit, equals, ranges = value.partition("=")
    if not equals or unit.strip().lower() != "bytes":
        return None
    specs = [spec.strip() for spec in ranges.split(",") if spec.strip()]
    if len(specs) != 1:
        return None
    match = RANGE_SPEC_RE.fullmatch(specs[0])
    if match is None or not (match[1] or match[2]):
        return None
    first, last = match[1], match[2]
    if first:
        start = bounded_int(first)
        if last and bounded_int(last) < start:
            return None
        if start >= size:
            raise RangeNotSatisfiable(size)
        return start, size if not last else min(bounded_int(last) + 1, size)
    suffix = bounded_int(last)  # bytes=-N: the last N bytes
    if suffix == 0:
        raise RangeNotSatisfiable(size)
    if size == 0:
        return None
    return max(0, size - suffix), size


def bounded_int(digits: str) -> int:
    """The number, or 10**18 for a longer one (past any file; int() of huge text is slow)."""
    digits = digits.lstrip("0") or "0"  # leading zeros are legal (RFC 9110 1*DIGIT) and count for nothing
    return int(digits) if len(digits) <= MAX_RANGE_DIGITS else 10**MAX_RANGE_DIGITS


def content_range(start: int, stop: int, size: int) -> bytes:
    return f"bytes {start}-{stop - 1}/{size}".encode()


def content_disposition(filename: str | None) -> bytes:
    """`attachment` with the original name (RFC 6266): an ASCII `filename`, and `filename*` if it differs.

    The fallback keeps what old clients read safely: non-ASCII letters lose their
    accents (NFKD), and anything else outside printable ASCII, and FALLBACK_UNSAFE_CHARS,
    become `_`; it is never a path, nor only dots, nor empty.
    """
    name = filename or FALLBACK_FILENAME
    fallback = ascii_fallback(name)
    value = f'attachment; filename="{fallback}"'
    if fallback != name:
        value += "; filename*=UTF-8''" + quote(name, safe=ATTR_CHAR_SAFE)
    return value.encode("ascii")


def ascii_fallback(name: str) -> str:
    out = []
    for char in unicodedata.normalize("NFKD", name):
        if unicodedata.combining(char):
            continue
        out.append(char if " " <= char <= "~" and char not in FALLBACK_UNSAFE_CHARS else "_")
    # As framing.clean_filename does to a name, after NFKD made new dots and spaces (`‥`, U+3000).
    fallback = "".join(out)[:MAX_FALLBACK_CHARS].strip()
    return fallback if fallback.strip(".") else FALLBACK_FILENAME  # not `.`, `..`, `...` (Windows drops end dots)


def repr_digest(sha256_hex: str) -> bytes:
    """RFC 9530 `Repr-Digest`: the SHA-256 of the whole file as a byte sequence (base64)."""
    return b"sha-256=:" + base64.b64encode(bytes.fromhex(sha256_hex)) + b":"


def entity_tag(sha256_hex: str) -> str:
    """A strong ETag: the content's SHA-256 (same bytes, same tag, whatever the id)."""
    return f'"{sha256_hex}"'


def served_type(recorded: Any) -> bytes:
    """The recorded Content-Type if it is a well-formed media type, else octet-stream.

    Never multipart/byteranges: a client would read the uploader's bytes as the parts of a
    multipart answer, which RFC 9110 §14.6 forbids for a single range (and we send no other).
    """
    if isinstance(recorded, str) and MEDIA_TYPE_RE.fullmatch(recorded) and not is_byteranges(recorded):
        return recorded.encode("ascii")
    return b"application/octet-stream"


def is_byteranges(media_type: str) -> bool:
    return media_type.partition(";")[0].strip().lower() == "multipart/byteranges"


def last_modified(record: Record) -> datetime | None:
    """When the file was stored (the record's `created`), to the second; None if unknown."""
    created = record.get("created")
    if not isinstance(created, str):
        return None
    try:
        stamp = datetime.fromisoformat(created)
    except ValueError:
        return None
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp.astimezone(timezone.utc).replace(microsecond=0)


def http_date(stamp: datetime) -> str:
    return format_datetime(stamp, usegmt=True)  # IMF-fixdate, RFC 9110 §5.6.7


def parse_http_date(text: str) -> datetime | None:
    """The date in UTC, or None for one that is not a valid HTTP-date (RFC 9110 §13.1.3: ignore it)."""
    try:
        stamp = parsedate_to_datetime(text.strip())
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=timezone.utc)
        # In UTC here, where a year or offset too large fails (OverflowError), not in a comparison.
        return stamp.astimezone(timezone.utc)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def opaque_tag(tag: str) -> str:
    return tag[2:] if tag.startswith("W/") else tag


def none_match(if_none_match: str, etag: str | None) -> bool:
    """Whether If-None-Match names our tag (weak comparison, RFC 9110 §13.1.2) or is `*`."""
    value = if_none_match.strip()
    if value == "*":
        return True
    return etag is not None and any(opaque_tag(tag.strip()) == etag for tag in value.split(","))


def strong_match(if_match: str, etag: str | None) -> bool:
    """Whether If-Match names our tag (strong comparison: never a W/ tag, RFC 9110 §13.1.1) or is `*`."""
    value = if_match.strip()
    if value == "*":
        return True  # any current representation: the file is there
    return etag is not None and any(tag.strip() == etag for tag in value.split(","))


def unmodified_since(since: str | None, modified: datetime | None) -> bool:
    """RFC 9110 §13.1.4: false only if the file changed after a valid date (no Last-Modified: ignored)."""
    when = parse_http_date(since) if since is not None else None
    return when is None or modified is None or modified <= when


def modified_since(since: str | None, modified: datetime | None) -> bool:
    """RFC 9110 §13.1.3: false only if the file is unchanged since a valid date."""
    when = parse_http_date(since) if since is not None else None
    return when is None or modified is None or modified > when


def has_preconditions(scope: Scope) -> bool:
    """Whether a DELETE has a condition to check (If-Modified-Since is for GET and HEAD only)."""
    return any(header(scope, name) is not None for name in (b"if-match", b"if-unmodified-since", b"if-none-match"))


def check_preconditions(scope: Scope, etag: str | None, modified: datetime | None) -> bool:
    """RFC 9110 §13.2.2 steps 1-4, in order: raise PreconditionFailed (412) for a false condition;
    return whether a GET or HEAD gets 304 (another method gets 412 where they would). `etag` None:
    the resource has no tag yet (an upload under way), so only `*` matches it."""
    if_match = list_header(scope, b"if-match")
    if if_match is not None:
        if not strong_match(if_match, etag):
            raise PreconditionFailed("If-Match does not name this file's version")
    elif not unmodified_since(header(scope, b"if-unmodified-since"), modified):
        raise PreconditionFailed("the file was stored after the If-Unmodified-Since date")
    reading = scope["method"] in ("GET", "HEAD")
    if_none_match = list_header(scope, b"if-none-match")
    if if_none_match is not None:  # If-Modified-Since is then ignored
        matched = none_match(if_none_match, etag)
        if matched and not reading:
            raise PreconditionFailed("If-None-Match names this file's version")
        return matched
    return reading and not modified_since(header(scope, b"if-modified-since"), modified)


def if_range_allows(if_range: str | None, etag: str, modified: datetime | None) -> bool:
    """RFC 9110 §13.1.5: serve the Range only if the client's copy is still ours.

    An entity tag must match strongly (a weak one never does); a date must equal
    Last-Modified exactly.
    """
    if if_range is None:
        return True
    value = if_range.strip()
    if value.startswith('"') or value.startswith("W/"):
        return value == etag
    when = parse_http_date(value)
    return when is not None and modified is not None and when == modified


def mount_url(scope: Scope, path: str) -> str:
    """`path` (ours, already URL-safe; it may carry a query string) under the mount point, for a
    Location or Link header."""
    return url_root(scope.get("root_path")) + path


def parse_limit(values: list[str] | None) -> int:
    """?limit=N: 1 to MAX_LIST_LIMIT; absent means the default; anything else is a 400."""
    if not values:
        return DEFAULT_LIST_LIMIT
    text = values[-1].strip().lstrip("0") or "0"
    # Length first: int() of thousands of digits raises (and costs) before the range check.
    well_formed = len(values) == 1 and text.isascii() and text.isdigit() and len(text) <= 6
    if not well_formed or not 1 <= int(text) <= MAX_LIST_LIMIT:
        raise InvalidQuery(f"limit must be one whole number from 1 to {MAX_LIST_LIMIT}")
    return int(text)


def file_headers(record: Record, etag: str, modified: datetime | None) -> list[tuple[bytes, bytes]]:
    """The validators and metadata every answer about a file's bytes carries (200, 206, 304)."""
    headers = [
        (b"etag", etag.encode()),
        (b"repr-digest", repr_digest(record["sha256"])),
        (b"accept-ranges", b"bytes"),
        # Ask caches to check with us each time (a 304 is cheap): a deleted file must go.
        (b"cache-control", b"no-cache"),
    ]
    if modified is not None:
        headers.append((b"last-modified", http_date(modified).encode()))
    return headers


# -- handlers -------------------------------------------------------------------------


class FilesResource:
    """The /files handlers on one store; `ready_store()` gives it, made ready on first use."""

    def __init__(self, config: Config | None, ready_store: Callable[[], Store]) -> None:
        self.config = config
        self.ready_store = ready_store

    def check_read(self, scope: Scope) -> None:
        read_token = self.config.read_token
        if read_token is None:
            return  # reads are open
        tokens = [t for t in (read_token, self.config.token) if t is not None]
        if not any([bearer_token_matches(scope, t) for t in tokens]):  # both compared, always
            raise Unauthorized("reading files needs 'Authorization: Bearer <token>'")

    async def open_file(self, file_id: str) -> StoredFile:
        """The stored file, or NotFound (an id that is not one never reaches the store)."""
        return await self.look_up(file_id, self.ready_store().open)

    async def read_record(self, file_id: str) -> Record:
        """The stored file's record, or NotFound."""
        return await self.look_up(file_id, self.ready_store().record)

    async def is_stored(self, file_id: str) -> bool:
        """Whether a readable record is there now (quietly: for a second look)."""
        try:
            return is_file_id(file_id) and await self.ready_store().record(file_id) is not None
        except UnreadableRecord:
            return False

    async def look_up(self, file_id: str, fetch: Callable[[str], Awaitable[Any]]) -> Any:
        """What `fetch` finds for a stored file; NotFound for no id, no file, or a record unread."""
        try:
            found = await fetch(file_id) if is_file_id(file_id) else None
        except UnreadableRecord as exc:
            found = None
            log_unreadable(file_id, exc)
        if found is None:
            raise NotFound("no such file")
        return found

    async def handle_download(
        self, scope: Scope, receive: Receive, send: Send, head_only: bool = False, file_id: str = ""
    ) -> None:
        self.check_read(scope)
        stored = await self.open_file(file_id)
        try:
            await send_stored(scope, receive, send, stored, head_only)
        finally:
            await stored.close()

    async def handle_record(
        self, scope: Scope, receive: Receive, send: Send, head_only: bool = False, file_id: str = ""
    ) -> None:
        self.check_read(scope)
        await send_json(send, 200, await self.read_record(file_id), head_only=head_only)

    async def handle_list(self, scope: Scope, receive: Receive, send: Send, head_only: bool = False) -> None:
        self.check_read(scope)
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
        limit = parse_limit(query.get("limit"))
        cursors = query.get("cursor") or [""]
        if len(cursors) > 1:
            raise InvalidQuery("give one cursor")
        cursor = cursors[0] or None
        try:
            page = await self.ready_store().list(limit, cursor)
        except BadCursor:
            raise InvalidQuery("cursor is not one this server gave out") from None
        headers = []
        if page.next_cursor is not None:
            link = mount_url(scope, f"/files?limit={limit}&cursor={quote(page.next_cursor, safe='')}")
            headers.append((b"link", f'<{link}>; rel="next"'.encode()))
        payload = {"files": page.records, "next_cursor": page.next_cursor}
        await send_json(send, 200, payload, headers, head_only=head_only)

    async def handle_delete(
        self, scope: Scope, receive: Receive, send: Send, head_only: bool = False, file_id: str = "",
        headers: Headers = (),
    ) -> None:
        check_write_token(scope, self.config.token)
        if not is_file_id(file_id):
            raise NotFound("no such file")
        if has_preconditions(scope):  # a missing file is 404 first, whatever they say
            record = await self.read_record(file_id)
            check_preconditions(scope, entity_tag(record["sha256"]), last_modified(record))
        if not await self.ready_store().delete(file_id):
            raise NotFound("no such file")
        await send_empty(send, 204, headers)


def log_unreadable(file_id: str, exc: UnreadableRecord) -> None:
    # As good as not stored (the listing skips it too); a DELETE still removes it.
    logger.warning("file %s is answered as not found: its record cannot be read: %s", file_id, exc)


async def send_stored(
    scope: Scope, receive: Receive, send: Send, stored: StoredFile, head_only: bool, extra_headers: Headers = ()
) -> None:
    """Answer with a stored file: 304, 206 or 200 (412 and 416 are raised), streamed in bounded chunks.

    `extra_headers` are added, each in place of the file's own of that name (a tus HEAD's Cache-Control).
    """
    record = stored.record
    etag = entity_tag(record["sha256"])
    modified = last_modified(record)
    extra = list(extra_headers)
    replaced = {name for name, _ in extra}
    headers = [*(item for item in file_headers(record, etag, modified) if item[0] not in replaced), *extra]
    if check_preconditions(scope, etag, modified):
        # RFC 9110 §15.4.5: the validators again, no content (and so no Content-Length).
        await send({"type": "http.response.start", "status": 304, "headers": headers})
        await send({"type": "http.response.body", "body": b""})
        return
    byte_range = None
    # RFC 9110 §14.2: range handling is defined for GET only (a HEAD ignores Range). Each
    # header's lines are read joined, so two lines (a proxy may read either) are not understood
    # and the whole file is sent.
    if scope["method"] == "GET" and if_range_allows(list_header(scope, b"if-range"), etag, modified):
        byte_range = parse_range(list_header(scope, b"range"), stored.size)
    start, stop = byte_range or (0, stored.size)
    headers += [
        (b"content-type", served_type(record.get("content_type"))),
        (b"content-length", str(stop - start).encode()),
        (b"content-disposition", content_disposition(record.get("filename"))),
        *UNTRUSTED_CONTENT_HEADERS,
    ]
    if byte_range is not None:
        headers.append((b"content-range", content_range(start, stop, stored.size)))
    chunks = None if head_only or start == stop else stored.chunks(start, stop)
    # The first bytes are read before the status: a file deleted since its record was read (S3
    # reads the object only now) is a 404, never a 200 cut off before its body.
    first = b"" if chunks is None else await anext(chunks, b"")
    await send({"type": "http.response.start", "status": 206 if byte_range else 200, "headers": headers})
    if chunks is None:
        await send({"type": "http.response.body", "body": b""})
        return
    await stream_chunks(receive, send, stored, chunks, first, start, stop)


async def stream_chunks(
    receive: Receive, send: Send, stored: StoredFile, chunks: AsyncIterator[bytes], first: bytes, start: int, stop: int,
) -> None:
    """Send bytes start..stop, `first` then the rest of `chunks`; stop reading as soon as the client has gone.

    Hypercorn's send does not fail once the client is gone: over HTTP/1.1 it drops the
    data, over HTTP/2 the last send can wait for good (for a window the client will never
    open). So a task watches receive() for http.disconnect, and each send is given up
    when it comes; other servers raise OSError from send.
    """
    watcher = asyncio.create_task(wait_for_disconnect(receive))
    position, chunk = start, first
    try:
        while chunk:
            position += len(chunk)
            message = {"type": "http.response.body", "body": chunk, "more_body": position < stop}
            if not await send_unless_gone(send, message, watcher):
                return
            chunk = await anext(chunks, b"")
        if position < stop:
            # Never end a short body as if whole: raising makes the server cut the connection.
            raise RuntimeError(f"file {stored.record.get('id')} ended at byte {position} of {stop}")
    finally:
        watcher.cancel()


async def wait_for_disconnect(receive: Receive) -> None:
    try:
        while (await receive())["type"] != "http.disconnect":
            pass
    except Exception:  # a receive that fails: the connection is no more use either
        pass


async def send_unless_gone(send: Send, message: Message, gone: asyncio.Task[None]) -> bool:
    """Send `message`; False, the send cancelled, if the client is gone first (or the send says so)."""
    if gone.done():
        return False
    sending = asyncio.ensure_future(send(message))
    await asyncio.wait((sending, gone), return_when=asyncio.FIRST_COMPLETED)
    if not sending.done():
        sending.cancel()
        return False
    try:
        sending.result()
    except OSError:  # the client left (uvicorn's ClientDisconnected)
        return False
    return True

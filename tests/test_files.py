"""The files resource (SPEC §9): download, record, list, delete; the header helpers; hostile ids.

In process through httpx's ASGITransport (and hand-made scopes where httpx would tidy a
path up); through real hypercorn in tests/test_files_server.py.

The tests on `backend_client`/`backend_app` run on both storage backends (the local dir
and S3 on SeaweedFS): the same downloads, ranges, conditionals, records, listing, deletes
and tokens. Those on `client`/`app` are about the local store itself (its sidecars edited
by hand, ids renamed on disk, reads of a deleted file) and stay local.
"""

from __future__ import annotations

import asyncio
import base64
import errno
import hashlib
import json
import logging
import os
import threading
from datetime import datetime, timezone
from email.utils import format_datetime, parsedate_to_datetime
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest

import upload_asgi
from backends import LocalBackend
from support import Reply, call_app, http_scope, stored_ids
from upload_service import files
from upload_service.asgi import list_header
from upload_service.files import (
    RangeNotSatisfiable,
    content_disposition,
    if_range_allows,
    none_match,
    parse_limit,
    parse_range,
    repr_digest,
    served_type,
)
from upload_service.localstore import LocalStore
from upload_service.routing import Routes, allowed_methods, pick_handler

MiB = 1024 * 1024
DATA = bytes(range(256)) * 40 + b"tail"  # 10244 bytes


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check(reply: httpx.Response) -> httpx.Response:
    """Every answer: Content-Length is the body's length (none at all for 204 and 304)."""
    if reply.status_code in (204, 304):
        assert "content-length" not in reply.headers
        assert reply.content == b""
    elif reply.request.method == "HEAD":
        assert reply.content == b""
    else:
        assert int(reply.headers["content-length"]) == len(reply.content)
    return reply


def check_error(reply: httpx.Response, status: int, code: str) -> dict[str, Any]:
    check(reply)
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/json"
    payload = reply.json()
    assert payload["error"] == code and isinstance(payload["detail"], str)
    return payload


def make_client(app: Any, root_path: str = "") -> httpx.AsyncClient:
    transport = httpx.ASGITransport(app=app, root_path=root_path)
    return httpx.AsyncClient(transport=transport, base_url="http://testserver")


@pytest.fixture
def app(upload_dir: Path) -> upload_asgi.UploadApp:
    return upload_asgi.create_app(upload_asgi.Config(upload_dir=upload_dir, fsync=False))


@pytest.fixture
async def client(app: upload_asgi.UploadApp) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(app) as client:
        yield client


@pytest.fixture
def backend_settings() -> dict[str, Any]:
    return {"fsync": False}


async def upload(
    client: httpx.AsyncClient, data: bytes = DATA, filename: str = "data.bin",
    content_type: str = "application/octet-stream", headers: dict[str, str] | None = None,
) -> dict[str, Any]:
    reply = check(await client.post("/upload", files={"file": (filename, data, content_type)}, headers=headers))
    assert reply.status_code == 201, reply.text
    return reply.json()


# -- pure helpers ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, size, expected",
    [
        pytest.param(None, 100, None, id="no-range"),
        pytest.param("bytes=0-9", 100, (0, 10), id="first-ten"),
        pytest.param("bytes=10-19", 100, (10, 20), id="middle"),
        pytest.param("bytes=5-5", 100, (5, 6), id="one-byte"),
        pytest.param("bytes=90-", 100, (90, 100), id="open"),
        pytest.param("bytes=0-", 100, (0, 100), id="open-from-zero"),
        pytest.param("bytes=-10", 100, (90, 100), id="suffix"),
        pytest.param("bytes=-1000", 100, (0, 100), id="suffix-longer-than-file"),
        pytest.param("bytes=50-1000", 100, (50, 100), id="last-past-end-clamped"),
        pytest.param("bytes=99-99", 100, (99, 100), id="last-byte"),
        pytest.param("BYTES = 0-9", 100, (0, 10), id="unit-case-and-spaces"),
        pytest.param("bytes= 0-9 ,", 100, (0, 10), id="empty-list-elements"),
        pytest.param("bytes=0-" + "9" * 40, 100, (0, 100), id="huge-last"),
        pytest.param("bytes=-" + "9" * 5000, 100, (0, 100), id="huge-suffix"),
        pytest.param("bytes=" + "0" * 36 + "5-", 10, (5, 10), id="leading-zeros-first"),
        pytest.param("bytes=0-" + "0" * 28 + "3", 10, (0, 4), id="leading-zeros-last"),
        pytest.param("bytes=-" + "0" * 28 + "3", 10, (7, 10), id="leading-zeros-suffix"),
        pytest.param("bytes=" + "0" * 28 + "1-2", 10, (1, 3), id="leading-zeros-first-of-two"),
        pytest.param("bytes=" + "0" * 40 + "-" + "0" * 40, 10, (0, 1), id="all-zeros"),
        pytest.param("bytes=-" + "0" * 30, 10, "416", id="suffix-of-zeros"),
        pytest.param("bytes=0-" + "0" * 20 + "9" * 40, 100, (0, 100), id="huge-last-after-zeros"),
        pytest.param("bytes=0-1,5-6", 100, None, id="several-ranges-whole-file"),
        pytest.param("bytes=0-1,200-300", 100, None, id="several-one-unsatisfiable"),
        pytest.param("items=0-9", 100, None, id="other-unit"),
        pytest.param("bytes", 100, None, id="no-equals"),
        pytest.param("bytes=", 100, None, id="no-range-spec"),
        pytest.param("bytes=-", 100, None, id="dash-alone"),
        pytest.param("bytes=9-5", 100, None, id="last-before-first"),
        pytest.param("bytes=a-b", 100, None, id="not-numbers"),
        pytest.param("bytes=0 - 9", 100, None, id="spaces-inside"),
        pytest.param("bytes=\u0661-\u0662", 100, None, id="non-ascii-digits"),
        pytest.param("bytes=+1-2", 100, None, id="signed"),
        pytest.param("bytes=100-", 100, "416", id="start-at-end"),
        pytest.param("bytes=100-200", 100, "416", id="start-past-end"),
        pytest.param("bytes=" + "9" * 5000 + "-", 100, "416", id="huge-start"),
        pytest.param("bytes=-0", 100, "416", id="empty-suffix"),
        pytest.param("bytes=0-", 0, "416", id="empty-file-open"),
        pytest.param("bytes=-5", 0, None, id="empty-file-suffix"),  # RFC 9110 §14.1.1: satisfiable, 200
    ],
)
def test_parse_range(value, size, expected):
    if expected == "416":
        with pytest.raises(RangeNotSatisfiable) as caught:
            parse_range(value, size)
        assert caught.value.status == 416
        assert dict(caught.value.headers)[b"content-range"] == f"bytes */{size}".encode()
    else:
        assert parse_range(value, size) == expected


@pytest.mark.parametrize(
    "filename, expected",
    [
        pytest.param("report.pdf", 'attachment; filename="report.pdf"', id="ascii"),
        pytest.param("two words.txt", 'attachment; filename="two words.txt"', id="space"),
        pytest.param(
            "résumé.pdf",
            "attachment; filename=\"resume.pdf\"; filename*=UTF-8''r%C3%A9sum%C3%A9.pdf",
            id="accents-folded",
        ),
        pytest.param(
            "日本語.txt",
            "attachment; filename=\"___.txt\"; filename*=UTF-8''%E6%97%A5%E6%9C%AC%E8%AA%9E.txt",
            id="cjk",
        ),
        pytest.param(
            'say "hi".txt',
            "attachment; filename=\"say _hi_.txt\"; filename*=UTF-8''say%20%22hi%22.txt",
            id="quotes",
        ),
        pytest.param(
            "back\\slash 100%.txt",
            "attachment; filename=\"back_slash 100_.txt\"; filename*=UTF-8''back%5Cslash%20100%25.txt",
            id="backslash-and-percent",
        ),
        pytest.param(
            "a;b=c,d'e.txt",
            "attachment; filename=\"a;b=c,d'e.txt\"",
            id="separators-in-quotes",
        ),
        pytest.param(
            "x\u2028y.txt",
            "attachment; filename=\"x_y.txt\"; filename*=UTF-8''x%E2%80%A8y.txt",
            id="line-separator",
        ),
        pytest.param(
            "\u2025\uff0f\u2025\uff0fetc\uff0fpasswd",  # ‥／‥／etc／passwd: NFKD gives ../../etc/passwd
            "attachment; filename=\".._.._etc_passwd\"; "
            "filename*=UTF-8''%E2%80%A5%EF%BC%8F%E2%80%A5%EF%BC%8Fetc%EF%BC%8Fpasswd",
            id="compat-slashes-and-dots",
        ),
        pytest.param(
            "C\uff1a\uff3cx.txt",  # C：＼x.txt
            "attachment; filename=\"C__x.txt\"; filename*=UTF-8''C%EF%BC%9A%EF%BC%BCx.txt",
            id="compat-colon-and-backslash",
        ),
        pytest.param("a:b.txt", "attachment; filename=\"a_b.txt\"; filename*=UTF-8''a%3Ab.txt", id="colon"),
        pytest.param("\u2025", "attachment; filename=\"download\"; filename*=UTF-8''%E2%80%A5", id="compat-dot-dot"),
        pytest.param("...", "attachment; filename=\"download\"; filename*=UTF-8''...", id="only-dots"),
        pytest.param("\uff0e", "attachment; filename=\"download\"; filename*=UTF-8''%EF%BC%8E", id="compat-dot"),
        pytest.param("\u0301", "attachment; filename=\"download\"; filename*=UTF-8''%CC%81", id="combining-only"),
        pytest.param("\u3000", "attachment; filename=\"download\"; filename*=UTF-8''%E3%80%80", id="compat-space-only"),
        pytest.param("emoji-\U0001F600.png", None, id="emoji"),
        pytest.param("", 'attachment; filename="download"', id="empty"),
        pytest.param(None, 'attachment; filename="download"', id="none"),
    ],
)
def test_content_disposition(filename, expected):
    value = content_disposition(filename)
    text = value.decode("ascii")  # always ASCII: a header cannot carry more safely
    assert "\r" not in text and "\n" not in text
    if expected is not None:
        assert text == expected
    if filename and "filename*=" in text:
        encoded = text.split("filename*=UTF-8''", 1)[1]
        from urllib.parse import unquote

        assert unquote(encoded, encoding="utf-8", errors="strict") == filename


def test_content_disposition_fallback_is_at_most_255_characters():
    name = "\ufdfa" * 255  # NFKD: 18 characters each
    text = content_disposition(name).decode("ascii")
    fallback = text.split('filename="', 1)[1].split('"', 1)[0]
    assert len(fallback) == 255
    assert len(text) < 255 + 255 * 9 + 60  # the fallback and filename*'s %XX%XX%XX each


async def test_a_name_that_normalizes_to_a_path_is_never_sent_as_one(backend_client):
    record = await upload(backend_client, DATA, "\u2025\uff0f\u2025\uff0fetc\uff0fpasswd")
    assert record["filename"] == "\u2025\uff0f\u2025\uff0fetc\uff0fpasswd"  # kept: no ASCII separator in it
    reply = check(await backend_client.get(f"/files/{record['id']}"))
    assert reply.headers["content-disposition"].startswith('attachment; filename=".._.._etc_passwd"; ')


def test_repr_digest_is_base64_of_the_raw_sha256():
    digest = hashlib.sha256(DATA).digest()
    assert repr_digest(sha(DATA)) == b"sha-256=:" + base64.b64encode(digest) + b":"


@pytest.mark.parametrize(
    "header, matches",
    [
        ('"abc"', True), ('W/"abc"', True), ("*", True), (' "x", "abc" ', True), ('"x",W/"abc"', True),
        ('"abcd"', False), ('"ab"', False), ("abc", False), ('"x"', False), ("", False),
    ],
)
def test_if_none_match_weak_comparison(header, matches):
    assert none_match(header, '"abc"') is matches


def test_list_header_joins_every_line():
    scope = http_scope("/", "GET", headers=[("if-match", '"a"'), ("range", "x"), ("if-match", '"b", "c"')])
    assert list_header(scope, b"if-match") == '"a", "b", "c"'
    assert list_header(scope, b"range") == "x"
    assert list_header(scope, b"if-none-match") is None


@pytest.mark.parametrize("method", ["GET", "HEAD"])
async def test_if_none_match_on_two_lines_is_one_list(backend_client, method):
    record = await upload(backend_client)
    lines = [("if-none-match", '"other"'), ("if-none-match", f'"{record["sha256"]}"')]
    reply = check(await backend_client.request(method, f"/files/{record['id']}", headers=lines))
    assert reply.status_code == 304


STAMP = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


@pytest.mark.parametrize(
    "header, allows",
    [
        (None, True),
        ('"abc"', True),
        ('W/"abc"', False),  # a weak tag never matches strongly
        ('"other"', False),
        ("Fri, 02 Jan 2026 03:04:05 GMT", True),
        ("Fri, 02 Jan 2026 03:04:06 GMT", False),
        ("not a date", False),
    ],
)
def test_if_range_allows(header, allows):
    assert if_range_allows(header, '"abc"', STAMP) is allows


# Numbers too large for a date (OverflowError inside the parser, or on the way to UTC).
OVERFLOWING_DATES = [
    pytest.param("Fri, 01 Jan 9999999999999999999999 00:00:00 GMT", id="huge-year"),
    pytest.param("Fri, 01 Jan 2100 00:00:00 +99999999999999999999", id="huge-offset"),
    pytest.param("Fri, 31 Dec 9999 23:59:59 -2359", id="past-year-9999-in-utc"),
]


@pytest.mark.parametrize("text", [*OVERFLOWING_DATES, "not a date", ""])
def test_parse_http_date_is_none_for_an_invalid_date(text):
    assert files.parse_http_date(text) is None


def test_parse_http_date_is_in_utc():
    assert files.parse_http_date("Fri, 02 Jan 2026 05:04:05 +0200") == STAMP
    assert files.parse_http_date("Fri, 02 Jan 2026 03:04:05 GMT").tzinfo == timezone.utc


@pytest.mark.parametrize(
    "recorded, served",
    [
        ("text/plain", b"text/plain"),
        ("text/plain; charset=utf-8", b"text/plain; charset=utf-8"),
        ("image/svg+xml", b"image/svg+xml"),
        ("multipart/mixed; boundary=x", b"multipart/mixed; boundary=x"),
        ("multipart/byteranges; boundary=x", b"application/octet-stream"),
        ("Multipart/ByteRanges;boundary=x", b"application/octet-stream"),
        ("multipart/byteranges ; boundary=x", b"application/octet-stream"),
        ("multipart/byteranges", b"application/octet-stream"),
        ("weird", b"application/octet-stream"),
        ("text/plain; name=ünï", b"application/octet-stream"),
        ("te xt/plain", b"application/octet-stream"),
        ('text/plain; name="a, b\\"c"; x=1;', b'text/plain; name="a, b\\"c"; x=1;'),
        ("text/plain;a=b, multipart/byteranges; boundary=AA", b"application/octet-stream"),
        ("text/plain; a=b, text/html", b"application/octet-stream"),
        ("text/plain; a", b"application/octet-stream"),
        ('text/plain; a="open', b"application/octet-stream"),
        ("", b"application/octet-stream"),
        (None, b"application/octet-stream"),
    ],
)
def test_served_type(recorded, served):
    assert served_type(recorded) == served


@pytest.mark.parametrize(
    "values, limit",
    [(None, 100), ([], 100), (["1"], 1), (["1000"], 1000), ([" 7 "], 7), (["0000001"], 1),
     (["0"], None), (["1001"], None), (["-1"], None), (["abc"], None), ([""], None), (["1.5"], None),
     (["\u0663"], None), (["1", "2"], None), (["9" * 5000], None)],
)
def test_parse_limit(values, limit):
    if limit is None:
        with pytest.raises(files.InvalidQuery):
            parse_limit(values)
    else:
        assert parse_limit(values) == limit


def test_routes_match_templates_and_exact_paths():
    def get(): ...
    def delete(): ...
    routes = Routes({"/files": {"GET": get}, "/files/{file_id}": {"GET": get, "DELETE": delete},
                     "/files/{file_id}/record": {"GET": get}})
    assert routes.match("/files") == ({"GET": get}, {})
    assert routes.match("/files/abc")[1] == {"file_id": "abc"}
    assert routes.match("/files/abc/record")[1] == {"file_id": "abc"}
    assert routes.match("/files/abc.json")[1] == {"file_id": "abc.json"}  # the handler refuses it
    for path in ("/files/", "/files/a/b", "/files//record", "/files/a/record/x", "/filesx", "/file/a"):
        assert routes.match(path) is None, path
    methods = routes.match("/files/x")[0]
    assert allowed_methods(methods) == "DELETE, GET, HEAD"
    assert pick_handler(methods, "HEAD") is get and pick_handler(methods, "PUT") is None
    assert pick_handler({"GET": get, "HEAD": delete}, "HEAD") is delete  # a route's own HEAD wins


# -- download ----------------------------------------------------------------------------


def check_file_headers(reply: httpx.Response, record: dict[str, Any], data: bytes) -> None:
    headers = reply.headers
    assert headers["etag"] == f'"{sha(data)}"'
    assert headers["repr-digest"] == "sha-256=:" + base64.b64encode(hashlib.sha256(data).digest()).decode() + ":"
    assert headers["accept-ranges"] == "bytes"
    created = datetime.fromisoformat(record["created"])
    assert parsedate_to_datetime(headers["last-modified"]) == created
    assert headers["cache-control"] == "no-cache"


async def test_download_whole_file_with_every_header(backend_client, backend):
    record = await upload(backend_client, DATA, "photo.jpg", "image/jpeg")
    reply = check(await backend_client.get(f"/files/{record['id']}"))
    assert reply.status_code == 200
    assert reply.content == DATA
    assert reply.headers["content-type"] == "image/jpeg"
    assert reply.headers["content-disposition"] == 'attachment; filename="photo.jpg"'
    assert reply.headers["x-content-type-options"] == "nosniff"
    assert "sandbox" in reply.headers["content-security-policy"]
    assert "content-range" not in reply.headers
    check_file_headers(reply, record, DATA)


async def test_head_is_get_without_the_body(backend_client):
    record = await upload(backend_client, DATA, "a.txt", "text/plain")
    get = check(await backend_client.get(f"/files/{record['id']}"))
    head = check(await backend_client.head(f"/files/{record['id']}"))
    assert head.status_code == 200 and head.content == b""
    assert int(head.headers["content-length"]) == len(get.content) == len(DATA)
    assert dict(head.headers) == dict(get.headers)


async def test_head_ignores_range(backend_client):
    record = await upload(backend_client)
    head = check(await backend_client.head(f"/files/{record['id']}", headers={"range": "bytes=0-9"}))
    assert head.status_code == 200 and head.headers["content-length"] == str(len(DATA))
    assert "content-range" not in head.headers


async def test_non_ascii_filename_round_trips(backend_client):
    name = "Früh­stück «menu» 日本.pdf"
    record = await upload(backend_client, DATA, name, "application/pdf")
    reply = check(await backend_client.get(f"/files/{record['id']}"))
    disposition = reply.headers["content-disposition"]
    assert disposition.startswith('attachment; filename="Fruh')
    from urllib.parse import unquote

    assert unquote(disposition.split("filename*=UTF-8''")[1]) == record["filename"] == name


async def test_content_type_the_client_sent_badly_is_served_as_octet_stream(backend_client):
    record = await upload(backend_client, b"x", "a.bin", "weird")
    assert record["content_type"] == "weird"
    reply = check(await backend_client.get(f"/files/{record['id']}"))
    assert reply.headers["content-type"] == "application/octet-stream"


async def test_a_stored_byteranges_type_is_never_served(backend_client):
    # RFC 9110 §14.6: no multipart answer to a single range; the uploader's boundary must not frame ours.
    record = await upload(backend_client, DATA, "parts.bin", "multipart/byteranges; boundary=THEIRS")
    for headers in ({}, {"range": "bytes=0-9"}):
        reply = check(await backend_client.get(f"/files/{record['id']}", headers=headers))
        assert reply.status_code == (206 if headers else 200)
        assert reply.headers["content-type"] == "application/octet-stream"


@pytest.mark.parametrize(
    "range_header, start, stop",
    [
        pytest.param("bytes=0-9", 0, 10, id="first"),
        pytest.param("bytes=100-199", 100, 200, id="middle"),
        pytest.param("bytes=-4", len(DATA) - 4, len(DATA), id="suffix"),
        pytest.param("bytes=10000-", 10000, len(DATA), id="open"),
        pytest.param("bytes=0-", 0, len(DATA), id="whole-as-range"),
        pytest.param(f"bytes={len(DATA) - 1}-99999999", len(DATA) - 1, len(DATA), id="clamped"),
        pytest.param(f"bytes={'0' * 30}5-{'0' * 30}9", 5, 10, id="leading-zeros"),
    ],
)
async def test_single_range_is_206(backend_client, range_header, start, stop):
    record = await upload(backend_client)
    reply = check(await backend_client.get(f"/files/{record['id']}", headers={"range": range_header}))
    assert reply.status_code == 206
    assert reply.content == DATA[start:stop]
    assert reply.headers["content-range"] == f"bytes {start}-{stop - 1}/{len(DATA)}"
    assert reply.headers["content-disposition"] == 'attachment; filename="data.bin"'
    check_file_headers(reply, record, DATA)  # Repr-Digest is the whole file's, even in a 206


@pytest.mark.parametrize(
    "range_header",
    ["bytes=0-1,5-6", "bytes=x-y", "items=0-5", "bytes=9-1", "bytes=0-1,999999-"],
)
async def test_several_or_unreadable_ranges_get_the_whole_file(backend_client, range_header):
    record = await upload(backend_client)
    reply = check(await backend_client.get(f"/files/{record['id']}", headers={"range": range_header}))
    assert reply.status_code == 200 and reply.content == DATA
    assert "content-range" not in reply.headers


async def test_two_range_or_if_range_lines_get_the_whole_file(backend_client):
    """RFC 9110 §5.3: two lines of a header that is not a list are not one value we can read
    (a proxy in front may have read either): the whole file, not the first line's range."""
    record = await upload(backend_client)
    url = f"/files/{record['id']}"
    etag = f'"{record["sha256"]}"'
    for headers in (
        [("range", "bytes=0-9"), ("range", "bytes=10-19")],
        [("range", "bytes=0-9"), ("if-range", etag), ("if-range", etag)],
    ):
        reply = check(await backend_client.get(url, headers=headers))
        assert reply.status_code == 200 and reply.content == DATA, headers
        assert "content-range" not in reply.headers


@pytest.mark.parametrize("range_header", [f"bytes={len(DATA)}-", "bytes=999999-1000000", "bytes=-0"])
async def test_unsatisfiable_range_is_416(backend_client, range_header):
    record = await upload(backend_client)
    reply = await backend_client.get(f"/files/{record['id']}", headers={"range": range_header})
    check_error(reply, 416, "range_not_satisfiable")
    assert reply.headers["content-range"] == f"bytes */{len(DATA)}"


async def test_empty_file(backend_client):
    record = await upload(backend_client, b"", "empty.txt", "text/plain")
    reply = check(await backend_client.get(f"/files/{record['id']}"))
    assert reply.status_code == 200 and reply.content == b"" and reply.headers["content-length"] == "0"
    assert reply.headers["etag"] == f'"{sha(b"")}"'
    ranged = await backend_client.get(f"/files/{record['id']}", headers={"range": "bytes=0-"})
    check_error(ranged, 416, "range_not_satisfiable")
    assert ranged.headers["content-range"] == "bytes */0"
    suffix = check(await backend_client.get(f"/files/{record['id']}", headers={"range": "bytes=-5"}))
    assert suffix.status_code == 200 and suffix.content == b"" and "content-range" not in suffix.headers


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    "if_none_match", ['"{sha}"', 'W/"{sha}"', "*", '"other", "{sha}"'], ids=["strong", "weak", "star", "list"]
)
async def test_if_none_match_is_304(backend_client, method, if_none_match):
    record = await upload(backend_client)
    value = if_none_match.format(sha=record["sha256"])
    # A matching If-None-Match wins over Range (RFC 9110 §13.2.2).
    reply = check(await backend_client.request(method, f"/files/{record['id']}",
                                       headers={"if-none-match": value, "range": "bytes=0-1"}))
    assert reply.status_code == 304
    check_file_headers(reply, record, DATA)
    assert "content-type" not in reply.headers and "content-disposition" not in reply.headers


async def test_if_none_match_other_tag_is_200(backend_client):
    record = await upload(backend_client)
    reply = check(await backend_client.get(f"/files/{record['id']}", headers={"if-none-match": f'"{"0" * 64}"'}))
    assert reply.status_code == 200 and reply.content == DATA


async def test_if_modified_since(backend_client):
    record = await upload(backend_client)
    modified = datetime.fromisoformat(record["created"])
    url = f"/files/{record['id']}"
    same = check(await backend_client.get(url, headers={"if-modified-since": format_datetime(modified, usegmt=True)}))
    assert same.status_code == 304
    earlier = format_datetime(datetime(2000, 1, 1, tzinfo=timezone.utc), usegmt=True)
    assert check(await backend_client.get(url, headers={"if-modified-since": earlier})).status_code == 200
    assert check(await backend_client.get(url, headers={"if-modified-since": "garbage"})).status_code == 200
    # If-None-Match present: If-Modified-Since is not looked at.
    both = {"if-modified-since": format_datetime(modified, usegmt=True), "if-none-match": '"x"'}
    assert check(await backend_client.get(url, headers=both)).status_code == 200


@pytest.mark.parametrize(
    "header, matches",
    [
        ('"abc"', True), ("*", True), (' "x", "abc" ', True), ('"x","abc"', True),
        ('W/"abc"', False), ('"x", W/"abc"', False), ('"abcd"', False), ("abc", False), ("", False),
    ],
)
def test_if_match_strong_comparison(header, matches):
    assert files.strong_match(header, '"abc"') is matches


EARLIER = "Sat, 01 Jan 2000 00:00:00 GMT"
LATER = "Fri, 01 Jan 2100 00:00:00 GMT"

# (headers, status) with {sha} and {lm} (Last-Modified) filled in: RFC 9110 §13.2.2 steps 1-2,
# the same on GET, HEAD and DELETE.
IF_MATCH_OR_UNMODIFIED = [
    pytest.param({"if-match": '"{sha}"'}, 200, id="if-match"),
    pytest.param({"if-match": "*"}, 200, id="if-match-star"),
    pytest.param({"if-match": '"other", "{sha}"'}, 200, id="if-match-list"),
    pytest.param({"if-match": 'W/"{sha}"'}, 412, id="if-match-weak"),
    pytest.param({"if-match": '"other"'}, 412, id="if-match-other"),
    pytest.param({"if-unmodified-since": "{lm}"}, 200, id="unmodified-since-last-modified"),
    pytest.param({"if-unmodified-since": LATER}, 200, id="unmodified-since-later"),
    pytest.param({"if-unmodified-since": EARLIER}, 412, id="unmodified-since-earlier"),
    pytest.param({"if-unmodified-since": "garbage"}, 200, id="unmodified-since-invalid"),
    pytest.param({"if-match": '"{sha}"', "if-unmodified-since": EARLIER}, 200, id="if-match-overrides-date"),
]


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    "conditions, status",
    [
        *IF_MATCH_OR_UNMODIFIED,
        pytest.param({"if-match": '"other"', "if-none-match": '"{sha}"'}, 412, id="if-match-before-none-match"),
        pytest.param({"if-match": '"{sha}"', "if-none-match": '"{sha}"'}, 304, id="if-match-then-none-match"),
        pytest.param({"if-unmodified-since": EARLIER, "if-modified-since": EARLIER}, 412, id="unmodified-first"),
    ],
)
async def test_preconditions_on_a_download(backend_client, method, conditions, status):
    record = await upload(backend_client)
    url = f"/files/{record['id']}"
    last_modified = check(await backend_client.head(url)).headers["last-modified"]
    headers = {k: v.format(sha=record["sha256"], lm=last_modified) for k, v in conditions.items()}
    reply = check(await backend_client.request(method, url, headers={**headers, "range": "bytes=0-9"}))
    expected = 206 if status == 200 and method == "GET" else status  # a passed condition goes on to Range
    assert reply.status_code == expected
    if status == 412 and method == "GET":
        check_error(reply, 412, "precondition_failed")


async def test_if_match_on_two_lines_is_one_list(backend_client):
    record = await upload(backend_client)
    lines = [("if-match", '"other"'), ("if-match", f'"{record["sha256"]}"')]
    assert check(await backend_client.get(f"/files/{record['id']}", headers=lines)).status_code == 200


@pytest.mark.parametrize(
    "conditions, status",
    [
        *IF_MATCH_OR_UNMODIFIED,
        pytest.param({"if-none-match": '"{sha}"'}, 412, id="none-match"),
        pytest.param({"if-none-match": 'W/"{sha}"'}, 412, id="none-match-weak"),
        pytest.param({"if-none-match": "*"}, 412, id="none-match-star"),
        pytest.param({"if-none-match": '"other"'}, 200, id="none-match-other"),
        pytest.param({"if-modified-since": LATER}, 200, id="modified-since-is-for-get"),
    ],
)
async def test_preconditions_on_a_delete(backend_client, backend, conditions, status):
    record = await upload(backend_client)
    url = f"/files/{record['id']}"
    last_modified = check(await backend_client.head(url)).headers["last-modified"]
    headers = {k: v.format(sha=record["sha256"], lm=last_modified) for k, v in conditions.items()}
    reply = check(await backend_client.delete(url, headers=headers))
    if status == 412:
        check_error(reply, 412, "precondition_failed")
        assert backend.stored_ids() == [record["id"]]
    else:
        assert reply.status_code == 204
        assert backend.stored_ids() == []


async def test_a_delete_of_a_missing_file_is_404_whatever_its_conditions(backend_client):
    for headers in ({"if-match": "*"}, {"if-match": '"x"'}, {"if-none-match": "*"}, {"if-unmodified-since": EARLIER}):
        check_error(await backend_client.delete(f"/files/{'0' * 32}", headers=headers), 404, "not_found")


async def test_if_range_on_a_download(backend_client):
    record = await upload(backend_client)
    url = f"/files/{record['id']}"
    last_modified = check(await backend_client.head(url)).headers["last-modified"]
    cases = [
        (f'"{record["sha256"]}"', 206),
        (f'W/"{record["sha256"]}"', 200),
        ('"an-older-version"', 200),
        (last_modified, 206),
        ("Sat, 01 Jan 2000 00:00:00 GMT", 200),
    ]
    for if_range, status in cases:
        reply = check(await backend_client.get(url, headers={"range": "bytes=0-9", "if-range": if_range}))
        assert reply.status_code == status, if_range
        assert reply.content == (DATA[:10] if status == 206 else DATA)


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("date", OVERFLOWING_DATES)
async def test_an_overflowing_date_is_ignored(backend_client, method, date):
    # RFC 9110 §13.1.3, §13.1.5: an invalid date is ignored (If-Modified-Since) or no match (If-Range).
    record = await upload(backend_client)
    url = f"/files/{record['id']}"
    for headers in ({"if-modified-since": date}, {"if-range": date, "range": "bytes=0-1"}):
        reply = check(await backend_client.request(method, url, headers=headers))
        assert reply.status_code == 200, headers
        assert reply.headers["content-length"] == str(len(DATA)) and "content-range" not in reply.headers
        if method == "GET":
            assert reply.content == DATA


@pytest.mark.parametrize(
    "data", [b"", b'{"id": "', b"\xff\xfe{}", b"[]", b"null", b'{"id": "x"}',
             b'{"sha256": "zz", "size": 4}', b'{"sha256": "%s", "size": 4, "filename": 123}' % (b"a" * 64),
             b'{"sha256": "%s", "size": -1}' % (b"a" * 64),
             b'{"sha256": "%s", "size": 4, "filename": "\\udc80"}' % (b"a" * 64),
             b'{"sha256": "%s", "size": 4, "metadata": ["a"]}' % (b"a" * 64),
             b'{"sha256": "%s", "size": 4, "metadata": {"a": null}}' % (b"a" * 64),
             b'{"sha256": "%s", "size": 4, "metadata": {"\\udc80": "a"}}' % (b"a" * 64)],
    ids=["empty", "cut-short", "not-utf8", "list", "null", "no-digest", "digest-not-hex", "filename-not-text",
         "negative-size", "lone-surrogate", "metadata-not-object", "metadata-value-not-text", "metadata-key-not-text"],
)
async def test_an_unreadable_record_is_a_missing_file(backend_client, backend, caplog, data):
    record = await upload(backend_client)
    other = await upload(backend_client, b"other")
    backend.overwrite_record(record["id"], data)  # what a crash with UPLOAD_FSYNC=0 may leave
    url = f"/files/{record['id']}"
    tus = {"tus-resumable": "1.0.0"}
    asks = [("GET", url, {}), ("HEAD", url, {}), ("HEAD", url, tus), ("GET", f"{url}/record", {}),
            ("HEAD", f"{url}/record", {}), ("DELETE", url, {"if-match": "*"}),
            ("PATCH", url, {**tus, "content-type": "application/offset+octet-stream", "upload-offset": "0"})]
    for method, path, headers in asks:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="upload_asgi"):
            reply = check(await backend_client.request(method, path, headers=headers))
        assert reply.status_code == 404, (method, path, headers)
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert len(warned) == 1 and record["id"] in warned[0], (method, path, headers, caplog.text)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert check(await backend_client.get("/files")).json()["files"] == [other]
    # A DELETE still removes the file and its record.
    assert check(await backend_client.delete(url)).status_code == 204
    assert backend.stored_ids() == [other["id"]]
    assert not [name for name in backend.stored_names() if record["id"] in name]


async def test_a_record_without_created_has_no_last_modified(client, upload_dir):  # local: edits a sidecar
    record = await upload(client)
    sidecar = upload_dir / f"{record['id']}.json"
    old = {k: v for k, v in record.items() if k != "created"}  # stored before "created" existed
    sidecar.write_text(json.dumps(old))
    since = {"if-modified-since": "Sat, 01 Jan 2000 00:00:00 GMT"}
    reply = check(await client.get(f"/files/{record['id']}", headers=since))
    assert reply.status_code == 200 and reply.content == DATA and "last-modified" not in reply.headers


async def test_multi_chunk_download_is_exact(backend_client):
    data = os.urandom(3 * MiB + 123)  # more than one 1 MiB read
    record = await upload(backend_client, data)
    reply = check(await backend_client.get(f"/files/{record['id']}"))
    assert sha(reply.content) == sha(data)
    part = check(await backend_client.get(f"/files/{record['id']}", headers={"range": f"bytes={MiB - 1}-{2 * MiB + 1}"}))
    assert part.status_code == 206 and part.content == data[MiB - 1 : 2 * MiB + 2]


# -- record, list, delete ------------------------------------------------------------------


async def test_record(backend_client):
    record = await upload(backend_client, DATA, "r.txt", "text/plain")
    reply = check(await backend_client.get(f"/files/{record['id']}/record"))
    assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
    assert reply.json() == record
    assert record["created"].endswith("Z") and datetime.fromisoformat(record["created"]).tzinfo is not None
    head = check(await backend_client.head(f"/files/{record['id']}/record"))
    assert head.status_code == 200 and head.headers["content-length"] == reply.headers["content-length"]
    check_error(await backend_client.get(f"/files/{'0' * 32}/record"), 404, "not_found")


async def upload_several(backend: Any, client: httpx.AsyncClient, count: int) -> list[dict[str, Any]]:
    """`count` uploads a listing tick apart (and the next one a tick later): the listing orders them."""
    records = []
    for i in range(count):
        records.append(await upload(client, f"file {i}".encode(), f"{i}.txt", "text/plain"))
        await asyncio.sleep(backend.listing_tick)
    return records


async def test_list_newest_first_across_pages_with_link(backend, backend_client):
    records = await upload_several(backend, backend_client, 5)
    seen, url, pages = [], "/files?limit=2", 0
    while url:
        reply = check(await backend_client.get(url))
        assert reply.status_code == 200 and reply.headers["content-type"] == "application/json"
        page = reply.json()
        assert set(page) == {"files", "next_cursor"}
        seen += page["files"]
        pages += 1
        if page["next_cursor"] is None:
            assert "link" not in reply.headers
            url = None
        else:
            link = reply.headers["link"]
            assert link == f'</files?limit=2&cursor={page["next_cursor"]}>; rel="next"'
            url = link[1 : link.index(">")]
    assert pages == 3
    assert seen == records[::-1]


async def test_list_default_limit_and_empty(backend_client, backend):
    reply = check(await backend_client.get("/files"))
    assert reply.json() == {"files": [], "next_cursor": None}
    records = await upload_several(backend, backend_client, 3)
    reply = check(await backend_client.get("/files"))
    assert reply.json() == {"files": records[::-1], "next_cursor": None}
    head = check(await backend_client.head("/files"))
    assert head.status_code == 200 and head.headers["content-length"] == reply.headers["content-length"]


async def test_list_is_stable_while_files_come_and_go(backend, backend_client):
    records = await upload_several(backend, backend_client, 4)
    first = check(await backend_client.get("/files?limit=2")).json()
    assert first["files"] == records[:1:-1]
    newer = await upload(backend_client, b"new", "new.txt")  # newer than the cursor: not on later pages
    check(await backend_client.delete(f"/files/{records[1]['id']}"))
    rest = check(await backend_client.get(f"/files?limit=2&cursor={first['next_cursor']}")).json()
    assert rest == {"files": [records[0]], "next_cursor": None}
    assert check(await backend_client.get("/files?limit=1")).json()["files"] == [newer]


async def test_a_page_of_long_records_ends_early_and_the_next_goes_on(backend, backend_client, monkeypatch):
    """A page stops once its records pass PAGE_BYTES as stored (records may hold a 64 KiB
    description: a page of 1000 was hundreds of MiB); the cursor goes on from its last record."""
    monkeypatch.setattr("upload_service.localstore.PAGE_BYTES", 2000)
    monkeypatch.setattr("upload_service.s3store.PAGE_BYTES", 2000)
    records = []
    for i in range(5):
        reply = check(await backend_client.post("/upload", files={"file": (f"{i}.txt", b"x")},
                                                data={"description": f"{i}" * 1000}))
        records.append(reply.json())
        await asyncio.sleep(backend.listing_tick)
    seen, url, sizes = [], "/files?limit=1000", []
    while url:
        reply = check(await backend_client.get(url))
        page = reply.json()
        seen += page["files"]
        sizes.append(len(page["files"]))
        url = reply.headers["link"][1 : reply.headers["link"].index(">")] if page["next_cursor"] else None
    assert seen == records[::-1]
    assert sizes == [2, 2, 1]  # each record is ~1.2 KB: the second passes 2000 bytes


def stored_files(upload_dir: Path, count: int, **extra: Any) -> LocalStore:
    """A local store of `count` one-byte files, the i-th written i seconds after the epoch."""
    store = LocalStore(upload_dir, fsync=False)
    store.prepare()
    for i in range(count):
        file_id = f"{i:032x}"
        (upload_dir / file_id).write_bytes(b"x")
        (upload_dir / f"{file_id}.json").write_text(json.dumps({"id": file_id, "size": 1, "sha256": "0" * 64, **extra}))
        os.utime(upload_dir / f"{file_id}.json", ns=(i * 10**9, i * 10**9))
    return store


async def every_id(store: LocalStore, limit: int) -> list[str]:
    """The ids of every page, following the cursors."""
    ids, cursor = [], None
    while True:
        page = await store.list(limit, cursor)
        ids += [r["id"] for r in page.records]
        cursor = page.next_cursor
        if cursor is None:
            return ids


async def test_a_page_of_64_kib_descriptions_stays_near_a_mib(upload_dir):
    store = stored_files(upload_dir, 40, description="\x01" * 65536)  # \u0001 in JSON: 6 bytes each
    page = await store.list(1000)
    assert 1 <= len(page.records) <= 3 and page.next_cursor is not None
    assert await every_id(store, 1000) == [f"{i:032x}" for i in range(39, -1, -1)]


async def test_list_skips_an_unreadable_record(client, upload_dir):  # local: edits a sidecar (S3: test_s3store)
    records = await upload_several(LocalBackend(upload_dir), client, 3)
    (upload_dir / f"{records[1]['id']}.json").write_text("{not json")
    reply = check(await client.get("/files"))
    assert reply.status_code == 200
    assert reply.json()["files"] == [records[2], records[0]]


@pytest.mark.parametrize(
    "query",
    ["limit=0", "limit=-1", "limit=abc", "limit=1001", "limit=1.5", "limit=", "limit=1&limit=2", "limit=%D9%A3",
     "limit=000", "cursor=&cursor="],
)
async def test_list_bad_limit_is_400(backend_client, query):
    check_error(await backend_client.get(f"/files?{query}"), 400, "invalid_query")


@pytest.mark.parametrize(
    "cursor",
    ["abc", "1-xyz", "1-" + "A" * 32, "%C2%B2-" + "0" * 32, "9" * 5000 + "-" + "0" * 32, "-" + "0" * 32,
     "1-" + "0" * 31],
)
async def test_list_bad_cursor_is_400(backend_client, cursor):
    check_error(await backend_client.get(f"/files?cursor={cursor}"), 400, "invalid_query")


async def test_list_never_holds_more_than_a_page(upload_dir, monkeypatch):
    """The listing keeps limit + 1 keys: heapq.nlargest over a generator, not a list of the dir."""
    store = stored_files(upload_dir, 300)
    import heapq

    sizes = []
    real = heapq.nlargest

    def spy(n, iterable, *args, **kwargs):
        assert not isinstance(iterable, (list, tuple)), "the directory was read into a list"
        sizes.append(n)
        return real(n, iterable, *args, **kwargs)

    monkeypatch.setattr(heapq, "nlargest", spy)
    page = await store.list(7)
    assert [r["id"] for r in page.records] == [f"{i:032x}" for i in range(299, 292, -1)]
    assert sizes == [8]
    assert await every_id(store, 50) == [f"{i:032x}" for i in range(299, -1, -1)]


async def test_listings_never_hold_back_downloads_deletes_health_or_resumable_uploads(client, monkeypatch):
    """Slow scans (many stored files) run one at a time on a thread of their own: with more listings
    at once than the default executor has threads, the rest still answers."""
    kept = await upload(client, b"kept bytes", "kept.txt")
    doomed = await upload(client, b"doomed", "doomed.txt")
    release = threading.Event()
    scan = LocalStore._list

    def slow_scan(self: LocalStore, limit: int, cursor: str | None) -> Any:
        release.wait(30)
        return scan(self, limit, cursor)

    monkeypatch.setattr(LocalStore, "_list", slow_scan)
    default_threads = min(32, (os.cpu_count() or 1) + 4)
    listings = [asyncio.create_task(client.get("/files")) for _ in range(default_threads + 2)]
    try:
        await asyncio.sleep(0.2)  # every listing is waiting for its scan
        download, deleted, health, created = await asyncio.wait_for(asyncio.gather(
            client.get(f"/files/{kept['id']}"),
            client.delete(f"/files/{doomed['id']}"),
            client.get("/health"),
            client.post("/files", headers={"Tus-Resumable": "1.0.0", "Upload-Length": "3"}),
        ), 10)
    finally:
        release.set()
    assert download.status_code == 200 and download.content == b"kept bytes"
    assert deleted.status_code == 204 and health.status_code == 200 and created.status_code == 201
    for reply in await asyncio.gather(*listings):
        assert check(reply).status_code == 200 and reply.json()["files"] == [kept]


async def test_delete_of_a_multipart_file_leaves_nothing(backend, backend_client):
    """On S3 a file of three parts (5 MiB each here): a range across a part edge, then gone whole."""
    data = os.urandom(2 * 5 * MiB + 1)
    record = await upload(backend_client, data)
    backend.assert_stored(record, data)
    reply = await backend_client.get(f"/files/{record['id']}", headers={"range": "bytes=5242870-5242889"})
    assert reply.status_code == 206 and reply.content == data[5242870:5242890]
    assert (await backend_client.delete(f"/files/{record['id']}")).status_code == 204
    backend.assert_nothing_stored()


async def test_of_deletes_at_once_one_is_204(backend_client, backend):
    if backend.name != "local":
        pytest.skip("an S3 DELETE does not say whether the object was there: two at once may both be 204")
    record = await upload(backend_client)
    replies = await asyncio.gather(*(backend_client.delete(f"/files/{record['id']}") for _ in range(8)))
    assert sorted(reply.status_code for reply in replies) == [204] + [404] * 7
    backend.assert_nothing_stored()


async def test_delete_then_404(backend_client, backend):
    record = await upload(backend_client)
    url = f"/files/{record['id']}"
    reply = check(await backend_client.delete(url))
    assert reply.status_code == 204
    check_error(await backend_client.get(url), 404, "not_found")
    head = check(await backend_client.head(url))
    assert head.status_code == 404 and head.headers["content-type"] == "application/json"
    check_error(await backend_client.get(url + "/record"), 404, "not_found")
    check_error(await backend_client.delete(url), 404, "not_found")
    assert check(await backend_client.get("/files")).json()["files"] == []
    backend.assert_nothing_stored()


@pytest.mark.parametrize(
    "method, path, allow",
    # /files and /files/<id> also take the resumable uploads' methods (upload_service/resumable.py).
    [("PUT", "/files/{id}", "DELETE, GET, HEAD, OPTIONS, PATCH"), ("POST", "/files/{id}", "DELETE, GET, HEAD, OPTIONS, PATCH"),
     ("DELETE", "/files/{id}/record", "GET, HEAD"), ("PATCH", "/files/{id}/record", "GET, HEAD"),
     ("DELETE", "/files", "GET, HEAD, OPTIONS, POST")],
)
async def test_other_methods_are_405_with_allow(backend_client, method, path, allow):
    record = await upload(backend_client)
    reply = await backend_client.request(method, path.format(id=record["id"]))
    check_error(reply, 405, "method_not_allowed")
    assert reply.headers["allow"] == allow


# -- Location -------------------------------------------------------------------------------


async def test_201_carries_location(backend_client):
    reply = check(await backend_client.post("/upload", files={"file": ("a.txt", b"a")}))
    assert reply.headers["location"] == f"/files/{reply.json()['id']}"
    pair = [("files", ("x", b"x")), ("files", ("y", b"yy"))]
    several = check(await backend_client.post("/upload-multiple", files=pair))
    assert several.headers["location"] == f"/files/{several.json()['files'][0]['id']}"
    assert check(await backend_client.get(several.headers["location"])).content == b"x"


async def test_mounted_location_and_link_carry_the_prefix(backend, backend_app):
    async with make_client(backend_app, root_path="/up") as backend_client:
        first = check(await backend_client.post("/up/upload", files={"file": ("a.txt", b"a")}))
        await asyncio.sleep(backend.listing_tick)
        second = check(await backend_client.post("/up/upload", files={"file": ("b.txt", b"bb")}))
        assert second.headers["location"] == f"/up/files/{second.json()['id']}"
        assert check(await backend_client.get(second.headers["location"])).content == b"bb"
        page = check(await backend_client.get("/up/files?limit=1"))
        link = page.headers["link"]
        assert link.startswith("</up/files?limit=1&cursor=")
        rest = check(await backend_client.get(link[1 : link.index(">")])).json()
        assert rest == {"files": [first.json()], "next_cursor": None}


@pytest.mark.parametrize(
    "root_path, expected",
    [("", "/files/x?a=1"), ("/up/", "/up/files/x?a=1"), ("/a b/ü?>%", "/a%20b/%C3%BC%3F%3E%25/files/x?a=1"),
     ("//evil.example", "/evil.example/files/x?a=1"),
     ("/x\r\nSet-Cookie: a=b", "/x%0D%0ASet-Cookie:%20a=b/files/x?a=1")],
)
def test_mount_url(root_path, expected):
    assert files.mount_url({"root_path": root_path}, "/files/x?a=1") == expected


# -- tokens -----------------------------------------------------------------------------------


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@pytest.fixture
async def guarded(make_backend_app: Any) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(make_backend_app(token="write-token", read_token="read-token")) as client:
        yield client


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", ["/files/{id}", "/files/{id}/record", "/files"])
async def test_read_token_guards_reads_and_either_token_reads(guarded, method, path):
    record = await upload(guarded, headers=bearer("write-token"))
    url = path.format(id=record["id"])
    for headers in ({}, bearer("wrong"), {"authorization": "Basic cmVhZC10b2tlbg=="}, bearer("read-token x")):
        reply = check(await guarded.request(method, url, headers=headers))
        assert reply.status_code == 401
        assert reply.headers["www-authenticate"].startswith("Bearer")
        if method == "GET":
            assert reply.json()["error"] == "unauthorized"
    for token in ("read-token", "write-token"):
        reply = check(await guarded.request(method, url, headers=bearer(token)))
        assert reply.status_code == 200


async def test_read_token_is_asked_before_the_id_is_looked_at(guarded):
    for path in ("/files/nonsense", f"/files/{'0' * 32}", f"/files/{'0' * 32}/record"):
        assert check(await guarded.get(path)).status_code == 401
        assert check(await guarded.get(path, headers=bearer("read-token"))).status_code == 404


async def test_delete_needs_the_write_token(guarded, backend):
    record = await upload(guarded, headers=bearer("write-token"))
    url = f"/files/{record['id']}"
    for headers in ({}, bearer("read-token"), bearer("wrong")):
        reply = await guarded.delete(url, headers=headers)
        check_error(reply, 401, "unauthorized")
        assert reply.headers["www-authenticate"].startswith("Bearer")
    assert backend.stored_ids() == [record["id"]]
    assert check(await guarded.delete(url, headers=bearer("write-token"))).status_code == 204
    assert backend.stored_ids() == []


async def test_read_token_cannot_upload(guarded, backend):
    reply = await guarded.post("/upload", files={"file": ("a", b"a")}, headers=bearer("read-token"))
    check_error(reply, 401, "unauthorized")
    backend.assert_nothing_stored()


async def test_write_token_alone_leaves_reads_open(make_backend_app):
    async with make_client(make_backend_app(token="write-token")) as client:
        record = await upload(client, headers=bearer("write-token"))
        assert check(await client.get(f"/files/{record['id']}")).content == DATA
        assert check(await client.get("/files")).json()["files"] == [record]
        check_error(await client.delete(f"/files/{record['id']}"), 401, "unauthorized")


def test_read_token_setting():
    config = upload_asgi.Config.from_env({"UPLOAD_READ_TOKEN": "abc"})
    assert config.read_token == "abc"
    assert upload_asgi.Config.from_env({}).read_token is None
    with pytest.raises(upload_asgi.ConfigError, match="UPLOAD_READ_TOKEN"):
        upload_asgi.Config.from_env({"UPLOAD_READ_TOKEN": "has space"})


# -- hostile ids -------------------------------------------------------------------------------


GOOD_ID = "0123456789abcdef0123456789abcdef"
HOSTILE_IDS = [
    pytest.param("..", id="dot-dot"),
    pytest.param(".", id="dot"),
    pytest.param("../../../etc/passwd", id="traversal"),
    pytest.param("..%2F..%2Fetc%2Fpasswd", id="encoded-traversal-undecoded"),
    pytest.param("%2e%2e", id="encoded-dots-undecoded"),
    pytest.param(".partial", id="partial-dir"),
    pytest.param(f"{GOOD_ID}.json", id="sidecar-name"),
    pytest.param(f".partial/{GOOD_ID}", id="partial-file"),
    pytest.param(GOOD_ID.upper(), id="upper-case"),
    pytest.param(GOOD_ID[:-1], id="31-hex"),
    pytest.param(GOOD_ID + "0", id="33-hex"),
    pytest.param(GOOD_ID + "\n", id="trailing-newline"),
    pytest.param(GOOD_ID + "\x00", id="nul-after"),
    pytest.param("\x00", id="nul"),
    pytest.param(GOOD_ID + " ", id="trailing-space"),
    pytest.param(" " + GOOD_ID, id="leading-space"),
    pytest.param("\u0660" * 32, id="arabic-digits"),
    pytest.param("０" * 32, id="fullwidth-digits"),
    pytest.param("a" * 100_000, id="very-long"),
    pytest.param("/" + GOOD_ID, id="double-slash"),
    pytest.param(f"{GOOD_ID}/", id="trailing-slash"),
    pytest.param(f"{GOOD_ID}/../{GOOD_ID}", id="dot-dot-inside"),
    pytest.param("~", id="tilde"),
    pytest.param("*", id="star"),
]


# Local only: the good id is made by renaming files on disk; that no bad id reaches any
# store is test_the_store_never_sees_a_bad_id, on both backends.


@pytest.fixture
async def stored_good_id(app, upload_dir) -> AsyncIterator[None]:
    """A stored file whose id is GOOD_ID (renamed), so a near miss has a real neighbour."""
    async with make_client(app) as client:
        record = await upload(client)
    (upload_dir / record["id"]).rename(upload_dir / GOOD_ID)
    (upload_dir / f"{record['id']}.json").write_text(json.dumps({**record, "id": GOOD_ID}))
    (upload_dir / f"{record['id']}.json").rename(upload_dir / f"{GOOD_ID}.json")
    yield


@pytest.mark.parametrize("bad_id", HOSTILE_IDS)
@pytest.mark.parametrize("method, suffix", [("GET", ""), ("HEAD", ""), ("DELETE", ""), ("GET", "/record")])
async def test_hostile_ids_are_404_and_touch_nothing(app, upload_dir, stored_good_id, bad_id, method, suffix):
    # A hand-made scope: the ASGI path is already percent-decoded, and httpx would tidy "..".
    reply: Reply = await call_app(app, http_scope(f"/files/{bad_id}{suffix}", method))
    assert reply.status == 404, reply.body
    if method == "HEAD":
        assert reply.body == b"" and int(reply.headers["content-length"]) > 0
    else:
        reply.check_length()
        assert reply.json()["error"] == "not_found"
    assert stored_ids(upload_dir) == [GOOD_ID]
    assert (upload_dir / f"{GOOD_ID}.json").is_file()


async def test_the_good_id_itself_works(app, upload_dir, stored_good_id):
    reply = await call_app(app, http_scope(f"/files/{GOOD_ID}/record", "GET"))
    assert reply.status == 200 and reply.json()["id"] == GOOD_ID


async def test_the_store_never_sees_a_bad_id(backend_app, monkeypatch):
    seen = []
    store = backend_app.prepare()
    for name in ("open", "record", "delete"):
        real = getattr(store, name)

        async def spy(file_id, _real=real):
            seen.append(file_id)
            return await _real(file_id)

        monkeypatch.setattr(store, name, spy)
    for bad in ("..", f"{GOOD_ID}.json", "\x00", "a" * 5000):
        for method, suffix in (("GET", ""), ("DELETE", ""), ("GET", "/record")):
            assert (await call_app(backend_app, http_scope(f"/files/{bad}{suffix}", method))).status == 404
    assert seen == []


# -- delete during a download, disconnects, failures ---------------------------------------------


async def download_while(app: Any, file_id: str, after_first_chunk: Any, headers=()) -> Reply:
    """GET a file with a hand-driven send; run `after_first_chunk()` once the first body chunk is out."""
    reply = Reply()
    done = asyncio.Event()
    ran = False

    async def send(message: dict[str, Any]) -> None:
        nonlocal ran
        await reply.record(message)
        if message["type"] == "http.response.body" and message.get("body") and not ran:
            ran = True
            await after_first_chunk()
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    async def receive() -> dict[str, Any]:
        if not hasattr(receive, "sent"):
            receive.sent = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    await app(http_scope(f"/files/{file_id}", "GET", headers=headers), receive, send)
    return reply


async def test_a_delete_during_a_download_never_tears_it(backend_app, backend_client, backend):
    data = os.urandom(3 * MiB + 7)  # several reads
    record = await upload(backend_client, data)

    async def delete() -> None:
        reply = await backend_client.delete(f"/files/{record['id']}")
        assert reply.status_code == 204

    reply = await download_while(backend_app, record["id"], delete)
    assert reply.status == 200
    reply.check_length()
    assert sha(reply.body) == sha(data)
    backend.assert_nothing_stored()
    check_error(await backend_client.get(f"/files/{record['id']}"), 404, "not_found")


@pytest.mark.parametrize("ranged", [False, True])
async def test_a_delete_between_the_record_and_the_bytes_is_a_404_or_every_byte(
    backend_app, backend_client, backend, monkeypatch, ranged
):
    """A DELETE just after a GET read the record: locally the open file still gives every byte;
    on S3, whose object is read only then, a 404 before any status, never a 200 or 206 cut off."""
    data = os.urandom(2 * MiB + 5)
    record = await upload(backend_client, data)
    store = backend_app.prepare()
    real_open = type(store).open

    async def open_then_deleted(self: Any, file_id: str) -> Any:
        stored = await real_open(self, file_id)
        assert await store.delete(file_id) is True
        return stored

    monkeypatch.setattr(type(store), "open", open_then_deleted)
    reply = await backend_client.get(f"/files/{record['id']}", headers={"Range": "bytes=5-"} if ranged else {})
    if backend.name == "local":
        assert reply.status_code == (206 if ranged else 200)
        assert check(reply).content == (data[5:] if ranged else data)
    else:
        check_error(reply, 404, "not_found")
    backend.assert_nothing_stored()


async def test_local_file_keeps_reading_after_delete(upload_dir, app, client):  # the local store's open file
    data = os.urandom(2 * MiB + 1)
    record = await upload(client, data)
    store = app.prepare()
    opened = await store.open(record["id"])
    try:
        assert await store.delete(record["id"]) is True
        assert not (upload_dir / record["id"]).exists()
        assert opened.size == len(data) and opened.record == record
        got = b"".join([chunk async for chunk in opened.chunks()])
        part = b"".join([chunk async for chunk in opened.chunks(MiB - 3, MiB + 3)])
    finally:
        await opened.close()
    assert got == data and part == data[MiB - 3 : MiB + 3]
    assert await store.open(record["id"]) is None


async def test_a_client_that_leaves_stops_the_reads(backend_app, backend_client):
    data = os.urandom(8 * MiB)
    record = await upload(backend_client, data)
    sent: list[int] = []
    left = asyncio.Event()

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.body":
            sent.append(len(message.get("body", b"")))
            left.set()  # gone after the first chunk; hypercorn's send then drops data silently

    calls = 0

    async def receive() -> dict[str, Any]:
        nonlocal calls
        calls += 1
        if calls == 1:
            return {"type": "http.request", "body": b"", "more_body": False}
        await left.wait()
        return {"type": "http.disconnect"}

    await asyncio.wait_for(backend_app(http_scope(f"/files/{record['id']}", "GET"), receive, send), 10)
    assert 1 <= len(sent) <= 3 and sum(sent) < len(data)


async def test_a_send_that_raises_oserror_ends_the_download_quietly(backend_app, backend_client):
    record = await upload(backend_client, os.urandom(3 * MiB))
    bodies = 0

    async def send(message: dict[str, Any]) -> None:
        nonlocal bodies
        if message["type"] == "http.response.body":
            bodies += 1
            raise OSError("backend_client gone")  # what uvicorn raises after a disconnect

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    await asyncio.wait_for(backend_app(http_scope(f"/files/{record['id']}", "GET"), receive, send), 10)
    assert bodies == 1


async def test_a_store_error_before_the_answer_is_500_without_details(backend_app, backend_client, monkeypatch, caplog):
    record = await upload(backend_client)
    store = backend_app.prepare()

    async def broken(file_id: str) -> None:
        raise PermissionError(13, "Permission denied", f"/srv/secret/{file_id}")

    monkeypatch.setattr(store, "open", broken)
    reply = await backend_client.get(f"/files/{record['id']}")
    payload = check_error(reply, 500, "internal_error")
    assert "/srv/secret" not in reply.text and "Permission" not in json.dumps(payload)
    assert "failed" in caplog.text


@pytest.mark.parametrize("method, broken", [("HEAD", "open"), ("DELETE", "delete")])
async def test_a_failed_head_or_delete_is_not_logged_as_an_upload(
    backend_app, backend_client, monkeypatch, caplog, method, broken
):
    record = await upload(backend_client)
    store = backend_app.prepare()

    async def broken_call(file_id: str) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(store, broken, broken_call)
    reply = check(await backend_client.request(method, f"/files/{record['id']}"))
    assert reply.status_code == 500
    if method == "DELETE":
        assert reply.json() == {"error": "internal_error", "detail": "the server failed to answer"}
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert [r.getMessage() for r in errors] == [f"{method} /files/{record['id']} failed: the server failed to answer"]
    assert errors[0].exc_info is not None  # the traceback, on the server only
    assert not [m for m in caplog.messages if "upload failed" in m or "store the upload" in m]


def serve_only_the_first_chunk(monkeypatch: pytest.MonkeyPatch, store: Any, then: BaseException | None) -> None:
    """Make the store's files yield their first chunk, then raise `then` (or end, if None)."""
    real_open = store.open

    async def open_cut(file_id: str):
        opened = await real_open(file_id)
        real_chunks = opened.chunks

        async def chunks(start: int = 0, stop: int | None = None):
            async for chunk in real_chunks(start, stop):
                yield chunk
                if then is not None:
                    raise then
                return  # the data ends early (a truncated file, a store that stops)

        opened.chunks = chunks
        return opened

    monkeypatch.setattr(store, "open", open_cut)


async def download_held_open(app: Any, file_id: str, reply: Reply) -> None:
    """GET a file into `reply` with a client that never leaves; the app's exception propagates."""

    async def receive() -> dict[str, Any]:
        await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    await app(http_scope(f"/files/{file_id}", "GET"), receive, reply.record)


async def test_a_read_error_mid_download_cuts_the_answer(backend_app, backend_client, backend, monkeypatch):
    data = os.urandom(3 * MiB)
    record = await upload(backend_client, data)
    serve_only_the_first_chunk(monkeypatch, backend_app.prepare(), OSError(5, "Input/output error"))
    reply = Reply()
    with pytest.raises(OSError):
        await download_held_open(backend_app, record["id"], reply)
    # The answer began whole-file-sized and was never ended: the server cuts the connection.
    assert reply.status == 200 and int(reply.headers["content-length"]) == len(data)
    assert len(reply.body) == MiB and reply.messages[-1].get("more_body") is True


async def test_a_file_shorter_than_promised_is_never_ended_as_whole(backend_app, backend_client, monkeypatch):
    data = os.urandom(2 * MiB)
    record = await upload(backend_client, data)
    serve_only_the_first_chunk(monkeypatch, backend_app.prepare(), None)
    reply = Reply()
    with pytest.raises(RuntimeError, match="ended at byte"):
        await download_held_open(backend_app, record["id"], reply)
    assert reply.status == 200 and len(reply.body) == MiB
    assert all(m.get("more_body") for m in reply.messages if m["type"] == "http.response.body")

"""In process: httpx through ASGITransport for happy paths and the error table; events fed by
hand (call_app) wherever exact chunking matters, i.e. every input shape of SPEC §6.

Every test runs on both storage backends (the `backend` fixture: the local dir and S3 on
SeaweedFS), and checks what the store holds after each answer."""

from __future__ import annotations

import asyncio
import hashlib
import random
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import upload_asgi
from upload_service.framing import clean_filename
from backends import close_app
from support import (
    assert_error,
    BOUNDARY,
    Part,
    call_app,
    chunks_of,
    field_part,
    file_part,
    form_body,
    form_content_type,
    http_scope,
    split_at,
)

B = BOUNDARY.encode()
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_length(reply: httpx.Response) -> None:
    assert int(reply.headers["content-length"]) == len(reply.content)




def check_created(reply: httpx.Response) -> Any:
    assert reply.status_code == 201, reply.text
    assert reply.headers["content-type"] == "application/json"
    check_length(reply)
    return reply.json()


async def post_body(client: httpx.AsyncClient, body: bytes, path: str = "/upload",
                    content_type: str | None = form_content_type()) -> httpx.Response:
    headers = {} if content_type is None else {"content-type": content_type}
    return await client.post(path, content=body, headers=headers)


# -- happy paths -----------------------------------------------------------------------


async def test_upload_one_file_with_description(backend_client, backend):
    data = bytes(range(256)) * 40 + b"\r\n--" + B + b"x"
    reply = await backend_client.post(
        "/upload",
        files={"file": ("photo.jpg", data, "image/jpeg")},
        data={"description": "Holiday 2024 — ünïcode"},
    )
    record = check_created(reply)
    assert set(record) == {"id", "filename", "content_type", "size", "sha256", "description", "created"}
    assert record["filename"] == "photo.jpg"
    assert record["content_type"] == "image/jpeg"
    assert record["size"] == len(data)
    assert record["sha256"] == sha(data)
    assert record["description"] == "Holiday 2024 — ünïcode"
    backend.assert_stored(record, data)
    assert backend.stored_ids() == [record["id"]]


async def test_upload_without_description_or_content_type(backend_client, backend):
    body = form_body([Part("file", b"raw", headers=[b'Content-Disposition: form-data; name="file"; filename="r"'])])
    record = check_created(await post_body(backend_client, body))
    assert record["description"] is None
    assert record["content_type"] == "application/octet-stream"
    backend.assert_stored(record, b"raw")


async def test_upload_empty_file(backend_client, backend):
    record = check_created(await backend_client.post("/upload", files={"file": ("empty.txt", b"", "text/plain")}))
    assert (record["size"], record["sha256"]) == (0, EMPTY_SHA256)
    backend.assert_stored(record, b"")


async def test_upload_multiple_names_and_content_types(backend_client, backend):
    # streaming-form-data's MultipleTargets mixes up filename and content type from the
    # second file on; every record here must carry its own part's pair.
    files = [
        ("report.pdf", b"%PDF-1.7 fake", "application/pdf"),
        ("notes.txt", b"line one\r\nline two\r\n", "text/plain; charset=utf-8"),
        ("image.png", bytes(range(256)) * 10, "image/png"),
        ("archive.tar.gz", b"\x1f\x8b" + b"\x00" * 500, "application/gzip"),
    ]
    reply = await backend_client.post(
        "/upload-multiple",
        files=[("files", f) for f in files],
        data={"description": "four"},
    )
    answer = check_created(reply)
    assert answer["count"] == len(files)
    assert answer["total_size"] == sum(len(d) for _, d, _ in files)
    assert [(r["filename"], r["content_type"]) for r in answer["files"]] == [(n, c) for n, _, c in files]
    for record, (_, data, _) in zip(answer["files"], files):
        assert record["description"] == "four"
        backend.assert_stored(record, data)
    assert len(backend.stored_ids()) == len(files)
    assert len({r["id"] for r in answer["files"]}) == len(files)


async def test_upload_multiple_same_name_twice_stores_two_files(backend_client, backend):
    reply = await backend_client.post("/upload-multiple", files=[("files", ("same.txt", b"one")), ("files", ("same.txt", b"two"))])
    answer = check_created(reply)
    assert [r["filename"] for r in answer["files"]] == ["same.txt", "same.txt"]
    backend.assert_stored(answer["files"][0], b"one")
    backend.assert_stored(answer["files"][1], b"two")


@pytest.mark.parametrize("case", [str.lower, str.upper, lambda s: f"  {s}\t"], ids=["lower", "upper", "padded"])
async def test_sha256_field_matches(backend_client, backend, case):
    data = b"checked content"
    reply = await backend_client.post("/upload", files={"file": ("c.txt", data)}, data={"sha256": case(sha(data))})
    backend.assert_stored(check_created(reply), data)


async def test_sha256_field_before_the_file(backend_client, backend):
    # The field may come first; the check still happens after the file is read.
    data = b"field first"
    body = form_body([field_part("sha256", sha(data)), file_part(data, "f.txt")])
    backend.assert_stored(check_created(await post_body(backend_client, body)), data)


# -- the error table (SPEC §3, the cases of issue 2) ------------------------------------------

ONE_FILE = form_body([field_part("description", "d"), file_part(b"x" * 5000, "a.txt", content_type="text/plain")])
THREE_FILES = form_body([file_part(b"y" * 3000, f"{i}.txt", "files") for i in range(3)])
WRONG_SHA = form_body([file_part(b"data", "a.txt"), field_part("sha256", "0" * 64)])


def cut_before_last_part(body: bytes) -> bytes:
    return body[: body.rindex(b"Content-Disposition")]


ERROR_TABLE = [
    # (path, content type, body, status, code)
    pytest.param("/upload", None, ONE_FILE, 415, "unsupported_media_type", id="no-content-type"),
    pytest.param("/upload", "text/plain", ONE_FILE, 415, "unsupported_media_type", id="text-plain"),
    pytest.param("/upload", "application/x-www-form-urlencoded", b"file=x", 415, "unsupported_media_type",
                 id="urlencoded"),
    pytest.param("/upload", f"multipart/mixed; boundary={BOUNDARY}", ONE_FILE, 415, "unsupported_media_type",
                 id="multipart-mixed"),
    pytest.param("/upload-multiple", "application/json", b"{}", 415, "unsupported_media_type", id="json-multiple"),
    pytest.param("/upload", "multipart/form-data", ONE_FILE, 400, "missing_boundary", id="no-boundary"),
    pytest.param("/upload", "multipart/form-data; boundary=", ONE_FILE, 400, "missing_boundary",
                 id="empty-boundary"),
    pytest.param("/upload", 'multipart/form-data; boundary=""', ONE_FILE, 400, "missing_boundary",
                 id="empty-quoted-boundary"),
    pytest.param("/upload", "multipart/form-data; boundary=" + "a" * 71, ONE_FILE, 400, "missing_boundary",
                 id="boundary-71-chars"),
    pytest.param("/upload", 'multipart/form-data; boundary="ends with space "', ONE_FILE, 400, "missing_boundary",
                 id="boundary-trailing-space"),
    pytest.param("/upload", "multipart/form-data; boundary=bad{char}", ONE_FILE, 400, "missing_boundary",
                 id="boundary-illegal-char"),
    pytest.param("/upload", None, b"", 415, "unsupported_media_type", id="empty-no-content-type"),
    pytest.param("/upload", form_content_type(), b"not multipart at all", 400, "malformed_multipart",
                 id="garbage-body"),
    pytest.param("/upload", form_content_type(), b"", 400, "malformed_multipart", id="empty-body"),
    pytest.param("/upload", form_content_type(), b"--" + B + b"\r\n\r\nno headers\r\n--" + B + b"--\r\n",
                 400, "malformed_multipart", id="part-without-headers"),
    pytest.param("/upload", form_content_type(),
                 form_body([Part("file", b"x", headers=[b'Content-Disposition: attachment; name="file"; filename="a"'])]),
                 400, "malformed_multipart", id="disposition-not-form-data"),
    pytest.param("/upload", form_content_type(),
                 form_body([Part("file", b"x", headers=[b'Content-Disposition: form-data; name="file";',
                                                       b' filename="folded.txt"'])]),
                 400, "malformed_multipart", id="folded-header"),
    pytest.param("/upload", form_content_type(), form_body([field_part("description", b"\xff\xfe"),
                                                            file_part(b"x", "a")]),
                 400, "malformed_multipart", id="description-not-utf-8"),
    pytest.param("/upload", form_content_type(), ONE_FILE[:-300], 400, "malformed_multipart",
                 id="truncated-mid-file"),
    pytest.param("/upload", form_content_type(), ONE_FILE[:-5], 400, "malformed_multipart",
                 id="truncated-in-closing-boundary"),
    pytest.param("/upload", form_content_type(), ONE_FILE[: ONE_FILE.rindex(b"--" + B + b"--")], 400,
                 "malformed_multipart", id="truncated-before-closing-boundary"),
    pytest.param("/upload", form_content_type(), ONE_FILE[:60], 400, "malformed_multipart",
                 id="truncated-in-headers"),
    pytest.param("/upload-multiple", form_content_type(), cut_before_last_part(THREE_FILES), 400,
                 "malformed_multipart", id="truncated-after-two-whole-files"),
    pytest.param("/upload", form_content_type(), form_body([field_part("description", "only text")]), 422,
                 "no_file", id="no-file-part"),
    pytest.param("/upload", form_content_type(), form_body([]), 400, "malformed_multipart", id="empty-form"),
    pytest.param("/upload", form_content_type(), b"--" + B + b"X\r\n\r\nx\r\n--" + B + b"--\r\n", 400,
                 "malformed_multipart", id="first-delimiter-is-not-one"),
    # RFC 9110 §5.1: a part header line is `token: value`, in any part, even one the route ignores.
    pytest.param("/upload-multiple", form_content_type(),
                 form_body([file_part(b"a", "a.txt", "files"), file_part(b"b", "b.txt", "files"),
                            Part("files", b"c", headers=[b'Content-Disposition form-data; name="files"; filename="c"'])]),
                 400, "malformed_multipart", id="third-part-disposition-without-colon"),
    pytest.param("/upload", form_content_type(),
                 form_body([file_part(b"a", "a.txt"),
                            Part("other", b"c", headers=[b'Content-Disposition: form-data; name="other"', b"Garbage"])]),
                 400, "malformed_multipart", id="ignored-part-header-without-colon"),
    pytest.param("/upload", form_content_type(),
                 form_body([file_part(b"a", "a.txt"),
                            Part("other", b"c", headers=[b'Content-Disposition: form-data; name="other"', b": x"])]),
                 400, "malformed_multipart", id="ignored-part-header-empty-name"),
    pytest.param("/upload", form_content_type(),
                 form_body([Part("file", b"a", headers=[b'Content-Disposition: form-data; name="file"; filename="a"',
                                                        b"Content Type: text/plain"])]),
                 400, "malformed_multipart", id="header-name-not-a-token"),
    pytest.param("/upload", form_content_type(), form_body([file_part(b"", "")]), 422, "no_file",
                 id="empty-filename-only"),
    pytest.param("/upload", form_content_type(), form_body([file_part(b"data", "")]), 422, "no_file",
                 id="empty-filename-with-data"),
    pytest.param("/upload", form_content_type(), form_body([file_part(b"x", "a.txt", name="files")]), 422,
                 "no_file", id="upload-with-files-field"),
    pytest.param("/upload-multiple", form_content_type(), form_body([file_part(b"x", "a.txt", name="file")]), 422,
                 "no_file", id="upload-multiple-with-file-field"),
    pytest.param("/upload", form_content_type(), form_body([Part("file", b"x")]), 422, "no_file",
                 id="file-field-without-filename"),
    pytest.param("/upload", form_content_type(), WRONG_SHA, 422, "sha256_mismatch", id="sha256-differs"),
    pytest.param("/upload", form_content_type(), form_body([file_part(b"data", "a.txt"), field_part("sha256", "abc")]),
                 422, "invalid_field", id="sha256-not-hex"),
]


@pytest.mark.parametrize("path, content_type, body, status, code", ERROR_TABLE)
async def test_error_table(backend_client, backend, path, content_type, body, status, code):
    reply = await post_body(backend_client, body, path, content_type)
    assert_error(reply, status, code)
    backend.assert_nothing_stored()


async def test_sha256_mismatch_says_the_real_digest(backend_client, backend):
    payload = assert_error(await post_body(backend_client, WRONG_SHA), 422, "sha256_mismatch")
    assert sha(b"data") in payload["detail"]
    backend.assert_nothing_stored()


async def test_error_then_success_on_the_same_app(backend_client, backend):
    assert_error(await post_body(backend_client, ONE_FILE[:-300]), 400, "malformed_multipart")
    backend.assert_nothing_stored()
    record = check_created(await post_body(backend_client, ONE_FILE))
    backend.assert_stored(record, b"x" * 5000)


# -- path traversal ------------------------------------------------------------------------


TRAVERSAL = [
    pytest.param("../../etc/passwd", "passwd", id="dot-dot-slash"),
    pytest.param("..\\..\\x", "x", id="dot-dot-backslash"),
    pytest.param("/abs/path", "path", id="absolute-posix"),
    pytest.param("C:\\Windows\\x.txt", "x.txt", id="windows-drive"),
    pytest.param("\\\\server\\share\\y.txt", "y.txt", id="unc"),
    pytest.param("../", "unnamed", id="only-dot-dot"),
    pytest.param("..", "unnamed", id="dot-dot"),
]


def all_files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


@pytest.mark.parametrize("raw, cleaned", TRAVERSAL)
async def test_path_traversal_filename_httpx(backend_client, backend, tmp_path, raw, cleaned):
    before = set(all_files(tmp_path))
    record = check_created(await backend_client.post("/upload", files={"file": (raw, b"evil")}))
    assert record["filename"] == cleaned
    backend.assert_stored(record, b"evil")
    assert backend.stored_names() == sorted([record["id"], f"{record['id']}.json"])
    assert {p for p in set(all_files(tmp_path)) - before if not p.startswith("uploads")} == set()


@pytest.mark.parametrize("raw, cleaned", TRAVERSAL)
async def test_path_traversal_filename_raw_header(backend_client, backend, tmp_path, raw, cleaned):
    # Browsers send backslashes unescaped inside the quotes: it must read the same.
    before = set(all_files(tmp_path))
    head = b'Content-Disposition: form-data; name="file"; filename="' + raw.encode() + b'"'
    record = check_created(await post_body(backend_client, form_body([Part("file", b"evil", headers=[head])])))
    assert record["filename"] == cleaned
    backend.assert_stored(record, b"evil")
    assert backend.stored_names() == sorted([record["id"], f"{record['id']}.json"])
    assert {p for p in set(all_files(tmp_path)) - before if not p.startswith("uploads")} == set()


# -- SPEC §6: every input shape, fed whole and split at many points -------------------------------


def chunkings(body: bytes, every_cut: bool = True) -> list[tuple[str, list[bytes]]]:
    """The body whole, in small fixed chunks, and (`every_cut`) cut in two or three at many points."""
    out = [("whole", [body]), ("1-byte", chunks_of(body, 1))]
    out += [(f"chunks-of-{n}", chunks_of(body, n)) for n in (2, 3, 7, 13, 64, 1021)]
    if not every_cut:
        return out
    if len(body) <= 600:
        cuts = set(range(1, len(body)))
    else:  # every cut near the structure (CRLFs), and a sample of the rest
        cuts = {i + d for i in range(len(body)) if body.startswith(b"\r\n", i) for d in range(-5, 8)}
        cuts |= set(random.Random(len(body)).sample(range(1, len(body)), 100))
    cuts = sorted(c for c in cuts if 0 < c < len(body))
    out += [(f"cut-at-{c}", split_at(body, [c])) for c in cuts]
    rng = random.Random(7)
    out += [(f"cut-3-{i}", split_at(body, rng.sample(range(1, len(body)), 2))) for i in range(30)]
    return out


def outcome_of(reply, backend: Any) -> tuple[Any, ...]:
    """What a user sees, minus the random ids; checks the store agrees with the answer."""
    assert reply.status is not None and reply.status < 500, reply.body
    reply.check_length()
    payload = reply.json()
    if reply.status != 201:
        assert set(payload) >= {"error", "detail"}
        backend.assert_nothing_stored()
        return reply.status, payload["error"]
    records = payload["files"] if "files" in payload else [payload]
    for record in records:
        stored = backend.stored_bytes(record["id"])
        assert (len(stored), sha(stored)) == (record["size"], record["sha256"])
    assert len(backend.stored_ids()) == len(records)
    backend.assert_nothing_in_flight()
    return 201, [{k: v for k, v in r.items() if k not in ("id", "created")} for r in records]


def remove_all(backend: Any) -> None:
    for file_id in backend.stored_ids():
        backend.remove(file_id)


async def outcome_every_way(backend: Any, app: Any, body: bytes, path: str = "/upload",
                            content_type: str = form_content_type()) -> tuple[Any, ...]:
    """Feed `body` in every chunking; all must give the same outcome, which is returned.

    On S3 the fixed-size chunkings only: the parser is the same on both backends, the
    cuts at every point cost S3 calls and find nothing the store could change.
    """
    outcomes: dict[str, Any] = {}
    for label, chunks in chunkings(body, every_cut=backend.name == "local"):
        reply = await call_app(app, http_scope(path, content_type=content_type), chunks)
        try:
            outcomes[label] = outcome_of(reply, backend)
        except AssertionError as exc:
            raise AssertionError(f"{label}: {exc}") from exc
        remove_all(backend)
    first = outcomes["whole"]
    for label, outcome in outcomes.items():
        assert outcome == first, label
    return first


@pytest.fixture
def backend_settings() -> dict[str, Any]:
    return {"fsync": False}  # many uploads per test; fsync is tested in test_targets and through servers


@pytest.fixture
def every_way(backend: Any, backend_app: Any) -> Any:
    """`await every_way(body, path, content_type)`: outcome_every_way on this test's backend."""

    async def run(body: bytes, path: str = "/upload", content_type: str = form_content_type()) -> tuple[Any, ...]:
        return await outcome_every_way(backend, backend_app, body, path, content_type)

    return run


def record(filename: str, data: bytes, content_type: str = "application/octet-stream",
           description: str | None = None) -> dict[str, Any]:
    return {"filename": filename, "content_type": content_type, "size": len(data), "sha256": sha(data),
            "description": description}


# Epilogue and preamble


@pytest.mark.parametrize(
    "epilogue",
    [
        pytest.param(b"", id="none"),
        pytest.param(b"\r\n", id="crlf"),
        pytest.param(b"This is the epilogue.\r\nIt is ignored.\r\n", id="text"),
        pytest.param(b"--" + B + b"\r\nContent-Disposition: form-data; name=\"file\"; filename=\"z\"\r\n\r\nzz\r\n"
                     b"--" + B + b"--\r\n", id="looks-like-another-part"),
        pytest.param(bytes(range(256)) * 4, id="binary"),
    ],
)
async def test_epilogue_is_ignored_and_costs_no_byte(every_way, epilogue):
    data = b"last part's data ends here\r\n"
    body = form_body([file_part(data, "e.txt", "files")], epilogue=epilogue)
    status, records = await every_way(body, "/upload-multiple")
    assert (status, records) == (201, [record("e.txt", data)])


async def test_epilogue_without_crlf_after_close_delimiter(every_way):
    data = b"abc"
    body = form_body([file_part(data, "e.txt")])[:-2] + b"trailing"
    assert await every_way(body) == (201, [record("e.txt", data)])


@pytest.mark.parametrize(
    "preamble",
    [
        pytest.param(b"This is a preamble.\r\n", id="text-line"),
        pytest.param(b"\r\n", id="crlf"),
        pytest.param(b"--" + B + b"x\r\n-- not it\r\n--" + B[:-1] + b"\r\n", id="boundary-look-alikes"),
        pytest.param(b"p" * 60_000 + b"\r\n", id="60KB"),
    ],
)
async def test_preamble_is_ignored(every_way, preamble):
    data = b"after the preamble"
    body = form_body([file_part(data, "p.txt")], preamble=preamble)
    assert await every_way(body) == (201, [record("p.txt", data)])


async def test_preamble_is_bounded(backend, backend_app):
    body = form_body([file_part(b"x", "p.txt")], preamble=b"p" * (1024 * 1024) + b"\r\n")
    for label, chunks in [("whole", [body]), ("4KiB", chunks_of(body, 4096)), ("odd", chunks_of(body, 9999))]:
        reply = await call_app(backend_app, http_scope(content_type=form_content_type()), chunks)
        assert outcome_of(reply, backend) == (400, "malformed_multipart"), label


# Header names: any case, any order, each part's own content type


async def test_header_case_and_order(every_way):
    parts = [
        Part("files", b"one", headers=[b"Content-Type: text/csv",
                                       b'Content-Disposition: form-data; name="files"; filename="1.csv"']),
        Part("files", b"two", headers=[b'content-disposition: form-data; name="files"; filename="2.bin"']),
        Part("files", b"three", headers=[b"CONTENT-TYPE: image/gif",
                                         b'CONTENT-DISPOSITION: form-data; name="files"; filename="3.gif"']),
        Part("description", b"mixed", headers=[b"Content-Type: text/plain; charset=utf-8",
                                               b'cOnTeNt-DiSpOsItIoN: form-data; name="description"']),
        Part("files", b"four", headers=[b"X-Extra: 1", b"content-TYPE: application/json",
                                        b"X-Other: 2",
                                        b'Content-disposition: form-data; filename="4.json"; name="files"']),
    ]
    status, records = await every_way(form_body(parts), "/upload-multiple")
    assert status == 201
    assert records == [
        record("1.csv", b"one", "text/csv", "mixed"),
        record("2.bin", b"two", "application/octet-stream", "mixed"),
        record("3.gif", b"three", "image/gif", "mixed"),
        record("4.json", b"four", "application/json", "mixed"),
    ]


async def test_content_type_before_disposition_single_upload(every_way):
    part = Part("file", b"<svg/>", headers=[b"Content-Type: image/svg+xml",
                                            b'Content-Disposition: form-data; name="file"; filename="i.svg"'])
    assert await every_way(form_body([part])) == (201, [record("i.svg", b"<svg/>", "image/svg+xml")])


# Boundaries


BOUNDARIES = [
    pytest.param("a", "a", id="length-1"),
    pytest.param("Z" * 70, "Z" * 70, id="length-70"),
    pytest.param("----WebKitFormBoundary7MA4YWxkTrZu0gW", "----WebKitFormBoundary7MA4YWxkTrZu0gW", id="webkit"),
    pytest.param("---------------------------974767299852498929531610575", None, id="firefox"),
    pytest.param("'()+_,-./:=?", None, id="all-specials-quoted"),
    pytest.param("with space inside", None, id="quoted-spaces"),
    pytest.param("0'()+_,-./:=? " * 4 + "0123456789abcd", None, id="length-70-every-bchar"),
    pytest.param("-", "-", id="a-single-dash"),
    pytest.param("simple", None, id="quoted-token"),
    pytest.param("*****", "*****", id="android-asterisks"),  # not bchars, but token characters clients send
    pytest.param("a!#$%&*^`|~b", "a!#$%&*^`|~b", id="every-token-char-not-a-bchar"),
]


@pytest.mark.parametrize("boundary, unquoted", BOUNDARIES)
async def test_boundaries(every_way, boundary, unquoted):
    assert 1 <= len(boundary) <= 70
    data = b"--" + boundary.encode() + b"-\r\n-" + b"\r\n--" + boundary[:-1].encode() + b"\r"
    body = form_body([field_part("description", boundary), file_part(data, "b.bin")], boundary=boundary)
    value = unquoted if unquoted is not None else f'"{boundary}"'
    content_type = f"multipart/form-data; boundary={value}"
    assert await every_way(body, content_type=content_type) == (
        201, [record("b.bin", data, description=boundary)]
    )


async def test_boundary_parameter_among_others(every_way):
    body = form_body([file_part(b"x", "x.txt")])
    content_type = f'Multipart/Form-Data; charset=utf-8; BOUNDARY="{BOUNDARY}"; foo=bar'
    assert await every_way(body, content_type=content_type) == (201, [record("x.txt", b"x")])


# Filenames


FILENAMES = [
    pytest.param(rb'filename="say \"hi\".txt"', 'say "hi".txt', id="quoted-with-escaped-quotes"),
    pytest.param(b'filename="semi;colon, comma.txt"', "semi;colon, comma.txt", id="quoted-with-separators"),
    pytest.param("filename=\"Ünïcödé 文件 🚀.txt\"".encode(), "Ünïcödé 文件 🚀.txt", id="non-ascii-utf-8"),
    pytest.param(b"filename*=UTF-8''%E2%82%AC%20rates%20%F0%9F%9A%80.txt", "€ rates 🚀.txt", id="rfc5987-alone"),
    pytest.param(b"filename*=iso-8859-1'en'caf%E9.txt", "café.txt", id="rfc5987-latin-1"),
    pytest.param(b"filename=\"fallback.txt\"; filename*=UTF-8''%E2%82%AC.txt", "fallback.txt",
                 id="filename-wins-over-filename-star"),
    pytest.param(b"filename*=UTF-8''%E2%82%AC.txt; filename=\"fallback.txt\"", "fallback.txt",
                 id="filename-wins-in-either-order"),
    pytest.param(b'filename="C:\\Users\\Jane Doe\\Desktop\\report final.pdf"', "report final.pdf",
                 id="windows-full-path"),
    pytest.param(b"filename=token.txt", "token.txt", id="unquoted"),
    pytest.param(b'filename="tab\there.txt"', "tabhere.txt", id="control-char-removed"),
]


@pytest.mark.parametrize("params, expected", FILENAMES)
async def test_filenames(every_way, params, expected):
    head = b'Content-Disposition: form-data; name="file"; ' + params
    body = form_body([Part("file", b"named", headers=[head, b"Content-Type: text/plain"])])
    assert await every_way(body) == (201, [record(expected, b"named", "text/plain")])


@pytest.mark.parametrize(
    "raw",
    [
        pytest.param(b"caf\xe9.txt", id="latin-1"),
        pytest.param(b"\xff\xfe\xfd", id="invalid-utf-8"),
        pytest.param(b"\xe2\x82", id="truncated-utf-8"),
        pytest.param(b"\xed\xa0\x80.txt", id="surrogate"),
    ],
)
async def test_filename_bytes_not_utf8_are_a_record(every_way, raw):
    """Read as windows-1252 without a `_charset_` field (test_form_input), whatever the chunking."""
    head = b'Content-Disposition: form-data; name="file"; filename="' + raw + b'"'
    status, detail = await every_way(form_body([Part("file", b"bytes", headers=[head])]))
    assert status == 201, detail
    assert detail[0]["size"] == 5 and detail[0]["filename"] == clean_filename(raw.decode("cp1252", "replace"))


# Odd parts


GOOD = file_part(b"the real file", "good.txt", content_type="text/plain")
GOOD_RECORD = record("good.txt", b"the real file", "text/plain")

ODD_PARTS = [
    pytest.param(Part("x", b"orphan", headers=[b"Content-Type: text/plain"]), id="no-content-disposition"),
    pytest.param(Part("x", b"orphan", headers=[b"X-Whatever: 1"]), id="only-other-headers"),
    pytest.param(Part("x", b"orphan", headers=[b'Content-Disposition: form-data; filename="o.txt"']), id="no-name"),
    pytest.param(Part("x", b"orphan", headers=[b'Content-Disposition: form-data; name=""; filename="o.txt"']),
                 id="empty-name"),
    pytest.param(Part("x", b"orphan", headers=[b"Content-Disposition: form-data"]), id="bare-form-data"),
    pytest.param(Part("file", b"orphan", headers=[b'Content-Disposition: form-data; name="file"; filename="o.txt"',
                                                  b'Content-Disposition: form-data; name="other"']),
                 id="two-content-dispositions"),
    pytest.param(Part("file", b"orphan", headers=[b'Content-Disposition: form-data; name="other"',
                                                  b'Content-Disposition: form-data; name="file"; filename="o.txt"']),
                 id="two-content-dispositions-file-second"),
]


@pytest.mark.parametrize("odd", ODD_PARTS)
@pytest.mark.parametrize("where", ["before", "after"])
async def test_odd_part_ignored_or_400(every_way, odd, where):
    parts = [odd, GOOD] if where == "before" else [GOOD, odd]
    outcome = await every_way(form_body(parts))
    assert outcome in ((201, [GOOD_RECORD]), (400, "malformed_multipart"))


@pytest.mark.parametrize("odd", ODD_PARTS)
async def test_odd_part_alone_never_stores(every_way, odd):
    outcome = await every_way(form_body([odd]))
    assert outcome in ((422, "no_file"), (400, "malformed_multipart"))


# Header bounds


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([b"X-Long: " + b"a" * 20_000], id="one-20KB-line"),
        pytest.param([b'Content-Disposition: form-data; name="file"; filename="' + b"n" * 20_000 + b'"'],
                     id="20KB-filename"),
        pytest.param([b"X-H%d: v" % i for i in range(40)], id="40-lines"),
        pytest.param([b"X-H%d: v" % i for i in range(1000)], id="1000-lines"),
    ],
)
async def test_part_headers_are_bounded(backend, backend_app, extra):
    head = extra if extra[0].startswith(b"Content-Disposition") else [
        b'Content-Disposition: form-data; name="file"; filename="h.txt"', *extra]
    body = form_body([Part("file", b"x", headers=head)])
    for label, chunks in [("whole", [body]), ("1000", chunks_of(body, 1000)), ("7", chunks_of(body, 7))]:
        reply = await call_app(backend_app, http_scope(content_type=form_content_type()), chunks)
        status, _ = outcome_of(reply, backend)
        assert status in (400, 413), label


async def test_part_headers_within_bounds_are_fine(every_way):
    head = [b'Content-Disposition: form-data; name="file"; filename="h.txt"',
            *(b"X-H%d: %s" % (i, b"v" * 200) for i in range(20))]
    body = form_body([Part("file", b"x", headers=head)])
    assert await every_way(body) == (201, [record("h.txt", b"x")])


# Part bodies that start like a delimiter


@pytest.mark.parametrize(
    "start",
    [
        pytest.param(b"-", id="dash"),
        pytest.param(b"---\ntitle: front matter\n---\n", id="yaml-front-matter"),
        pytest.param(b"--" + B + b"-", id="dash-dash-boundary-dash"),
        pytest.param(b"--" + B + b"\r", id="dash-dash-boundary-cr"),
        pytest.param(b"\r\n-", id="crlf-dash"),
    ],
)
async def test_later_part_starting_like_a_delimiter(every_way, start):
    # A body that begins like a delimiter, cut anywhere (streaming-form-data failed on a
    # "-" that ended a chunk, when it read the bodies).
    data = start + b" and then the rest"
    body = form_body([file_part(b"first", "1.txt", "files"), file_part(data, "2.txt", "files"),
                      file_part(start, "3.txt", "files")])
    assert await every_way(body, "/upload-multiple") == (
        201, [record("1.txt", b"first"), record("2.txt", data), record("3.txt", start)]
    )


async def test_a_part_without_a_body_is_an_empty_one(every_way):
    # RFC 2046: `body-part := headers [CRLF *OCTET]`. Without the body, the blank line's CRLF
    # begins the delimiter. Read as a body that begins "--boundary", the first part would
    # swallow the next: a form read otherwise by a front end that follows the RFC.
    d = b"--" + B
    body = (d + b"\r\n" + file_part(b"", "empty.txt", "files").head() + b"\r\n\r\n"
            + d + b"\r\n" + file_part(b"two", "2.txt", "files").head() + b"\r\n\r\ntwo\r\n"
            + d + b"\r\n" + field_part("description", "").head() + b"\r\n\r\n"
            + d + b"--\r\n")
    assert await every_way(body, "/upload-multiple") == (
        201, [record("empty.txt", b"", description=""), record("2.txt", b"two", description="")]
    )


async def test_a_body_that_begins_with_the_close_delimiter_ends_the_form(every_way):
    # With the blank line's CRLF before it, "--boundary--" is the close delimiter (Go's
    # mime/multipart reads it so too); what follows is the epilogue.
    body = form_body([file_part(b"first", "1.txt", "files"),
                      file_part(b"--" + B + b"-- and then the rest", "2.txt", "files")])
    assert await every_way(body, "/upload-multiple") == (201, [record("1.txt", b"first"), record("2.txt", b"")])


# -- golden browser-shaped bodies ---------------------------------------------------------------


CHROME_BODY = (
    b"------WebKitFormBoundaryePkpFF7tjBAqx29L\r\n"
    b'Content-Disposition: form-data; name="description"\r\n\r\n'
    b"From Chrome\r\n"
    b"------WebKitFormBoundaryePkpFF7tjBAqx29L\r\n"
    b'Content-Disposition: form-data; name="files"; filename="a %22quoted%22 name.txt"\r\n'
    b"Content-Type: text/plain\r\n\r\n"
    b"hello\n\r\n"
    b"------WebKitFormBoundaryePkpFF7tjBAqx29L\r\n"
    b'Content-Disposition: form-data; name="files"; filename=""\r\n'
    b"Content-Type: application/octet-stream\r\n\r\n"
    b"\r\n"
    b"------WebKitFormBoundaryePkpFF7tjBAqx29L--\r\n"
)


async def test_chrome_shaped_body(every_way):
    # Chrome percent-encodes '"' in filenames (WHATWG); the app shows what it got.
    ctype = "multipart/form-data; boundary=----WebKitFormBoundaryePkpFF7tjBAqx29L"
    outcome = await every_way(CHROME_BODY, "/upload-multiple", ctype)
    assert outcome == (201, [record("a %22quoted%22 name.txt", b"hello\n", "text/plain", "From Chrome")])


CURL_BODY = (
    b"--------------------------d74496d66958873e\r\n"
    b'Content-Disposition: form-data; name="file"; filename="big.iso"\r\n'
    b"Content-Type: application/octet-stream\r\n\r\n"
    + bytes(range(256)) * 8 + b"\r\n"
    b"--------------------------d74496d66958873e--\r\n"
)


async def test_curl_shaped_body(every_way):
    ctype = "multipart/form-data; boundary=------------------------d74496d66958873e"
    outcome = await every_way(CURL_BODY, "/upload", ctype)
    assert outcome == (201, [record("big.iso", bytes(range(256)) * 8)])


# -- chunk-boundary property ------------------------------------------------------------------

TRAPS = [b"\r\n", b"\r\n--", b"--", b"-", b"\r\n--" + B[:-1], b"\r\n--" + B[:1], b"-" + B + b"--", b"--" + B + b"--",
         b"--" + B + b"\r\n", B, b"\r", b"\n", b"\r\n\r\n", b"\x00"]
MARKER = b"\r\n--" + B  # a delimiter, once followed by CRLF or "--"


def is_legal(content: bytes) -> bool:
    """RFC 2046 §5.1.1: a body, with the blank line's CRLF before it, never holds the
    delimiter "\r\n--boundary" at all."""
    return MARKER not in b"\r\n" + content + b"\r\n"


def is_data(content: bytes) -> bool:
    """Weaker: the body holds no complete delimiter or close delimiter, once framed (the
    blank line's CRLF before it: a part may have no body, RFC 2046 §5.1.1)."""
    framed = b"\r\n" + content + b"\r\n"
    i = framed.find(MARKER)
    while i >= 0:
        if framed[i + len(MARKER) : i + len(MARKER) + 2] in (b"\r\n", b"--"):
            return False
        i = framed.find(MARKER, i + 1)
    return True


legal_bytes = st.lists(st.one_of(st.binary(max_size=64), st.sampled_from(TRAPS)), max_size=12).map(b"".join)
near_miss_bytes = st.lists(
    st.one_of(st.binary(max_size=16), st.sampled_from(TRAPS + [MARKER, MARKER + b"-", MARKER + b"x", MARKER + b"\r"])),
    max_size=12,
).map(b"".join)


def upload_in_chunks(backend: Any, app: Any, body: bytes, points: list[int]) -> tuple[Any, ...]:
    """One upload on a loop of its own (hypothesis examples are sync), then the store emptied."""

    async def run() -> tuple[Any, ...]:
        try:
            reply = await call_app(app, http_scope("/upload-multiple", content_type=form_content_type()),
                                   split_at(body, points))
            return outcome_of(reply, backend)
        finally:
            await close_app(app)  # the S3 store's client is this loop's

    try:
        return asyncio.run(run())
    finally:
        remove_all(backend)


def random_form(files: list[tuple[bytes, str, str | None]], description: str | None, data: Any) -> tuple[bytes, Any]:
    """A form of these files (and description, anywhere), and the answer it must get."""
    parts = [file_part(content, name, "files", ctype) for content, name, ctype in files]
    if description is not None:
        parts.insert(data.draw(st.integers(0, len(parts))), field_part("description", description))
    body = form_body(parts, epilogue=data.draw(st.sampled_from([b"", b"epilogue\r\n"])))
    expected = (201, [record(name, content, ctype or "application/octet-stream", description)
                      for content, name, ctype in files])
    return body, expected


def random_cuts(body: bytes, data: Any) -> list[list[int]]:
    """Some random split points, and some around each part's body start (where the parser slipped)."""
    points = data.draw(st.lists(st.integers(1, len(body) - 1), max_size=16))
    starts = [i + 4 for i in range(len(body)) if body.startswith(b"\r\n\r\n", i)]
    near = [s + d for s in starts for d in data.draw(st.lists(st.integers(-2, 3), max_size=3))]
    return [points, near]


FILES = st.tuples(st.sampled_from(["a.txt", "ü.bin", "x y.png"]), st.sampled_from([None, "text/plain", "image/png"]))


def test_random_split_points_give_the_same_records(backend):
    app = upload_asgi.create_app(backend.config(fsync=False))

    @settings(deadline=None, max_examples=backend.examples(150), suppress_health_check=[HealthCheck.too_slow])
    @given(
        files=st.lists(st.tuples(legal_bytes.filter(is_legal), FILES), min_size=1, max_size=3),
        description=st.one_of(st.none(), st.text(max_size=20)),
        data=st.data(),
    )
    def check(files, description, data):
        body, expected = random_form([(c, n, t) for c, (n, t) in files], description, data)
        assert upload_in_chunks(backend, app, body, []) == expected
        for points in random_cuts(body, data):
            assert upload_in_chunks(backend, app, body, points) == expected

    check()


def is_padded(content: bytes) -> bool:
    """The body holds "\r\n--boundary" then a space or tab: transport padding, refused (400)."""
    framed = b"\r\n" + content + b"\r\n"
    return any(framed[i + len(MARKER) : i + len(MARKER) + 1] in (b" ", b"\t")
               for i in range(len(framed)) if framed.startswith(MARKER, i))


def test_near_delimiters_are_content_however_the_body_is_cut(backend):
    # "\r\n--boundary" followed by anything but CRLF or "--" is not a delimiter: RFC 2046
    # forbids it in a body, but it is content, whatever the chunks (streaming-form-data,
    # when it read the bodies, lost bytes around it depending on the chunking).
    app = upload_asgi.create_app(backend.config(fsync=False))

    @settings(deadline=None, max_examples=backend.examples(100), suppress_health_check=[HealthCheck.too_slow])
    @given(
        files=st.lists(st.tuples(near_miss_bytes.filter(is_data), FILES), min_size=1, max_size=3),
        data=st.data(),
    )
    def check(files, data):
        body, expected = random_form([(c, n, t) for c, (n, t) in files], None, data)
        if any(is_padded(content) for content, _ in files):
            expected = (400, "malformed_multipart")
        for points in [[], *random_cuts(body, data)]:
            assert upload_in_chunks(backend, app, body, points) == expected

    check()


def test_a_known_parser_slip_is_stored_whole(backend):
    # Found by the property above: split before the last "-", streaming-form-data
    # handed the file over without its last 51 bytes.
    content = MARKER + b"x" + MARKER + b"x" + MARKER + b"-\x00\x00\x00\x00-"
    body = form_body([file_part(content, "a.txt", "files", "text/plain")])
    cut = body.index(content) + len(content) - 1
    outcome = upload_in_chunks(backend, upload_asgi.create_app(backend.config(fsync=False)), body, [cut])
    assert outcome == (201, [record("a.txt", content, "text/plain")])

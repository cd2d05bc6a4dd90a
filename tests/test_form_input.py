"""Form input a real client may send (SPEC §6): odd filenames, boundaries, lengths, headers, fields sent as files.

Each was once a 500, a wrong 201 or a misread; all go through the app in process, on both
storage backends (the local dir and S3).
"""

from __future__ import annotations

import time
from typing import Any

import pytest

from upload_service import framing
from support import (
    assert_error,
    upload_scope,
    BOUNDARY,
    Part,
    call_app,
    chunks_of,
    field_part,
    file_part,
    form_body,
)

MiB = 1024 * 1024
B = BOUNDARY.encode()


@pytest.fixture
def backend_settings() -> dict[str, Any]:
    return {"fsync": False}


@pytest.mark.parametrize(
    "charset, status",
    [("utf-8", 201), ("utf-16", 201), ("", 201), ("idna", 201), ("punycode", 201), ("undefined", 201)],
)
async def test_filename_star_in_any_charset_is_a_record_or_a_400(backend_app, backend, charset, status):
    """A charset other than ISO-8859-1 is read as UTF-8 (never handed to a codec such as idna,
    which raises on bad input): a record, never a 500."""
    data = b"named oddly"
    disposition = f"Content-Disposition: form-data; name=\"file\"; filename*={charset}''%ffname%E2%82%AC.txt"
    body = form_body([Part("file", data, headers=[disposition.encode()])])
    reply = await call_app(backend_app, upload_scope(), [body])
    assert reply.status == status, reply.body
    reply.check_length()
    if status == 400:
        backend.assert_nothing_stored()
        return
    record = reply.json()
    assert record["filename"].endswith("name€.txt")  # read as UTF-8 (%ff is not UTF-8)
    backend.assert_stored(record, data)


def test_filename_star_latin1_is_decoded():
    assert framing.decode_ext_value("ISO-8859-1'fr'%E9t%E9.txt") == "été.txt"


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(
            form_body([file_part(b"abcd"), field_part("description", "x")]).replace(
                b"\r\n--" + B + b"\r\nContent-Disposition: form-data; name=\"description\"",
                b"\r\n--" + B + b" \t\r\nContent-Disposition: form-data; name=\"description\"",
            ),
            id="between-parts",
        ),
        pytest.param(
            form_body([file_part(b"abcd")]).replace(b"--" + B + b"\r\n", b"--" + B + b"  \r\n", 1),
            id="first-boundary",
        ),
        pytest.param(form_body([file_part(b"abcd")]).replace(b"--" + B + b"--", b"--" + B + b" --"), id="close"),
    ],
)
@pytest.mark.parametrize("chunk", [1, 7, 1 << 20])
async def test_transport_padding_is_refused_never_misread(backend_app, backend, body, chunk):
    """RFC 2046 padding after a boundary: the parser would read it as body (one file of two
    parts, 201): refused instead."""
    reply = await call_app(backend_app, upload_scope(), chunks_of(body, chunk))
    assert_error(reply, 400, "malformed_multipart")
    backend.assert_nothing_stored()


async def test_a_repeated_text_field_is_refused(backend_app, backend):
    """Each text field lives in memory: 200 copies of one would hold 200 x the field limit."""
    parts = [field_part("description", "x" * 1000) for _ in range(3)] + [file_part(b"data")]
    reply = await call_app(backend_app, upload_scope(), [form_body(parts)])
    assert_error(reply, 400, "malformed_multipart")
    assert "more than once" in reply.json()["detail"]
    backend.assert_nothing_stored()


async def test_a_boundary_shaped_like_an_rfc2047_word_is_read_as_it_is(backend_app, backend):
    boundary = "=?utf-8?q?x?="  # legal (RFC 2046 bchars); the email package would decode it to "x"
    data = b"data\r\n--x\r\n--x--\r\n"  # what a decoded boundary would cut short
    body = form_body([file_part(data)], boundary=boundary)
    reply = await call_app(backend_app, upload_scope(boundary=f'"{boundary}"'), [body])
    assert reply.status == 201, reply.body
    backend.assert_stored(reply.json(), data)


@pytest.mark.parametrize("length", ["²", "-5", "1e3", " 12 "])
async def test_an_odd_content_length_is_not_a_500(backend_app, backend, length):
    data = b"content"
    reply = await call_app(backend_app, upload_scope(headers=[("content-length", length)]), [form_body([file_part(data)])])
    assert reply.status == 201, reply.body
    backend.assert_stored(reply.json(), data)


@pytest.mark.parametrize(
    "header",
    [
        pytest.param(b"Content-Type: text/plain " + b"(" * 1200, id="nested-comments"),
        pytest.param(b'Content-Type: text/plain ("' + b"(" * 1200, id="comments-behind-a-quote"),
        pytest.param(b'Content-Disposition: form-data; name="file"; filename="a" ' + b"(" * 1200, id="in-disposition"),
        pytest.param(b"Content-Type: text/plain" + b";" * 16000, id="separators"),
        pytest.param(b"Content-Type: text/plain;" + b" ;" * 8000, id="spaced-separators"),
        pytest.param(b'Content-Disposition: form-data; name="file"; filename="' + b"a " * 8000 + b'"', id="quoted-spaces"),
        pytest.param(b"Content-Type: text/plain; a=" + b'""' * 7000, id="empty-quoted-strings"),
        pytest.param(b"Content-Type: text/plain; a=" + b"@" * 15000, id="specials"),
        pytest.param(
            b'Content-Disposition: form-data; name="file"; filename="' + b"=?utf-8?q?a?=" * 1100 + b'"',
            id="encoded-words",
        ),
    ],
)
async def test_a_header_the_email_package_chokes_on_is_a_quick_400(backend_app, backend, header):
    """Nested comments made the email package recurse (RecursionError: a 500); thousands of
    separators made it take seconds per part, and the parser as long again (a worker stalled
    for minutes by one request of 200 such parts)."""
    disposition = b'Content-Disposition: form-data; name="file"; filename="a.txt"'
    headers = [header] if header.startswith(b"Content-Disposition") else [disposition, header]
    parts = [Part("file", b"data", headers=headers) for _ in range(5)]
    started = time.monotonic()
    reply = await call_app(backend_app, upload_scope("/upload-multiple"), [form_body(parts)])
    assert time.monotonic() - started < 1.0
    assert_error(reply, 400, "malformed_multipart")
    backend.assert_nothing_stored()


async def test_a_long_filename_with_spaces_is_still_read(backend_app, backend):
    filename = " ".join(["word"] * 50) + ".txt"  # 49 spaces, 249 characters
    reply = await call_app(backend_app, upload_scope(), [form_body([file_part(b"data", filename=filename)])])
    assert reply.status == 201, reply.body
    assert reply.json()["filename"] == filename


@pytest.mark.parametrize("digest_file", [b"%s", b"%s\n", b"  %s\r\n", b"%s  data.bin\n"])  # last: sha256sum
async def test_a_sha256_sent_as_a_file_part_is_still_checked(backend_app, backend, digest_file):
    """`curl -F sha256=@digest.txt` sends the digest with a filename: it was silently
    ignored, so a wrong digest still gave 201."""
    import hashlib

    data = b"checked content"
    right = hashlib.sha256(data).hexdigest().encode()
    digest = file_part(digest_file % right, filename="digest.txt", name="sha256", content_type="text/plain")
    reply = await call_app(backend_app, upload_scope(), [form_body([file_part(data), digest])])
    assert reply.status == 201, reply.body
    backend.assert_stored(reply.json(), data)

    wrong = file_part(digest_file % (b"0" * 64), filename="digest.txt", name="sha256")
    reply = await call_app(backend_app, upload_scope(), [form_body([file_part(data), wrong])])
    assert_error(reply, 422, "sha256_mismatch")
    assert len(backend.stored_ids()) == 1  # only the first upload


async def test_a_description_sent_as_a_file_part_is_read(backend_app, backend):
    note = file_part("a note from a file".encode(), filename="note.txt", name="description")
    reply = await call_app(backend_app, upload_scope(), [form_body([note, file_part(b"data")])])
    assert reply.status == 201, reply.body
    assert reply.json()["description"] == "a note from a file"



"""Form input a real client may send (SPEC §6): odd filenames, boundaries, lengths, headers, fields sent as files.

Each was once a 500, a wrong 201 or a misread; all go through the app in process, on both
storage backends (the local dir and S3).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
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
    http_scope,
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


@pytest.mark.parametrize("size", [100, 200_000])
async def test_a_body_with_lf_line_endings_is_told_it_has_no_boundary_line(backend_app, backend, size):
    """A hand-built body whose lines end in LF alone holds no delimiter (RFC 2046: CRLF)."""
    body = form_body([file_part(b"x" * size)]).replace(b"\r\n", b"\n")
    reply = await call_app(backend_app, upload_scope(), chunks_of(body, 64 * 1024))
    assert_error(reply, 400, "malformed_multipart")
    assert "boundary line" in reply.json()["detail"]
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


@pytest.mark.parametrize("zeros, status", [(5000, 201), (0, 413)])
async def test_a_content_length_of_thousands_of_digits_is_read_not_a_500(backend_app, backend, zeros, status):
    """uvicorn and granian pass it on; Python's int() refuses text of over 4300 digits."""
    data = b"content"
    body = form_body([file_part(data)])
    length = "0" * zeros + str(len(body)) if zeros else "9" * 5000
    reply = await call_app(backend_app, upload_scope(headers=[("content-length", length)]), [body])
    assert reply.status == status, reply.body
    if status == 201:
        backend.assert_stored(reply.json(), data)
    else:
        assert reply.json()["error"] == "payload_too_large"


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


async def test_a_content_type_too_long_to_serve_back_is_not_kept(backend_app, backend):
    """A part's Content-Type is served as the file's header: 16 KB of it made the file unreadable
    to clients that cap a header (Node's http: HPE_HEADER_OVERFLOW), as the resumable path caps it."""
    for sent, kept in (("application/x-" + "a" * 16_000, "application/octet-stream"),
                       ("text/csv; note=" + "n" * 300, "text/csv")):
        reply = await call_app(backend_app, upload_scope(), [form_body([file_part(b"data", content_type=sent)])])
        assert reply.status == 201, reply.body
        assert reply.json()["content_type"] == kept
        backend.assert_stored(reply.json(), b"data")


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




def encoded_file_part(data: bytes, encoding: str, name: str = "file", filename: str | None = "f.bin") -> Part:
    disposition = f'Content-Disposition: form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    return Part(name, data, headers=[disposition.encode(), b"Content-Transfer-Encoding: " + encoding.encode()])


@pytest.mark.parametrize("encoding, encode", [
    ("base64", base64.encodebytes),  # what curl -F 'file=@f;encoder=base64' sends: 76-character lines
    ("BASE64", base64.b64encode),
    ("quoted-printable", lambda data: binascii.b2a_qp(data, istext=False)),
    ("binary", bytes),
    ("8bit", bytes),
])
@pytest.mark.parametrize("chunk", [1, 7, 4096])
async def test_a_transfer_encoded_part_is_stored_decoded(backend_app, backend, encoding, encode, chunk):
    """RFC 7578 §4.7 forbids senders a Content-Transfer-Encoding, but curl sends base64 when
    asked: it was stored still encoded, with the digest of the text, and a 201."""
    data = os.urandom(3000) + b"\r\n--" + B + b"=\r\n"  # bytes that look like framing and escapes
    description = encoded_file_part(encode("a described file".encode()), encoding, name="description", filename=None)
    body = form_body([description, encoded_file_part(encode(data), encoding)])
    reply = await call_app(backend_app, upload_scope(), chunks_of(body, chunk))
    assert reply.status == 201, reply.body
    record = reply.json()
    assert record["size"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
    assert record["description"] == "a described file"
    backend.assert_stored(record, data)


@pytest.mark.parametrize("encoding, content", [
    ("base64", b"not base64 at all!"),  # characters outside the alphabet
    ("base64", b"QUJD"[:3]),  # ends inside a 4-character group
    ("base64", b"QQ==QUJD"),  # goes on after its padding
    ("x-uuencode", b"whatever"),
    ("gzip", b"whatever"),
])
async def test_a_transfer_encoding_that_cannot_be_undone_is_a_400(backend_app, backend, encoding, content):
    reply = await call_app(backend_app, upload_scope(), [form_body([encoded_file_part(content, encoding)])])
    assert_error(reply, 400, "malformed_multipart")
    backend.assert_nothing_stored()


def test_base64_is_decoded_whatever_the_chunks():
    data = os.urandom(999)
    text = base64.encodebytes(data)
    for cut in range(len(text) + 1):
        decoder = framing.Base64Decoder()
        assert decoder.decode(text[:cut]) + decoder.decode(text[cut:]) + decoder.flush() == data, cut


def test_quoted_printable_is_decoded_whatever_the_chunks():
    """Escapes and soft line breaks cut anywhere, hard line breaks kept."""
    text = b"line one\r\na long line=\r\n goes on=3D=\nend =41=42\r\n" + binascii.b2a_qp(bytes(range(256)), istext=False)
    data = binascii.a2b_qp(text)
    for first in range(len(text) + 1):
        for second in (first, first + 1, first + 2, first + 3):
            decoder = framing.QuotedPrintableDecoder()
            pieces = [text[:first], text[first:second], text[second:]]
            assert b"".join(map(decoder.decode, pieces)) + decoder.flush() == data, (first, second)


@pytest.mark.parametrize("size", [10, 100_000])
async def test_a_file_part_without_a_filename_is_a_422_whatever_its_size(backend_app, backend, size):
    """OkHttp, Apache HttpClient and Spring can send a binary part without a filename: it was
    read as a skipped text part, a 422 when small and a 413 (field_size) past the field limit."""
    for path, name in (("/upload", "file"), ("/upload-multiple", "files")):
        body = form_body([Part(name, b"x" * size, content_type="application/octet-stream")])
        reply = await call_app(backend_app, upload_scope(path), [body])
        assert_error(reply, 422, "no_file")
    backend.assert_nothing_stored()


@pytest.mark.parametrize("filename, shown", [
    # .NET's MultipartFormDataContent, with the filename* it sends beside it
    ("=?utf-8?B?5paw5bu65paH5pys5paH5qGjLnR4dA==?=", "新建文本文档.txt"),
    ("=?ISO-8859-1?Q?r=E9sum=E9.txt?=", "résumé.txt"),
    ("=?utf-8?B?not base64?=", "=?utf-8?B?not base64?="),  # not a word: kept as sent
    ("=?koi8-r?B?8dPO2Q==?=", "=?koi8-r?B?8dPO2Q==?="),  # a charset we do not decode: kept as sent
])
async def test_a_filename_that_is_one_rfc2047_word_is_decoded(backend_app, backend, filename, shown):
    disposition = f"Content-Disposition: form-data; name=file; filename=\"{filename}\"; filename*=utf-8''x.txt"
    reply = await call_app(backend_app, upload_scope(), [form_body([Part("file", b"data", headers=[disposition.encode()])])])
    assert reply.status == 201, reply.body
    assert reply.json()["filename"] == shown


@pytest.mark.parametrize("size", [10, 100_000])
async def test_a_file_with_an_empty_filename_is_a_422_whatever_its_size(backend_app, backend, size):
    """requests' `('', data)`, `curl -F 'file=@x;filename='`, Go's CreateFormFile("file", ""): content
    under `filename=""` was a 422 when small and a 413 (field_size) past the field limit."""
    for path, name in (("/upload", "file"), ("/upload-multiple", "files")):
        body = form_body([Part(name, b"x" * size, filename="", content_type="application/octet-stream")])
        reply = await call_app(backend_app, upload_scope(path), [body])
        assert_error(reply, 422, "no_file")
    backend.assert_nothing_stored()
    # An empty file input (no content) beside a real file is still ignored.
    body = form_body([Part("file", b"", filename=""), file_part(b"data")])
    reply = await call_app(backend_app, upload_scope(), [body])
    assert reply.status == 201, reply.body


def charset_part(name: str, data: bytes, content_type: str) -> Part:
    return Part(name, data, headers=[f'Content-Disposition: form-data; name="{name}"'.encode(),
                                     f"Content-Type: {content_type}".encode()])


@pytest.mark.parametrize("content_type, data, description", [
    ("text/plain; charset=ISO-8859-1", "café".encode("latin-1"), "café"),  # Apache HttpClient's addTextBody
    ("text/plain; charset=ISO-8859-1", b"\x81 \x9d", "\x81 \x9d"),  # as meant: no windows-1252 characters
    ('text/plain; charset="windows-1252"', "€ 5".encode("cp1252"), "€ 5"),
    ("text/plain; charset=Shift_JIS", "説明".encode("shift_jis"), "説明"),
    ("text/plain; charset=UTF-8", "café".encode(), "café"),
    ("text/plain; charset=x-unknown", "café".encode(), "café"),  # not one we read: UTF-8
    ("text/plain; charset=idna", "café".encode(), "café"),  # a codec, not a web charset: UTF-8
    ("text/plain; charset=GB2312", "说明".encode("gbk"), "说明"),  # read as GBK, as browsers do
])
async def test_a_text_field_is_read_in_the_charset_its_part_declares(backend_app, backend, content_type, data, description):
    """RFC 7578 §4.4: a text part's charset parameter says how to read it (it was a 400, 'not UTF-8')."""
    body = form_body([charset_part("description", data, content_type), file_part(b"data")])
    reply = await call_app(backend_app, upload_scope(), [body])
    assert reply.status == 201, reply.body
    assert reply.json()["description"] == description


async def test_the_requests_charset_is_the_forms_without_a_charset_field(backend_app, backend):
    """Apache HttpClient's browser-compatible mode (LEGACY) names the form's charset on the request's
    Content-Type and none on its text parts; a part's own charset and `_charset_` still come first."""
    content_type = f"multipart/form-data; charset=ISO-8859-1; boundary={BOUNDARY}"
    for parts, expected in (
        ([field_part("description", "dé".encode("latin-1")), legacy_file_part("é.txt", "latin-1")], ("dé", "é.txt")),
        ([field_part("_charset_", "utf-8"), field_part("description", "dé".encode()), file_part(b"data")], ("dé", "data.bin")),
        ([charset_part("description", "dé".encode(), "text/plain; charset=UTF-8"), file_part(b"data")], ("dé", "data.bin")),
    ):
        reply = await call_app(backend_app, http_scope(content_type=content_type), [form_body(parts)])
        assert reply.status == 201, reply.body
        assert (reply.json()["description"], reply.json()["filename"]) == expected


async def test_a_text_field_that_does_not_decode_in_its_charset_is_a_400(backend_app, backend):
    body = form_body([charset_part("description", b"\x82\xff", "text/plain; charset=Shift_JIS"), file_part(b"data")])
    assert_error(await call_app(backend_app, upload_scope(), [body]), 400, "malformed_multipart")
    backend.assert_nothing_stored()


async def test_a_form_charset_field_says_how_to_read_the_text_fields(backend_app, backend):
    """RFC 7578 §4.6: a browser form with a hidden `_charset_` input on a windows-1252 page; the field
    may come before or after it, and a part's own charset still wins."""
    text = "€ café".encode("cp1252")
    for parts in ([field_part("_charset_", "windows-1252"), field_part("description", text)],
                  [field_part("description", text), field_part("_charset_", "windows-1252")]):
        reply = await call_app(backend_app, upload_scope(), [form_body([*parts, file_part(b"data")])])
        assert reply.status == 201, reply.body
        assert reply.json()["description"] == "€ café"
    parts = [field_part("_charset_", "windows-1252"), charset_part("description", "é".encode(), "text/plain; charset=utf-8")]
    reply = await call_app(backend_app, upload_scope(), [form_body([*parts, file_part(b"data")])])
    assert reply.status == 201, reply.body
    assert reply.json()["description"] == "é"
    stored = backend.stored_ids()
    parts = [field_part("_charset_", "utf-16"), field_part("description", text)]  # not a web charset: UTF-8
    assert_error(await call_app(backend_app, upload_scope(), [form_body([*parts, file_part(b"data")])]),
                 400, "malformed_multipart")
    assert backend.stored_ids() == stored


def named_part(params: bytes) -> Part:
    """A file part whose Content-Disposition has these parameters after its name."""
    return Part("file", b"data", headers=[b'Content-Disposition: form-data; name="file"; ' + params])


async def stored_filename(app, parts: list[Part]) -> str:
    reply = await call_app(app, upload_scope(), [form_body(parts)])
    assert reply.status == 201, reply.body
    return reply.json()["filename"]


def legacy_file_part(name: str, charset: str, field: str = "file") -> Part:
    """What a browser sends for a file input on a page in `charset`: the filename in that charset."""
    return Part(field, b"data", headers=[b'Content-Disposition: form-data; name="' + field.encode() + b'"; filename="'
                                         + name.encode(charset) + b'"', b"Content-Type: text/plain"])


@pytest.mark.parametrize("charset, name", [
    ("windows-1252", "résumé €.txt"),
    ("shift_jis", "日本語の表.txt"),  # 表 is 0x95 0x5C: its second byte is a backslash
    ("shift_jis", "予定表"),  # ... and here it stands before the closing quote
    ("euc-kr", "한국어.txt"),
    ("gbk", "图片.jpg"),  # bytes that happen to be valid UTF-8
    ("iso-2022-jp", "日本語.txt"),  # 7-bit: ESC sequences and ASCII bytes
])
async def test_a_filename_in_the_forms_charset_is_read_in_it(backend_app, backend, charset, name):
    """A browser's form on a page in a legacy charset writes the filename in that charset (Chromium
    does; RFC 7578 §4.6 `_charset_` names it), before or after the `_charset_` field."""
    for parts in ([field_part("_charset_", charset), legacy_file_part(name, charset)],
                  [legacy_file_part(name, charset), field_part("_charset_", charset)]):
        reply = await call_app(backend_app, upload_scope(), [form_body(parts)])
        assert reply.status == 201, reply.body
        assert reply.json()["filename"] == name
        assert backend.stored_record(reply.json()["id"])["filename"] == name
    files = [legacy_file_part(f"{i} {name}", charset, "files") for i in range(3)]
    reply = await call_app(backend_app, upload_scope("/upload-multiple"), [form_body([*files, field_part("_charset_", charset)])])
    assert [r["filename"] for r in reply.json()["files"]] == [f"{i} {name}" for i in range(3)]


@pytest.mark.parametrize("raw, name", [
    (b"caf\xe9.txt", "café.txt"),  # Apache HttpClient's browser-compatible mode, ISO-8859-1
    (b"\xff\xfe\xfd", "ÿþý"),
    (b"a\x85b \x93q\x94 \x96 \x80.txt", "a\u2026b \u201cq\u201d \u2013 \u20ac.txt"),  # windows-1252's own
    (b"a\x81b.txt", "a\ufffdb.txt"),  # undefined in windows-1252
])
async def test_a_filename_not_utf8_without_a_form_charset_is_read_as_windows_1252(backend_app, backend, raw, name):
    """What browsers take ISO-8859-1, HTTP's historical reading of header bytes, for."""
    assert await stored_filename(backend_app, [named_part(b'filename="' + raw + b'"')]) == name


@pytest.mark.parametrize("params", [
    b'filename="=?utf-8?B?w6l0w6kudHh0?="',  # .NET's RFC 2047 word
    b"filename*=UTF-8''%C3%A9t%C3%A9.txt",
    b"filename*0*=UTF-8''%C3%A9t%C3%A9; filename*1=.txt",
])
async def test_a_filename_that_names_its_charset_is_not_read_in_the_forms(backend_app, backend, params):
    parts = [field_part("_charset_", "windows-1252"), named_part(params)]
    assert await stored_filename(backend_app, parts) == "été.txt"


@pytest.mark.parametrize("label, codec, text", [
    ("shift_jis", "cp932", "①～－∥"),  # NEC row 13, and U+FF5E (not U+301C) as Windows and browsers write ～
    ("windows-31j", "cp932", "表示"),  # Java's name for it (Apache HttpClient)
    ("euc-kr", "cp949", "똠"),  # browsers' EUC-KR is windows-949
    ("ks_c_5601-1987", "cp949", "한국어"),  # Microsoft's label
    ("big5", "cp950", "€ 說明"),  # browsers' Big5 has the euro sign
    ("x-gbk", "gb18030", "说明"),
    ("windows-1253", "cp1253", "Γεια"),
    ("windows-1252", "cp1252", "€ café"),  # what browsers name a page in ISO-8859-1
])
async def test_a_legacy_charset_is_read_as_browsers_write_it(backend_app, backend, label, codec, text):
    """The WHATWG Encoding standard's labels and decoders: a browser on a page in such a charset writes
    its filenames and text fields so. Python's codecs of the same names refused ① or € in a text field
    (400) and turned them into U+FFFD in a filename."""
    parts = [field_part("_charset_", label), field_part("description", text.encode(codec)),
             legacy_file_part(f"{text}.txt", codec)]
    reply = await call_app(backend_app, upload_scope(), [form_body(parts)])
    assert reply.status == 201, reply.body
    assert (reply.json()["filename"], reply.json()["description"]) == (f"{text}.txt", text)


async def test_a_filename_that_does_not_decode_in_the_forms_charset_keeps_what_does(backend_app, backend):
    parts = [field_part("_charset_", "shift_jis"), named_part(b'filename="a\x85\x40.txt"')]  # 0x8540: no character
    assert await stored_filename(backend_app, parts) == "a\ufffd@.txt"


@pytest.mark.parametrize("params, filename", [
    ("filename*0*=utf-8''%C3%A9t%C3%A9; filename*1=\".txt\"", "été.txt"),
    ('filename*0="abc"; filename*1="def.txt"', "abcdef.txt"),
    ("filename*0*=iso-8859-1''caf%E9; filename*1*=%20au%20lait.txt", "café au lait.txt"),
    ('filename*1="ignored.txt"', None),  # no piece 0: no filename
    ("filename=\"plain.txt\"; filename*0*=utf-8''other.txt", "plain.txt"),  # filename wins
])
async def test_rfc_2231_continuations_are_joined(backend_app, backend, params, filename):
    """RFC 2231 §3-4 (JavaMail writes them; werkzeug, aiohttp, Django and the email package read them)."""
    if filename is None:
        assert_error(await call_app(backend_app, upload_scope(), [form_body([named_part(params.encode())])]), 422, "no_file")
    else:
        assert await stored_filename(backend_app, [named_part(params.encode())]) == filename


async def test_an_rfc_2231_piece_with_raw_bytes_is_read(backend_app, backend):
    # windows-1252 without a form charset, as a filename= of such bytes; else the form's
    assert await stored_filename(backend_app, [named_part(b"filename*0*=utf-8''%41\xe9")]) == "A\xe9"
    parts = [field_part("_charset_", "windows-1252"), named_part(b'filename*0="caf\xe9"; filename*1=".txt"')]
    assert await stored_filename(backend_app, parts) == "caf\xe9.txt"


@pytest.mark.parametrize("disposition, filename", [
    # Node's form-data (axios, got) does not escape quotes in a filename
    ('form-data; name="file"; filename="my "quoted" file.txt"', 'my "quoted" file.txt'),
    ('form-data; name="file"; filename="a"b.txt"', 'a"b.txt'),
    ("form-data; name=\"file\"; filename=\"say \"hi\".txt\"; filename*=UTF-8''say%20%22hi%22.txt", 'say "hi".txt'),
    ('form-data; name="file"; filename="ok.txt" ; size=3', "ok.txt"),
    ('form-data; name="file"; filename="cut" junk', "cut"),  # not a quoted name gone wrong: as before
])
async def test_a_filename_with_unescaped_quotes_is_read_whole(backend_app, backend, disposition, filename):
    reply = await call_app(backend_app, upload_scope(), [form_body([Part("file", b"data", headers=[
        f"Content-Disposition: {disposition}".encode()])])])
    assert reply.status == 201, reply.body
    assert reply.json()["filename"] == filename



@pytest.mark.parametrize("names", [["files[]", "files[]"], ["files[0]", "files[1]"]])
async def test_a_file_field_named_the_php_way_is_the_field(backend_app, backend, names):
    """What upload widgets send by default: Uppy's bundled XHR uploads `files[]`, Dropzone's
    `uploadMultiple` `files[0]`, `files[1]`."""
    datas = [b"the first file", b"and the second"]
    body = form_body([file_part(data, f"{i}.txt", name) for i, (data, name) in enumerate(zip(datas, names))])
    reply = await call_app(backend_app, upload_scope("/upload-multiple"), [body])
    assert reply.status == 201, reply.body
    for record, data in zip(reply.json()["files"], datas):
        backend.assert_stored(record, data)


@pytest.mark.parametrize("name", ["files[a]", "files[1][2]", "files[", "filesx"])
async def test_other_names_near_the_file_field_are_not_it(backend_app, backend, name):
    reply = await call_app(backend_app, upload_scope("/upload-multiple"), [form_body([file_part(b"data", "a.txt", name)])])
    assert_error(reply, 422, "no_file")
    backend.assert_nothing_stored()


async def test_a_small_text_part_in_the_file_field_is_dropped(backend_app, backend):
    """FilePond sends its item's metadata (`file={}`) as a text part before the file itself."""
    body = form_body([field_part("file", "{}"), file_part(b"the file", "a.txt", "file")])
    reply = await call_app(backend_app, upload_scope(), [body])
    assert reply.status == 201, reply.body
    backend.assert_stored(reply.json(), b"the file")
    reply = await call_app(backend_app, upload_scope(), [form_body([field_part("file", "{}")])])
    assert_error(reply, 422, "no_file")


async def test_a_text_part_in_the_file_field_past_the_field_limit_is_a_file_without_a_name(
    make_backend_app, backend
):
    """A file sent without its filename: 422 no_file, not the 413 of an unread field."""
    app = make_backend_app(max_field_size=100)
    body = form_body([field_part("file", b"x" * 1000), file_part(b"data")])
    reply = await call_app(app, upload_scope(), [body])
    assert_error(reply, 422, "no_file")
    assert "no filename" in reply.json()["detail"]
    backend.assert_nothing_stored()

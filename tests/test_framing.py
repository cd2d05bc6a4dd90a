"""upload_service/framing.py driven directly: part headers and the Framer, bytes in, parts out."""

from __future__ import annotations

import base64
import binascii
import time

import pytest
from hypothesis import given, settings, strategies as st

from support import BOUNDARY, Part, field_part, file_part, form_body
from upload_service.errors import FormError, LimitExceeded
from upload_service.framing import (
    DEFAULT_CONTENT_TYPE,
    MAX_CONTENT_TYPE_CHARS,
    MAX_FILENAME_BYTES,
    MAX_PART_HEADER_BYTES,
    MAX_PART_HEADER_LINES,
    MAX_PREAMBLE,
    Base64Decoder,
    Framer,
    PartInfo,
    QuotedPrintableDecoder,
    clean_content_type,
    clean_filename,
    decode_ext_value,
    parse_header_params,
    parse_params_slowly,
    read_part_headers,
    read_in_charset,
)

B = BOUNDARY.encode()


# -- parse_header_params ----------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        pytest.param("text/plain", ("text/plain", {}), id="no-params"),
        pytest.param(
            'form-data; name="file"; filename="a.txt"',
            ("form-data", {"name": "file", "filename": "a.txt"}),
            id="quoted",
        ),
        pytest.param("form-data; name=file; filename=a.txt", ("form-data", {"name": "file", "filename": "a.txt"}),
                     id="token"),
        pytest.param('Form-Data; NAME="x"', ("form-data", {"name": "x"}), id="case-folded-keys-not-values"),
        pytest.param('form-data; name="a;b"; filename="c d.txt"', ("form-data", {"name": "a;b", "filename": "c d.txt"}),
                     id="semicolon-and-space-in-quotes"),
        pytest.param(r'form-data; filename="a\"b\\c"', ("form-data", {"filename": 'a"b\\c'}), id="escapes"),
        pytest.param('form-data; name="a b "', ("form-data", {"name": "a b "}), id="white-space-kept-in-quotes"),
        pytest.param(r'form-data; filename="C:\Users\me\a.txt"', ("form-data", {"filename": r"C:\Users\me\a.txt"}),
                     id="windows-path-kept"),
        pytest.param('form-data; name="first"; name="second"', ("form-data", {"name": "first"}), id="first-wins"),
        pytest.param("form-data ;  name = x ;", ("form-data", {"name": "x"}), id="loose-whitespace"),
        pytest.param("form-data; flag; name=x", ("form-data", {"flag": "", "name": "x"}), id="bare-key"),
        pytest.param('form-data; filename="unterminated', ("form-data", {"filename": "unterminated"}),
                     id="unterminated-quote"),
        # Node's form-data (axios, got) leaves quotes in a name unescaped: read to the last quote before `;`
        pytest.param('form-data; name="file"; filename="my "quoted" file.txt"',
                     ("form-data", {"name": "file", "filename": 'my "quoted" file.txt'}), id="unescaped-quotes"),
        pytest.param('form-data; filename="a"b.txt"; name="f"', ("form-data", {"filename": 'a"b.txt', "name": "f"}),
                     id="unescaped-quote-then-more"),
        pytest.param('form-data; filename="cut" junk; name="f"', ("form-data", {"filename": "cut", "name": "f"}),
                     id="junk-after-the-quote-dropped"),
        pytest.param('form-data; filename="ok.txt"  ; name="f"', ("form-data", {"filename": "ok.txt", "name": "f"}),
                     id="space-after-the-quote"),
        pytest.param("multipart/form-data; boundary=\"a b'()+_,-./:=?\"",
                     ("multipart/form-data", {"boundary": "a b'()+_,-./:=?"}), id="boundary-all-bchars"),
        pytest.param("", ("", {}), id="empty"),
    ],
)
def test_parse_header_params(value, expected):
    assert parse_header_params(value) == expected


@pytest.mark.parametrize("value", [
    "form-data" + ("; a=b" + " " * 10) * 8 + "x",
    "form-data" + ('; a="b"' + " \t" * 10) * 6 + ";",
])
def test_a_value_with_many_white_space_runs_is_read_in_linear_time(value):
    """The one-regex reading once backtracked over every split of the white space between
    parameters (exponential in their number: seconds for ten). Now it fails at once."""
    started = time.perf_counter()
    parse_header_params(value)
    assert time.perf_counter() - started < 1.0


# Parameter text as clients write it (whole `; key=value` pieces, quoted or not), with
# what either reading must get right mixed in: escapes, `;` and `=` in quotes, white space
# around the pieces, keys that are not tokens, stray quotes and semicolons.
_white = st.sampled_from(["", "", " ", "\t", "  "])
_quoted = st.text(st.sampled_from(list('ab ;=\\"\t') + ["é", "\r"]), max_size=6).map(lambda t: f'"{t}"')
_token = st.text(st.sampled_from(list("abZ09-_.*'%!")), max_size=6)
_param = st.builds(
    lambda before, key, around, value, after: f"{before};{before}{key}{around}={value}{after}",
    _white, st.sampled_from(["name", "filename", "filename*", "NAME", "a", "a b", ""]),
    st.sampled_from(["", "", " "]), st.one_of(_quoted, _token), _white,
)
_noise = st.sampled_from([";", "=", " ", '"', "\\", "x", "é"])
_param_text = st.lists(st.one_of(_param, _param, _param, _noise), max_size=5).map("".join)


@settings(max_examples=1000, deadline=None)
@given(head=st.sampled_from(["form-data", "multipart/form-data", "Text/Plain ", ""]), params=_param_text)
def test_the_one_regex_reading_agrees_with_the_slow_one(head, params):
    """parse_header_params reads what clients send with one regex: whatever it reads that
    way must come out as the character-by-character reading would have it."""
    value = f"{head}{params}"
    before, _, after = value.partition(";")
    assert parse_header_params(value) == (before.strip().lower(), parse_params_slowly(after))


# -- decode_ext_value ---------------------------------------------------------------


@pytest.mark.parametrize(
    "value, expected",
    [
        pytest.param("UTF-8''%E2%82%AC%20rates.txt", "€ rates.txt", id="utf-8"),
        pytest.param("utf-8'en'na%C3%AFve.txt", "naïve.txt", id="language-tag"),
        pytest.param("iso-8859-1''caf%E9.txt", "café.txt", id="latin-1"),
        pytest.param("''plain.txt", "plain.txt", id="no-charset-means-utf-8"),
        pytest.param("x-unknown-charset''a%C3%A9", "aé", id="unknown-charset-falls-back"),
        pytest.param("UTF-8''%FF.txt", "\ufffd.txt", id="bad-bytes-replaced"),
    ],
)
def test_decode_ext_value(value, expected):
    assert decode_ext_value(value) == expected


# -- clean_filename -------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        pytest.param("report.pdf", "report.pdf", id="plain"),
        pytest.param("../../etc/passwd", "passwd", id="dot-dot-slash"),
        pytest.param("..\\..\\x", "x", id="dot-dot-backslash"),
        pytest.param("/abs/path", "path", id="absolute"),
        pytest.param("C:\\Windows\\x.txt", "x.txt", id="windows-full-path"),
        pytest.param("a\x00b\tc\x7f\r\nd.txt", "abcd.txt", id="control-chars"),
        pytest.param("\u202efdp.exe", "fdp.exe", id="right-to-left-override"),  # would show as exe.pdf
        pytest.param("a\u2066b\u2069\u200f.txt", "ab.txt", id="bidi-isolates-and-marks"),
        pytest.param("👩\u200d💻.txt", "👩\u200d💻.txt", id="joiner-kept"),
        pytest.param("..", "unnamed", id="dot-dot"),
        pytest.param(".", "unnamed", id="dot"),
        pytest.param("dir/", "unnamed", id="trailing-separator"),
        pytest.param("", "unnamed", id="empty"),
        pytest.param("  spaced.txt  ", "spaced.txt", id="outer-space"),
        pytest.param("ünïcödé 文件.txt", "ünïcödé 文件.txt", id="non-ascii"),
        pytest.param("x" * 1000, "x" * MAX_FILENAME_BYTES, id="capped"),
        pytest.param("x" * 1000 + ".tar.gz", "x" * 252 + ".gz", id="capped-extension-kept"),
        # Linux's NAME_MAX is 255 bytes: 100 CJK characters are 300 (aria2c and rclone could not save it)
        pytest.param("日" * 100 + ".txt", "日" * 83 + ".txt", id="capped-in-bytes-at-a-character"),
        pytest.param("日" * 100 + "." + "x" * 17, ("日" * 100 + "." + "x" * 17).encode()[:255].decode(errors="ignore"),
                     id="capped-no-extension-that-long"),
    ],
)
def test_clean_filename(raw, expected):
    assert clean_filename(raw) == expected


@pytest.mark.parametrize(
    "raw, expected",
    [
        pytest.param("text/csv; charset=utf-8", "text/csv; charset=utf-8", id="as-sent"),
        pytest.param(" image/png\x07 ", "image/png", id="control-characters"),
        pytest.param("text/plain; " + "a=1; " * 60, "text/plain", id="long-parameters-dropped"),
        pytest.param("application/x-" + "a" * 16_000, DEFAULT_CONTENT_TYPE, id="too-long-a-type"),
        pytest.param("\x00", DEFAULT_CONTENT_TYPE, id="nothing-left"),
    ],
)
def test_clean_content_type(raw, expected):
    """It is served back as a header: at most MAX_CONTENT_TYPE_CHARS, printable."""
    cleaned = clean_content_type(raw)
    assert cleaned == expected and len(cleaned) <= MAX_CONTENT_TYPE_CHARS


# -- read_part_headers -------------------------------------------------------------


def test_read_part_headers_file_part():
    info = read_part_headers(b'Content-Disposition: form-data; name="file"; filename="a.txt"\r\nContent-Type: text/plain')
    assert info == PartInfo("file", "a.txt", "text/plain")


def test_read_part_headers_any_case_and_order():
    block = b'content-type: image/png\r\nCONTENT-DISPOSITION: form-data; name="file"; filename="p.png"'
    assert read_part_headers(block) == PartInfo("file", "p.png", "image/png")


def test_read_part_headers_text_field_defaults():
    assert read_part_headers(b'Content-Disposition: form-data; name="description"') == PartInfo(
        "description", None, DEFAULT_CONTENT_TYPE
    )


def test_read_part_headers_empty_filename_is_not_none():
    info = read_part_headers(b'Content-Disposition: form-data; name="file"; filename=""')
    assert info is not None and info.filename == ""


@pytest.mark.parametrize(
    "params, expected",
    [
        pytest.param(b"filename*=UTF-8''%E2%82%AC.txt", "€.txt", id="filename-star-alone"),
        pytest.param(b"filename=\"plain.txt\"; filename*=UTF-8''%E2%82%AC.txt", "plain.txt", id="filename-wins"),
        pytest.param(b"filename*=UTF-8''%E2%82%AC.txt; filename=\"plain.txt\"", "plain.txt",
                     id="filename-wins-either-order"),
        pytest.param("filename=\"日本語.txt\"".encode(), "日本語.txt", id="raw-utf-8"),
    ],
)
def test_read_part_headers_filename_forms(params, expected):
    info = read_part_headers(b'Content-Disposition: form-data; name="file"; ' + params)
    assert info.filename == expected


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b"Content-Type: text/plain", id="no-content-disposition"),
        pytest.param(b'Content-Disposition: form-data; filename="a.txt"', id="no-name"),
        pytest.param(b'Content-Disposition: form-data; name=""; filename="a.txt"', id="empty-name"),
    ],
)
def test_read_part_headers_parts_to_skip(block):
    assert read_part_headers(block) is None


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(b'Content-Disposition: form-data; name="a"\r\nContent-Disposition: form-data; name="b"',
                     id="two-content-dispositions"),
        pytest.param(b'Content-Disposition: attachment; name="a"', id="not-form-data"),
        pytest.param(b'Content-Disposition: form-data; name="a";\r\n filename="x"', id="folded"),
        pytest.param(b'Content-Disposition: form-data; name="a"\rX: y', id="bare-cr"),
        pytest.param(b'Content-Disposition: form-data; name="a"' + b"\r\nX-A: b" * MAX_PART_HEADER_LINES,
                     id="too-many-lines"),
    ],
)
def test_read_part_headers_refuses(block):
    with pytest.raises(FormError):
        read_part_headers(block)


@pytest.mark.parametrize("name", ["表.txt", "予定表"])  # 表 is 0x95 0x5C: a backslash, before the quote in the 2nd
def test_a_filename_not_utf8_is_kept_as_escapes_to_read_in_the_forms_charset(name):
    raw = name.encode("shift_jis")
    info = read_part_headers(b'Content-Disposition: form-data; name="file"; filename="' + raw + b'"; x="y"')
    assert info.name == "file"
    assert read_in_charset(info.filename, "shift_jis") == name
    assert read_in_charset(info.filename, None) == raw.decode("cp1252", "replace")


@pytest.mark.parametrize("text, charset, read", [
    ("été", None, "été"),  # UTF-8, no form charset: as it is
    ("été", "utf-8", "été"),
    ("plain.txt", "shift_jis", "plain.txt"),
    ("图片.jpg".encode("gbk").decode("utf-8"), "gbk", "图片.jpg"),  # GBK bytes that are valid UTF-8
    ("日本語.txt".encode("iso2022_jp").decode("ascii"), "iso2022_jp", "日本語.txt"),  # 7-bit, with ESC
    ("\u201cq\u201d \u2013 \u20ac".encode("cp1252").decode("utf-8", "surrogateescape"), None, "\u201cq\u201d \u2013 \u20ac"),
])
def test_read_in_charset(text, charset, read):
    assert read_in_charset(text, charset) == read


# -- Framer --------------------------------------------------------------------


class Recorder:
    """A PartHandler that keeps what the framer told: [info, body, ended] a part."""

    def __init__(self) -> None:
        self.parts: list[list] = []
        self.pieces: list[bytes] = []

    def part_started(self, info: PartInfo | None) -> None:
        assert not self.parts or self.parts[-1][2], "a part started before the last one ended"
        self.parts.append([info, b"", False])

    def part_data(self, data: bytes) -> None:
        assert data and not self.parts[-1][2]
        self.pieces.append(data)
        self.parts[-1][1] += data

    def part_ended(self) -> None:
        self.parts[-1][2] = True


def framed(chunks: list[bytes], max_parts: int = 20) -> tuple[Recorder, Framer]:
    recorder = Recorder()
    framer = Framer(B, max_parts, recorder)
    for chunk in chunks:
        framer.feed(chunk)
    return recorder, framer


def as_sent(parts: list[Part]) -> list[tuple[str | None, bytes]]:
    return [(part.name, part.data) for part in parts]


def as_told(recorder: Recorder) -> list[tuple[str | None, bytes]]:
    assert all(ended for _, _, ended in recorder.parts)
    return [(info.name if info else None, body) for info, body, _ in recorder.parts]


GOLDEN_PARTS = [
    field_part("description", "two files"),
    file_part(b"alpha\r\n--" + B[:-1] + b"\r\n-", "a.txt", "files", "text/plain"),
    Part("files", b"beta", headers=[b"Content-Type: image/png",
                                     b'content-disposition: form-data; name="files"; filename="b.png"']),
]


@pytest.mark.parametrize("step", [1, 2, 3, 7, 64, 10**6], ids=lambda s: f"chunks-of-{s}")
def test_framer_cuts_preamble_and_epilogue(step):
    inner = form_body(GOLDEN_PARTS)
    body = b"preamble line\r\n" + inner + b"epilogue --" + B + b"\r\n"
    recorder, framer = framed([body[i : i + step] for i in range(0, len(body), step)])
    assert as_told(recorder) == as_sent(GOLDEN_PARTS)
    assert framer.complete
    assert [(p.name, p.filename, p.content_type) for p, _, _ in recorder.parts] == [
        ("description", None, DEFAULT_CONTENT_TYPE),
        ("files", "a.txt", "text/plain"),
        ("files", "b.png", "image/png"),
    ]


TRICKY_PARTS = [
    Part("x", b"no name: not for a target", headers=[b"Content-Type: text/plain"]),
    field_part("description", ""),
    file_part(b"-" + B + b"--", "a", "files"),
    file_part(b"\r\n--" + B[:-1], "b", "files"),
    file_part(b"\r\n--" + B + b"X\r\n--" + B + b"-x", "c", "files"),  # markers that begin no boundary line
    file_part(b"\r\r\n\r\n-\r\n--\r", "d", "files"),
]


def test_framer_hands_on_each_body_whole_however_the_body_is_cut():
    body = form_body(TRICKY_PARTS, preamble=b"pre\r\n", epilogue=b"\r\n--" + B + b"\r\n")
    expected = [(None if p.name == "x" else p.name, p.data) for p in TRICKY_PARTS]
    for cut in range(len(body) + 1):
        recorder, framer = framed([body[:cut], body[cut:]])
        assert as_told(recorder) == expected and framer.complete, cut
    for step in (1, 2, 5, 49, 50, 51):
        recorder, _ = framed([body[i : i + step] for i in range(0, len(body), step)])
        assert as_told(recorder) == expected, step


def test_framer_hands_on_a_chunk_of_body_as_it_is():
    head, tail = form_body([file_part(b"")]).split(b"\r\n--" + B + b"--")
    middle = bytes(range(256)) * 256  # CRs, but none that may begin a boundary line at its end
    recorder, _ = framed([head + b"abc", middle, middle, b"\r\n--" + B + b"--" + tail])
    assert recorder.pieces == [b"abc", middle, middle] and recorder.pieces[1] is recorder.pieces[2] is middle


@pytest.mark.parametrize("tail", [b"\r", b"\r\r\r\n-", b"\r\n--" + B, b"\r\n--" + B + b"-"])
def test_framer_holds_what_may_begin_a_delimiter_until_the_next_chunk(tail):
    head = form_body([file_part(b"")]).split(b"\r\n--" + B + b"--")[0]
    recorder, framer = framed([head, b"data" + tail])
    assert recorder.parts[0][1] == b"data" + tail[: tail.rindex(b"\r")]  # up to the CR that may begin one
    framer.feed(b"xy")  # not a delimiter after all: body bytes
    assert recorder.parts[0][1] == b"data" + tail + b"xy"
    framer.feed(b"\r\n--" + B + b"--\r\n")
    assert as_told(recorder) == [("file", b"data" + tail + b"xy")] and framer.complete


def test_a_part_without_a_body_ends_at_its_blank_line():
    # RFC 2046 §5.1.1: `body-part := headers [CRLF *OCTET]`; the blank line's CRLF begins the delimiter.
    d = b"--" + B
    body = (d + b'\r\nContent-Disposition: form-data; name="a"\r\n\r\n'
            + d + b'\r\nContent-Disposition: form-data; name="b"\r\n\r\nbee\r\n'
            + d + b'\r\nContent-Disposition: form-data; name="c"\r\n\r\n' + d + b"--\r\n")
    for cut in range(len(body) + 1):
        recorder, framer = framed([body[:cut], body[cut:]])
        assert as_told(recorder) == [("a", b""), ("b", b"bee"), ("c", b"")] and framer.complete, cut
    recorder, _ = framed([body[i : i + 1] for i in range(len(body))])
    assert as_told(recorder) == [("a", b""), ("b", b"bee"), ("c", b"")]


def test_a_header_block_of_the_largest_size_is_read_however_it_is_cut():
    line = b'Content-Disposition: form-data; name="a"\r\nX-Pad: '
    block = line + b"p" * (MAX_PART_HEADER_BYTES - len(line))
    body = b"--" + B + b"\r\n" + block + b"\r\n\r\nx\r\n--" + B + b"--\r\n"
    start = body.index(block)
    for cut in range(start + MAX_PART_HEADER_BYTES - 2, start + MAX_PART_HEADER_BYTES + 6):
        recorder, _ = framed([body[:cut], body[cut:]])
        assert as_told(recorder) == [("a", b"x")], cut
    with pytest.raises(FormError, match="longer than"):
        framed([body.replace(b"X-Pad: ", b"X-Pad: p")])


def test_framer_incomplete_body_is_not_complete():
    body = form_body([file_part(b"data")])
    for cut in range(len(body) - 2):
        _, framer = framed([body[:cut]])
        assert not framer.complete, cut


def test_framer_bounds_the_preamble():
    with pytest.raises(FormError):
        framed([b"x" * 4096] * (MAX_PREAMBLE // 4096 + 2))


def test_framer_bounds_a_header_block():
    body = b"--" + B + b"\r\nX-Long: " + b"a" * (MAX_PART_HEADER_BYTES + 10)
    with pytest.raises(FormError):
        framed([body[i : i + 1000] for i in range(0, len(body), 1000)])


def test_framer_counts_parts():
    body = form_body([field_part(f"f{i}", "x") for i in range(5)])
    with pytest.raises(LimitExceeded):
        framed([body], max_parts=4)


# -- header lines that are not `name: value`, bodies without parts (issue 11) --------


DISPOSITION = b'Content-Disposition: form-data; name="a"'


@pytest.mark.parametrize(
    "block",
    [
        # RFC 9110 §5.1: every line is `token: value`; streaming-form-data skips these lines.
        pytest.param(b'Content-Disposition form-data; name="a"', id="disposition-without-colon"),
        pytest.param(DISPOSITION + b"\r\nGarbage", id="no-colon"),
        pytest.param(DISPOSITION + b"\r\n: x", id="empty-name"),
        pytest.param(DISPOSITION + b"\r\nX Y: z", id="space-in-name"),
        pytest.param(b'Content-Disposition : form-data; name="a"', id="space-before-colon"),
        pytest.param(DISPOSITION + b"\r\nX(y): z", id="separator-in-name"),
        pytest.param(DISPOSITION + b"\r\nX\xc3\xa9: z", id="non-ascii-name"),
        pytest.param(b"Garbage\r\n" + DISPOSITION, id="no-colon-first"),
    ],
)
def test_a_header_line_that_is_not_name_value_is_malformed(block):
    with pytest.raises(FormError, match="not 'name: value'"):
        read_part_headers(block)


@pytest.mark.parametrize(
    "block",
    [
        pytest.param(DISPOSITION + b"\r\nX-Odd!#$%&'*+-.^_`|~9: v", id="every-token-character"),
        pytest.param(DISPOSITION + b"\r\nX-Empty:", id="empty-value"),
        pytest.param(DISPOSITION + b"\r\nX-Colons: a:b:c", id="colons-in-value"),
    ],
)
def test_any_token_name_and_value_is_read(block):
    assert read_part_headers(block).name == "a"


def test_a_broken_line_in_a_part_without_name_is_still_malformed():
    # Such a part is skipped, but its headers are read first.
    with pytest.raises(FormError):
        read_part_headers(b"Content-Type: text/plain\r\nno colon here")


def feed_all(body: bytes, step: int) -> tuple[Recorder, Framer]:
    return framed([body[i : i + step] for i in range(0, len(body), step)])


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"--" + B + b"--\r\n", id="only-close-delimiter"),
        pytest.param(b"--" + B + b"--", id="only-close-delimiter-no-crlf"),
        pytest.param(b"preamble\r\n--" + B + b"--\r\n", id="preamble-then-close"),
        pytest.param(b"--" + B + b"X\r\n\r\nx\r\n--" + B + b"--\r\n", id="first-delimiter-is-not-one"),
    ],
)
@pytest.mark.parametrize("step", [1, 7, 10_000])
def test_a_body_without_parts_is_malformed(body, step):
    # streaming-form-data reads each of these as an empty form, without an error.
    with pytest.raises(FormError, match="no part"):
        feed_all(body, step)


def test_a_body_with_one_part_is_read():
    body = b"--" + B + b"\r\n" + DISPOSITION + b"\r\n\r\nx\r\n--" + B + b"--\r\n"
    recorder, framer = feed_all(body, 3)
    assert framer.complete and as_told(recorder) == [("a", b"x")]


# -- Content-Transfer-Encoding decoders ------------------------------------------


def decode_in_pieces(decoder: Base64Decoder | QuotedPrintableDecoder, text: bytes, cuts: list[int]) -> bytes:
    edges = [0, *sorted(min(cut, len(text)) for cut in cuts), len(text)]
    return b"".join(decoder.decode(text[a:b]) for a, b in zip(edges, edges[1:])) + decoder.flush()


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=300), st.lists(st.integers(0, 420), max_size=6), st.booleans())
def test_base64_in_any_pieces_is_the_data(data, cuts, lines):
    text = base64.encodebytes(data) if lines else base64.b64encode(data)
    assert decode_in_pieces(Base64Decoder(), text, cuts) == data


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=120).map(lambda raw: bytes(b for b in raw if b < 128)), st.lists(st.integers(0, 120), max_size=6))
def test_base64_of_any_text_decodes_or_is_a_400(text, cuts):
    """Never another exception: a 500 or a hang would be the server's fault, not the client's."""
    try:
        decode_in_pieces(Base64Decoder(), text, cuts)
    except FormError:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.lists(st.sampled_from([b"=", b"\r", b"\n", b"A", b"4", b"1", b" ", b"x", b"\xff"]), max_size=40).map(b"".join),
       st.lists(st.integers(0, 40), max_size=6))
def test_quoted_printable_in_any_pieces_reads_as_the_whole(text, cuts):
    """Escapes and soft line breaks cut anywhere read as the whole text does, or are a 400 either way."""
    def decoded(pieces: list[int]) -> bytes | None:
        try:
            return decode_in_pieces(QuotedPrintableDecoder(), text, pieces)
        except FormError:
            return None
    whole = decoded([])
    assert decoded(cuts) == whole
    if whole is not None:
        assert whole == binascii.a2b_qp(text)


@pytest.mark.parametrize("text", [b"x===41", b"ab=\rXYZ\nc", b"a=\r  \nb", b"end="])
def test_quoted_printable_with_a_stray_equals_is_a_400(text):
    with pytest.raises(FormError):
        decode_in_pieces(QuotedPrintableDecoder(), text, [])


def test_base64_padding_before_the_end_is_a_400_in_one_piece_or_many():
    for cuts in ([], [4], [6]):
        with pytest.raises(FormError):
            decode_in_pieces(Base64Decoder(), b"QUJD====", cuts)

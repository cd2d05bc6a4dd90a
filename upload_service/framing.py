"""Multipart framing, sans-IO: bytes in, each part's headers and body bytes out.

A `Framer` is the one scan of a form's body: `bytes.find` for each delimiter (several
times SHA-256's speed), with every part's headers read here, strictly:

- a preamble before the first boundary is skipped (bounded), the epilogue ignored;
- a part header line must be `name: value`, a header block is bounded, and a body of
  only a close delimiter has no part (400);
- a body that ends before its closing boundary is not `complete`;
- a part's Content-Transfer-Encoding (RFC 7578 §4.7 forbids senders one, but
  `curl -F 'f=@x;encoder=base64'` sends base64) is undone by the decoders here.

It tells a `PartHandler` (`targets.FormReader`) where each part starts, its body bytes
and where it ends.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import unquote, unquote_to_bytes

from upload_service.errors import TOKEN, FormError, LimitExceeded
from upload_service.units import KiB

# RFC 2046 §5.1.1 allows a preamble before the first boundary; nothing real sends
# more than a line, so 64 KiB is generous and keeps a hostile one from costing time.
MAX_PREAMBLE = 64 * KiB
# Browsers send two or three header lines of well under 1 KiB per part; h11 allows
# 16 KiB for a whole request head by default, so we allow the same per part.
MAX_PART_HEADER_BYTES = 16 * KiB
MAX_PART_HEADER_LINES = 32
# A display name longer than a filesystem's NAME_MAX (255 bytes on Linux) is not a real filename,
# and a client saving a download under it fails. Past it, a name keeps an extension this long.
MAX_FILENAME_BYTES = 255
MAX_EXTENSION_CHARS = 16
# A stored content type is served as a header (and in a tus HEAD's metadata): a media type
# is at most 255 characters (RFC 6838 §4.2: 127 for a type and for a subtype).
MAX_CONTENT_TYPE_CHARS = 255
DEFAULT_CONTENT_TYPE = "application/octet-stream"
# The charsets a text field may declare (RFC 7578 §4.4: Apache HttpClient's text parts say
# ISO-8859-1) or a form's `_charset_` field may name (§4.6: a browser's, from a page in a
# legacy charset): the WHATWG Encoding labels, and the codec that reads each as browsers write it
# (their Shift_JIS is Windows' cp932, EUC-KR cp949, Big5 cp950, GBK the GB18030 decoder); but
# ISO-8859-1 and US-ASCII as themselves: browsers name windows-1252 by its own name, and who says
# ISO-8859-1 (Java's clients) means it; any other label counts as none.
# A fixed table: a client's label never picks a codec of its own (idna, rot13, base64...).
_CHARSET_LABELS = {
    "utf-8": "utf-8 utf8 unicode-1-1-utf-8",
    "cp1252": "windows-1252 cp1252 x-cp1252",
    "latin-1": "iso-8859-1 iso8859-1 iso88591 iso_8859-1 latin1 l1 cp819 ibm819 csisolatin1",
    "ascii": "us-ascii ascii ansi_x3.4-1968",
    **{f"cp{n}": f"windows-{n} cp{n} x-cp{n}" for n in range(1250, 1259) if n != 1252},
    **{f"iso8859_{n}": f"iso-8859-{n} iso8859-{n} iso_8859-{n}" for n in (2, 3, 4, 5, 6, 7, 8, 10, 13, 14, 15, 16)},
    "cp874": "windows-874 dos-874 iso-8859-11 tis-620",
    "koi8_r": "koi8-r koi8_r koi8 cskoi8r", "koi8_u": "koi8-u koi8-ru", "cp866": "ibm866 cp866 866 csibm866",
    "mac_roman": "macintosh mac x-mac-roman csmacintosh", "mac_cyrillic": "x-mac-cyrillic x-mac-ukrainian",
    "cp932": "shift_jis shift-jis sjis x-sjis ms_kanji ms932 windows-31j csshiftjis",
    "euc_jp": "euc-jp x-euc-jp cseucpkdfmtjapanese", "iso2022_jp": "iso-2022-jp csiso2022jp",
    "gb18030": "gbk gb2312 gb_2312 gb_2312-80 x-gbk chinese csgb2312 csiso58gb231280 iso-ir-58 gb18030",
    "cp950": "big5 big5-hkscs cn-big5 csbig5 x-x-big5",
    "cp949": "euc-kr cseuckr korean ks_c_5601-1987 ks_c_5601-1989 ksc5601 ksc_5601 csksc56011987 iso-ir-149"
             " windows-949 x-windows-949",
}
FIELD_CHARSETS = {label: codec for codec, labels in _CHARSET_LABELS.items() for label in labels.split()}
FIELD_CHARSETS.update(dict.fromkeys(["iso-8859-8-i", "csiso88598i", "logical"], "iso8859_8"))  # Hebrew, logical order

CRLF = b"\r\n"
# A real Content-Type or Content-Disposition has a handful of parameters. Values with
# thousands of separators, quotes, comments or RFC 2047 words are refused: reading them
# costs CPU on the loop, and nothing real sends them. A quoted value
# may hold more runs of white space than a 255-byte name can.
MAX_HEADER_SPECIALS = 64
MAX_HEADER_SPACE_RUNS = 2 * MAX_FILENAME_BYTES
_STRUCTURED_HEADERS = ("content-type", "content-disposition")
# What a part's Content-Transfer-Encoding may say: identity ones, and the two with a decoder.
IDENTITY_ENCODINGS = ("7bit", "8bit", "binary")
DECODED_ENCODINGS = ("base64", "quoted-printable")
# An RFC 2047 encoded word as a whole filename (.NET's HttpClient writes non-ASCII names so).
_ENCODED_WORD_RE = re.compile(r"=\?(utf-8|iso-8859-1)\?([bq])\?([^?\s]*)\?=", re.IGNORECASE)
_QUOTED_RE = re.compile(r'"(?:[^"\\]|\\.)*"?')
_SPECIAL_RE = re.compile(r'[;,:<>@\[\]\\()"]|\s+')  # RFC 5322 specials, quotes, white space
_SPACE_RUN_RE = re.compile(r"\s+")
_ESCAPED_RE = re.compile(r'\\(["\\])')
# Bidirectional controls (Cf): a display name with U+202E shows `exe.pdf` for `fdp.exe`.
_BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")
# RFC 9110 §5.1: a field name is a token (§5.6.2), right before the colon (RFC 9112
# §5.1 forbids white space there). A line that is not `name: value` is malformed, also
# in a part the route ignores: skipping it could silently drop a part.
_TOKEN_RE = re.compile(TOKEN)
# `; key="value"` or `; key=token`, without escapes: how clients write parameters. Each
# piece can match in one way only (possessive white space, a `;` first): a hostile value
# fails in linear time, never by backtracking over every split of its white space.
_PLAIN_PARAM_RE = re.compile(rf'[ \t]*+;[ \t]*+({_TOKEN_RE.pattern})=(?:"([^"\\]*)"|({_TOKEN_RE.pattern}))')
_PLAIN_PARAMS_RE = re.compile(f"(?:{_PLAIN_PARAM_RE.pattern})*+[ \t]*+")


# -- small pure helpers ----------------------------------------------------------


def parse_header_params(value: str, escapes: bool = True) -> tuple[str, dict[str, str]]:
    """Split `type; a=b; c="d"` into its first token and parameters (first one wins).

    Inside a quoted string only `\\"` and `\\\\` are escapes: a Windows path such as
    `C:\\Users\\a.txt`, which old browsers sent unescaped, keeps its separators. Without
    `escapes` none is (a legacy charset's second byte may be 0x5C, before the closing quote).
    """
    head, _, rest = value.partition(";")
    if _PLAIN_PARAMS_RE.fullmatch(value, len(head)):  # what clients send: read by one regex
        params = {}
        for key, quoted, token in _PLAIN_PARAM_RE.findall(value, len(head)):
            params.setdefault(key.lower(), token or quoted)
        return head.strip().lower(), params
    return head.strip().lower(), parse_params_slowly(rest, escapes)


def parse_params_slowly(rest: str, escapes: bool = True) -> dict[str, str]:
    """The parameters after a header value's first `;`, however loosely written."""
    params: dict[str, str] = {}
    i, n = 0, len(rest)
    while i < n:
        while i < n and rest[i] in " \t;":
            i += 1
        start = i
        while i < n and rest[i] not in "=;":
            i += 1
        key = rest[start:i].strip().lower()
        if i >= n or rest[i] == ";":
            if key:
                params.setdefault(key, "")
            continue
        i += 1  # the "="
        while i < n and rest[i] in " \t":
            i += 1
        if i < n and rest[i] == '"':
            opened = i
            i += 1
            chars = []
            while i < n and rest[i] != '"':
                if escapes and rest[i] == "\\" and i + 1 < n and rest[i + 1] in '"\\':
                    i += 1
                chars.append(rest[i])
                i += 1
            i += 1  # the closing quote, if any
            param = "".join(chars)
            end = rest.find(";", i)
            end = n if end < 0 else end
            tail = rest[i:end].rstrip()
            if tail.endswith('"'):
                # `"my "quoted" name"`: Node's form-data (axios, got) leaves inner quotes
                # unescaped; the value runs to the last quote before the next `;`.
                param = rest[opened + 1 : i + len(tail) - 1]
                param = _ESCAPED_RE.sub(r"\1", param) if escapes else param
            i = end
        else:
            start = i
            while i < n and rest[i] != ";":
                i += 1
            param = rest[start:i].strip()
        if key:
            params.setdefault(key, param)
    return params


def decode_ext_value(value: str) -> str:
    """Decode an RFC 5987 `charset'language'percent-encoded` value."""
    encoding, encoded = split_ext_value(value)
    return unquote(encoded, encoding=encoding, errors="replace")


def split_ext_value(value: str) -> tuple[str, str]:
    """The codec and the percent-encoded text of `charset'language'text`."""
    charset, _, rest = value.partition("'")
    _, _, encoded = rest.partition("'")
    # RFC 5987 §3.2.1 names these two; any other (or none) is read as UTF-8, never
    # handed to a codec of the client's choosing (idna, punycode... raise on bad input).
    return ("iso-8859-1" if charset.strip().lower() == "iso-8859-1" else "utf-8"), encoded


def decode_continuations(params: dict[str, str], name: str) -> str | None:
    """RFC 2231 §3-4: `filename*0*=utf-8''%C3%A9t; filename*1=".txt"`, the pieces joined in order
    (percent-decoded where the name ends in `*`), read in the first piece's charset; bytes that are
    not UTF-8 kept as surrogate escapes, for the form's charset (`read_in_charset`)."""
    pieces: list[bytes] = []
    encoding = "utf-8"
    while True:
        index = len(pieces)
        if (plain := params.get(f"{name}*{index}")) is not None:
            pieces.append(plain.encode("utf-8", "surrogateescape"))
        elif (encoded := params.get(f"{name}*{index}*")) is not None:
            if index == 0:
                encoding, encoded = split_ext_value(encoded)
            pieces.append(unquote_to_bytes(encoded.encode("utf-8", "surrogateescape")))
        else:
            return b"".join(pieces).decode(encoding, "surrogateescape") if pieces else None


def decode_encoded_word(value: str) -> str:
    """Decode a filename that is one RFC 2047 word in UTF-8 or ISO-8859-1; anything else as it is."""
    match = _ENCODED_WORD_RE.fullmatch(value)
    if match is None:
        return value
    charset, kind, text = match[1].lower(), match[2].lower(), match[3]
    try:
        if kind == "b":
            raw = base64.b64decode(text, validate=True)
        else:
            raw = binascii.a2b_qp(text.encode("ascii"), header=True)
        return raw.decode(charset)
    except (ValueError, UnicodeError):  # binascii.Error is a ValueError
        return value


def disposition_filename(params: dict[str, str]) -> str | None:
    """The filename a Content-Disposition's parameters name: `filename` (one RFC 2047 word decoded),
    else `filename*` decoded, else RFC 2231 continuations joined."""
    if "filename" in params:  # RFC 7578 §4.2: filename* is not for form data
        return decode_encoded_word(params["filename"])
    if "filename*" in params:
        return decode_ext_value(params["filename*"])
    return decode_continuations(params, "filename")


def read_in_charset(text: str, charset: str | None) -> str:
    """A header value's bytes (those not UTF-8 kept as surrogate escapes) read in `charset`, a form's
    `_charset_` (a browser writes filenames in its page's charset); without one, bytes that were not
    UTF-8 in windows-1252 (what browsers take ISO-8859-1 for). `text` itself when nothing changes."""
    if charset in (None, "utf-8", "ascii"):
        if text.isascii() or not any("\udc80" <= c <= "\udcff" for c in text):
            return text
        charset = "cp1252"
    elif text.isascii() and not (charset == "iso2022_jp" and "\x1b" in text):  # ISO-2022-JP is 7-bit
        return text
    return text.encode("utf-8", "surrogateescape").decode(charset, "replace")


def field_charset(label: str | None) -> str | None:
    """The codec for a charset label of FIELD_CHARSETS (any case), else None."""
    return FIELD_CHARSETS.get(label.strip().lower()) if label else None


def clean_filename(raw: str) -> str:
    """Keep the last path component of a client's filename, for display only."""
    name = raw.replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(c for c in name if unicodedata.category(c) != "Cc" and c not in _BIDI_CONTROLS).strip()
    if name in (".", ".."):
        name = ""
    return fit_name_max(name) or "unnamed"


def fit_name_max(name: str) -> str:
    """`name` cut to MAX_FILENAME_BYTES of UTF-8, at a character, its extension kept."""
    if len(name.encode("utf-8", "surrogatepass")) <= MAX_FILENAME_BYTES:
        return name
    stem, dot, extension = name.rpartition(".")
    if not stem or len(extension) > MAX_EXTENSION_CHARS:
        stem, dot, extension = name, "", ""
    suffix = dot + extension
    room = MAX_FILENAME_BYTES - len(suffix.encode("utf-8", "surrogatepass"))
    kept = []
    for char in stem:
        room -= len(char.encode("utf-8", "surrogatepass"))
        if room < 0:
            break
        kept.append(char)
    return "".join(kept) + suffix


def clean_content_type(raw: str) -> str:
    """A client's content type as sent, without control characters; past MAX_CONTENT_TYPE_CHARS,
    without its parameters; the default if nothing (or nothing that short) is left."""
    if not raw.isprintable():
        raw = "".join(c for c in raw if c.isprintable())
    raw = raw.strip()
    if len(raw) > MAX_CONTENT_TYPE_CHARS:
        raw = raw.partition(";")[0].strip()
        if len(raw) > MAX_CONTENT_TYPE_CHARS:
            raw = ""
    return raw or DEFAULT_CONTENT_TYPE



@dataclass(frozen=True)
class PartInfo:
    """What a part's headers say about it."""

    name: str
    filename: str | None  # None for a text field; "" for an empty file input; bytes not UTF-8 as surrogate escapes
    content_type: str
    transfer_encoding: str = ""  # "base64" or "quoted-printable" to undo; "" for none
    # The filename is the header's own bytes (a plain `filename=`), in the form's charset; one an
    # RFC 2047 word, `filename*` or RFC 2231 pieces gave names its charset itself.
    filename_as_sent: bool = True


def read_part_headers(block: bytes) -> PartInfo | None:
    """Parse one part's header block (without its final blank line).

    Returns None for a part to skip (no Content-Disposition, or no name); raises
    FormError for a block that is not well-formed part headers.
    """
    lines = block.split(CRLF)
    if len(lines) > MAX_PART_HEADER_LINES:
        raise FormError(f"a part has more than {MAX_PART_HEADER_LINES} header lines")
    disposition: dict[str, str] | None = None
    content_type = None
    transfer_encoding = None
    for raw_line in lines:
        if b"\r" in raw_line or b"\n" in raw_line or raw_line[:1] in (b" ", b"\t"):
            raise FormError("a part header line is malformed (bare CR/LF or folded)")
        try:
            line, escapes = raw_line.decode("utf-8"), True
        except UnicodeDecodeError:  # a filename in a legacy charset: read once the form's is known
            line, escapes = raw_line.decode("utf-8", "surrogateescape"), False
        header_name, colon, raw_value = line.partition(":")
        if not colon or not _TOKEN_RE.fullmatch(header_name):
            raise FormError("a part header line is not 'name: value' (RFC 9110 §5.1)")
        header_name = header_name.lower()
        if header_name in _STRUCTURED_HEADERS:
            refuse_costly_value(raw_value)
        if header_name == "content-disposition":
            if disposition is not None:
                raise FormError("a part has two Content-Disposition headers")
            kind, disposition = parse_header_params(raw_value, escapes)
            if kind != "form-data":
                raise FormError("a part's Content-Disposition is not form-data")
        elif header_name == "content-type" and content_type is None:
            content_type = raw_value.strip()
        elif header_name == "content-transfer-encoding" and transfer_encoding is None:
            transfer_encoding = read_transfer_encoding(raw_value)
    name = (disposition or {}).get("name", "")
    if not name:
        return None
    filename = disposition_filename(disposition)
    as_sent = filename is None or filename == disposition.get("filename")
    return PartInfo(name, filename, clean_content_type(content_type or ""), transfer_encoding or "", as_sent)


def read_transfer_encoding(value: str) -> str:
    """The encoding to undo ("" for an identity one); 400 for one nobody should send."""
    encoding = value.strip().lower()
    if encoding in IDENTITY_ENCODINGS:
        return ""
    if encoding in DECODED_ENCODINGS:
        return encoding
    raise FormError(f"a part's Content-Transfer-Encoding {value.strip()[:40]!r} is not 7bit, 8bit, binary,"
                    " base64 or quoted-printable")


class Base64Decoder:
    """Undo base64 (RFC 2045 §6.8) chunk by chunk: line breaks and white space skipped,
    each run of whole 4-character groups decoded as it completes."""

    def __init__(self) -> None:
        self._rest = b""
        self._ended = False  # padding seen: nothing may follow

    def decode(self, chunk: bytes) -> bytes:
        data = self._rest + chunk.translate(None, b" \t\r\n")
        whole = len(data) - len(data) % 4
        self._rest = data[whole:]
        if not whole:
            return b""
        if self._ended:
            raise FormError("a part's base64 body goes on after its padding")
        self._ended = data[whole - 1 : whole] == b"="
        if data.find(b"=", 0, whole - 2) >= 0:  # padding only ends a run (one chunk or many alike)
            raise FormError("a part's base64 body goes on after its padding")
        try:
            return binascii.a2b_base64(data[:whole], strict_mode=True)
        except binascii.Error:
            raise FormError("a part's base64 body is not valid base64") from None

    def flush(self) -> bytes:
        if self._rest:
            raise FormError("a part's base64 body ends inside a 4-character group")
        return b""


class QuotedPrintableDecoder:
    """Undo quoted-printable (RFC 2045 §6.7) chunk by chunk: an `=` in a chunk's last two
    bytes may begin an escape or a soft line break the next chunk ends, so it waits. An `=`
    that begins neither is refused: `binascii.a2b_qp` reads those by what follows, so the
    bytes stored would depend on where the chunks were cut."""

    def __init__(self) -> None:
        self._rest = b""

    def decode(self, chunk: bytes) -> bytes:
        data = self._rest + chunk
        cut = data.find(b"=", max(0, len(data) - 2))
        if cut < 0:
            self._rest = b""
        else:
            data, self._rest = data[:cut], data[cut:]
        return decode_quoted_printable(data)

    def flush(self) -> bytes:
        data, self._rest = self._rest, b""
        return decode_quoted_printable(data)


_QP_BAD_ESCAPE_RE = re.compile(rb"=(?![0-9A-Fa-f]{2}|\r\n|\n)")


def decode_quoted_printable(data: bytes) -> bytes:
    if _QP_BAD_ESCAPE_RE.search(data):
        raise FormError("a part's quoted-printable body has an `=` that is neither an escape nor a line break")
    return binascii.a2b_qp(data)


def transfer_decoder(encoding: str) -> Base64Decoder | QuotedPrintableDecoder:
    return Base64Decoder() if encoding == "base64" else QuotedPrintableDecoder()


def refuse_costly_value(value: str) -> None:
    """Refuse a Content-Type or Content-Disposition value no real client sends (see above)."""
    if len(value) <= MAX_HEADER_SPECIALS:  # too short to hold more than any limit below
        return
    unquoted = _QUOTED_RE.sub('""', value)  # each quoted string counts as its two quotes
    if (
        len(_SPECIAL_RE.findall(unquoted)) > MAX_HEADER_SPECIALS
        or value.count("(") > MAX_HEADER_SPECIALS
        or value.count("=?") > MAX_HEADER_SPECIALS
        or len(_SPACE_RUN_RE.findall(value)) > MAX_HEADER_SPACE_RUNS
    ):
        raise FormError("a part's Content-Type or Content-Disposition is too intricate to read")


# -- framing ------------------------------------------------------------------


def refuse_padding(after_marker: bytes) -> None:
    """Refuse "--boundary" followed by spaces or tabs.

    RFC 2046 §5.1.1 lets a sender pad a boundary line with white space; where it is
    not padding, it is the delimiter inside content, which the RFC forbids. Nothing
    real sends either, and parsers differ on it (streaming-form-data reads it as body
    bytes): refused, not guessed at.
    """
    if after_marker[:1] in (b" ", b"\t"):
        raise FormError("a boundary line has white space after the boundary (transport padding)")


def find_boundary_line(data: bytes, marker: bytes, start: int = 0) -> tuple[int, bytes]:
    """Find the first `marker` ("\r\n--boundary") at or after `start` that begins a
    boundary line: followed by CRLF (a delimiter) or "--" (the close delimiter).

    Return (index, those two bytes); (index, b"") when `data` ends before they can be
    told; (-1, b"") when there is none. A marker followed by anything else is content.
    """
    n = len(marker)
    i = data.find(marker, start)
    while i >= 0:
        after = data[i + n : i + n + 2]
        refuse_padding(after)
        if len(after) < 2:
            return i, b""
        if after in (CRLF, b"--"):
            return i, after
        i = data.find(marker, i + 1)
    return -1, b""


class PartHandler(Protocol):
    """What a `Framer` tells, in order, for each part of the form."""

    def part_started(self, info: PartInfo | None) -> None:
        """A part's headers were read: its `PartInfo`, or None for a part without a name."""

    def part_data(self, data: bytes) -> None:
        """The next bytes of the part's body (never empty)."""

    def part_ended(self) -> None:
        """The part's body is whole: its delimiter was read."""


class Framer:
    """Read a multipart body: each part's headers, and its body up to the next delimiter.

    `feed(data)` tells the handler what `data` completes, in order. The preamble and
    epilogue are cut away; a header block, or bytes that may begin a delimiter, are
    held until the next chunk tells. Body bytes go through as slices of the chunk, and
    a chunk of body only as the chunk itself (no copy).
    """

    PREAMBLE, HEADERS, BODY, EPILOGUE = range(4)

    def __init__(self, boundary: bytes, max_parts: int, handler: PartHandler) -> None:
        self.marker = b"\r\n--" + boundary
        self.max_parts = max_parts
        self.part_count = 0
        self.state = self.PREAMBLE
        self._handler = handler
        # The stream is read as if it began with CRLF, so the first boundary is
        # found like every other.
        self._held = CRLF
        self._preamble_bytes = -len(CRLF)

    @property
    def complete(self) -> bool:
        """True once the closing boundary has been read."""
        return self.state == self.EPILOGUE

    @property
    def found_boundary(self) -> bool:
        """True once the first boundary line has been read."""
        return self.state != self.PREAMBLE

    def feed(self, data: bytes) -> None:
        if self.state == self.EPILOGUE:
            return
        if self._held:
            data, self._held = self._held + data, b""
        pos = 0
        while pos >= 0:
            if self.state == self.BODY:
                pos = self._read_body(data, pos)
            elif self.state == self.HEADERS:
                pos = self._read_headers(data, pos)
            else:
                pos = self._skip_preamble(data)

    def _read_body(self, data: bytes, pos: int) -> int:
        """Hand on the body bytes up to the next delimiter; return where the headers or
        the epilogue begin, or -1 when `data` ends first (holding what may be a delimiter)."""
        i, after = data.find(self.marker, pos), b""  # most chunks: no marker, no call below
        if i >= 0:
            i, after = find_boundary_line(data, self.marker, i)
        if not after:  # no delimiter, or one that the next chunk ends
            end = i if i >= 0 else self._partial_marker_at(data, pos)
            if end > pos:
                self._handler.part_data(data if pos == 0 and end == len(data) else data[pos:end])
            self._held = data[end:]
            return -1
        if i > pos:
            self._handler.part_data(data[pos:i])
        return self._end_part(after, i + len(self.marker) + 2)

    def _end_part(self, after: bytes, next_part: int) -> int:
        """The part's delimiter was read, `after` the two bytes after it: return where the next
        part's headers begin, or -1 after the close delimiter."""
        self._handler.part_ended()
        if after == b"--":
            self.state = self.EPILOGUE
            return -1
        self.state = self.HEADERS
        return next_part

    def _partial_marker_at(self, data: bytes, start: int) -> int:
        """Where the tail of `data` that may begin a delimiter starts (len(data) if none does).
        A boundary holds no CR (forms.BOUNDARY_RE), so only the last CR can begin one."""
        r = data.rfind(b"\r", max(start, len(data) - len(self.marker) + 1))
        return r if r >= 0 and self.marker.startswith(data[r:]) else len(data)

    def _read_headers(self, data: bytes, pos: int) -> int:
        """Read a part's header block; return where its body begins (or what follows a part
        without one), or -1 (held) when `data` ends before that can be told."""
        end = self._find_headers_end(data, pos)
        after = self._delimiter_after_headers(data, end) if end >= 0 else None
        if after is None:
            self._held = data[pos:]
            return -1
        self.part_count += 1
        if self.part_count > self.max_parts:
            raise LimitExceeded(
                "parts", self.max_parts, f"the form has more than {self.max_parts} parts"
            )
        self._handler.part_started(read_part_headers(data[pos:end]))
        if not after:
            self.state = self.BODY
            return end + 4
        return self._end_part(after, end + 2 + len(self.marker) + 2)

    def _delimiter_after_headers(self, data: bytes, end: int) -> bytes | None:
        """RFC 2046 §5.1.1: `body-part := headers [CRLF *OCTET]`, so a part may have no body
        at all, the blank line's CRLF beginning its delimiter. Return the two bytes after
        such a delimiter, b"" when a body follows, None when `data` ends too soon to tell."""
        window = data[end + 2 : end + 4 + len(self.marker)]
        i, after = find_boundary_line(window, self.marker)
        if i == 0:
            return after or None
        if len(window) < len(self.marker) and self.marker.startswith(window):
            return None
        return b""

    def _find_headers_end(self, data: bytes, start: int) -> int:
        if len(data) - start >= 2 and data[start : start + 2] == CRLF:
            raise FormError("a part has no headers")
        end = data.find(b"\r\n\r\n", start, start + MAX_PART_HEADER_BYTES + 4)
        if end < 0 and len(data) - start >= MAX_PART_HEADER_BYTES + 4:
            raise FormError(f"a part's headers are longer than {MAX_PART_HEADER_BYTES} bytes")
        return end

    def _skip_preamble(self, data: bytes) -> int:
        """Skip what comes before the first boundary; return where the first part's
        headers begin, or -1 when `data` ends first (holding what may be the boundary)."""
        i, after = find_boundary_line(data, self.marker)
        if not after:
            keep = len(data) - i if i >= 0 else min(len(data), len(self.marker) + 1)
            self._count_preamble(len(data) - keep)
            self._held = data[len(data) - keep :]
            return -1
        self._count_preamble(i)
        if after == b"--":
            # RFC 2046 §5.1.1: a body holds one or more parts; a close delimiter first is none.
            raise FormError("the body has no part, only a closing boundary")
        self.state = self.HEADERS
        return i + len(self.marker) + 2

    def _count_preamble(self, size: int) -> None:
        self._preamble_bytes += size
        if self._preamble_bytes > MAX_PREAMBLE:
            raise FormError(
                f"more than {MAX_PREAMBLE} bytes before the first boundary line"
                " ('--' and the boundary, then CRLF)"
            )


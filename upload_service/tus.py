"""Resumable upload protocols, sans-IO: tus 1.0.0 and the IETF draft's headers, parsed and formatted.

Pure functions and the errors they raise, no ASGI: `resumable.py` drives them.
tus 1.0.0: https://tus.io/protocols/resumable-upload. The IETF draft:
draft-ietf-httpbis-resumable-upload (interop versions 3 to 9: drafts -01 to -12 and
the later ones that kept 9); all use `Upload-Offset`, `Upload-Complete` as a
structured boolean (version 3: `Upload-Incomplete`), `Upload-Length`, `Upload-Limit`,
`application/partial-upload` for appends (from version 6) and RFC 9457 problem details on
a mismatch.
"""

from __future__ import annotations

import base64
import binascii
import email.utils
import hashlib
import re
from typing import Any

from upload_service.errors import PayloadTooLarge, UploadError, shown
from upload_service.framing import decode_ext_value, disposition_filename, parse_header_params, read_in_charset
from upload_service.storage import DECLARED_SHA256_RE

TUS_VERSION = "1.0.0"
TUS_EXTENSIONS = "creation,creation-with-upload,creation-defer-length,termination,expiration,checksum"
CHECKSUM_ALGORITHMS = ("sha1", "sha256")  # Upload-Checksum: what hashlib does without a second thought
# Interop versions: 3 is draft -01, 4 and 5 are -02 and -03, 6 is -04/-05, 7 is -06 to -08,
# 8 is -09 to -11, 9 is -12 on (what differs between them: dialects.Dialect).
DRAFT_VERSIONS = ("3", "4", "5", "6", "7", "8", "9")
TUS_CONTENT_TYPE = "application/offset+octet-stream"
DRAFT_CONTENT_TYPE = "application/partial-upload"
PROBLEM_BASE = "https://iana.org/assignments/http-problem-types#"

# Upload-Metadata bounds: the record needs a filename and a type; a header of many
# kilobytes or hundreds of keys is not metadata but an attempt to make us store it.
MAX_METADATA_BYTES = 8 * 1024
MAX_METADATA_PAIRS = 32
# A length or offset: digits only, at most 2**63 - 1 (what a signed 64-bit file offset holds).
NUMBER_RE = re.compile(r"([0-9]{1,19})")
MAX_NUMBER = 2**63 - 1
# tus 1.0.0: a key "MUST NOT contain spaces and commas and MUST NOT be empty" (tusd takes
# `user:id` or `a/b`); printable ASCII, so that it echoes back in a header as it came.
KEY_RE = re.compile(r"[\x21-\x2b\x2d-\x7e]+")


# -- errors --------------------------------------------------------------------------


class InvalidHeader(UploadError):
    status, code = 400, "invalid_header"


class UnsupportedVersion(UploadError):
    status, code = 412, "unsupported_version"
    headers = ((b"tus-version", TUS_VERSION.encode()),)


class ConcatenationUnsupported(UploadError):
    status, code = 400, "concatenation_unsupported"


class OffsetMismatch(UploadError):
    status, code = 409, "offset_mismatch"


class UploadExpired(UploadError):
    status, code = 410, "upload_expired"


class UploadIncomplete(UploadError):
    status, code = 409, "upload_incomplete"


class UploadComplete(UploadError):
    status, code = 409, "upload_complete"


class ChunkChecksumMismatch(UploadError):
    """tus checksum extension: the chunk does not match its Upload-Checksum."""

    status, code = 460, "checksum_mismatch"


class DigestMismatch(UploadError):
    """The whole file does not match the digest the client declared (tus: 460)."""

    status, code = 460, "sha256_mismatch"


class Problem(UploadError):
    """An RFC 9457 problem of the IETF draft: `type` and `title` join our error and detail."""

    content_type = b"application/problem+json"

    def __init__(self, status: int, kind: str, detail: str, **extra: Any) -> None:
        super().__init__(detail, type=PROBLEM_BASE + kind, title=kind.replace("-", " ").capitalize(), **extra)
        self.status = status
        self.code = kind


# -- the errors of a mismatch, in either protocol -------------------------------------


def offset_mismatch(draft: bool, expected: int, given: int) -> UploadError:
    """409, with the right offset in `Upload-Offset` too (the draft: MUST; tus clients may read it)."""
    detail = f"Upload-Offset is {given}, the upload is at {expected}"
    if draft:
        error: UploadError = Problem(409, "mismatching-upload-offset", detail,
                                     **{"expected-offset": expected, "provided-offset": given})
    else:
        error = OffsetMismatch(detail, offset=expected)
    error.headers = ((b"upload-offset", str(expected).encode()),)
    return error


def inconsistent_length(detail: str) -> UploadError:
    return Problem(400, "inconsistent-upload-length", detail)


def length_conflict(draft: bool, detail: str) -> UploadError:
    """An Upload-Length that cannot be the upload's: another than the one known, or below the offset."""
    return inconsistent_length(detail) if draft else InvalidHeader(detail)


def past_length(draft: bool, length: int | None, limit: int, max_file_size: int) -> UploadError:
    """A body past the upload's length is inconsistent (the draft); past our file limit, 413 in both."""
    if length is None:
        detail = f"the body would take the upload past the file limit; {limit} more bytes fit"
        return PayloadTooLarge(detail, limit="file_size", max=max_file_size)
    detail = f"the body would take the upload past its Upload-Length {length}; {limit} more bytes fit"
    if draft:
        return Problem(400, "inconsistent-upload-length", detail)
    return PayloadTooLarge(detail, limit="upload_length", max=limit)



# -- headers -------------------------------------------------------------------------


def parse_number(text: str | None, name: str, structured: bool = False) -> int:
    """A non-negative integer header (Upload-Length, Upload-Offset), or 400. `structured`: the
    draft's RFC 9651 integer (at most 15 digits, its parameters checked, then ignored)."""
    value = (text or "").strip()
    match = sf_match(SF_INTEGER_RE, value) if structured else NUMBER_RE.fullmatch(value)
    if match is None or int(match[1]) > MAX_NUMBER:
        kind = "structured integer of at most 15 digits" if structured else "integer below 2^63"
        raise InvalidHeader(f"{name} must be a non-negative {kind}, not {shown(value)}")
    return int(match[1])


def check_tus_resumable(text: str | None) -> None:
    """Every tus request but OPTIONS names the protocol version; we speak 1.0.0 only (412)."""
    if text is None or text.strip() != TUS_VERSION:
        raise UnsupportedVersion(f"Tus-Resumable must be {TUS_VERSION}, not {shown(text)}")


def parse_metadata(text: str | None) -> dict[str, str]:
    """Upload-Metadata: `key base64value, key2, ...` -> {key: base64value ("" for none)}.

    Values stay base64 (they may be binary); `metadata_text` decodes one.
    """
    if text is None or not text.strip():
        return {}
    if len(text) > MAX_METADATA_BYTES:
        raise InvalidHeader(f"Upload-Metadata is longer than {MAX_METADATA_BYTES} bytes")
    pairs = text.split(",")
    if len(pairs) > MAX_METADATA_PAIRS:
        raise InvalidHeader(f"Upload-Metadata has more than {MAX_METADATA_PAIRS} keys")
    metadata: dict[str, str] = {}
    for pair in pairs:
        key, _, value = pair.strip().partition(" ")
        value = value.strip()
        if not KEY_RE.fullmatch(key):
            raise InvalidHeader(f"Upload-Metadata key {key[:40]!r} is empty or not printable ASCII")
        if key in metadata:
            raise InvalidHeader(f"Upload-Metadata key {key!r} is given twice")
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise InvalidHeader(f"Upload-Metadata value of {key!r} is not base64") from None
        metadata[key] = value
    return metadata


def metadata_text(metadata: dict[str, str], key: str) -> str | None:
    """A metadata value as text (invalid UTF-8 replaced), or None if absent."""
    value = metadata.get(key)
    if value is None:
        return None
    return base64.b64decode(value).decode("utf-8", errors="replace")


def format_metadata(metadata: dict[str, str]) -> str:
    return ",".join(f"{key} {value}" if value else key for key, value in metadata.items())


def encode_metadata(values: dict[str, str]) -> dict[str, str]:
    """Text values -> the stored form (base64), for the draft's Content-Type and filename."""
    return {key: base64.b64encode(value.encode()).decode("ascii") for key, value in values.items()}


def bounded_metadata(values: dict[str, str]) -> str:
    """Upload-Metadata of text values, as a creation may send it: keys a header can carry, at most
    MAX_METADATA_PAIRS of them and MAX_METADATA_BYTES in all, the longest values left out first
    (a stored form's description may be 64 KiB; a value that was not UTF-8 comes back longer)."""
    metadata = encode_metadata({key: value for key, value in values.items() if KEY_RE.fullmatch(key)})
    while metadata and (len(metadata) > MAX_METADATA_PAIRS or len(format_metadata(metadata)) > MAX_METADATA_BYTES):
        del metadata[max(reversed(metadata), key=lambda key: len(metadata[key]))]  # ties: the last
    return format_metadata(metadata)


def declared_sha256(metadata: dict[str, str], repr_digest: str | None) -> str | None:
    """The whole-file SHA-256 (hex) the client declared: `sha256` metadata or Repr-Digest."""
    from_metadata = metadata_text(metadata, "sha256")
    if from_metadata is not None and not DECLARED_SHA256_RE.fullmatch(from_metadata.strip()):
        raise InvalidHeader("the sha256 metadata must be 64 hexadecimal digits")
    from_digest = parse_repr_digest(repr_digest)
    if from_metadata is not None and from_digest is not None and from_metadata.strip().lower() != from_digest:
        raise InvalidHeader("the sha256 metadata and Repr-Digest disagree")
    return from_digest or (from_metadata.strip().lower() if from_metadata is not None else None)


def parse_repr_digest(text: str | None) -> str | None:
    """RFC 9530 Repr-Digest, a structured dictionary: the `sha-256` member as hex, if any.

    As RFC 9651 reads a dictionary: the last of a key given twice wins, a member's
    parameters are ignored, and a byte sequence may leave out its `=` padding."""
    if text is None or not text.strip():
        return None
    value = None
    for member in text.split(","):
        key, _, item = member.strip().partition("=")
        if key.strip().lower() == "sha-256":  # the one algorithm we check
            value = item.partition(";")[0].strip()
    if value is None:
        return None
    try:
        if len(value) < 2 or value[0] != ":" or value[-1] != ":":
            raise ValueError
        encoded = value[1:-1]
        raw = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidHeader("Repr-Digest sha-256 must be a byte sequence, :base64:") from None
    if len(raw) != 32:
        raise InvalidHeader("Repr-Digest sha-256 must be 32 bytes")
    return raw.hex()


def parse_checksum(text: str | None) -> tuple[str, bytes] | None:
    """Upload-Checksum: `<algorithm> <base64 digest>` -> (algorithm, digest); None if absent."""
    if text is None:
        return None
    algorithm, _, value = text.strip().partition(" ")
    if algorithm not in CHECKSUM_ALGORITHMS:
        raise InvalidHeader(f"Upload-Checksum algorithm {algorithm[:20]!r} is not one of {', '.join(CHECKSUM_ALGORITHMS)}")
    try:
        digest = base64.b64decode(value.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidHeader("Upload-Checksum digest is not base64") from None
    if len(digest) != hashlib.new(algorithm).digest_size:
        raise InvalidHeader(f"Upload-Checksum digest is not a {algorithm} digest")
    return algorithm, digest


# RFC 9651 §3.1.2 parameters: `;key` or `;key=bare-item` (integer, decimal, string, token, bytes,
# boolean, date, display string).
SF_KEY = r"[a-z*][a-z0-9_.*-]*"
SF_BARE_ITEM = (
    r'(?:-?[0-9]{1,15}(?:\.[0-9]{1,3})?|"(?:[ !#-\[\]-~]|\\["\\])*"|[A-Za-z*][!#$%&\'*+.^_`|~0-9A-Za-z:/-]*'
    r'|:[A-Za-z0-9+/=]*:|\?[01]|@-?[0-9]{1,15}|%"(?:[ !#$&-\[\]-~]|%[0-9a-f]{2})*")'
)
SF_PARAMETERS = rf"(?:; *{SF_KEY}(?:={SF_BARE_ITEM})?)*"
SF_BOOLEAN_RE = re.compile(rf"\?([01]){SF_PARAMETERS}")
SF_INTEGER_RE = re.compile(rf"([0-9]{{1,15}}){SF_PARAMETERS}")
# Longer values are refused unread: the patterns above take ~200 bytes of memory a character
# (a server may pass headers of megabytes), and no client needs parameters this long.
SF_MAX_LENGTH = 1024


def sf_match(pattern: re.Pattern[str], text: str | None) -> re.Match[str] | None:
    value = (text or "").strip(" ")
    return pattern.fullmatch(value) if len(value) <= SF_MAX_LENGTH else None


def parse_boolean(text: str | None, name: str) -> bool:
    """A structured-field boolean (RFC 9651): `?1` or `?0`, its parameters (`;key=value`) checked, then ignored."""
    match = sf_match(SF_BOOLEAN_RE, text)
    if match is None:
        raise InvalidHeader(f"{name} must be ?1 or ?0")
    return match[1] == "1"


def format_boolean(value: bool) -> bytes:
    return b"?1" if value else b"?0"


def draft_version(text: str | None) -> str | None:
    """The IETF draft interop version a request speaks, if one we accept; else None (tus)."""
    match = sf_match(SF_INTEGER_RE, text)  # an RFC 9651 integer: "08" is 8
    version = None if match is None else str(int(match[1]))
    return version if version in DRAFT_VERSIONS else None


def format_expires(timestamp: float) -> str:
    """Upload-Expires: an RFC 9110 HTTP-date."""
    return email.utils.formatdate(timestamp, usegmt=True)


def format_limit(draft: str, max_size: int, max_append: int | None = None, expires_in: float | None = None) -> str:
    """Upload-Limit, a structured dictionary of the server's limits: the seconds an upload has
    left are `expires` up to interop version 6 (drafts -04/-05; earlier ones had no such header,
    tusd sends it anyway), `max-age` since (-06, version 7)."""
    limit = f"max-size={max_size}"
    if max_append is not None:
        limit += f", max-append-size={max_append}"
    if expires_in is not None:
        limit += f", {'max-age' if int(draft) >= 7 else 'expires'}={max(0, int(expires_in))}"
    return limit


def filename_of(content_disposition: str | None) -> str | None:
    """The filename of a Content-Disposition (the draft's creation request). RFC 6266 §4.3, not
    RFC 7578 (form parts): with both, `filename*` wins (unless it does not decode whole)."""
    if not content_disposition:
        return None
    _, params = parse_header_params(content_disposition)
    name = decode_ext_value(params["filename*"]) if "filename*" in params else None
    if not name or "\ufffd" in name:
        name = disposition_filename(params)  # `filename` if there is one, else `filename*` as it decodes
    return None if name is None else read_in_charset(name, None)  # bytes not UTF-8 as windows-1252, as a form's


def media_type_of(content_type: str | None) -> str | None:
    if not content_type:
        return None
    media_type = content_type.split(";", 1)[0].strip().lower()
    return media_type or None

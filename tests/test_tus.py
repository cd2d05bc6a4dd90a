"""The resumable protocols' pure helpers (upload_service/tus.py): absurd values are 400s."""

from __future__ import annotations

import base64
import hashlib

import pytest

from upload_service import tus


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()



@pytest.mark.parametrize("text", ["", "-1", "1e3", "0x10", " 12 3", "9" * 20, str(2**63), "١٢"])
def test_absurd_numbers_are_400(text: str) -> None:
    with pytest.raises(tus.InvalidHeader):
        tus.parse_number(text, "Upload-Length")


def test_numbers() -> None:
    assert tus.parse_number(" 0 ", "Upload-Offset") == 0
    assert tus.parse_number(str(2**63 - 1), "Upload-Offset") == 2**63 - 1


def test_metadata_parsing() -> None:
    parsed = tus.parse_metadata(f"filename {b64('a b.txt')},is_confidential, filetype {b64('text/plain')}")
    assert parsed == {"filename": b64("a b.txt"), "is_confidential": "", "filetype": b64("text/plain")}
    assert tus.metadata_text(parsed, "filename") == "a b.txt"
    assert tus.metadata_text(parsed, "missing") is None
    assert tus.parse_metadata(tus.format_metadata(parsed)) == parsed


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("filename not*base64", id="bad-base64"),
        pytest.param(f"a {b64('x')},a {b64('y')}", id="duplicate"),
        pytest.param(f"k\x01ey {b64('x')}", id="bad-key"),
        pytest.param(",", id="empty-key"),
        pytest.param("k " + "A" * 9000, id="too-long"),
        pytest.param(",".join(f"k{i}" for i in range(40)), id="too-many"),
    ],
)
def test_absurd_metadata_is_400(text: str) -> None:
    with pytest.raises(tus.InvalidHeader):
        tus.parse_metadata(text)


def test_checksum_parsing() -> None:
    assert tus.parse_checksum(None) is None
    digest = hashlib.sha1(b"x").digest()
    assert tus.parse_checksum(f"sha1 {b64(digest)}") == ("sha1", digest)
    for bad in ("md5 " + b64(hashlib.md5(b"x").digest()), "sha1 ???", "sha256 " + b64(digest), "sha1"):
        with pytest.raises(tus.InvalidHeader):
            tus.parse_checksum(bad)


def test_repr_digest_parsing() -> None:
    digest = hashlib.sha256(b"x").digest()
    assert tus.parse_repr_digest(f"sha-512=:{b64(b'0' * 64)}:, sha-256=:{b64(digest)}:") == digest.hex()
    assert tus.parse_repr_digest(f"sha-512=:{b64(b'0' * 64)}:") is None
    for bad in ("sha-256=abc", f"sha-256=:{b64(b'short')}:", "sha-256=:!!:"):
        with pytest.raises(tus.InvalidHeader):
            tus.parse_repr_digest(bad)


def test_expires_is_an_http_date() -> None:
    assert tus.format_expires(0) == "Thu, 01 Jan 1970 00:00:00 GMT"


def test_filename_of_a_content_disposition() -> None:
    assert tus.filename_of(None) is None and tus.filename_of("attachment") is None
    assert tus.filename_of("attachment; filename*=UTF-8''%E2%82%AC.txt") == "€.txt"
    assert tus.filename_of("attachment; filename=a.txt; filename*=UTF-8''b.txt") == "a.txt"  # as in a form

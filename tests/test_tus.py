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


def test_draft_numbers_are_structured_integers() -> None:
    assert tus.parse_number("5;a=1; b", "Upload-Offset", structured=True) == 5
    assert tus.parse_number('5;a=@1700000000;b=%"caf%c3%a9"', "Upload-Offset", structured=True) == 5  # date, display
    assert tus.parse_number(" 007 ", "Upload-Offset", structured=True) == 7
    assert tus.parse_number("9" * 15, "Upload-Length", structured=True) == 10**15 - 1
    for text in ("9" * 16, "5;", "5 ;a", "5;A", "5,6", "-1", "5;a=x y", '5;a=%"%C3"', "5;a=@x"):
        with pytest.raises(tus.InvalidHeader):
            tus.parse_number(text, "Upload-Offset", structured=True)
    with pytest.raises(tus.InvalidHeader):
        tus.parse_number("5;a=1", "Upload-Offset")  # tus: digits only


def test_metadata_parsing() -> None:
    parsed = tus.parse_metadata(f"filename {b64('a b.txt')},is_confidential, filetype {b64('text/plain')}")
    assert parsed == {"filename": b64("a b.txt"), "is_confidential": "", "filetype": b64("text/plain")}
    assert tus.metadata_text(parsed, "filename") == "a b.txt"
    assert tus.metadata_text(parsed, "missing") is None
    assert tus.parse_metadata(tus.format_metadata(parsed)) == parsed


def test_metadata_keys_are_what_tus_allows() -> None:
    """tus 1.0.0 forbids only spaces, commas and empty keys (tusd takes `user:id`): any other
    printable ASCII is a key, and echoes back as it came."""
    keys = ["user:id", "a/b", "x@y", "meta[owner]", 'q"uote', "~!#$%&*+-.^_`|"]
    text = ",".join(f"{key} {b64(key)}" for key in keys)
    parsed = tus.parse_metadata(text)
    assert [tus.metadata_text(parsed, key) for key in keys] == keys
    assert tus.format_metadata(parsed) == text


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("filename not*base64", id="bad-base64"),
        pytest.param(f"a {b64('x')},a {b64('y')}", id="duplicate"),
        pytest.param(f"k\x01ey {b64('x')}", id="bad-key"),
        pytest.param(",", id="empty-key"),
        pytest.param(f"filename {b64('x')},", id="trailing-comma"),
        pytest.param(f"n\u00e4me {b64('x')}", id="non-ascii-key"),
        pytest.param(f"k\x7fey {b64('x')}", id="delete-in-key"),
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


def test_repr_digest_is_read_as_a_structured_dictionary() -> None:
    """RFC 9651: the last member of a key wins, a member's parameters are ignored, and a byte
    sequence's `=` padding may be left out."""
    digest, other = hashlib.sha256(b"x").digest(), hashlib.sha256(b"y").digest()
    assert tus.parse_repr_digest(f"sha-256=:{b64(other)}:, sha-256=:{b64(digest)}:") == digest.hex()
    assert tus.parse_repr_digest(f"sha-256=:{b64(digest)}:;note=1") == digest.hex()
    assert tus.parse_repr_digest(f"sha-256=:{b64(digest).rstrip('=')}:") == digest.hex()


@pytest.mark.parametrize("version, age", [("6", "expires"), ("7", "max-age"), ("9", "max-age")])
def test_upload_limit_names_the_lifetime_as_the_version_does(version: str, age: str) -> None:
    """Interop version 6 (drafts -04/-05) calls an upload's lifetime `expires`; later drafts `max-age`."""
    assert tus.format_limit(version, 100, expires_in=60.7) == f"max-size=100, {age}=60"
    assert tus.format_limit(version, 100, max_append=10, expires_in=-5) == f"max-size=100, max-append-size=10, {age}=0"
    assert tus.format_limit(version, 100) == "max-size=100"


def test_a_stored_files_metadata_is_what_its_record_keeps() -> None:
    assert tus.bounded_metadata({"filename": "a.txt", "filetype": "text/plain", "description": "Q3"}) == \
        f"filename {b64(b'a.txt')},filetype {b64(b'text/plain')},description {b64(b'Q3')}"
    assert tus.bounded_metadata({"filename": "a.txt", "bare": ""}) == f"filename {b64(b'a.txt')},bare"
    assert tus.bounded_metadata({}) == ""
    assert tus.bounded_metadata({"a\r\nb": "x", "k ey": "x", "ok": "y"}) == f"ok {b64(b'y')}"  # keys a header can carry
    assert len(tus.bounded_metadata({f"k{i}": "v" for i in range(40)}).split(",")) == 32
    # the longest value goes first: the small ones after it stay
    assert tus.bounded_metadata({"thumb": "\ufffd" * 5000, "filename": "photo.jpg"}) == f"filename {b64(b'photo.jpg')}"
    long = tus.bounded_metadata({"filename": "é" * 255, "filetype": "t/" + "x" * 253, "description": "d" * 6000})
    assert long == f"filename {b64(('é' * 255).encode())},filetype {b64(('t/' + 'x' * 253).encode())}"


def test_the_interop_version_is_read_as_a_structured_integer() -> None:
    assert [tus.draft_version(text) for text in ("8", " 08 ", "006", "7", "9", "9;a=1", "8; x")] == [
        "8", "8", "6", "7", "9", "9", "8"]
    for text in (None, "", "2", "10", "8.0", "+8", "-8", "８", "8" * 16, "0" * 15 + "8", "9;", "9;A", "9 ;a"):
        assert tus.draft_version(text) is None, text


def test_expires_is_an_http_date() -> None:
    assert tus.format_expires(0) == "Thu, 01 Jan 1970 00:00:00 GMT"


def test_filename_of_a_content_disposition() -> None:
    assert tus.filename_of(None) is None and tus.filename_of("attachment") is None
    assert tus.filename_of("attachment; filename*=UTF-8''%E2%82%AC.txt") == "€.txt"
    # RFC 6266 §4.3, not a form part's rule: with both, filename* wins, unless it does not decode whole.
    assert tus.filename_of("attachment; filename=a.txt; filename*=UTF-8''b%C3%A9.txt") == "bé.txt"
    assert tus.filename_of("attachment; filename=a.txt; filename*=UTF-8''") == "a.txt"
    assert tus.filename_of("attachment; filename=a.txt; filename*=UTF-8''%FF.txt") == "a.txt"  # not UTF-8


def test_draft_booleans_may_carry_parameters() -> None:
    """RFC 9651: an Item is a bare item and its parameters."""
    assert tus.parse_boolean("?1;a=1", "Upload-Complete") is True
    assert tus.parse_boolean(" ?0; x", "Upload-Complete") is False
    assert tus.parse_boolean('?1;a=?0;b=1.5;c=tok/x;d=:YQ==:;e="q \\" "', "Upload-Complete") is True


@pytest.mark.parametrize("text", ["?2;a", "?1;=b", '?1;a="x', "?1;", "?1 ;a", "?1;A=b", "?1, ?0", "1", ""])
def test_a_malformed_draft_boolean_is_refused(text: str) -> None:
    with pytest.raises(tus.InvalidHeader):
        tus.parse_boolean(text, "Upload-Complete")

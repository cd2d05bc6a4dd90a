"""upload_service.framing driven directly: part header lines and bodies without parts (issue 11)."""

from __future__ import annotations

import pytest

from support import BOUNDARY
from upload_service.errors import FormError
from upload_service.framing import Framer, read_part_headers

B = BOUNDARY.encode()
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


def feed_all(body: bytes, step: int) -> Framer:
    framer = Framer(B, 20)
    for i in range(0, len(body), step):
        for _ in framer.feed(body[i : i + step]):
            pass
    return framer


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
    framer = feed_all(body, 3)
    assert framer.complete and list(framer.parts)[0].name == "a"

"""Bodies for the benchmarks, built once per run from a fixed seed.

Every payload is the content of one or more parts; `form_body` wraps it into a
multipart/form-data body. Big end-to-end bodies are never built whole: `Upload`
describes one as a head, one block of data repeated, and a tail, which a client
sends with large `sendall`s and which hashes without being joined.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

SEED = 20240607
BOUNDARY = "----upload-asgi-bench-2zKcQmV7pLx9RtYw"
CONTENT_TYPE = f"multipart/form-data; boundary={BOUNDARY}"
MARKER = b"\r\n--" + BOUNDARY.encode()
# The end-to-end bodies repeat one block of random bytes; 1 MiB divides every size used.
BLOCK_SIZE = 1 * MiB


def random_bytes(size: int, seed: int = SEED) -> bytes:
    rng = random.Random(seed)
    # randbytes takes at most 2**28 bytes at once (2**31 bits).
    return b"".join(rng.randbytes(min(16 * MiB, size - i)) for i in range(0, size, 16 * MiB))


def tile(block: bytes, size: int) -> bytes:
    """Repeat `block` up to exactly `size` bytes."""
    whole, rest = divmod(size, len(block))
    return block * whole + block[:rest]


def crlf_text(size: int, seed: int = SEED) -> bytes:
    """Text with Windows line endings: a CR LF every ~40 bytes, as in a CSV or a log."""
    rng = random.Random(seed)
    words = [b"alpha", b"beta", b"gamma", b"delta", b"upload", b"-", b"--", b"1234", b"x;y", b"\xc3\xa9t\xc3\xa9"]
    lines = []
    length = 0
    while length < 1 * MiB:
        line = b" ".join(rng.choice(words) for _ in range(rng.randint(1, 12))) + b"\r\n"
        lines.append(line)
        length += len(line)
    return tile(b"".join(lines), size)


def near_boundary(size: int, boundary: str = BOUNDARY) -> bytes:
    """The parsers' worst case: `\\r\\n--` and all but the last byte of the boundary, again and again."""
    almost = b"\r\n--" + boundary.encode()[:-1]
    return tile(almost + b"#" + almost[:-3] + b"\r\n", size)


# -- multipart bodies -------------------------------------------------------------


def part_head(name: str, filename: str | None = None, content_type: str | None = None) -> bytes:
    """`--boundary` CRLF, the part's headers, and the blank line."""
    disposition = f'form-data; name="{name}"'
    if filename is not None:
        disposition += f'; filename="{filename}"'
    lines = [f"--{BOUNDARY}", f"Content-Disposition: {disposition}"]
    if content_type is not None:
        lines.append(f"Content-Type: {content_type}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def text_part(name: str, value: bytes) -> bytes:
    return part_head(name) + value + b"\r\n"


CLOSE = f"--{BOUNDARY}--\r\n".encode()


def file_form(data: bytes, fields: tuple[tuple[str, bytes], ...] = ()) -> bytes:
    """A body with the text fields first, then one file part named `file`."""
    head = b"".join(text_part(name, value) for name, value in fields)
    return head + part_head("file", "data.bin", "application/octet-stream") + data + b"\r\n" + CLOSE


def many_fields(size: int, seed: int = SEED) -> bytes:
    """A body of small text fields (~100 bytes each) and one small file at the end."""
    rng = random.Random(seed)
    parts = []
    length = 0
    i = 0
    while length < size:
        value = rng.randbytes(40).hex().encode()[: rng.randint(20, 80)]
        part = text_part(f"field{i}", value)
        parts.append(part)
        length += len(part)
        i += 1
    return b"".join(parts) + part_head("file", "small.txt", "text/plain") + b"hello\r\n" + CLOSE


def file_and_fields(size: int, seed: int = SEED) -> bytes:
    """One large file between a few text fields, as a browser form sends it."""
    fields = (("description", b"quarterly export, compressed"), ("sha256", b"0" * 64), ("tags", b"a,b,c"))
    body = file_form(random_bytes(size, seed), fields)
    return body[:-len(CLOSE)] + text_part("comment", b"sent from the bench") + CLOSE


def parser_payloads(size: int) -> dict[str, bytes]:
    """The bodies the parser is measured on, each about `size` bytes."""
    return {
        "random": file_form(random_bytes(size)),
        "crlf_text": file_form(crlf_text(size)),
        "near_boundary": file_form(near_boundary(size)),
        # Each small field costs two header parses (~0.2 ms): a smaller body keeps the run short.
        "many_fields": many_fields(max(size // 128, 32 * KiB)),
        "file_and_fields": file_and_fields(size),
    }


def slices(data: bytes, size: int) -> list[bytes]:
    """Cut `data` into `size`-byte pieces (the last may be shorter), built before timing."""
    return [data[i : i + size] for i in range(0, len(data), size)]


# -- end-to-end uploads -------------------------------------------------------------


@dataclass
class Upload:
    """A multipart body of `size` file bytes: head, `block` repeated, tail; never joined."""

    size: int
    block: bytes
    head: bytes = part_head("file", "data.bin", "application/octet-stream")
    tail: bytes = b"\r\n" + CLOSE
    _sha256: str | None = field(default=None, repr=False)
    _body_sha256: str | None = field(default=None, repr=False)

    @property
    def repeats(self) -> int:
        assert self.size % len(self.block) == 0, "sizes are whole blocks"
        return self.size // len(self.block)

    @property
    def body_length(self) -> int:
        return len(self.head) + self.size + len(self.tail)

    @property
    def sha256(self) -> str:
        """SHA-256 of the file part's content (computed once)."""
        if self._sha256 is None:
            digest = hashlib.sha256()
            for _ in range(self.repeats):
                digest.update(self.block)
            self._sha256 = digest.hexdigest()
        return self._sha256

    @property
    def body_sha256(self) -> str:
        """SHA-256 of the whole body, framing included (computed once)."""
        if self._body_sha256 is None:
            digest = hashlib.sha256(self.head)
            for _ in range(self.repeats):
                digest.update(self.block)
            digest.update(self.tail)
            self._body_sha256 = digest.hexdigest()
        return self._body_sha256


def upload(size: int, block: bytes | None = None) -> Upload:
    if block is None:
        block = random_bytes(min(size, BLOCK_SIZE))
    return Upload(size, block)

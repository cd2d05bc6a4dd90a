"""The S3 client side of the S3 backend: aiobotocore set up for S3-compatible stores, part
bodies sent without copies, and S3's errors said as ours (502 refused, 503 unreachable).
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import os
from datetime import datetime
from typing import Any, AsyncIterator, Callable

from upload_service.errors import ConfigError, StorageRefused, StorageUnavailable

try:
    import aiohttp
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session
    from botocore.exceptions import (
        BotoCoreError, ClientError, DataNotFoundError, NoCredentialsError, PartialCredentialsError,
    )
    from botocore.parsers import DEFAULT_TIMESTAMP_PARSER
except ImportError as exc:  # pragma: no cover - the extra not installed
    raise ConfigError(
        f"UPLOAD_STORAGE: s3:// needs the S3 client: pip install 'upload-asgi[s3]' ({exc})"
    ) from None

__all__ = [
    "BotoCoreError", "CONFLICT_CODES", "ClientError", "Conflict", "MISSING_CODES", "PartBody", "UNSUPPORTED_CODES", "aiohttp",
    "describe_failure", "error_code", "open_client",
]

MISSING_CODES = {"NoSuchKey", "404", "NotFound"}
CONFLICT_CODES = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}  # a condition failed
UNSUPPORTED_CODES = {"NotImplemented", "501"}  # a feature the store does not have
REFUSED_CODES = {
    "AccessDenied", "403", "Forbidden", "InvalidAccessKeyId", "SignatureDoesNotMatch",
    "AllAccessDisabled", "AccountProblem", "InvalidToken", "ExpiredToken",
}
FAILING_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout"}


class Conflict(Exception):
    """A conditional write lost: the object is not as we last saw it."""


async def open_client(endpoint_url: str | None, max_connections: int) -> Any:
    """An aiobotocore S3 client on the running loop; credentials from botocore's usual chain."""
    config = AioConfig(
        # Path style: S3-compatible stores (SeaweedFS, MinIO) rarely have bucket DNS names.
        s3={"addressing_style": "path"} if endpoint_url else {},
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=5,
        read_timeout=60,
        max_pool_connections=max_connections,
        # Only the checksums S3 requires: many S3-compatible stores refuse the newer
        # CRC trailers, and the app computes the SHA-256 that matters anyway.
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    session = get_session()
    session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
    # Parsing S3's model files takes a while: on a thread, the loop goes on serving; making the
    # client then finds them parsed.
    await asyncio.to_thread(load_s3_model, session)
    context = session.create_client("s3", endpoint_url=endpoint_url, region_name=region, config=config)
    return await context.__aenter__()


def parse_timestamp(value: Any) -> Any:
    """S3's own form (`2026-12-01T19:45:22.000Z`, each key's LastModified in a listing) by
    `fromisoformat`, anything else as botocore parses it: botocore's dateutil was most of the
    time a listing page held the event loop."""
    if isinstance(value, str) and len(value) == 24 and value[10] == "T" and value[-1] == "Z":
        return datetime.fromisoformat(value)
    return DEFAULT_TIMESTAMP_PARSER(value)


def load_s3_model(session: Any) -> None:
    """Load into the session's loader what making an S3 client reads from botocore's data files
    (a file another botocore lacks is left to the client to look for)."""
    loader = session.get_component("data_loader")
    try:
        loader.load_service_model("s3", "service-2")
        loader.load_service_model("s3", "endpoint-rule-set-1")
        for name in ("endpoints", "partitions", "sdk-default-configuration"):
            loader.load_data(name)
    except DataNotFoundError:
        pass


def error_code(exc: BaseException | None) -> str | None:
    """The S3 error code of a ClientError ('NoSuchKey', '404' for a HEAD), else None."""
    if isinstance(exc, ClientError):
        return str(exc.response.get("Error", {}).get("Code"))
    return None


def describe_failure(
    exc: BaseException, operation: str, bucket: str, url: str, endpoint_url: str | None
) -> StorageUnavailable:
    """An S3 failure as the error a client sees, naming what to fix."""
    code = error_code(exc)
    where = endpoint_url or "AWS S3"
    if isinstance(exc, (NoCredentialsError, PartialCredentialsError)):
        return StorageRefused("no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if code == "NoSuchBucket" or (code in ("404", "NotFound") and operation == "head_bucket"):
        return StorageRefused(f"UPLOAD_STORAGE: the bucket {bucket!r} does not exist at {where}")
    if code in REFUSED_CODES:
        return StorageRefused(
            f"the object store refused access to {url} ({code}): check AWS_ACCESS_KEY_ID, "
            "AWS_SECRET_ACCESS_KEY and the bucket's policy"
        )
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status >= 500 or code in FAILING_CODES:
            return StorageUnavailable(f"the object store at {where} is failing ({code} on {operation})")
        return StorageRefused(f"the object store at {where} refused {operation} ({code})")
    return StorageUnavailable(f"cannot reach the object store at {where} ({type(exc).__name__} on {operation})")


class PartBody:
    """A part as the blocks it was written in, sent without ever copying it whole.

    Given bytes, botocore wraps them in a BytesIO that aiohttp copies whole
    (`getbuffer`), and a large write to aiohttp's transport is buffered whole again;
    joining the blocks into one part would be one more copy. This gives botocore what it
    asks of a body (`read`/`seek`/`tell` to sign it and rewind for a retry, `len` for
    its length) and aiohttp what it streams (`__aiter__`): the blocks, in views of
    SEND_CHUNK_SIZE, each written and drained before the next.
    """

    SEND_CHUNK_SIZE = 256 * 1024

    def __init__(self, blocks: list[bytes]) -> None:
        self._blocks = blocks
        self._starts = list(itertools.accumulate((len(b) for b in blocks), initial=0))  # offsets, and the size
        self._position = 0
        self.on_sent: Callable[[], None] | None = None  # called as each piece has gone out

    def __len__(self) -> int:
        return self._starts[-1]

    def read(self, size: int = -1) -> bytes:
        stop = len(self) if size is None or size < 0 else min(len(self), self._position + size)
        pieces = []
        index = bisect.bisect_right(self._starts, self._position) - 1
        while self._position < stop:
            block, offset = self._blocks[index], self._position - self._starts[index]
            piece = block[offset : offset + stop - self._position]
            pieces.append(piece)
            self._position += len(piece)
            index += 1
        return b"".join(pieces)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        base = {os.SEEK_SET: 0, os.SEEK_CUR: self._position, os.SEEK_END: len(self)}[whence]
        self._position = min(max(0, base + offset), len(self))
        return self._position

    def tell(self) -> int:
        return self._position

    def __aiter__(self) -> AsyncIterator[memoryview]:
        return self._views()

    async def _views(self) -> AsyncIterator[memoryview]:
        for block in self._blocks:
            view = memoryview(block)
            for start in range(0, len(view), self.SEND_CHUNK_SIZE):
                yield view[start : start + self.SEND_CHUNK_SIZE]  # resumed once written and drained
                if self.on_sent is not None:
                    self.on_sent()

"""Form uploads: `POST /upload` and `POST /upload-multiple`, read into the store.

The request path of a multipart/form-data upload: the boundary from the headers, the
body through `targets.FormReader` into the store's sinks, the form checked, the files
committed all or none. Errors propagate to the front door, which answers them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
from dataclasses import dataclass
from typing import Any, NamedTuple

from targets import FormLimits, FormReader, UploadFileTarget
from upload_service.asgi import Receive
from upload_service.body import BodyProgress, read_body
from upload_service.errors import (
    ChecksumMismatch, InvalidField, MissingBoundary, NoFile, PayloadTooLarge, UnsupportedMediaType, shown,
)
from upload_service.framing import field_charset, parse_header_params
from upload_service.settings import Config
from upload_service.storage import DECLARED_SHA256_RE, Record, Store
from upload_service.threads import WriterPool, wait_through_cancel
from upload_service.units import MiB

logger = logging.getLogger("upload_asgi")

# The description goes on every record of an /upload-multiple request, in the answer and in
# each sidecar: in all, at most this much of it as JSON.
DESCRIPTIONS_BUDGET = 1 * MiB
# RFC 2046 §5.1.1: 1-70 characters from bchars, not ending in a space; and the token characters
# it leaves out (RFC 9110 §5.6.2: `!#$%&*^`|~`), as clients send them (Android's well-known
# HttpURLConnection snippet: `*****`) and other multipart readers take them.
BOUNDARY_RE = re.compile(r"[0-9A-Za-z'()+_,\-./:=? !#$%&*^`|~]{0,69}[0-9A-Za-z'()+_,\-./:=?!#$%&*^`|~]")


@dataclass(frozen=True)
class UploadRoute:
    """What an upload endpoint reads: its file field, how many files, its text fields."""

    file_field: str
    single: bool
    text_fields: tuple[str, ...]


UPLOAD_ROUTE = UploadRoute("file", single=True, text_fields=("description", "sha256"))
UPLOAD_MULTIPLE_ROUTE = UploadRoute("files", single=False, text_fields=("description",))


class FormType(NamedTuple):
    """What a request's Content-Type says of its form."""

    boundary: bytes
    charset: str | None  # the codec of its `charset` parameter (Apache HttpClient's browser mode), if one we read


def form_type_of(content_type: str | None) -> FormType:
    """The multipart boundary and charset of a request Content-Type, or raise the error."""
    if not content_type:
        raise UnsupportedMediaType("Content-Type must be multipart/form-data")
    media_type, params = parse_header_params(content_type)
    if media_type != "multipart/form-data":
        raise UnsupportedMediaType(f"Content-Type must be multipart/form-data, not {shown(media_type)}")
    boundary = params.get("boundary")
    if not boundary:
        raise MissingBoundary("the multipart/form-data Content-Type has no boundary")
    if not BOUNDARY_RE.fullmatch(boundary):
        raise MissingBoundary("the multipart boundary is not valid (RFC 2046 §5.1.1)")
    return FormType(boundary.encode("ascii"), field_charset(params.get("charset")))


def form_limits(config: Config, route: UploadRoute) -> FormLimits:
    return FormLimits(
        max_file_size=config.max_file_size,
        max_field_size=config.max_field_size,
        max_files=1 if route.single else config.max_files,
        max_parts=config.max_parts,
    )


def make_record(target: UploadFileTarget, description: str | None, created: str, form_charset: str | None) -> Record:
    return {
        "id": target.id,
        "filename": target.record_filename(form_charset),
        "content_type": target.content_type,
        "size": target.size,
        "sha256": target.sha256,
        "description": description,
        "created": created,
    }


_last_second: tuple[int, str] = (-1, "")


def utc_now() -> str:
    """ISO 8601 UTC to the second: a record's `created`, and a download's Last-Modified."""
    global _last_second
    second = int(time.time())
    if second != _last_second[0]:  # formatting costs more than the rest of a record
        _last_second = (second, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second)))
    return _last_second[1]


async def store_form(
    config: Config,
    store: Store,
    writer: WriterPool,
    form: FormType,
    receive: Receive,
    route: UploadRoute,
    progress: BodyProgress,
    promised: int | None = None,
) -> list[Record]:
    """Read the body into the store and commit its files; on any failure, leave nothing."""
    reader = FormReader(
        form.boundary, store, form_limits(config, route),
        file_field=route.file_field, text_fields=route.text_fields, executor=writer, charset=form.charset,
    )
    try:
        await read_body(
            receive, reader, progress, config.max_request_size, config.idle_timeout, config.min_rate, promised=promised
        )
        reader.close()
        for target in reader.files:  # the last block of each file
            if target.job is not None:
                await asyncio.wrap_future(target.job)
        records = check_form(reader, route)
        await store.commit(
            [(target.sink, record) for target, record in zip(reader.files, records)], before=reader.write_held
        )
    except BaseException as exc:
        # Off the loop: abort waits for a writer thread's block (a slow disk must
        # not stall every other request), and is waited for even if cancelled again.
        aborting = asyncio.get_running_loop().run_in_executor(None, reader.abort)
        cancelled = await wait_through_cancel(aborting)
        if aborting.exception() is not None:  # a close that failed; the upload failed anyway
            logger.warning("cleaning up a failed upload failed", exc_info=aborting.exception())
        if cancelled and not isinstance(exc, asyncio.CancelledError):
            raise asyncio.CancelledError from exc
        raise
    return records


def check_form(reader: FormReader, route: UploadRoute) -> list[Record]:
    """Validate a complete form and build the records of its files."""
    if not reader.files:
        raise NoFile(f"the form has no file part named {route.file_field!r} with a filename")
    description = reader.field("description")
    if description is not None and len(reader.files) > 1:
        check_descriptions(description, len(reader.files))
    created = utc_now()  # one moment for all the files of a request
    charset = reader.form_charset()
    records = [make_record(target, description, created, charset) for target in reader.files]
    expected = reader.field("sha256") if "sha256" in route.text_fields else None
    if expected is not None:
        # The field, or a digest file's first word (`sha256sum` writes "<hex>  <name>").
        expected = (expected.split() or [""])[0]
        if not DECLARED_SHA256_RE.fullmatch(expected):
            raise InvalidField("the sha256 field must be 64 hexadecimal digits")
        if expected.lower() != records[0]["sha256"]:
            raise ChecksumMismatch(
                f"the file's SHA-256 is {records[0]['sha256']}, not {expected.lower()}",
                sha256=records[0]["sha256"],
            )
    return records


def check_descriptions(description: str, files: int) -> None:
    size = len(json.dumps(description))
    if size * files > DESCRIPTIONS_BUDGET:
        raise PayloadTooLarge(
            f"the description ({size} bytes as JSON) on each of {files} files passes {DESCRIPTIONS_BUDGET}"
            " bytes in all: send a shorter one or fewer files",
            limit="descriptions", max=DESCRIPTIONS_BUDGET,
        )


def form_answer(records: list[Record], route: UploadRoute) -> Any:
    if route.single:
        return records[0]
    return {"files": records, "count": len(records), "total_size": sum(r["size"] for r in records)}

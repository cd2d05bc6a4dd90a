"""Resumable uploads (SPEC §10): tus 1.0.0 and the IETF draft on /files.

Raw requests in process for every status; then real servers with independent
clients (tuspy, tus-js-client in Node and in Chromium), a restart and a cut
connection mid-upload, a PATCH taking over from a silent one, two workers, HTTP/2, and
the page resuming in Chromium. The pure helpers are in test_tus.py, the store
driven directly in test_localresumable.py.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import re
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import replace
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest

import upload_asgi
from backends import close_app
from support import ROOT, Reply, Server, call_app, field_part, file_part, form_body, form_content_type, http_scope, stored_ids
from upload_service.storage import DigestCache, ResumableUpload, UploadBusy
from upload_service.units import MiB

TUS = {"Tus-Resumable": "1.0.0"}
OCTETS = {**TUS, "Content-Type": "application/offset+octet-stream"}


def b64(text: str | bytes) -> str:
    return base64.b64encode(text.encode() if isinstance(text, str) else text).decode()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(size: int, seed: int = 1) -> bytes:
    """`size` bytes that differ at every offset (a misplaced chunk changes the digest)."""
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(size)


def check_error(reply: httpx.Response, status: int, code: str) -> dict[str, Any] | None:
    assert reply.status_code == status, reply.text
    if reply.request.method == "HEAD":  # the GET's length, no body
        return None
    assert int(reply.headers["content-length"]) == len(reply.content)
    body = reply.json()
    assert body["error"] == code, body
    assert body["detail"]
    return body


def check_tus(reply: httpx.Response) -> None:
    assert reply.headers["tus-resumable"] == "1.0.0"


def metric(exposition: str, sample: str) -> float:
    """The value of one sample (`name{labels}` as written) in Prometheus text."""
    for line in exposition.splitlines():
        name, _, value = line.rpartition(" ")
        if name == sample:
            return float(value)
    raise AssertionError(f"no sample {sample}")


def resumable_files(upload_dir: Path) -> list[str]:
    staging = upload_dir / ".resumable"
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []


@pytest.fixture
def config(backend: Any) -> upload_asgi.Config:
    """The in-process tests run on each backend (conftest `backend`: local, then S3 on SeaweedFS)."""
    return backend.config(fsync=False, max_file_size=10_000_000)


@pytest.fixture
async def app(config: upload_asgi.Config) -> AsyncIterator[upload_asgi.UploadApp]:
    app = upload_asgi.create_app(config)
    yield app
    await close_app(app)


async def record_of(client: httpx.AsyncClient, location: str) -> dict[str, Any]:
    reply = await client.get(f"{location}/record")
    assert reply.status_code == 200, reply.text
    return reply.json()


def leftovers(backend: Any) -> list[str]:
    """What is left of resumable uploads: staged files, or .resumable/ objects and multipart uploads."""
    if backend.name == "local":
        return resumable_files(backend.upload_dir)
    return [n for n in backend.objects() if n.startswith(".resumable/")] + backend.uploads_in_progress()


async def create(client: httpx.AsyncClient, length: int | None, metadata: str | None = None, **headers: str) -> str:
    sent = {**TUS, **headers}
    if length is None:
        sent["Upload-Defer-Length"] = "1"
    else:
        sent["Upload-Length"] = str(length)
    if metadata is not None:
        sent["Upload-Metadata"] = metadata
    reply = await client.post("/files", headers=sent)
    assert reply.status_code == 201, reply.text
    check_tus(reply)
    location = reply.headers["location"]
    assert location.startswith("/files/") and len(location) == len("/files/") + 32
    return location


async def patch(client: httpx.AsyncClient, location: str, offset: int, data: bytes, **headers: str) -> httpx.Response:
    sent = {**OCTETS, "Upload-Offset": str(offset), **headers}
    return await client.patch(location, content=data, headers=sent)


async def offset_of(client: httpx.AsyncClient, location: str) -> int:
    reply = await client.head(location, headers=TUS)
    assert reply.status_code == 200
    return int(reply.headers["upload-offset"])


def stored_record(upload_dir: Path, location: str) -> dict[str, Any]:
    return json.loads((upload_dir / f"{location.rsplit('/', 1)[1]}.json").read_text())


# -- tus over HTTP, in process ------------------------------------------------------------


async def test_options(client: httpx.AsyncClient) -> None:
    for path in ("/files", "/files/" + "0" * 32):
        reply = await client.options(path)
        assert reply.status_code == 204
        check_tus(reply)
        assert reply.headers["tus-version"] == "1.0.0"
        assert reply.headers["tus-extension"] == (
            "creation,creation-with-upload,creation-defer-length,termination,expiration,checksum"
        )
        assert reply.headers["tus-max-size"] == "10000000"
        assert reply.headers["tus-checksum-algorithm"] == "sha1,sha256"


async def test_the_endpoint_with_a_trailing_slash_is_the_same(client: httpx.AsyncClient, backend: Any) -> None:
    """tusd's base path is `/files/`, and tus-js-client's and tuspy's examples name the endpoint so."""
    reply = await client.options("/files/")
    assert reply.status_code == 204
    assert reply.headers["tus-version"] == "1.0.0"
    reply = await client.post("/files/", headers={**TUS, "Upload-Length": "3"})
    assert reply.status_code == 201, reply.text
    location = reply.headers["location"]
    assert location.startswith("/files/") and len(location) == len("/files/") + 32
    assert (await patch(client, location, 0, b"abc")).status_code == 204
    listed = (await client.get("/files/")).json()
    assert [r["id"] for r in listed["files"]] == [location.rsplit("/", 1)[1]]
    for path in ("/files", "/files/"):  # an override names a method of the path, as without the slash
        reply = await client.post(path, headers={**TUS, "Upload-Length": "3", "X-HTTP-Method-Override": "PATCH"})
        assert reply.status_code == 405, reply.text
    assert backend.stored_bytes(location.rsplit("/", 1)[1]) == b"abc"


@pytest.mark.parametrize("sent", [b"", b"0123"])
async def test_a_patch_body_the_server_ends_short_of_its_length_is_refused(
    app: upload_asgi.UploadApp, client: httpx.AsyncClient, sent: bytes
) -> None:
    """uvicorn's httptools passes none of the body of a request with `Upgrade` (Java's HttpClient
    asks for h2c), and granian ends an HTTP/2 body its client reset: not a 204 for a PATCH of 10
    bytes, and what did arrive is kept, as when a client leaves."""
    location = await create(client, 10)
    headers = {**OCTETS, "Upload-Offset": "0", "Content-Length": "10"}
    reply = await call_app(app, http_scope(location, "PATCH", headers.items()), [sent] if sent else [])
    assert reply.status == 400 and reply.json()["error"] == "incomplete_body"
    assert reply.headers["tus-resumable"] == "1.0.0"
    assert await offset_of(client, location) == len(sent)
    assert (await patch(client, location, len(sent), b"0123456789"[len(sent):])).status_code == 204


async def test_a_chunked_body_asking_to_switch_protocols_that_never_comes_completes_nothing(
    app: upload_asgi.UploadApp, client: httpx.AsyncClient
) -> None:
    """uvicorn's httptools passes none of a chunked body with `Upgrade` either: a draft append saying
    `Upload-Complete: ?1` must not store the upload at the offset it had."""
    location = await create(client, None)
    assert (await patch(client, location, 0, b"01234")).status_code == 204
    headers = {**draft("6"), "Content-Type": "application/partial-upload", "Upload-Offset": "5",
               "Upload-Complete": "?1", "Transfer-Encoding": "chunked", "Upgrade": "h2c", "Connection": "Upgrade"}
    reply = await call_app(app, http_scope(location, "PATCH", headers.items()), [])
    assert reply.status == 400 and reply.json()["error"] == "incomplete_body"
    assert await offset_of(client, location) == 5


async def test_upload_in_pieces_stores_a_file_like_a_form(client: httpx.AsyncClient, backend: Any) -> None:
    data = payload(2_345_679)
    metadata = f"filename {b64('../dir/report é.pdf')},filetype {b64('application/pdf')},description {b64('Q3')}"
    location = await create(client, len(data), metadata)
    reply = await client.head(location, headers=TUS)
    assert reply.status_code == 200
    check_tus(reply)
    assert reply.headers["upload-offset"] == "0"
    assert reply.headers["upload-length"] == str(len(data))
    assert reply.headers["cache-control"] == "no-store"
    assert reply.headers["upload-metadata"] == metadata
    assert "GMT" in reply.headers["upload-expires"]
    offset = 0
    for size in (1, 65_536, 1_048_577, 7):
        reply = await patch(client, location, offset, data[offset : offset + size])
        assert reply.status_code == 204, reply.text
        check_tus(reply)
        offset += size
        assert reply.headers["upload-offset"] == str(offset)
        assert await offset_of(client, location) == offset
    reply = await client.get(location)
    check_error(reply, 409, "upload_incomplete")
    reply = await patch(client, location, offset, data[offset:])
    assert reply.status_code == 204
    assert reply.headers["upload-offset"] == str(len(data))
    assert "upload-expires" not in reply.headers
    record = await record_of(client, location)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", record.pop("created"))
    assert record == {
        "id": location.rsplit("/", 1)[1],
        "filename": "report é.pdf",
        "content_type": "application/pdf",
        "size": len(data),
        "sha256": sha(data),
        "description": "Q3",
        "metadata": {"filename": "../dir/report é.pdf", "filetype": "application/pdf", "description": "Q3"},
    }
    backend.assert_stored(await record_of(client, location), data)
    assert leftovers(backend) == []
    reply = await client.get(location)
    assert reply.status_code == 200
    assert reply.content == data
    assert reply.headers["etag"] == f'"{sha(data)}"'
    assert reply.headers["content-disposition"] == "attachment; filename=\"report e.pdf\"; filename*=UTF-8''report%20%C3%A9.pdf"
    reply = await client.head(location, headers=TUS)  # a finished upload still says where it stands
    assert reply.headers["upload-offset"] == reply.headers["upload-length"] == str(len(data))
    assert reply.headers["upload-metadata"] == metadata  # as tus says a HEAD MUST: as the creation sent it
    assert "upload-metadata" not in (await client.head(location, headers=draft("8"))).headers
    metrics = (await client.get("/metrics")).text
    assert metric(metrics, 'upload_asgi_uploads_total{outcome="stored"}') == 1
    assert metric(metrics, 'upload_asgi_uploads_total{outcome="partial"}') == 4
    assert metric(metrics, "upload_asgi_stored_bytes_total") == len(data)
    assert metric(metrics, "upload_asgi_stored_files_total") == 1


async def test_a_resumable_head_of_a_finished_upload_is_never_cached(client: httpx.AsyncClient, backend: Any) -> None:
    """tus 1.0.0 HEAD: the server "MUST prevent the client and/or proxies from caching the response"
    (no-store), also once the upload is a stored file; a plain HEAD keeps the files resource's no-cache."""
    location = await create(client, 3)
    assert (await patch(client, location, 0, b"abc")).status_code == 204
    etag = f'"{sha(b"abc")}"'
    for speaks, status in ((TUS, 200), (draft("8"), 200), ({**TUS, "If-None-Match": etag}, 304)):
        reply = await client.head(location, headers=speaks)
        assert reply.status_code == status and reply.headers.get_list("cache-control") == ["no-store"]
    assert (await client.head(location)).headers.get_list("cache-control") == ["no-cache"]


async def test_a_finished_upload_keeps_the_metadata_its_creation_sent(client: httpx.AsyncClient, backend: Any) -> None:
    """tus 1.0.0: a HEAD MUST include Upload-Metadata "as specified by the Client during the creation", and
    so once the upload is a stored file too; its record keeps every key (for the embedding app's hooks),
    and one created without metadata says none. The draft's record: what its headers named."""
    sent = f"user:id {b64('7')},filename {b64('../../etc/passwd')},bare,note {b64('é')}"
    location = await create(client, 3, sent)
    assert (await patch(client, location, 0, b"abc")).status_code == 204
    reply = await client.head(location, headers=TUS)
    assert reply.status_code == 200 and reply.headers["upload-metadata"] == sent
    record = await record_of(client, location)
    assert record["filename"] == "passwd" and record["content_type"] == "application/octet-stream"
    assert record["metadata"] == {"user:id": "7", "filename": "../../etc/passwd", "bare": "", "note": "é"}
    assert (await client.get("/files")).json()["files"][0]["metadata"] == record["metadata"]
    location = await create(client, 0)  # stored at its creation
    reply = await client.head(location, headers=TUS)
    assert reply.status_code == 200 and "upload-metadata" not in reply.headers
    assert (await record_of(client, location))["metadata"] == {}
    headers = draft("8", upload_complete="?1", content_type="text/plain", content_disposition='attachment; filename="a.txt"')
    reply = await client.post("/files", content=b"abc", headers=headers)
    assert reply.status_code == 201, reply.text
    assert reply.json()["metadata"] == {"filename": "a.txt", "filetype": "text/plain"}


async def test_a_finished_uploads_echoed_metadata_stays_a_header_a_creation_could_send(
    client: httpx.AsyncClient, backend: Any
) -> None:
    """A value that was not UTF-8 comes back as text with U+FFFD, up to 3 times longer: the echo keeps
    to the 8 KiB a creation may send (the last keys left out; nginx's default buffers refuse a longer
    header); a key no header may carry (a hand-edited record's) is left out (it was a 500)."""
    sent = ",".join(f"k{i} {b64(bytes([0xFF]) * 180)}" for i in range(30))
    location = await create(client, 1, sent)
    assert (await patch(client, location, 0, b"x")).status_code == 204
    echoed = (await client.head(location, headers=TUS)).headers["upload-metadata"]
    assert len(echoed) <= 8192 and echoed.startswith(f"k0 {b64(chr(0xFFFD) * 180)},k1 ")
    record = await record_of(client, location)
    backend.overwrite_record(record["id"], json.dumps({**record, "metadata": {"a\r\nb": "x", "ok": "y"}}).encode())
    reply = await client.head(location, headers=TUS)
    assert reply.status_code == 200 and reply.headers["upload-metadata"] == f"ok {b64('y')}"


async def test_a_finished_uploads_metadata_stays_within_what_a_creation_may_send(
    client: httpx.AsyncClient, backend: Any
) -> None:
    """A form's description may be 64 KiB; a tus HEAD of its file leaves it out past 8 KiB of metadata
    (a Node client refuses a header over 16 KiB), and keeps the filename and the type."""
    body = form_body([file_part(b"abc", "a.txt", content_type="text/plain"), field_part("description", "d" * 9000)])
    reply = await client.post("/upload", content=body, headers={"Content-Type": form_content_type()})
    assert reply.status_code == 201, reply.text
    reply = await client.head(f"/files/{reply.json()['id']}", headers=TUS)
    assert reply.status_code == 200
    assert reply.headers["upload-metadata"] == f"filename {b64('a.txt')},filetype {b64('text/plain')}"


async def test_metadata_is_cleaned_as_a_forms_part_is(client: httpx.AsyncClient, backend: Any) -> None:
    """SPEC §10, the same records: control characters leave a filetype and a filename as they leave a form
    part's Content-Type and filename; a description is kept as sent, as a form's text field is."""
    filetype, filename, description = "text/plain;\x01 charset=utf-8\t", "a\x01b\x7f.txt", "two\r\nlines"
    body = form_body([file_part(b"abc", filename, content_type=filetype), field_part("description", description)])
    reply = await client.post("/upload", content=body, headers={"Content-Type": form_content_type()})
    assert reply.status_code == 201, reply.text
    form = reply.json()
    location = await create(client, 3, f"filename {b64(filename)},filetype {b64(filetype)},description {b64(description)}")
    assert (await patch(client, location, 0, b"abc")).status_code == 204
    record = await record_of(client, location)
    shown = ("text/plain; charset=utf-8", "ab.txt", "two\r\nlines")
    assert (record["content_type"], record["filename"], record["description"]) == shown
    assert (form["content_type"], form["filename"], form["description"]) == shown
    location = await create(client, 0, "filetype " + b64("text/plain\r\nX-Evil: 1"))
    assert (await record_of(client, location))["content_type"] == "text/plainX-Evil: 1"


async def test_creation_with_upload_and_deferred_length(client: httpx.AsyncClient, backend: Any) -> None:
    data = payload(100_000)
    reply = await client.post(
        "/files", content=data[:40_000], headers={**OCTETS, "Upload-Defer-Length": "1"}
    )
    assert reply.status_code == 201
    assert reply.headers["upload-offset"] == "40000"
    assert reply.headers["upload-defer-length"] == "1"
    location = reply.headers["location"]
    reply = await client.head(location, headers=TUS)
    assert reply.headers["upload-defer-length"] == "1"
    assert "upload-length" not in reply.headers
    check_error(await patch(client, location, 40_000, b"", **{"Upload-Length": "39999"}), 400, "invalid_header")
    check_error(await patch(client, location, 40_000, b"", **{"Upload-Length": "10000001"}), 413, "payload_too_large")
    reply = await patch(client, location, 40_000, data[40_000:], **{"Upload-Length": str(len(data))})
    assert reply.status_code == 204
    backend.assert_stored(await record_of(client, location), data)
    assert (await record_of(client, location))["filename"] == "unnamed"


async def test_a_patch_repeating_the_known_length_saves_nothing_more(
    client: httpx.AsyncClient, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from upload_service.localresumable import LocalUpload
    from upload_service.s3resumable import S3Upload

    saved: list[bool] = []
    for kind in (LocalUpload, S3Upload):
        def counting(self: Any, durable: bool = True, save: Any = kind.save_info) -> None:
            saved.append(durable)
            save(self, durable)
        monkeypatch.setattr(kind, "save_info", counting)
    data = payload(10)
    location = await create(client, 10)
    reply = await patch(client, location, 0, data[:4], **{"Upload-Length": "10"})
    assert reply.status_code == 204
    assert saved == [False]  # only the offset, as any PATCH: the length was known
    check_error(await patch(client, location, 4, data[4:], **{"Upload-Length": "11"}), 400, "invalid_header")
    reply = await patch(client, location, 4, data[4:], **{"Upload-Length": "10"})
    assert reply.status_code == 204
    backend.assert_stored(await record_of(client, location), data)


async def test_creation_with_the_whole_file_and_an_empty_one(client: httpx.AsyncClient, backend: Any) -> None:
    data = payload(5000)
    reply = await client.post("/files", content=data, headers={**OCTETS, "Upload-Length": "5000"})
    assert reply.status_code == 201
    assert reply.headers["upload-offset"] == "5000"
    backend.assert_stored(await record_of(client, reply.headers["location"]), data)
    location = await create(client, 0)
    backend.assert_stored(await record_of(client, location), b"")
    assert leftovers(backend) == []


@pytest.mark.parametrize(
    "headers, status, code",
    [
        pytest.param({"Upload-Length": "10"}, 412, "unsupported_version", id="no-tus-resumable"),
        pytest.param({**TUS, "Tus-Resumable": "0.2.2", "Upload-Length": "10"}, 412, "unsupported_version", id="old-version"),
        pytest.param(TUS, 400, "invalid_header", id="no-length"),
        pytest.param({**TUS, "Upload-Length": "10", "Upload-Defer-Length": "1"}, 400, "invalid_header", id="both-lengths"),
        pytest.param({**TUS, "Upload-Defer-Length": "2"}, 400, "invalid_header", id="defer-not-1"),
        pytest.param({**TUS, "Upload-Length": "-5"}, 400, "invalid_header", id="negative-length"),
        pytest.param({**TUS, "Upload-Length": "9" * 40}, 400, "invalid_header", id="absurd-length"),
        pytest.param({**TUS, "Upload-Length": "10000001"}, 413, "payload_too_large", id="over-the-file-limit"),
        pytest.param({**TUS, "Upload-Length": "10", "Upload-Metadata": "filename ***"}, 400, "invalid_header", id="bad-metadata"),
        pytest.param({**TUS, "Upload-Length": "10", "Upload-Metadata": f"sha256 {b64('abc')}"}, 400, "invalid_header", id="bad-sha256"),
        pytest.param({**TUS, "Upload-Length": "10", "Repr-Digest": "sha-256=:nope:"}, 400, "invalid_header", id="bad-repr-digest"),
        # Concatenation is not offered (tus-js-client's parallelUploads would store each half as a file).
        pytest.param({**TUS, "Upload-Length": "10", "Upload-Concat": "partial"}, 400, "concatenation_unsupported", id="partial"),
        pytest.param({**TUS, "Upload-Concat": "final;/files/a /files/b"}, 400, "concatenation_unsupported", id="final"),
    ],
)
async def test_creation_refused(
    client: httpx.AsyncClient, backend: Any, headers: dict[str, str], status: int, code: str
) -> None:
    reply = await client.post("/files", headers=headers)
    check_error(reply, status, code)
    check_tus(reply)
    if status == 412:
        assert reply.headers["tus-version"] == "1.0.0"
    backend.assert_nothing_stored()


@pytest.mark.parametrize("order", [1, -1])
async def test_a_protocol_header_on_two_lines_is_never_read_as_one_of_them(
    client: httpx.AsyncClient, backend: Any, order: int
) -> None:
    """RFC 9110 §5.3: two lines mean their values joined with ", ", a malformed value; reading the
    first (as a proxy in front may read the last) would let the two disagree on the request."""
    reply = await client.post("/files", headers=[("Tus-Resumable", "1.0.0"), *[("Upload-Length", "5"), ("Upload-Length", "7")][::order]])
    check_error(reply, 400, "invalid_header")
    reply = await client.post("/files", headers=[*[("Tus-Resumable", "1.0.0"), ("Tus-Resumable", "2.0.0")][::order], ("Upload-Length", "5")])
    check_error(reply, 412, "unsupported_version")
    location = await create(client, 10)
    offsets = [("Upload-Offset", "0"), ("Upload-Offset", "5")][::order]
    reply = await client.patch(location, content=b"abcde", headers=[*OCTETS.items(), *offsets])
    check_error(reply, 400, "invalid_header")
    complete = [("Upload-Complete", "?0"), ("Upload-Complete", "?1")][::order]
    reply = await client.post("/files", content=b"abcde", headers=[("Upload-Draft-Interop-Version", "8"), *complete])
    assert reply.status_code == 400, reply.text
    assert await offset_of(client, location) == 0
    assert (await client.delete(location, headers=TUS)).status_code == 204
    backend.assert_nothing_stored()


async def test_creation_body_of_another_type_is_415(client: httpx.AsyncClient, backend: Any) -> None:
    reply = await client.post("/files", content=b"abc", headers={**TUS, "Upload-Length": "3", "Content-Type": "text/plain"})
    check_error(reply, 415, "unsupported_media_type")
    backend.assert_nothing_stored()


async def test_patch_refused_and_nothing_moves(client: httpx.AsyncClient, backend: Any) -> None:
    location = await create(client, 100)
    assert (await patch(client, location, 0, b"0123456789")).status_code == 204
    cases = [
        ({"Content-Type": "application/octet-stream"}, 10, 415, "unsupported_media_type"),
        ({"Tus-Resumable": "2.0.0"}, 10, 412, "unsupported_version"),
        ({}, 0, 409, "offset_mismatch"),
        ({}, 11, 409, "offset_mismatch"),
        ({"Upload-Offset": "ten"}, 10, 400, "invalid_header"),
        ({"Upload-Offset": "9" * 30}, 10, 400, "invalid_header"),
        ({"Upload-Checksum": "md5 " + b64(hashlib.md5(b"x").digest())}, 10, 400, "invalid_header"),
        ({"Upload-Checksum": "sha1 " + b64(hashlib.sha1(b"other").digest())}, 10, 460, "checksum_mismatch"),
        ({"Upload-Checksum": "sha256 " + b64(hashlib.sha256(b"other").digest())}, 10, 460, "checksum_mismatch"),
        ({"Upload-Length": "50"}, 10, 400, "invalid_header"),  # the length is set already
    ]
    for headers, offset, status, code in cases:
        reply = await patch(client, location, offset, b"abcdef", **headers)
        body = check_error(reply, status, code)
        check_tus(reply)
        if code == "offset_mismatch":
            assert body["offset"] == 10
        assert await offset_of(client, location) == 10, code
    if backend.name == "local":
        assert (backend.upload_dir / ".resumable" / location.rsplit("/", 1)[1]).read_bytes() == b"0123456789"
    check_error(await patch(client, "/files/" + "f" * 32, 0, b"x"), 404, "not_found")
    check_error(await patch(client, "/files/../../etc/passwd", 0, b"x"), 404, "not_found")
    check_error(await client.head("/files/" + "f" * 32, headers=TUS), 404, "not_found")


async def test_method_override(client: httpx.AsyncClient, backend: Any) -> None:
    """tus 1.0.0 core: a POST's X-HTTP-Method-Override is its method (tus-js-client's overridePatchMethod),
    on /files and /files/<id>; only PATCH or DELETE (a GET or HEAD would answer without reading the body)."""
    location = await create(client, 6)
    reply = await client.post(location, content=b"abc", headers={**OCTETS, "Upload-Offset": "0", "X-HTTP-Method-Override": "PATCH"})
    assert reply.status_code == 204, reply.text
    check_tus(reply)
    assert reply.headers["upload-offset"] == "3" and await offset_of(client, location) == 3
    check_error(await client.post(location, headers={**TUS, "X-HTTP-Method-Override": "HEAD"}), 400, "invalid_header")
    check_error(await client.post("/files", headers={**TUS, "X-HTTP-Method-Override": "PUT"}), 400, "invalid_header")
    check_error(await client.post(location, content=b"x" * 100_000, headers={**TUS, "X-HTTP-Method-Override": "GET"}),
                400, "invalid_header")
    reply = await client.post(location, headers={**TUS, "X-HTTP-Method-Override": "DELETE"})
    assert reply.status_code == 204, reply.text
    check_error(await client.head(location, headers=TUS), 404, "not_found")
    # Elsewhere a POST stays a POST.
    check_error(await client.post("/upload", content=b"x", headers={"X-HTTP-Method-Override": "GET"}), 415, "unsupported_media_type")
    backend.assert_nothing_stored()


async def test_answers_outside_the_upload_handlers_speak_the_clients_protocol(
    client: httpx.AsyncClient, backend: Any
) -> None:
    """tus 1.0.0: Tus-Resumable "MUST be included in every request and response except for OPTIONS";
    so for a stored file's DELETE, a 405 and a refused method override too (the draft: its version)."""
    location = await create(client, 3)
    assert (await patch(client, location, 0, b"abc")).status_code == 204  # stored
    drafted = {"Upload-Draft-Interop-Version": "8"}
    for sent, expected in ((TUS, ("tus-resumable", "1.0.0")), (drafted, ("upload-draft-interop-version", "8"))):
        refused = await client.put(location, headers=sent)
        check_error(refused, 405, "method_not_allowed")
        overridden = await client.post(location, headers={**sent, "X-HTTP-Method-Override": "GET"})
        check_error(overridden, 400, "invalid_header")
        for reply in (refused, overridden):
            assert reply.headers.get(expected[0]) == expected[1], reply.headers
    reply = await client.delete(location, headers=TUS)
    assert reply.status_code == 204 and reply.headers["tus-resumable"] == "1.0.0"
    reply = await client.put("/files", headers={})
    assert reply.status_code == 405 and "tus-resumable" not in reply.headers  # a client that speaks neither


async def test_long_headers_are_refused_unread_and_never_echoed_whole(
    client: httpx.AsyncClient, backend: Any
) -> None:
    """Below the 64 KiB of header fields a request may have in all (431 past them): a structured field
    past 1 KiB is refused before its pattern runs (~200 bytes of memory a character), a refusal's
    detail quotes 40 characters of a value at most, and a draft creation keeps its Content-Type and
    filename as a record would."""
    params = ";a=1" * 4000
    reply = await client.post("/files", headers=draft("9", Upload_Complete="?0" + params))
    assert check_error(reply, 400, "invalid_header")["detail"] == "Upload-Complete must be ?1 or ?0"
    reply = await client.post("/files", headers=draft("9", Upload_Complete="?0", Upload_Length="5" + params))
    assert len(check_error(reply, 400, "invalid_header")["detail"]) < 200
    reply = await client.post("/files", headers={"Upload-Draft-Interop-Version": "9" + params, "Upload-Length": "5"})
    assert reply.status_code == 412  # not a version we speak: tus, without its Tus-Resumable
    reply = await client.post("/files", headers={"Tus-Resumable": "1.0.0" + "x" * 50_000, "Upload-Length": "5"})
    assert len(check_error(reply, 412, "unsupported_version")["detail"]) < 200
    reply = await client.patch("/files/" + "0" * 32, headers={**TUS, "Content-Type": "text/plain;" + "x" * 50_000})
    assert len(check_error(reply, 415, "unsupported_media_type")["detail"]) < 200
    long_type = "image/png; name=" + "x" * 25_000
    reply = await client.post("/files", content=b"ab", headers=draft(
        "9", Upload_Complete="?0", Content_Type=long_type,
        Content_Disposition=f'attachment; filename="{"n" * 25_000}.png"'))
    assert reply.status_code == 201, reply.text
    reply = await client.patch(reply.headers["location"], content=b"c", headers=draft(
        "9", Content_Type="application/partial-upload", Upload_Offset="2", Upload_Complete="?1"))
    assert reply.status_code == 200, reply.text
    record = reply.json()
    assert record["content_type"] == "image/png" and record["filename"] == "n" * 251 + ".png"  # 255 bytes, extension kept
    for path in ("/files", "/upload", "/health"):
        reply = await client.post(path, headers={**TUS, "Upload-Length": "5", "X-Big": "y" * 65_536})
        assert len(check_error(reply, 431, "request_header_fields_too_large")["detail"]) < 200
    long_id = "i" * 60_000  # uvicorn and granian pass a path of 60 KB on: not echoed whole
    reply = await patch(client, "/files/" + long_id, 0, b"x")
    assert len(check_error(reply, 404, "not_found")["detail"]) < 300
    assert len(check_error(await client.get("/" + long_id), 404, "not_found")["detail"]) < 300


async def test_creations_nobody_pays_for_do_not_push_out_a_big_upload_s_hash_state(
    app: upload_asgi.UploadApp, client: httpx.AsyncClient, backend: Any
) -> None:
    """Each worker keeps the SHA-256 states of the uploads it wrote (1024 by default, 8 here): past
    that, the one cheapest to re-read goes. Empty creations (no token needed) once pushed out the
    state of an upload in progress, whose next PATCH then re-read everything so far."""
    app.resumable.store.digests = DigestCache(8)
    data = payload(3_000_000)
    location = await create(client, len(data))
    assert (await patch(client, location, 0, data[:2_000_000])).status_code == 204
    for _ in range(20):
        small = await create(client, 10)
        assert (await patch(client, small, 0, b"x")).status_code == 204
    assert (await patch(client, location, 2_000_000, data[2_000_000:])).status_code == 204
    assert metric((await client.get("/metrics")).text, "upload_asgi_resumable_rehashed_bytes_total") == 0
    assert (await record_of(client, location))["sha256"] == sha(data)


async def test_checksummed_chunks(client: httpx.AsyncClient, backend: Any) -> None:
    data = payload(3_000_000)
    location = await create(client, len(data))
    first, rest = data[:1_500_000], data[1_500_000:]
    reply = await patch(client, location, 0, first, **{"Upload-Checksum": "sha1 " + b64(hashlib.sha1(first).digest())})
    assert reply.status_code == 204
    corrupt = rest[:-1] + b"\0"
    reply = await patch(client, location, len(first), corrupt, **{"Upload-Checksum": "sha256 " + b64(hashlib.sha256(rest).digest())})
    check_error(reply, 460, "checksum_mismatch")
    assert await offset_of(client, location) == len(first)  # the chunk was discarded
    reply = await patch(client, location, len(first), rest, **{"Upload-Checksum": "sha256 " + b64(hashlib.sha256(rest).digest())})
    assert reply.status_code == 204
    backend.assert_stored(await record_of(client, location), data)


async def test_patch_past_the_length_stores_nothing_of_it(client: httpx.AsyncClient, backend: Any) -> None:
    location = await create(client, 10)
    assert (await patch(client, location, 0, b"01234")).status_code == 204
    check_error(await patch(client, location, 5, b"5678901"), 413, "payload_too_large")  # Content-Length says so

    async def chunks():  # no Content-Length: found while streaming
        yield b"567"
        yield b"8901"

    reply = await client.patch(location, content=chunks(), headers={**OCTETS, "Upload-Offset": "5"})
    check_error(reply, 413, "payload_too_large")
    assert await offset_of(client, location) == 5
    if backend.name == "local":
        assert (backend.upload_dir / ".resumable" / location.rsplit("/", 1)[1]).read_bytes() == b"01234"
    assert (await patch(client, location, 5, b"56789")).status_code == 204
    backend.assert_stored(await record_of(client, location), b"0123456789")


@pytest.mark.parametrize("refused", ["past-the-length", "checksum"])
async def test_a_refused_patch_whose_length_completes_the_upload_stores_it(
    client: httpx.AsyncClient, backend: Any, refused: str, caplog: pytest.LogCaptureFixture
) -> None:
    """tus keeps a refused PATCH's Upload-Length (as tusd). When that length is the offset, the
    upload has every byte: it is stored then, not left until a HEAD comes (or the expiry sweep)."""
    location = await create(client, None)
    assert (await patch(client, location, 0, b"abc")).status_code == 204
    if refused == "past-the-length":
        check_error(await patch(client, location, 3, b"de", **{"Upload-Length": "3"}), 413, "payload_too_large")
    else:
        wrong = f"sha1 {b64(hashlib.sha1(b'other').digest())}"
        reply = await patch(client, location, 3, b"", **{"Upload-Length": "3", "Upload-Checksum": wrong})
        check_error(reply, 460, "checksum_mismatch")
    record = await record_of(client, location)
    backend.assert_stored(record, b"abc")  # no HEAD in between
    assert (await client.get(location)).content == b"abc"
    assert f"upload stored: id={record['id']} size=3" in caplog.text  # logged as stored, then as refused


async def test_deferred_length_stops_at_the_file_limit(client: httpx.AsyncClient, backend: Any) -> None:
    location = await create(client, None)
    check_error(await patch(client, location, 0, b"x" * 10_000_001), 413, "payload_too_large")
    assert await offset_of(client, location) == 0


@pytest.mark.parametrize("how", ["metadata", "repr-digest"])
async def test_declared_digest_checked_before_commit(client: httpx.AsyncClient, backend: Any, how: str) -> None:
    data = payload(70_000)
    declared = hashlib.sha256(b"something else").digest()
    headers = {"Repr-Digest": f"sha-256=:{b64(declared)}:"} if how == "repr-digest" else {}
    metadata = f"sha256 {b64(declared.hex())}" if how == "metadata" else None
    location = await create(client, len(data), metadata, **headers)
    assert (await patch(client, location, 0, data[:1000])).status_code == 204
    body = check_error(await patch(client, location, 1000, data[1000:]), 460, "sha256_mismatch")
    assert body["sha256"] == sha(data)
    backend.assert_nothing_stored()
    check_error(await client.head(location, headers=TUS), 404, "not_found")
    # And the right digest stores it.
    good = {"Repr-Digest": f"sha-256=:{b64(hashlib.sha256(data).digest())}:"} if how == "repr-digest" else {}
    location = await create(client, len(data), f"sha256 {b64(sha(data).upper())}" if how == "metadata" else None, **good)
    assert (await patch(client, location, 0, data)).status_code == 204
    backend.assert_stored(await record_of(client, location), data)


def finishing_dies_once(app: upload_asgi.UploadApp, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first upload to finish fails there (a crash, the store failing), after every byte was kept."""
    real_finish = type(app.resumable).finish
    cut_short = []

    async def dies_once(self: Any, *args: Any) -> None:
        if not cut_short:
            cut_short.append(True)
            raise ConnectionResetError("the store went away while finishing")
        await real_finish(self, *args)

    monkeypatch.setattr(type(app.resumable), "finish", dies_once)


async def test_a_head_finishes_an_upload_whose_finishing_was_cut_short(
    app: upload_asgi.UploadApp, client: httpx.AsyncClient, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every byte kept, the file not stored (the request died while finishing): a client that HEADs,
    sees every byte there and stops must find its file, not leave the upload to expire."""
    data = payload(3000, seed=16)
    finishing_dies_once(app, monkeypatch)
    location = await create(client, len(data), "filename ZC5iaW4=")
    assert (await patch(client, location, 0, data)).status_code >= 500
    assert (await client.get(location)).status_code == 409  # no file yet: an upload under way
    reply = await client.head(location, headers=TUS)
    assert reply.status_code == 200 and reply.headers["upload-offset"] == reply.headers["upload-length"] == "3000"
    record = await record_of(client, location)
    assert record["sha256"] == sha(data) and record["filename"] == "d.bin"
    backend.assert_stored(record, data)
    assert leftovers(backend) == []


async def test_a_head_of_a_complete_upload_held_by_a_dead_request_is_423_not_all_there(
    app: upload_asgi.UploadApp, client: httpx.AsyncClient, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On S3 the lease of a request that died with the store down outlives it: a HEAD cannot store
    the file then, and must not say every byte is there (the client would stop, the upload expire).
    The draft's version 8 HEAD says Upload-Complete ?0: its client completes it with an empty ?1
    append (version 6 completes an upload at its length, as tus: 423 as tus)."""
    from upload_service import resumable

    data = payload(3000, seed=18)
    finishing_dies_once(app, monkeypatch)
    location = await create(client, len(data))
    assert (await patch(client, location, 0, data)).status_code >= 500
    store = app.resumable.store
    real_acquire = store.acquire

    def held(upload_id: str) -> Any:
        raise UploadBusy(upload_id)

    monkeypatch.setattr(resumable, "FINISH_WAIT_SECONDS", 0.2)
    monkeypatch.setattr(store, "acquire", held)
    for dialect in (TUS, {"Upload-Draft-Interop-Version": "6"}):
        check_error(await client.head(location, headers=dialect), 423, "")
    reply = await client.head(location, headers={"Upload-Draft-Interop-Version": "8"})
    assert (reply.status_code, reply.headers["upload-complete"], reply.headers["upload-offset"]) == (204, "?0", "3000")
    monkeypatch.setattr(store, "acquire", real_acquire)  # the lease released
    reply = await client.head(location, headers=TUS)
    assert reply.status_code == 200 and reply.headers["upload-offset"] == "3000"
    backend.assert_stored(await record_of(client, location), data)
    assert leftovers(backend) == []


async def test_an_upload_being_finished_is_never_a_404(
    client: httpx.AsyncClient, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Locally the data file is moved into the upload dir before its record is written: a HEAD, GET,
    PATCH or DELETE meanwhile waits for the finish (a tus client takes a 404 as gone and starts over)."""
    if backend.name != "local":
        pytest.skip("the local store's finish")
    from upload_service import localresumable

    real_write_sidecar = localresumable.write_sidecar

    def slow_write_sidecar(*args: Any) -> None:
        time.sleep(0.3)
        real_write_sidecar(*args)

    monkeypatch.setattr(localresumable, "write_sidecar", slow_write_sidecar)
    data = payload(6000, seed=17)
    location = await create(client, len(data))
    assert (await patch(client, location, 0, data[:1000])).status_code == 204
    finishing = asyncio.create_task(patch(client, location, 1000, data[1000:]))
    staged = backend.upload_dir / ".resumable" / location.rsplit("/", 1)[1]
    while staged.exists():
        await asyncio.sleep(0.005)
    head, get, again, delete = await asyncio.gather(
        client.head(location, headers=TUS), client.get(location), patch(client, location, 1000, data[1000:]),
        client.delete(location, headers={**TUS, "If-Match": '"no such tag"'}),
    )
    assert (await finishing).status_code == 204
    assert head.status_code == 200 and head.headers["upload-offset"] == "6000"
    assert get.status_code == 200 and get.content == data
    check_error(again, 409, "upload_complete")
    assert again.headers["upload-offset"] == "6000"
    assert delete.status_code == 412  # it found the stored file
    at_end = await patch(client, location, 6000, b"")  # nothing to append, at the end: where it stands
    assert at_end.status_code == 204 and at_end.headers["upload-offset"] == "6000"
    check_tus(at_end)
    backend.assert_stored(await record_of(client, location), data)


async def start_silent_patch(client: httpx.AsyncClient, location: str, data: bytes, sent: int, **headers: str) -> asyncio.Task:
    """A PATCH of all of `data` whose client loses its connection unseen once the app has read
    `sent` bytes: nothing more comes, and the server cannot tell."""
    read = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield data[:sent]
        read.set()  # the app asked for more: it has the first `sent` bytes
        await asyncio.Event().wait()

    headers = {**OCTETS, "Upload-Offset": "0", "Content-Length": str(len(data)), **headers}
    task = asyncio.create_task(client.patch(location, content=body(), headers=headers))
    await asyncio.wait_for(read.wait(), 20)
    return task


async def resume(client: httpx.AsyncClient, location: str, data: bytes) -> httpx.Response:
    """What a tus client does after a dropped connection: HEAD, PATCH the rest; once more on 409
    (on S3 the bytes the old request held are kept only when it stops)."""
    for _ in range(2):
        offset = await offset_of(client, location)
        reply = await patch(client, location, offset, data[offset:])
        if reply.status_code != 409:
            break
    return reply


@pytest.mark.parametrize("through", ["same app", "another app"])
async def test_a_patch_takes_over_from_a_writer_gone_silent(
    app: upload_asgi.UploadApp, config: upload_asgi.Config, backend: Any, through: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client whose connection died unseen resumes at the offset HEAD gives: its PATCH asks the
    request still holding the upload to stop, which keeps what it got (as tusd does), instead of a
    423 until the idle timeout. Another app on the same upload dir is another worker (a stop file);
    on S3 another worker or server (a stop object naming the holder's lease)."""
    from upload_service import takeover

    monkeypatch.setattr(takeover, "TAKEOVER_WAIT_SECONDS", 2.0)
    data = payload(3 * MiB, seed=21)
    sent = MiB + 5
    other = app if through == "same app" else upload_asgi.create_app(config)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as first, \
            httpx.AsyncClient(transport=httpx.ASGITransport(app=other), base_url="http://t") as second:
        location = await create(first, len(data))
        silent = await start_silent_patch(first, location, data, sent)
        reply = await resume(second, location, data)
        assert reply.status_code == 204, reply.text
        check_error(await silent, 400, "upload_interrupted")
        backend.assert_stored(await record_of(second, location), data)
        assert leftovers(backend) == []  # the stop file or object too
    if other is not app:
        await close_app(other)


async def test_a_chunk_with_a_checksum_taken_over_is_dropped_and_says_so(client: httpx.AsyncClient, backend: Any) -> None:
    """tus: a chunk whose checksum cannot be checked MUST be discarded; the request that sent it is
    told so, not that what it sent is kept."""
    data = payload(2 * MiB, seed=24)
    location = await create(client, len(data))
    checksum = {"Upload-Checksum": "sha1 " + b64(hashlib.sha1(data).digest())}
    silent = await start_silent_patch(client, location, data, MiB, **checksum)
    assert await offset_of(client, location) == 0
    reply = await resume(client, location, data)
    assert reply.status_code == 204, reply.text
    detail = check_error(await silent, 400, "upload_interrupted")["detail"]
    assert "dropped" in detail and "kept" not in detail, detail
    backend.assert_stored(await record_of(client, location), data)


async def test_a_head_while_a_patch_writes_never_says_the_upload_expired(
    app: upload_asgi.UploadApp, client: httpx.AsyncClient, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its expiry passed while a PATCH is still writing it (a long body): the upload lives on, its
    request renews it at its end; HEAD says so, not an Upload-Expires already past."""
    data = payload(2 * MiB, seed=25)
    location = await create(client, len(data))
    silent = await start_silent_patch(client, location, data, MiB)
    store, real_peek = app.resumable.store, app.resumable.store.peek

    def expired(upload_id: str) -> Any:
        info = real_peek(upload_id)
        if info is not None:
            info.expires = time.time() - 1  # the PATCH began longer ago than the expiry
        return info

    monkeypatch.setattr(store, "peek", expired)
    asked = time.time()
    reply = await client.head(location, headers=TUS)
    assert reply.status_code == 200, reply.text
    assert expires_of(reply) >= int(asked + app.config.resumable_expiry) - 1  # an HTTP-date: to the second
    monkeypatch.undo()
    assert (await resume(client, location, data)).status_code == 204
    check_error(await silent, 400, "upload_interrupted")
    backend.assert_stored(await record_of(client, location), data)


async def test_a_plain_head_of_an_upload_under_way_answers_as_get(client: httpx.AsyncClient, backend: Any) -> None:
    """HEAD is GET without the body (RFC 9110 §9.3.2): one that speaks neither protocol (curl -I, a
    link checker) is told 409 as GET is, not an empty file's 200; a tus client where it stands."""
    location = await create(client, 10)
    assert (await patch(client, location, 0, b"01234")).status_code == 204
    get, head = await client.get(location), await client.head(location)
    check_error(get, 409, "upload_incomplete")
    assert head.status_code == 409 and head.content == b""
    assert {**head.headers, "date": ""} == {**get.headers, "date": ""}
    reply = await client.head(location, headers=TUS)
    assert reply.status_code == 200 and reply.headers["upload-offset"] == "5"


async def test_a_termination_takes_over_from_a_writer_gone_silent(client: httpx.AsyncClient, backend: Any) -> None:
    data = payload(2 * MiB, seed=22)
    location = await create(client, len(data))
    silent = await start_silent_patch(client, location, data, MiB)
    assert (await client.delete(location, headers=TUS)).status_code == 204
    check_error(await silent, 400, "upload_interrupted")
    assert (await client.head(location, headers=TUS)).status_code == 404
    assert leftovers(backend) == []
    backend.assert_nothing_stored()


async def test_uploads_hashed_again_never_hold_back_other_requests(
    client: httpx.AsyncClient, config: upload_asgi.Config, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upload written by another worker (or before a restart) is hashed again from what is stored
    (locally at its next PATCH, on S3 when it completes). Those re-reads run on threads of their own:
    with more at once than the default executor has threads, downloads and form uploads still answer."""
    count = min(32, (os.cpu_count() or 1) + 4) + 2
    locations = [await create(client, 4) for _ in range(count)]
    for location in locations:
        assert (await patch(client, location, 0, b"ab")).status_code == 204
    kept = (await client.post("/upload", content=form_body([file_part(b"kept", "k.txt")]),
                              headers={"Content-Type": form_content_type()})).json()
    release = threading.Event()
    ensure_hash = ResumableUpload._ensure_hash

    def slow_rehash(self: ResumableUpload) -> None:
        if self.hash_unknown:
            release.wait(30)
        ensure_hash(self)

    monkeypatch.setattr(ResumableUpload, "_ensure_hash", slow_rehash)
    restarted = upload_asgi.create_app(config)  # knows none of the uploads' hashes
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=restarted), base_url="http://t") as after:
        patches = [asyncio.create_task(patch(after, location, 2, b"cd")) for location in locations]
        try:
            await asyncio.sleep(0.3)  # every PATCH is waiting for its re-read
            download, stored = await asyncio.wait_for(asyncio.gather(
                after.get(f"/files/{kept['id']}"),
                after.post("/upload", content=form_body([file_part(b"new", "n.txt")]),
                           headers={"Content-Type": form_content_type()}),
            ), 10)
        finally:
            release.set()
        assert (download.status_code, download.content, stored.status_code) == (200, b"kept", 201)
        for reply in await asyncio.gather(*patches):
            assert reply.status_code == 204, reply.text
        for location in locations:
            backend.assert_stored(await record_of(after, location), b"abcd")
    await close_app(restarted)


async def test_a_head_without_the_write_token_does_not_finish_a_cut_short_upload(
    config: upload_asgi.Config, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Finishing is a write: a reader's HEAD (no token, with UPLOAD_TOKEN set) says where the
    upload stands and stores nothing; the writer's HEAD then stores the file."""
    app = upload_asgi.create_app(replace(config, token="s3cret"))
    auth = {"Authorization": "Bearer s3cret"}
    data = payload(3000, seed=17)
    finishing_dies_once(app, monkeypatch)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        location = await create(client, len(data), **auth)
        assert (await patch(client, location, 0, data, **auth)).status_code >= 500
        reply = await client.head(location, headers=TUS)
        assert reply.status_code == 200 and reply.headers["upload-offset"] == reply.headers["upload-length"] == "3000"
        assert (await client.get(location)).status_code == 409  # still no file: an upload under way
        assert (await client.get(f"{location}/record")).status_code == 404
        assert (await client.head(location, headers={**TUS, **auth})).status_code == 200
        backend.assert_stored(await record_of(client, location), data)
        assert leftovers(backend) == []
    await close_app(app)


async def test_termination(client: httpx.AsyncClient, backend: Any) -> None:
    location = await create(client, 100)
    assert (await patch(client, location, 0, b"abc")).status_code == 204
    reply = await client.delete(location)
    check_error(reply, 412, "unsupported_version")
    reply = await client.delete(location, headers=TUS)
    assert reply.status_code == 204
    check_tus(reply)
    check_error(await client.head(location, headers=TUS), 404, "not_found")
    check_error(await patch(client, location, 3, b"d"), 404, "not_found")
    check_error(await client.delete(location, headers=TUS), 404, "not_found")
    backend.assert_nothing_stored()
    # A finished upload is a stored file: deleted like one (no tus header needed).
    location = await create(client, 3)
    assert (await patch(client, location, 0, b"abc")).status_code == 204
    assert (await client.delete(location)).status_code == 204
    check_error(await client.get(location), 404, "not_found")
    backend.assert_nothing_stored()


@pytest.mark.parametrize(
    "conditions, status",
    [
        pytest.param({"If-Match": "*"}, 204, id="if-match-any"),
        pytest.param({"If-Match": '"abc"'}, 412, id="if-match-a-tag"),  # an upload under way has none yet
        pytest.param({"If-None-Match": "*"}, 412, id="if-none-match-any"),
        pytest.param({"If-None-Match": '"abc"'}, 204, id="if-none-match-a-tag"),
        pytest.param({"If-Unmodified-Since": "Sat, 01 Jan 2000 00:00:00 GMT"}, 204, id="if-unmodified-since"),
    ],
)
async def test_termination_with_preconditions(
    client: httpx.AsyncClient, backend: Any, conditions: dict[str, str], status: int
) -> None:
    location = await create(client, 100)
    assert (await patch(client, location, 0, b"abc")).status_code == 204
    reply = await client.delete(location, headers={**TUS, **conditions})
    if status == 412:
        check_error(reply, 412, "precondition_failed")
        assert (await client.head(location, headers=TUS)).headers["upload-offset"] == "3"
        assert (await client.delete(location, headers=TUS)).status_code == 204
    else:
        assert reply.status_code == 204
    check_error(await client.head(location, headers=TUS), 404, "not_found")
    backend.assert_nothing_stored()


async def test_expiry(backend: Any) -> None:
    expiry = 0.5 if backend.name == "local" else 2.0  # S3 calls on a busy machine take a while
    config = backend.config(fsync=False, resumable_expiry=expiry)
    app = upload_asgi.create_app(config)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        touched = await create(client, 100)
        untouched = await create(client, 100)
        fetched = await create(client, 100)
        assert (await patch(client, touched, 0, b"abc")).status_code == 204
        await asyncio.sleep(expiry + 0.1)
        check_error(await client.head(touched, headers=TUS), 410, "upload_expired")
        check_error(await client.head(touched, headers=TUS), 404, "not_found")
        check_error(await patch(client, untouched, 0, b"abc"), 410, "upload_expired")
        check_error(await client.get(fetched), 410, "upload_expired")  # as HEAD says, not 409 incomplete
        check_error(await client.get(fetched), 404, "not_found")
    await close_app(app)
    backend.assert_nothing_stored()
    # A sweep (at startup, then every minute when /files is used) removes what nobody touches.
    app = upload_asgi.create_app(config)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        await create(client, 100)
        await asyncio.sleep(expiry + 0.1)
        assert await asyncio.to_thread(app.resumable.sweep) == 1  # on the loop, S3's would only start one
    await close_app(app)
    backend.assert_nothing_stored()


async def test_a_reader_without_its_token_cannot_expire_an_upload(backend: Any) -> None:
    """With UPLOAD_READ_TOKEN the token is asked before the id is looked at: 401, and the expired
    upload stays for its writer to be told 410."""
    config = backend.config(fsync=False, resumable_expiry=0.5, token="w", read_token="r")
    app = upload_asgi.create_app(config)
    writer = {**TUS, "Authorization": "Bearer w"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        location = await create(client, 100, **writer)
        await asyncio.sleep(0.6)
        check_error(await client.head(location, headers=TUS), 401, "")
        check_error(await client.head(location, headers=writer), 410, "")
    await close_app(app)


@pytest.mark.parametrize("dialect", [TUS, {"Upload-Draft-Interop-Version": "6"}])
async def test_with_a_read_token_alone_an_uploader_may_still_ask_where_its_upload_stands(
    backend: Any, dialect: dict[str, str]
) -> None:
    """UPLOAD_READ_TOKEN without UPLOAD_TOKEN: uploads are open, and so is the HEAD a client resumes
    with (tus-js-client took a 401 there as the upload gone, and sent the whole file again). A
    stored file is still a reader's: 401 without the read token."""
    app = upload_asgi.create_app(backend.config(fsync=False, read_token="r"))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        location = await create(client, 10)
        assert (await client.patch(location, content=b"01234",
                                   headers={**OCTETS, "Upload-Offset": "0"})).status_code == 204
        reply = await client.head(location, headers=dialect)
        assert reply.status_code in (200, 204) and reply.headers["upload-offset"] == "5", reply.headers
        check_error(await client.head(location), 401, "")  # a plain HEAD: a read
        check_error(await client.get(location), 401, "unauthorized")
        assert (await client.patch(location, content=b"56789",
                                   headers={**OCTETS, "Upload-Offset": "5"})).status_code == 204
        check_error(await client.head(location, headers=dialect), 401, "")  # a stored file
        reply = await client.head(location, headers={**dialect, "Authorization": "Bearer r"})
        assert reply.status_code == 200 and reply.headers["upload-offset"] == "10"
    await close_app(app)


def trickling(pieces: list[bytes], pause: float, then: str) -> Any:
    """An ASGI receive: `pieces` a `pause` apart, then the body's end ("end"), the client
    leaving ("disconnect"), or silence ("silence": the idle timeout answers)."""
    events = iter(pieces)
    ended = False

    async def receive() -> dict[str, Any]:
        nonlocal ended
        piece = next(events, None)
        if piece is not None:
            await asyncio.sleep(pause)
            return {"type": "http.request", "body": piece, "more_body": True}
        if then == "silence":
            await asyncio.Event().wait()
        if then == "end" and not ended:
            ended = True
            return {"type": "http.request", "body": b"", "more_body": False}
        return {"type": "http.disconnect"}

    return receive


async def answer_of(app: upload_asgi.UploadApp, scope: dict[str, Any], receive: Any) -> tuple[Reply, asyncio.Task[None]]:
    """Start one request; return once it answered or ended (a 408 drains the body for 2 s more)."""
    reply = Reply()
    request = asyncio.create_task(app(scope, receive, reply.record))
    while reply.status is None and not request.done():
        await asyncio.sleep(0.01)
    return reply, request


def expires_of(reply: Any) -> float:
    """Upload-Expires as POSIX seconds (an HTTP-date: to the second, rounded down)."""
    return parsedate_to_datetime(reply.headers["upload-expires"]).timestamp()


@pytest.mark.parametrize("how", ["creation-with-upload", "client-leaves", "idle-timeout"])
async def test_a_request_that_keeps_bytes_renews_the_expiry(backend: Any, how: str) -> None:
    """A body that takes longer than UPLOAD_RESUMABLE_EXPIRY, then ends, is cut off by its client or
    answered 408, keeps its bytes: the upload lives UPLOAD_RESUMABLE_EXPIRY from then, not from before."""
    expiry = 1.0 if backend.name == "local" else 2.0  # S3 calls on a busy machine take a while
    config = backend.config(fsync=False, resumable_expiry=expiry, idle_timeout=expiry / 2, min_rate=0)
    app = upload_asgi.create_app(config)
    data = payload(10_000, seed=18)
    pieces = [data[i : i + 100] for i in range(0, 600, 100)]  # 600 bytes over 1.5 x the expiry
    renewed = time.time() + 1.5 * expiry + expiry - 1  # at the earliest, once the last piece is in
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        if how == "creation-with-upload":
            headers = {**OCTETS, "Upload-Length": str(len(data)), "Content-Length": "600"}
            sent, request = await answer_of(app, http_scope("/files", "POST", headers.items()), trickling(pieces, expiry / 4, "end"))
            assert sent.status == 201, sent.body
            assert expires_of(sent) >= renewed
            location = sent.headers["location"]
        else:
            location = await create(client, len(data))
            headers = {**OCTETS, "Upload-Offset": "0", "Content-Length": str(len(data))}
            then = "disconnect" if how == "client-leaves" else "silence"
            sent, request = await answer_of(app, http_scope(location, "PATCH", headers.items()), trickling(pieces, expiry / 4, then))
            assert sent.status == (None if how == "client-leaves" else 408)
        reply = await client.head(location, headers=TUS)
        assert reply.status_code == 200, reply.text
        assert reply.headers["upload-offset"] == "600"
        assert expires_of(reply) >= renewed
        assert (await patch(client, location, 600, data[600:])).status_code == 204
        backend.assert_stored(await record_of(client, location), data)
    await request
    await close_app(app)


async def test_a_head_decides_expiry_on_the_info_read_under_the_lock(
    app: upload_asgi.UploadApp, client: httpx.AsyncClient, backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HEAD's first read says expired, but a PATCH renewed the upload and let go before HEAD took the
    lock: the info read under the lock decides, and the upload stays."""
    location = await create(client, 10)
    assert (await patch(client, location, 0, b"abc")).status_code == 204
    store = app.resumable.store
    real_peek = store.peek
    stale = []

    def read_before_a_renewal(upload_id: str) -> Any:
        info = real_peek(upload_id)
        if info is not None and not stale:
            stale.append(True)
            info.expires = time.time() - 1  # as it was before the PATCH renewed it
        return info

    monkeypatch.setattr(store, "peek", read_before_a_renewal)
    reply = await client.head(location, headers=TUS)
    assert reply.status_code == 200, reply.text
    assert reply.headers["upload-offset"] == "3" and expires_of(reply) > time.time()
    assert (await patch(client, location, 3, b"defghij")).status_code == 204
    backend.assert_stored(await record_of(client, location), b"abcdefghij")


async def test_token_guards_writes_not_reads(upload_dir: Path) -> None:
    app = upload_asgi.create_app(upload_asgi.Config(upload_dir=upload_dir, fsync=False, token="s3cret"))
    auth = {"Authorization": "Bearer s3cret"}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        reply = await client.post("/files", headers={**TUS, "Upload-Length": "3"})
        check_error(reply, 401, "unauthorized")
        assert reply.headers["www-authenticate"].startswith("Bearer")
        location = await create(client, 3, **auth)
        check_error(await patch(client, location, 0, b"abc"), 401, "unauthorized")
        check_error(await client.delete(location, headers=TUS), 401, "unauthorized")
        assert (await client.head(location, headers=TUS)).status_code == 200
        assert (await client.options("/files")).status_code == 204
        assert (await patch(client, location, 0, b"abc", **auth)).status_code == 204
    assert stored_ids(upload_dir) == [location.rsplit("/", 1)[1]]


async def test_hooks_and_cors(upload_dir: Path) -> None:
    """before_upload may refuse a creation or a PATCH; on_upload gets the finished upload's
    record and the scope; a browser on an allowed origin can read the tus headers."""
    seen: list[tuple[str, str]] = []

    def before_upload(scope: dict[str, Any], headers: dict[str, str]) -> None:
        if headers.get("x-user") != "ada":
            raise upload_asgi.UploadRefused(403, "only ada uploads here", code="forbidden")

    def on_upload(record: dict[str, Any], scope: dict[str, Any]) -> None:
        seen.append((record["id"], scope["method"]))

    config = upload_asgi.Config(upload_dir=upload_dir, fsync=False, cors_origins=("https://app.example",))
    app = upload_asgi.create_app(config, on_upload=on_upload, before_upload=before_upload)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        reply = await client.post("/files", headers={**TUS, "Upload-Length": "3"})
        check_error(reply, 403, "forbidden")
        check_tus(reply)
        location = await create(client, 3, **{"X-User": "ada"})
        check_error(await patch(client, location, 0, b"abc"), 403, "forbidden")
        assert await offset_of(client, location) == 0
        reply = await patch(client, location, 0, b"abc", **{"X-User": "ada", "Origin": "https://app.example"})
        assert reply.status_code == 204
        assert reply.headers["access-control-allow-origin"] == "https://app.example"
        assert "Upload-Offset" in reply.headers["access-control-expose-headers"]
    assert seen == [(location.rsplit("/", 1)[1], "PATCH")]


async def test_other_methods_are_405(client: httpx.AsyncClient) -> None:
    reply = await client.put("/files")
    check_error(reply, 405, "method_not_allowed")
    assert reply.headers["allow"] == "GET, HEAD, OPTIONS, POST"
    reply = await client.post("/files/" + "0" * 32)
    check_error(reply, 405, "method_not_allowed")


# -- the IETF draft, in process -----------------------------------------------------------


def draft(version: str, **headers: str) -> dict[str, str]:
    return {"Upload-Draft-Interop-Version": version, **{k.replace("_", "-"): v for k, v in headers.items()}}


def check_problem(reply: httpx.Response, status: int, kind: str, version: str) -> dict[str, Any]:
    assert reply.status_code == status, reply.text
    assert reply.headers["content-type"] == "application/problem+json"
    assert reply.headers["upload-draft-interop-version"] == version
    assert int(reply.headers["content-length"]) == len(reply.content)
    body = reply.json()
    assert body["type"] == "https://iana.org/assignments/http-problem-types#" + kind
    assert body["title"]
    return body


@pytest.mark.parametrize("version", ["6", "7", "8", "9"])
async def test_draft_upload_in_pieces(client: httpx.AsyncClient, backend: Any, version: str) -> None:
    data = payload(1_234_567)
    reply = await client.post(
        "/files", content=data[:1000],
        headers=draft(version, Upload_Complete="?0", Content_Type="text/csv",
                      Content_Disposition='attachment; filename="rows.csv"', Upload_Length=str(len(data))),
    )
    assert reply.status_code == 201, reply.text
    assert reply.headers["upload-draft-interop-version"] == version
    assert "tus-resumable" not in reply.headers
    assert reply.headers["upload-complete"] == "?0"
    assert reply.headers["upload-offset"] == "1000"
    assert reply.headers["upload-limit"].startswith("max-size=10000000")
    location = reply.headers["location"]
    reply = await client.head(location, headers=draft(version))
    assert reply.status_code == 204
    assert reply.headers["upload-offset"] == "1000"
    assert reply.headers["upload-complete"] == "?0"
    assert reply.headers["upload-length"] == str(len(data))
    assert reply.headers["cache-control"] == "no-store"
    append = draft(version, Content_Type="application/partial-upload", Upload_Complete="?0")
    reply = await client.patch(location, content=data[1000:5000], headers={**append, "Upload-Offset": "1000"})
    assert reply.status_code == 204
    assert reply.headers["upload-offset"] == "5000"
    body = check_problem(
        await client.patch(location, content=b"x", headers={**append, "Upload-Offset": "4000"}),
        409, "mismatching-upload-offset", version,
    )
    assert body["expected-offset"] == 5000 and body["provided-offset"] == 4000
    reply = await client.patch(location, content=b"x", headers={**append, "Upload-Offset": "5000", "Content-Type": "application/offset+octet-stream"})
    check_error(reply, 415, "unsupported_media_type")
    # Drafts -06 to -08 (7): "any response, successful or not" to a request that did not complete
    # the upload says ?0; -12 on (9): a refusal is the protocol's answer, ?0.
    assert reply.headers.get("upload-complete") == ("?0" if version in ("7", "9") else None)
    complete = {**append, "Upload-Complete": "?1", "Upload-Offset": "5000"}
    check_problem(await client.patch(location, content=data[5000:-1], headers=complete), 400, "inconsistent-upload-length", version)
    assert int((await client.head(location, headers=draft(version))).headers["upload-offset"]) == 5000
    reply = await client.patch(location, content=data[5000:], headers=complete)
    assert reply.status_code == 200, reply.text
    assert reply.headers["upload-complete"] == "?1"
    record = reply.json()
    assert record["filename"] == "rows.csv" and record["content_type"] == "text/csv"
    backend.assert_stored(record, data)
    # Complete: since interop 8, bytes appended are an inconsistent length, an empty append 410 (8)
    # or the final answer again (9); in 6 and 7 (drafts -04 to -08) any append but that (6) is
    # 400 completed-upload.
    at_end = {**complete, "Upload-Offset": str(len(data))}
    if version in ("6", "7"):
        check_problem(await client.patch(location, content=b"x", headers=at_end), 400, "completed-upload", version)
    else:
        check_problem(await client.patch(location, content=b"x", headers=at_end), 400, "inconsistent-upload-length", version)
    if version == "7":
        check_problem(await client.patch(location, content=b"", headers=at_end), 400, "completed-upload", version)
    elif version == "8":
        check_problem(await client.patch(location, content=b"", headers=at_end), 410, "completed-upload", version)
    else:
        again = await client.patch(location, content=b"", headers=at_end)
        assert (again.status_code, again.json(), again.headers["upload-complete"]) == (200, record, "?1")
    backend.assert_stored(record, data)
    reply = await client.head(location, headers=draft(version))  # now a stored file: its download headers
    assert reply.status_code == 200 and reply.headers["upload-complete"] == "?1"
    assert limits(reply) == {"max-size": 10_000_000}
    assert reply.headers["upload-offset"] == str(len(data)) and reply.headers["etag"] == f'"{sha(data)}"'


async def test_interop_3_as_apples_urlsession_speaks_it(client: httpx.AsyncClient, backend: Any) -> None:
    """Draft -01 (interop 3; URLSession since iOS 17 and macOS 14): `Upload-Incomplete`, the
    inverse of Upload-Complete, and a PATCH without it is the last (as tusd takes it)."""
    data = payload(200_000)
    reply = await client.post("/files", content=data, headers=draft("3", Upload_Incomplete="?0"))
    assert reply.status_code == 201, reply.text
    assert reply.headers["upload-draft-interop-version"] == "3"
    assert reply.headers["upload-incomplete"] == "?0" and "upload-complete" not in reply.headers
    backend.assert_stored(reply.json(), data)
    # Cut after its first bytes, resumed after a HEAD.
    reply = await client.post("/files", content=data[:1000], headers=draft("3", Upload_Incomplete="?1"))
    assert reply.status_code == 201 and reply.headers["upload-incomplete"] == "?1"
    location = reply.headers["location"]
    head = await client.head(location, headers=draft("3"))
    assert (head.status_code, head.headers["upload-offset"], head.headers["upload-incomplete"]) == (204, "1000", "?1")
    assert head.headers["cache-control"] == "no-store"
    reply = await client.patch(location, content=data[1000:5000], headers=draft("3", Upload_Offset="1000", Upload_Incomplete="?1"))
    assert (reply.status_code, reply.headers["upload-offset"], reply.headers["upload-incomplete"]) == (204, "5000", "?1")
    conflict = await client.patch(location, content=b"x", headers=draft("3", Upload_Offset="10"))
    check_problem(conflict, 409, "mismatching-upload-offset", "3")
    assert conflict.headers["upload-offset"] == "5000"
    check_error(await client.patch(location, content=b"x", headers=draft("3", Upload_Offset="5000", Upload_Incomplete="no")),
                400, "invalid_header")
    # Neither Upload-Incomplete nor a Content-Type: the last bytes.
    reply = await client.patch(location, content=data[5000:], headers=draft("3", Upload_Offset="5000"))
    assert reply.status_code == 200, reply.text
    assert reply.headers["upload-incomplete"] == "?0" and reply.headers["upload-offset"] == str(len(data))
    backend.assert_stored(reply.json(), data)
    head = await client.head(location, headers=draft("3"))
    assert (head.status_code, head.headers["upload-incomplete"]) == (200, "?0")


@pytest.mark.parametrize("version", ["4", "5"])
async def test_interop_4_and_5_take_appends_of_any_media_type(client: httpx.AsyncClient, backend: Any, version: str) -> None:
    """Drafts -02 and -03 named no media type for an append (tusd takes any)."""
    data = payload(10_000)
    reply = await client.post("/files", content=data[:100], headers=draft(version, Upload_Complete="?0"))
    assert (reply.status_code, reply.headers["upload-complete"]) == (201, "?0")
    location = reply.headers["location"]
    append = draft(version, Upload_Offset="100", Upload_Complete="?0", Content_Type="application/octet-stream")
    reply = await client.patch(location, content=data[100:5000], headers=append)
    assert (reply.status_code, reply.headers["upload-offset"]) == (204, "5000")
    reply = await client.patch(location, content=data[5000:], headers=draft(version, Upload_Offset="5000", Upload_Complete="?1"))
    assert (reply.status_code, reply.headers["upload-complete"]) == (200, "?1"), reply.text
    backend.assert_stored(reply.json(), data)


async def test_draft_offset_never_goes_back(client: httpx.AsyncClient, backend: Any) -> None:
    """A HEAD while a PATCH streams a body that is then refused (it passes the length) said no
    more than the offset after the refusal (the draft: the offset MUST NOT decrease)."""
    reply = await client.post("/files", content=b"01234", headers=draft("8", Upload_Complete="?0", Upload_Length="10"))
    location = reply.headers["location"]
    paused, go_on = asyncio.Event(), asyncio.Event()

    async def body() -> AsyncIterator[bytes]:  # no Content-Length: it passes the length only at its end
        yield b"567"
        paused.set()
        await go_on.wait()
        yield b"8901"

    append = draft("8", Content_Type="application/partial-upload", Upload_Complete="?0", Upload_Offset="5")
    patching = asyncio.create_task(client.patch(location, content=body(), headers=append))
    await paused.wait()
    await asyncio.sleep(0.3)  # past the idle hand-off: the 3 bytes are on disk
    during = await client.head(location, headers=draft("8"))
    go_on.set()
    check_problem(await patching, 400, "inconsistent-upload-length", "8")
    after = await client.head(location, headers=draft("8"))
    assert during.headers["upload-offset"] == after.headers["upload-offset"] == "5"
    complete = {**append, "Upload-Complete": "?1"}
    check_problem(await client.patch(location, content=b"56", headers=complete), 400, "inconsistent-upload-length", "8")
    reply = await client.patch(location, content=b"56789", headers=complete)
    assert reply.status_code == 200, reply.text
    backend.assert_stored(reply.json(), b"0123456789")


@pytest.mark.parametrize("version", ["6", "7", "8", "9"])
async def test_draft_one_request_and_deferred_length(client: httpx.AsyncClient, backend: Any, version: str) -> None:
    data = payload(300_000)
    reply = await client.post("/files", content=data, headers=draft(version, Upload_Complete="?1"))
    assert reply.status_code == 201
    assert reply.headers["location"] == f"/files/{reply.json()['id']}"
    backend.assert_stored(reply.json(), data)
    reply = await client.post("/files", content=data[:10], headers=draft(version, Upload_Complete="?0"))
    location = reply.headers["location"]
    assert "upload-length" not in (await client.head(location, headers=draft(version))).headers
    append = draft(version, Content_Type="application/partial-upload", Upload_Complete="?1", Upload_Offset="10")
    reply = await client.patch(location, content=data[10:], headers=append)
    assert reply.status_code == 200
    backend.assert_stored(reply.json(), data)


@pytest.mark.parametrize("version", ["7", "8", "9"])
async def test_draft_offset_at_the_length_is_complete_only_when_the_client_says_so(
    client: httpx.AsyncClient, backend: Any, version: str
) -> None:
    """Versions 7 on: "the offset could match the length, but the upload can still be incomplete": every
    byte sent with ?0, in the creation or an append, is still an upload; an empty ?1 append stores it."""
    data = payload(6)
    created = await client.post("/files", content=data, headers=draft(version, Upload_Complete="?0", Upload_Length="6"))
    deferred = await client.post("/files", content=data[:3], headers=draft(version, Upload_Complete="?0"))
    append = draft(version, Content_Type="application/partial-upload", Upload_Complete="?0", Upload_Offset="3")
    appended = await client.patch(deferred.headers["location"], content=data[3:], headers={**append, "Upload-Length": "6"})
    for reply in (created, appended):
        assert reply.status_code in (201, 204), reply.text
        assert reply.content == b""
        assert (reply.headers["upload-complete"], reply.headers["upload-offset"]) == ("?0", "6")
        location = reply.request.url if reply is appended else reply.headers["location"]
        head = await client.head(location, headers=draft(version))
        assert head.status_code == 204
        assert (head.headers["upload-complete"], head.headers["upload-offset"], head.headers["upload-length"]) == ("?0", "6", "6")
        check_error(await client.get(location), 409, "upload_incomplete")
        under_way = await client.get(location, headers=draft(version))
        if version == "9":  # an offset retrieval
            assert (under_way.status_code, under_way.headers["upload-offset"]) == (204, "6")
        else:  # the protocol's headers on its refusal too
            check_error(under_way, 409, "upload_incomplete")
            assert under_way.headers["upload-draft-interop-version"] == version
    assert (await client.get("/files")).json()["files"] == []  # nothing stored yet
    complete = {**append, "Upload-Complete": "?1", "Upload-Offset": "6"}
    for location in (created.headers["location"], deferred.headers["location"]):
        reply = await client.patch(location, content=b"", headers=complete)
        assert reply.status_code == 200, reply.text
        assert reply.headers["upload-complete"] == "?1"
        backend.assert_stored(reply.json(), data)


async def test_a_patch_taken_over_from_a_body_of_no_length_resumes_where_head_said(
    client: httpx.AsyncClient, backend: Any
) -> None:
    """A body of no declared length (chunked) is counted once it ends: meanwhile HEAD says the offset
    before it. A PATCH that takes the upload over resumes at that offset, which the draft says MUST
    be accepted; the interrupted body is dropped, not kept."""
    data = payload(3000)
    reply = await client.post("/files", content=data[:1000], headers=draft("8", Upload_Complete="?0", Upload_Length="3000"))
    location = reply.headers["location"]
    append = draft("8", Content_Type="application/partial-upload", Upload_Complete="?0", Upload_Offset="1000")
    release = asyncio.Event()

    async def stalled() -> Any:
        yield data[1000:1500]
        await release.wait()

    held = asyncio.create_task(client.patch(location, content=stalled(), headers=append))
    await asyncio.sleep(0.5)
    assert (await client.head(location, headers=draft("8"))).headers["upload-offset"] == "1000"
    reply = await client.patch(location, content=data[1000:], headers={**append, "Upload-Complete": "?1"})
    assert reply.status_code == 200, reply.text
    assert (await held).status_code == 400
    release.set()
    backend.assert_stored(reply.json(), data)
    assert leftovers(backend) == []


async def test_a_refused_draft_patch_leaves_no_length_behind(client: httpx.AsyncClient, backend: Any) -> None:
    """Its Upload-Length and its bytes disagree ("their indicated lengths MUST match"): refused, and
    the length it named is not the upload's, so the right completion still goes through (tus keeps
    a PATCH's declared length whatever becomes of its body, as tusd)."""
    reply = await client.post("/files", content=b"abc", headers=draft("8", Upload_Complete="?0"))
    location = reply.headers["location"]
    complete = draft("8", Content_Type="application/partial-upload", Upload_Complete="?1", Upload_Offset="3")
    refused = await client.patch(location, content=b"def", headers={**complete, "Upload-Length": "20"})
    check_problem(refused, 400, "inconsistent-upload-length", "8")
    assert "upload-length" not in (await client.head(location, headers=draft("8"))).headers
    reply = await client.patch(location, content=b"def", headers=complete)
    assert reply.status_code == 200, reply.text
    backend.assert_stored(reply.json(), b"abcdef")


async def test_draft_9_says_whose_answer_it_is_and_takes_a_get_as_a_head(client: httpx.AsyncClient, backend: Any) -> None:
    """Drafts -12 on (interop 9): `Upload-Complete` on an answer says whether it is the uploaded file's
    (?1) or the protocol's (?0), refusals included; a GET retrieves an upload's offset as a HEAD does;
    an empty append to a stored upload gets its final answer again (a client whose answer was lost)."""
    data = payload(10)
    reply = await client.post("/files", content=data[:4], headers=draft("9", Upload_Complete="?0", Upload_Length="10"))
    assert (reply.status_code, reply.headers["upload-complete"]) == (201, "?0")
    location = reply.headers["location"]
    got = await client.get(location, headers=draft("9"))
    assert (got.status_code, got.content, got.headers["cache-control"]) == (204, b"", "no-store")
    assert (got.headers["upload-offset"], got.headers["upload-complete"], got.headers["upload-length"]) == ("4", "?0", "10")
    append = draft("9", Content_Type="application/partial-upload", Upload_Complete="?0")
    mismatch = await client.patch(location, content=b"x", headers={**append, "Upload-Offset": "3"})
    check_problem(mismatch, 409, "mismatching-upload-offset", "9")
    assert (mismatch.headers["upload-complete"], mismatch.headers["upload-offset"]) == ("?0", "4")
    short = await client.patch(location, content=data[4:9], headers={**append, "Upload-Offset": "4", "Upload-Complete": "?1"})
    check_problem(short, 400, "inconsistent-upload-length", "9")
    unknown = await client.patch("/files/" + "0" * 32, content=b"x", headers={**append, "Upload-Offset": "0"})
    for speaks, name in ((TUS, "tus-resumable"), (draft("8"), "upload-draft-interop-version")):
        missing = await client.get("/files/" + "0" * 32, headers=speaks)
        assert missing.status_code == 404 and name in missing.headers  # every protocol answer says it
    put = await client.put(location, content=b"x", headers=draft("9"))
    override = await client.post(location, content=b"x", headers=draft("9", X_HTTP_Method_Override="GET"))
    for refusal in (short, unknown, put, override):
        assert refusal.headers.get_list("upload-complete") == ["?0"], refusal.text
        assert refusal.headers["upload-draft-interop-version"] == "9"
    assert (unknown.status_code, put.status_code, override.status_code) == (404, 405, 400)
    done = await client.patch(location, content=data[4:], headers={**append, "Upload-Offset": "4", "Upload-Complete": "?1"})
    assert (done.status_code, done.headers["upload-complete"]) == (200, "?1")
    record = done.json()
    backend.assert_stored(record, data)
    got = await client.get(location, headers=draft("9"))  # a stored file: its bytes, and where it stands
    assert (got.status_code, got.content, got.headers["etag"]) == (200, data, f'"{sha(data)}"')
    assert (got.headers["upload-offset"], got.headers["upload-complete"]) == ("10", "?1")
    at_end = {**append, "Upload-Offset": "10", "Upload-Complete": "?1"}
    again = await client.patch(location, content=b"", headers=at_end)
    assert (again.status_code, again.json(), again.headers["upload-complete"]) == (200, record, "?1")
    body = check_problem(await client.patch(location, content=b"", headers={**at_end, "Upload-Offset": "4"}),
                         409, "mismatching-upload-offset", "9")
    assert (body["expected-offset"], body["provided-offset"]) == (10, 4)
    check_problem(await client.patch(location, content=b"x", headers=at_end), 400, "inconsistent-upload-length", "9")
    backend.assert_stored(record, data)
    wrong = f"sha-256=:{b64(hashlib.sha256(b'other').digest())}:"
    reply = await client.post("/files", content=b"abc", headers=draft("9", Upload_Complete="?1", Repr_Digest=wrong))
    check_problem(reply, 422, "digest-mismatched-values", "9")
    assert reply.headers.get_list("upload-complete") == ["?1"]  # about the file: the file's answer


async def test_draft_6_stores_an_upload_at_its_length_as_tusd(client: httpx.AsyncClient, backend: Any) -> None:
    """Version 6 is what tus-js-client sends, and its draft mode says ?0 on a stream's last PATCH
    (tusd stores an upload once its offset reaches its length): stored at once. A client that then
    sends the draft's empty ?1 append, or sends it again, gets the record as from the append that stored it."""
    data = payload(6)
    created = await client.post("/files", content=data, headers=draft("6", Upload_Complete="?0", Upload_Length="6"))
    deferred = await client.post("/files", content=data[:3], headers=draft("6", Upload_Complete="?0"))
    assert deferred.status_code == 201 and deferred.headers["upload-complete"] == "?0"
    append = draft("6", Content_Type="application/partial-upload", Upload_Complete="?0", Upload_Offset="3")
    appended = await client.patch(deferred.headers["location"], content=data[3:], headers={**append, "Upload-Length": "6"})
    for reply, status in ((created, 201), (appended, 200)):
        assert reply.status_code == status, reply.text
        assert (reply.headers["upload-complete"], reply.headers["upload-offset"]) == ("?1", "6")
        backend.assert_stored(reply.json(), data)
        location = reply.request.url if reply is appended else reply.headers["location"]
        head = await client.head(location, headers=draft("6"))
        assert (head.status_code, head.headers["upload-complete"], head.headers["upload-offset"]) == (200, "?1", "6")
        for _ in range(2):
            again = await client.patch(location, content=b"", headers={**append, "Upload-Complete": "?1", "Upload-Offset": "6"})
            assert again.status_code == 200, again.text
            assert (again.headers["upload-complete"], again.headers["upload-offset"]) == ("?1", "6")
            assert again.json() == reply.json()
        more = await client.patch(location, content=b"x", headers={**append, "Upload-Offset": "6"})
        check_problem(more, 400, "completed-upload", "6")
        check_problem(await client.patch(location, content=b"", headers={**append, "Upload-Offset": "5"}),
                      400, "completed-upload", "6")
    assert len((await client.get("/files")).json()["files"]) == 2


async def test_draft_filename_from_content_disposition(client: httpx.AsyncClient, backend: Any) -> None:
    """`filename*` decoded (RFC 8187), and when both come it wins (RFC 6266 §4.3, unlike a form part);
    the header's bytes as UTF-8 when they are UTF-8 (the ASGI server hands them over as latin-1)."""
    cases = [
        ("attachment; filename*=UTF-8''%E2%82%AC%20rates.txt", "€ rates.txt"),
        ('attachment; filename="€ rates.txt"'.encode(), "€ rates.txt"),
        (b'attachment; filename="\xe9t\xe9.txt"', "été.txt"),  # not UTF-8: latin-1, as HTTP defines it
        ("attachment; filename=\"plain.txt\"; filename*=UTF-8''%E2%82%AC.txt", "€.txt"),  # RFC 6266 §4.3
        # RFC 2231 pieces whose bytes are not UTF-8 (a 500): windows-1252, as a form part's without a charset
        ("attachment; filename*0*=utf-8''%FF%FE.txt", "ÿþ.txt"),
        (b'attachment; filename*0="\xff\xfe.txt"', "ÿþ.txt"),
        ("attachment; filename*0*=utf-8''" + "%FF" * 300 + ".txt", "ÿ" * 125 + ".txt"),  # 255 bytes, its stem kept
    ]
    for disposition, filename in cases:
        headers = {**draft("8", Upload_Complete="?1"), "Content-Disposition": disposition}
        reply = await client.post("/files", content=b"abc", headers=headers)
        assert reply.status_code == 201, reply.text
        assert reply.json()["filename"] == filename


async def test_draft_patch_with_a_conflicting_length_is_a_problem(client: httpx.AsyncClient, backend: Any) -> None:
    """An Upload-Length other than the one known, or below the offset: the draft's inconsistent-upload-length."""
    append = draft("8", Content_Type="application/partial-upload", Upload_Complete="?0", Upload_Offset="3")
    reply = await client.post("/files", content=b"abc", headers=draft("8", Upload_Complete="?0", Upload_Length="10"))
    known = reply.headers["location"]
    reply = await client.post("/files", content=b"abc", headers=draft("8", Upload_Complete="?0"))
    deferred = reply.headers["location"]
    for location, length in ((known, "11"), (deferred, "2")):
        reply = await client.patch(location, content=b"d", headers={**append, "Upload-Length": length})
        check_problem(reply, 400, "inconsistent-upload-length", "8")
        assert int((await client.head(location, headers=draft("8"))).headers["upload-offset"]) == 3


def limits(reply: httpx.Response) -> dict[str, int]:
    """Upload-Limit as a dictionary of integers."""
    return {key: int(value) for key, _, value in (m.strip().partition("=") for m in reply.headers["upload-limit"].split(","))}


@pytest.mark.parametrize("version, age", [("6", "expires"), ("7", "max-age"), ("8", "max-age"), ("9", "max-age")])
async def test_draft_limits_as_each_version_names_them(
    client: httpx.AsyncClient, backend: Any, config: upload_asgi.Config, version: str, age: str
) -> None:
    """Upload-Limit: the lifetime is `expires` in interop 6, `max-age` since 7. OPTIONS names the append
    type (Accept-Patch); a 413 for a limit of ours carries the limits too (the draft: MUST)."""
    expiry = int(config.resumable_expiry)
    reply = await client.options("/files", headers=draft(version))
    assert reply.status_code == 204
    assert reply.headers["accept-patch"] == "application/partial-upload"
    assert limits(reply) == {"max-size": 10_000_000, age: expiry}
    reply = await client.post("/files", content=b"abc", headers=draft(version, Upload_Complete="?0"))
    assert set(limits(reply)) == {"max-size", age} and expiry - 5 <= limits(reply)[age] <= expiry
    head = await client.head(reply.headers["location"], headers=draft(version))
    assert set(limits(head)) == {"max-size", age}
    for length in ("10000001", None):
        if length is None:  # over the file limit by its body, the length deferred
            reply = await client.patch(
                head.request.url, content=b"x" * (10_000_001 - 3),
                headers=draft(version, Content_Type="application/partial-upload", Upload_Complete="?0", Upload_Offset="3"))
        else:
            reply = await client.post("/files", headers=draft(version, Upload_Complete="?0", Upload_Length=length))
        body = check_error(reply, 413, "payload_too_large")
        assert body["limit"] == "file_size" and body["max"] == 10_000_000
        assert reply.headers["upload-draft-interop-version"] == version
        assert limits(reply) == {"max-size": 10_000_000}  # a refusal does not renew the upload: no time left named
    assert int((await client.head(head.request.url, headers=draft(version))).headers["upload-offset"]) == 3
    assert "accept-patch" not in (await client.options("/files")).headers  # tus: no draft headers


async def test_options_star_names_the_limits_every_creation_route_has(
    app: upload_asgi.UploadApp, config: upload_asgi.Config
) -> None:
    """The draft: a server whose resources all create uploads with the same limits SHOULD answer them
    to `OPTIONS *`; tus' discovery headers too. `*` is for OPTIONS alone."""
    reply = await call_app(app, http_scope("*", "OPTIONS", draft("9").items()))
    assert reply.status == 204
    assert reply.headers["upload-limit"] == f"max-size=10000000, max-age={int(config.resumable_expiry)}"
    assert reply.headers["tus-version"] == "1.0.0" and reply.headers["tus-max-size"] == "10000000"
    reply = await call_app(app, http_scope("*", "GET"))
    assert reply.status == 405 and reply.headers["allow"] == "OPTIONS"


async def test_draft_limits_name_the_append_size_when_a_request_may_carry_less_than_a_file(backend: Any) -> None:
    """UPLOAD_MAX_REQUEST_SIZE below UPLOAD_MAX_FILE_SIZE: `max-append-size`, so a draft client sends
    the file in appends of at most that; one over it is 413 with the limits."""
    app = upload_asgi.create_app(backend.config(fsync=False, max_file_size=10_000, max_request_size=4_000))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver") as client:
            reply = await client.options("/files", headers=draft("8"))
            assert limits(reply)["max-append-size"] == 4_000 and limits(reply)["max-size"] == 10_000
            data = payload(9_000)
            reply = await client.post("/files", content=data[:4_000], headers=draft("8", Upload_Complete="?0"))
            assert reply.status_code == 201, reply.text
            location = reply.headers["location"]
            append = draft("8", Content_Type="application/partial-upload", Upload_Complete="?1", Upload_Offset="4000")
            reply = await client.patch(location, content=data[4_000:], headers=append)
            assert check_error(reply, 413, "payload_too_large")["limit"] == "request_size"
            assert limits(reply)["max-append-size"] == 4_000
            assert (await client.head(location, headers=draft("8"))).headers["upload-offset"] == "4000"
            reply = await client.patch(location, content=data[4_000:8_000], headers={**append, "Upload-Complete": "?0"})
            assert reply.status_code == 204, reply.text
            reply = await client.patch(location, content=data[8_000:], headers={**append, "Upload-Offset": "8000"})
            assert reply.status_code == 200, reply.text
            backend.assert_stored(reply.json(), data)
    finally:
        await close_app(app)


@pytest.mark.parametrize("length", ["declared", "deferred"])
async def test_an_upload_over_a_file_limit_lowered_since_is_refused_not_stored(backend: Any, length: str) -> None:
    """A restart with a smaller UPLOAD_MAX_FILE_SIZE: an upload begun under the old limit whose
    length (or, deferred, offset) is over the new one gets 413 at each PATCH, never a file over it."""
    data = payload(9_000)
    before = upload_asgi.create_app(backend.config(fsync=False, max_file_size=10_000))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=before), base_url="http://testserver") as client:
            location = await create(client, len(data) if length == "declared" else None)
            assert (await patch(client, location, 0, data[:6_000])).status_code == 204
    finally:
        await close_app(before)
    after = upload_asgi.create_app(backend.config(fsync=False, max_file_size=4_000))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=after), base_url="http://testserver") as client:
            extra = {"Upload-Length": str(len(data))} if length == "deferred" else {}
            for body, headers in ((data[6_000:], extra), (b"", {})):
                body_json = check_error(await patch(client, location, 6_000, body, **headers), 413, "payload_too_large")
                assert body_json["limit"] == "file_size" and body_json["max"] == 4_000
            what = "length 9000" if length == "declared" else "offset 6000"
            assert body_json["detail"] == f"the upload's {what} is over the file limit of 4000 bytes"
            assert await offset_of(client, location) == 6_000
            assert (await client.get("/files")).json()["files"] == []
            assert (await client.delete(location, headers=TUS)).status_code == 204
            assert leftovers(backend) == []
    finally:
        await close_app(after)


async def test_a_head_does_not_store_a_cut_short_upload_over_a_file_limit_lowered_since(
    backend: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every byte in, its finishing cut short, then a restart with a smaller UPLOAD_MAX_FILE_SIZE:
    the writer's HEAD says where it stands and stores nothing, as each PATCH is refused."""
    data = payload(9_000, seed=19)
    before = upload_asgi.create_app(backend.config(fsync=False, max_file_size=10_000))
    finishing_dies_once(before, monkeypatch)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=before), base_url="http://testserver") as client:
            location = await create(client, len(data))
            assert (await patch(client, location, 0, data)).status_code >= 500
    finally:
        await close_app(before)
    after = upload_asgi.create_app(backend.config(fsync=False, max_file_size=4_000))
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=after), base_url="http://testserver") as client:
            reply = await client.head(location, headers=TUS)
            assert reply.status_code == 200 and reply.headers["upload-offset"] == "9000"
            check_error(await patch(client, location, 9_000, b""), 413, "payload_too_large")
            assert (await client.get("/files")).json()["files"] == []
            assert (await client.get(location)).status_code == 409
    finally:
        await close_app(after)


@pytest.mark.parametrize("version", [None, "8"])
async def test_an_offset_mismatch_names_the_offset_in_a_header(client: httpx.AsyncClient, backend: Any, version: str | None) -> None:
    """The draft: the 409 MUST carry the right `Upload-Offset`; tus gets it too (and in the body, as before)."""
    if version is None:
        reply = await client.post("/files", content=b"abc", headers={**OCTETS, "Upload-Length": "10"})
        append = OCTETS
    else:
        reply = await client.post("/files", content=b"abc", headers=draft(version, Upload_Complete="?0"))
        append = draft(version, Content_Type="application/partial-upload", Upload_Complete="?0")
    location = reply.headers["location"]
    reply = await client.patch(location, content=b"d", headers={**append, "Upload-Offset": "1"})
    assert reply.status_code == 409, reply.text
    assert reply.headers["upload-offset"] == "3"
    assert int(reply.headers["content-length"]) == len(reply.content)
    assert int((await client.head(location, headers=draft(version) if version else TUS)).headers["upload-offset"]) == 3


async def test_draft_creation_keeps_the_content_type_as_sent(client: httpx.AsyncClient, backend: Any) -> None:
    """As a form part's: the parameters (a charset) stay in the record and the download."""
    reply = await client.post("/files", content=b"caf\xc3\xa9", headers=draft(
        "8", Upload_Complete="?1", Content_Type="text/plain; charset=utf-8"))
    assert reply.status_code == 201, reply.text
    assert reply.json()["content_type"] == "text/plain; charset=utf-8"
    assert (await client.get(reply.headers["location"])).headers["content-type"] == "text/plain; charset=utf-8"


async def test_draft_refusals(client: httpx.AsyncClient, backend: Any) -> None:
    check_error(await client.post("/files", content=b"abc", headers=draft("8")), 400, "invalid_header")
    check_error(await client.post("/files", content=b"abc", headers=draft("8", Upload_Complete="yes")), 400, "invalid_header")
    check_error(await client.post("/files", headers=draft("8", Upload_Complete="?0", Upload_Length="10000001")), 413, "payload_too_large")
    check_problem(await client.post("/files", content=b"abc", headers=draft("8", Upload_Complete="?1", Upload_Length="4")),
                  400, "inconsistent-upload-length", "8")
    check_problem(await client.post("/files", headers=draft("8", Upload_Complete="?1", Upload_Length="4")),
                  400, "inconsistent-upload-length", "8")
    reply = await client.post("/files", headers=draft("8", Upload_Complete="?1"))  # an empty file, complete
    assert reply.status_code == 201 and reply.json()["size"] == 0
    assert (await client.delete(f"/files/{reply.json()['id']}")).status_code == 204
    wrong = f"sha-256=:{b64(hashlib.sha256(b'other').digest())}:"
    reply = await client.post("/files", content=b"abc", headers=draft("8", Upload_Complete="?1", Repr_Digest=wrong))
    body = check_problem(reply, 422, "digest-mismatched-values", "8")  # SPEC §10: 422
    assert body["sha256"] == sha(b"abc")
    assert reply.headers["upload-complete"] == "?1"  # the draft: an answer about the whole representation
    reply = await client.post("/files", content=b"abc", headers=draft("8", Upload_Complete="?0"))
    location = reply.headers["location"]
    append = draft("8", Content_Type="application/partial-upload", Upload_Offset="3")
    check_error(await client.patch(location, content=b"d", headers=append), 400, "invalid_header")  # no Upload-Complete
    reply = await client.delete(location, headers=draft("8"))
    assert reply.status_code == 204
    assert reply.headers["upload-draft-interop-version"] == "8"
    backend.assert_nothing_stored()
    # An interop version we do not speak is tus, which wants its own header.
    check_error(await client.post("/files", headers={"Upload-Draft-Interop-Version": "10", "Upload-Complete": "?1"}),
                412, "unsupported_version")


async def test_draft_numbers_are_structured_integers(client: httpx.AsyncClient, backend: Any) -> None:
    """RFC 9651: the interop version, Upload-Length and Upload-Offset are Items, whose parameters
    are ignored, and an integer has at most 15 digits. tus' numbers are digits only."""
    created = draft("9;p=1", Upload_Complete="?0", Upload_Length="6;q")
    reply = await client.post("/files", content=b"abc", headers=created)
    assert reply.status_code == 201, reply.text
    assert reply.headers["upload-draft-interop-version"] == "9"
    location = reply.headers["location"]
    append = draft("9", Content_Type="application/partial-upload", Upload_Complete="?1", Upload_Offset="3;a=?1")
    for offset in ("0" * 15 + "3", "3;", "3 ;a", "3;A"):
        check_error(await client.patch(location, content=b"def", headers={**append, "Upload-Offset": offset}),
                    400, "invalid_header")
    reply = await client.patch(location, content=b"def", headers=append)
    assert reply.status_code == 200, reply.text
    backend.assert_stored(reply.json(), b"abcdef")
    tus_creation = {"Tus-Resumable": "1.0.0", "Upload-Length": "3;a=1"}
    check_error(await client.post("/files", headers=tus_creation), 400, "invalid_header")


# -- real servers and independent clients -------------------------------------------------------


@pytest.fixture
def data_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = payload(5_000_003, seed=7)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    return path, data


def test_tuspy_upload_and_resume_after_a_cut(server: Server, data_file: tuple[Path, bytes]) -> None:
    from tusclient import client as tusclient

    path, data = data_file
    tus_client = tusclient.TusClient(f"{server.url}/files")
    first = tus_client.uploader(
        file_path=str(path), chunk_size=1_000_000, metadata={"filename": "source.bin", "filetype": "application/x-demo"},
        upload_checksum=True,
    )
    first.upload(stop_at=2_000_000)  # then the client goes away
    assert first.offset == 2_000_000
    resumed = tus_client.uploader(file_path=str(path), chunk_size=1_500_000, url=first.url, upload_checksum=True)
    assert resumed.offset == 2_000_000  # it asked the server (HEAD) where to go on
    resumed.upload()
    with server.client() as http:
        reply = http.get(first.url)
        assert reply.status_code == 200
        assert reply.content == data
    record = stored_record(server.upload_dir, first.url)
    assert record["sha256"] == sha(data)
    assert record["filename"] == "source.bin" and record["content_type"] == "application/x-demo"


def node_upload(endpoint: str, path: Path, **options: Any) -> dict[str, Any]:
    script = ROOT / "tests" / "tus_node_client.mjs"
    done = subprocess.run(
        ["node", str(script), endpoint, str(path), json.dumps(options)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


needs_node = pytest.mark.skipif(
    shutil.which("node") is None or not (ROOT / "node_modules" / "tus-js-client").exists(),
    reason="tus-js-client is not installed (make install-test runs npm ci)",
)


@needs_node
@pytest.mark.parametrize(
    "options",
    [
        pytest.param({"chunkSize": 1_000_000, "abortAfter": 2_000_000}, id="tus-abort-and-resume"),
        pytest.param({"uploadDataDuringCreation": True, "chunkSize": 2_000_000}, id="tus-creation-with-upload"),
        pytest.param({"uploadLengthDeferred": True, "chunkSize": 1_700_000}, id="tus-deferred-length"),
        pytest.param({"overridePatchMethod": True, "chunkSize": 2_000_000}, id="tus-override-patch-method"),
        pytest.param({"protocol": "ietf-draft-05", "chunkSize": 1_000_000, "abortAfter": 3_000_000}, id="draft-6-abort-and-resume"),
        pytest.param({"protocol": "ietf-draft-05", "uploadDataDuringCreation": True}, id="draft-6-one-request"),
        # A stream's last PATCH says Upload-Complete ?0: stored at its length, as tusd does.
        pytest.param({"protocol": "ietf-draft-05", "stream": True, "chunkSize": 1_000_000}, id="draft-6-stream"),
        pytest.param({"stream": True, "chunkSize": 1_500_000}, id="tus-stream"),
    ],
)
def test_tus_js_client_in_node(
    backend: Any, backend_server: Server, data_file: tuple[Path, bytes], options: dict[str, Any]
) -> None:
    server = backend_server
    path, data = data_file
    result = node_upload(f"{server.url}/files", path, metadata={"filename": "node.bin", "filetype": "image/png"}, **options)
    if "abortAfter" in options:
        assert result["resumedFrom"] == options["abortAfter"]  # nothing sent twice
        assert result["abortedAt"] == result["url"]
    with server.client() as http:
        record = http.get(f"{result['url']}/record").json()
        metrics = http.get("/metrics").text
    assert record["sha256"] == sha(data)
    assert record["filename"] == "node.bin" and record["content_type"] == "image/png"
    backend.assert_stored(record, data)
    if backend.name == "s3":  # the file and its record, no tail, info or lease left
        assert backend.objects() == [record["id"], f"{record['id']}.json"] and backend.uploads_in_progress() == []
    else:
        assert resumable_files(server.upload_dir) == []
    assert metric(metrics, "upload_asgi_received_bytes_total") == len(data)
    assert metric(metrics, "upload_asgi_resumable_rehashed_bytes_total") == 0  # the same worker throughout


def send_partial_patch(port: int, location: str, offset: int, body: bytes, declared: int) -> socket.socket:
    """Start a PATCH that declares `declared` body bytes and send only `body`; return the socket."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (
        f"PATCH {location} HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\n"
        f"Content-Type: application/offset+octet-stream\r\nUpload-Offset: {offset}\r\n"
        f"Content-Length: {declared}\r\n\r\n"
    ).encode()
    sock.sendall(head + body)
    return sock


def wait_for_offset(http: httpx.Client, location: str, offset: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if int(http.head(location, headers=TUS).headers["upload-offset"]) >= offset:
            return
        time.sleep(0.05)
    raise AssertionError(f"the upload never reached {offset}")


@pytest.mark.slow
def test_restart_mid_upload(tmp_path: Path, data_file: tuple[Path, bytes]) -> None:
    _, data = data_file
    upload_dir = tmp_path / "uploads"
    first = Server(upload_dir, env={"UPLOAD_FSYNC": "0"}).start()
    try:
        with first.client() as http:
            location = http.post("/files", headers={**TUS, "Upload-Length": str(len(data))}).headers["location"]
            sock = send_partial_patch(first.port, location, 0, data[:3_000_000], len(data))
            wait_for_offset(http, location, 3_000_000)  # a pausing client's bytes are written, not held
    finally:
        first.kill()  # kill -9 mid-PATCH: a crash, not a shutdown
        sock.close()
    second = Server(upload_dir, env={"UPLOAD_FSYNC": "0", "UPLOAD_LOG_LEVEL": "info"}).start()
    try:
        with second.client() as http:
            reply = http.head(location, headers=TUS)
            assert reply.status_code == 200
            offset = int(reply.headers["upload-offset"])
            assert offset == 3_000_000  # every byte that reached the server survived
            reply = http.patch(location, content=data[offset:], headers={**OCTETS, "Upload-Offset": str(offset)})
            assert reply.status_code == 204, reply.text
            assert http.get(location).content == data
            # This worker never saw the first bytes: it re-read them, once, to hash them.
            assert metric(http.get("/metrics").text, "upload_asgi_resumable_rehashed_bytes_total") == offset
    finally:
        second.stop()
    record = stored_record(upload_dir, location)
    assert record["sha256"] == sha(data)  # re-read from disk: this worker never saw the first bytes
    assert resumable_files(upload_dir) == []


def test_cut_connection_keeps_what_arrived(server: Server) -> None:
    data = payload(3_000_000)
    with server.client() as http:
        location = http.post("/files", headers={**TUS, "Upload-Length": str(len(data))}).headers["location"]
        sock = send_partial_patch(server.port, location, 0, data[:1_200_000], len(data))
        wait_for_offset(http, location, 1_200_000)
        sock.close()
        deadline = time.monotonic() + 30
        while True:  # the lock goes once the server has seen the client leave
            reply = http.patch(location, content=data[1_200_000:], headers={**OCTETS, "Upload-Offset": "1200000"})
            if reply.status_code != 423 or time.monotonic() > deadline:
                break
            time.sleep(0.05)
        assert reply.status_code == 204, reply.text
        assert http.get(location).content == data
    assert stored_record(server.upload_dir, location)["sha256"] == sha(data)


@pytest.mark.slow
def test_patches_through_two_workers(tmp_path: Path) -> None:
    """With -w 2 each PATCH may land in either worker: one that did not write the bytes before re-reads them."""
    data = payload(6_000_000, seed=3)
    upload_dir = tmp_path / "uploads"
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}, args=["-w", "2"]) as server:
        with server.client() as http:
            location = http.post("/files", headers={**TUS, "Upload-Length": str(len(data))}).headers["location"]
        for offset in range(0, len(data), 500_000):
            with server.client() as http:  # a new connection each time
                reply = http.patch(location, content=data[offset : offset + 500_000], headers={**OCTETS, "Upload-Offset": str(offset)})
                assert reply.status_code == 204, reply.text
        with server.client() as http:
            assert http.get(location).content == data
    assert stored_record(upload_dir, location)["sha256"] == sha(data)


@pytest.mark.slow
def test_a_silent_patch_is_taken_over_through_either_worker(tmp_path: Path) -> None:
    """With -w 2 the resuming PATCH lands in the worker that holds the upload (asked directly)
    or in the other (asked through a stop file): either way it is taken over, not a 423."""
    data = payload(1_000_000, seed=4)
    with Server(tmp_path / "uploads", env={"UPLOAD_FSYNC": "0"}, args=["-w", "2"]) as server:
        for _ in range(4):
            with server.client() as http:
                location = http.post("/files", headers={**TUS, "Upload-Length": str(len(data))}).headers["location"]
                sock = send_partial_patch(server.port, location, 0, data[:300_000], len(data))
                wait_for_offset(http, location, 300_000)
            with server.client() as http:  # a new connection: either worker
                reply = http.patch(location, content=data[300_000:], headers={**OCTETS, "Upload-Offset": "300000"})
                assert reply.status_code == 204, reply.text
                assert http.get(location).content == data
            assert sock.recv(65536).startswith(b"HTTP/1.1 400")
            sock.close()
        assert resumable_files(server.upload_dir) == []


def test_a_second_patch_takes_over_and_never_interleaves(server: Server) -> None:
    """A second PATCH while the first still holds the upload (its client silent, the server
    cannot tell it is gone): the first is told to stop and keeps what it got (400
    upload_interrupted); the second, sent from offset 0, is refused (409); resuming where HEAD
    says completes the file. Never 423 until the idle timeout, never two writers interleaved."""
    data = payload(2_000_000)
    with server.client() as http:
        location = http.post("/files", headers={**TUS, "Upload-Length": str(len(data))}).headers["location"]
        sock = send_partial_patch(server.port, location, 0, data[:1_500_000], len(data))
        wait_for_offset(http, location, 1_500_000)
        reply = http.patch(location, content=data, headers={**OCTETS, "Upload-Offset": "0"})
        check_error(reply, 409, "offset_mismatch")
        check_tus(reply)
        answer = sock.recv(65536)
        sock.close()
        assert answer.startswith(b"HTTP/1.1 400") and b"upload_interrupted" in answer, answer
        offset = int(http.head(location, headers=TUS).headers["upload-offset"])
        assert offset == 1_500_000
        reply = http.patch(location, content=data[offset:], headers={**OCTETS, "Upload-Offset": str(offset)})
        assert reply.status_code == 204, reply.text
        assert http.get(location).content == data
    assert stored_record(server.upload_dir, location)["sha256"] == sha(data)
    assert resumable_files(server.upload_dir) == []


def test_over_http2(tmp_path: Path) -> None:
    """Over HTTP/2 (TLS): streamed PATCH bodies without a Content-Length, and a refused one."""
    import ssl

    import trustme

    ca = trustme.CA()
    pem = tmp_path / "server.pem"
    ca.issue_cert("127.0.0.1").private_key_and_cert_chain_pem.write_to_path(str(pem))
    context = ssl.create_default_context()
    ca.configure_trust(context)
    data = payload(3_000_000, seed=9)

    def stream(body: bytes):
        for i in range(0, len(body), 65_536):
            yield body[i : i + 65_536]

    upload_dir = tmp_path / "uploads"
    args = ["--certfile", str(pem), "--keyfile", str(pem)]
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}, args=args, scheme="https") as server:
        with httpx.Client(base_url=server.url, http2=True, verify=context, timeout=60) as http:
            # A creation's body without a length (DATA frames) that is not tus': refused, nothing
            # created, the rest read (unread, hypercorn drops the connection); an empty one is fine.
            creation = {**TUS, "Upload-Defer-Length": "1", "Content-Type": "text/plain"}
            check_error(http.post("/files", content=stream(data[:200_000]), headers=creation), 415, "unsupported_media_type")
            assert not (upload_dir / ".resumable").exists() or list((upload_dir / ".resumable").iterdir()) == []
            reply = http.post("/files", content=stream(b""), headers=creation)
            assert reply.http_version == "HTTP/2" and reply.status_code == 201
            location = reply.headers["location"]
            reply = http.patch(location, content=stream(data[:2_000_000]), headers={**OCTETS, "Upload-Offset": "0"})
            assert reply.status_code == 204 and reply.headers["upload-offset"] == "2000000"
            reply = http.patch(location, content=stream(data[2_000_000:]), headers={**OCTETS, "Upload-Offset": "5"})
            check_error(reply, 409, "offset_mismatch")
            reply = http.patch(
                location, content=stream(data[2_000_000:]),
                headers={**OCTETS, "Upload-Offset": "2000000", "Upload-Length": str(len(data))},
            )
            assert reply.status_code == 204, reply.text
            assert http.get(location).content == data
    assert stored_record(upload_dir, location)["sha256"] == sha(data)


@pytest.mark.browser
@needs_node
def test_tus_js_client_in_chromium(server: Server) -> None:
    """tus-js-client's browser build, in headless Chromium at the server's origin, uploads a Blob."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("no /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    size = 3_000_001
    expected = bytes((i * 31 + 7) & 255 for i in range(size))
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=["--no-sandbox", "--disable-gpu"])
        try:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.add_script_tag(path=str(ROOT / "node_modules" / "tus-js-client" / "dist" / "tus.min.js"))
            url = page.evaluate(
                """(size) => {
                  const data = new Uint8Array(size);
                  for (let i = 0; i < size; i++) data[i] = (i * 31 + 7) & 255;
                  return new Promise((resolve, reject) => {
                    const upload = new tus.Upload(new Blob([data]), {
                      endpoint: "/files", chunkSize: 1000000, retryDelays: [0, 500],
                      metadata: {filename: "browser.bin", filetype: "application/x-browser"},
                      onSuccess: () => resolve(upload.url), onError: (error) => reject(String(error)),
                    });
                    upload.start();
                  });
                }""",
                size,
            )
        finally:
            browser.close()
    record = stored_record(server.upload_dir, url)
    assert record["sha256"] == sha(expected)
    assert record["filename"] == "browser.bin" and record["content_type"] == "application/x-browser"


# -- the page: large files go resumably ------------------------------------------------


@pytest.fixture
def chromium_page() -> Any:
    """open(url) -> a Playwright page in headless Chromium (the system one), uploads throttled."""
    chromium = Path("/usr/bin/chromium")
    if not chromium.exists():
        pytest.skip("no /usr/bin/chromium")
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(chromium), args=["--no-sandbox", "--disable-gpu"])
        errors: list[str] = []

        def open_page(url: str, upload_bytes_per_second: int, init_script: str | None = None) -> Any:
            context = browser.new_context()
            page = context.new_page()
            page.on("pageerror", lambda error: errors.append(str(error)))
            if init_script is not None:
                page.add_init_script(init_script)
            cdp = context.new_cdp_session(page)
            cdp.send("Network.enable")
            cdp.send("Network.emulateNetworkConditions", {
                "offline": False, "latency": 0, "downloadThroughput": -1, "uploadThroughput": upload_bytes_per_second,
            })
            page.goto(url)
            return page

        try:
            yield open_page
        finally:
            browser.close()
        assert errors == []


def wait_for(check: Any, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)
    return result


def staged_size(upload_dir: Path) -> int:
    staging = upload_dir / ".resumable"
    sizes = [p.stat().st_size for p in staging.iterdir() if is_hex_id(p.name)] if staging.exists() else []
    return max(sizes, default=0)


def is_hex_id(name: str) -> bool:
    return len(name) == 32 and all(c in "0123456789abcdef" for c in name)


def row_state(page: Any) -> str | None:
    return page.evaluate("(document.querySelector('#rows tr') || {getAttribute: () => null}).getAttribute('data-state')")


@pytest.mark.browser
@pytest.mark.slow
def test_page_resumes_after_a_server_restart(tmp_path: Path, chromium_page: Any) -> None:
    data = payload(40 * MiB, seed=11)
    path = tmp_path / "files" / "big.iso"
    path.parent.mkdir()
    path.write_bytes(data)
    upload_dir = tmp_path / "uploads"
    first = Server(upload_dir, env={"UPLOAD_FSYNC": "0"}).start()
    second = Server(upload_dir, env={"UPLOAD_FSYNC": "0"})
    second.port, second.url, second.cmd = first.port, first.url, first.cmd  # the same address
    try:
        page = chromium_page(first.url + "/", 8_000_000)
        page.set_input_files("#picker", str(path))
        wait_for(lambda: staged_size(upload_dir) >= 17 * MiB)
        first.kill()  # the server dies mid-upload
        time.sleep(1.0)
        second.start()
        wait_for(lambda: row_state(page) in ("done", "error"), timeout=120)
        assert row_state(page) == "done", page.evaluate("document.querySelector('#rows tr .msg').textContent")
        shown = page.evaluate("document.querySelector('#rows tr td.sha code').textContent")
        assert shown == sha(data)
        with second.client() as http:
            metrics = http.get("/metrics").text
        received = metric(metrics, "upload_asgi_received_bytes_total")
        assert received <= len(data) - 16 * MiB  # it went on from the server's offset
    finally:
        first.stop()
        second.stop()
    [file_id] = stored_ids(upload_dir)
    assert (upload_dir / file_id).read_bytes() == data
    assert stored_record(upload_dir, f"/files/{file_id}")["filename"] == "big.iso"
    assert resumable_files(upload_dir) == []


@pytest.mark.browser
@pytest.mark.slow
def test_page_resumes_after_a_reload(tmp_path: Path, server: Server, chromium_page: Any) -> None:
    data = payload(40 * MiB, seed=12)
    path = tmp_path / "files" / "disk.img"
    path.parent.mkdir()
    path.write_bytes(data)
    page = chromium_page(server.url + "/", 8_000_000)
    page.set_input_files("#picker", str(path))
    wait_for(lambda: staged_size(server.upload_dir) >= 17 * MiB)
    page.reload()
    page.set_input_files("#picker", str(path))  # the same file picked again
    wait_for(lambda: row_state(page) in ("done", "error"), timeout=120)
    assert row_state(page) == "done", page.evaluate("document.querySelector('#rows tr .msg').textContent")
    with server.client() as http:
        metrics = http.get("/metrics").text
    received = metric(metrics, "upload_asgi_received_bytes_total")
    assert received < len(data) + 16 * MiB  # no second upload from byte 0
    [file_id] = stored_ids(server.upload_dir)
    assert stored_record(server.upload_dir, f"/files/{file_id}")["sha256"] == sha(data)
    assert resumable_files(server.upload_dir) == []


def write_big(tmp_path: Path, data: bytes, name: str = "big.bin", folder: str = "files") -> Path:
    path = tmp_path / folder / name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return path


def settled(page: Any, timeout: float = 120) -> str:
    """The first row's state once it is done or failed."""
    wait_for(lambda: row_state(page) in ("done", "error"), timeout=timeout)
    return row_state(page)


def all_settled(page: Any, rows: int, timeout: float = 120) -> list[str]:
    """Every row's state once all `rows` are done or failed."""
    wait_for(lambda: len(row_states(page)) == rows and all(s in ("done", "error") for s in row_states(page)), timeout)
    return row_states(page)


def assert_only_stored(upload_dir: Path, data: bytes) -> None:
    [file_id] = stored_ids(upload_dir)
    assert (upload_dir / file_id).read_bytes() == data


def row_states(page: Any) -> list[str]:
    return page.evaluate("Array.from(document.querySelectorAll('#rows tr')).map(r => r.getAttribute('data-state'))")


def row_message(page: Any, index: int = 0) -> str:
    return page.evaluate(f"document.querySelectorAll('#rows tr .msg')[{index}].textContent")


SITE_DATA_BLOCKED = """Object.defineProperty(window, "localStorage", {
  get() { throw new DOMException("The user blocked site data", "SecurityError"); }
});"""


@pytest.mark.browser
@pytest.mark.slow
def test_page_uploads_large_files_with_site_data_blocked(tmp_path: Path, server: Server, chromium_page: Any) -> None:
    """Reading localStorage throws then: a large file goes resumably all the same (it cannot go on
    after a reload), and the files picked with it are not dropped."""
    big, small = payload(33 * MiB, seed=21), payload(MiB, seed=22)
    paths = [write_big(tmp_path, big), write_big(tmp_path, small, "small.bin")]
    page = chromium_page(server.url + "/", 0, SITE_DATA_BLOCKED)
    page.set_input_files("#picker", [str(path) for path in paths])
    assert all_settled(page, 2) == ["done", "done"], [row_message(page, 0), row_message(page, 1)]
    stored = sorted((server.upload_dir / i).read_bytes() for i in stored_ids(server.upload_dir))
    assert stored == sorted([big, small])
    assert resumable_files(server.upload_dir) == []


@pytest.mark.browser
@pytest.mark.slow
def test_page_shows_the_servers_words_for_a_failure_not_worth_waiting_out(
    tmp_path: Path, server: Server, chromium_page: Any
) -> None:
    """A 507 (disk full) to a PATCH is not a lost connection: the row says the server's words at
    once; Retry later goes on from where the server stopped."""
    data = payload(33 * MiB, seed=23)
    path = write_big(tmp_path, data)
    page = chromium_page(server.url + "/", 0)
    full = {"on": True}

    def disk_full(route: Any) -> None:
        if full["on"] and route.request.method == "PATCH":
            route.fulfill(status=507, content_type="application/json",
                          body=json.dumps({"error": "insufficient_storage", "detail": "no space left on the disk"}))
        else:
            route.continue_()

    page.route("**/files/**", disk_full)
    started = time.monotonic()
    page.set_input_files("#picker", str(path))
    assert settled(page, timeout=60) == "error" and time.monotonic() - started < 20
    assert "(507): no space left on the disk" in row_message(page)
    full["on"] = False
    page.click("#rows tr button.retry")
    assert settled(page) == "done", row_message(page)
    assert_only_stored(server.upload_dir, data)


@pytest.mark.browser
@pytest.mark.slow
def test_page_creates_the_upload_again_when_its_creation_got_no_answer(
    tmp_path: Path, server: Server, chromium_page: Any
) -> None:
    """The server unreachable when the upload is created: the page tries the creation again (it
    asked `HEAD null`, which a host app under the same prefix may answer 200)."""
    data = payload(33 * MiB, seed=24)
    path = write_big(tmp_path, data)
    page = chromium_page(server.url + "/", 0)
    requests: list[str] = []
    page.on("request", lambda request: requests.append(f"{request.method} {request.url}"))
    lost = []

    def unreachable_once(route: Any) -> None:
        if route.request.method == "POST" and not lost:
            lost.append(True)
            route.abort("connectionrefused")
        else:
            route.continue_()

    page.route("**/files", unreachable_once)
    page.set_input_files("#picker", str(path))
    assert settled(page) == "done", row_message(page)
    assert lost and not [r for r in requests if "null" in r]
    assert_only_stored(server.upload_dir, data)


@pytest.mark.browser
@pytest.mark.slow
def test_page_sends_the_same_large_file_picked_twice_as_two_uploads(
    tmp_path: Path, server: Server, chromium_page: Any
) -> None:
    """Both rows once shared one upload (the saved key is the file's): one took it over from the
    other, which then failed though the file was stored."""
    data = payload(33 * MiB, seed=25)
    path = write_big(tmp_path, data)
    page = chromium_page(server.url + "/", 40_000_000)
    page.set_input_files("#picker", str(path))
    page.set_input_files("#picker", str(path))
    assert all_settled(page, 2) == ["done", "done"], [row_message(page, 0), row_message(page, 1)]
    assert [(server.upload_dir / i).read_bytes() == data for i in stored_ids(server.upload_dir)] == [True, True]
    assert resumable_files(server.upload_dir) == []


@pytest.mark.browser
@pytest.mark.slow
def test_page_never_goes_on_from_another_files_bytes_after_a_reload(
    tmp_path: Path, server: Server, chromium_page: Any
) -> None:
    """After a reload, another file with the same name, size and time is picked: it is sent whole,
    not spliced onto the first file's bytes on the server."""
    first, second = payload(40 * MiB, seed=26), payload(40 * MiB, seed=27)
    one, other = write_big(tmp_path, first, "disk.img", "one"), write_big(tmp_path, second, "disk.img", "other")
    for path in (one, other):
        os.utime(path, ns=(1_700_000_000 * 10**9, 1_700_000_000 * 10**9))
    page = chromium_page(server.url + "/", 8_000_000)
    page.set_input_files("#picker", str(one))
    wait_for(lambda: staged_size(server.upload_dir) >= 17 * MiB)
    page.reload()
    page.set_input_files("#picker", str(other))
    assert settled(page) == "done", row_message(page)
    assert_only_stored(server.upload_dir, second)


@pytest.mark.slow
def test_startup_sweeps_expired_uploads(tmp_path: Path) -> None:
    upload_dir = tmp_path / "uploads"
    env = {"UPLOAD_FSYNC": "0", "UPLOAD_RESUMABLE_EXPIRY": "1"}
    with Server(upload_dir, env=env) as server, server.client() as http:
        location = http.post("/files", headers={**TUS, "Upload-Length": "10"}).headers["location"]
        assert http.patch(location, content=b"abc", headers={**OCTETS, "Upload-Offset": "0"}).status_code == 204
    assert len(resumable_files(upload_dir)) == 2
    time.sleep(1.2)
    with Server(upload_dir, env=env):
        assert resumable_files(upload_dir) == []  # gone at startup, before any request


@pytest.mark.browser
@pytest.mark.slow
def test_page_shows_a_file_stored_though_the_last_answer_was_lost(tmp_path: Path, server: Server, chromium_page: Any) -> None:
    """The last PATCH stores the file but its answer never reaches the page: the page's HEAD then
    finds a stored file (200, Upload-Complete: ?1) and shows it as stored, not as failed."""
    data = payload(33 * MiB, seed=13)
    path = tmp_path / "files" / "video.mp4"
    path.parent.mkdir()
    path.write_bytes(data)
    page = chromium_page(server.url + "/", 0)

    def lose_the_last_answer(route: Any) -> None:
        if route.request.method == "PATCH" and route.request.headers.get("upload-complete") == "?1":
            route.fetch()  # the server gets every byte and stores the file
            route.abort("connectionreset")  # the page never sees the answer
        else:
            route.continue_()

    page.route("**/files/**", lose_the_last_answer)
    page.set_input_files("#picker", str(path))
    wait_for(lambda: row_state(page) in ("done", "error"), timeout=120)
    assert row_state(page) == "done", page.evaluate("document.querySelector('#rows tr .msg').textContent")
    assert page.evaluate("document.querySelector('#rows tr td.sha code').textContent") == sha(data)
    assert page.evaluate("Object.keys(localStorage).length") == 0  # nothing left to resume
    [file_id] = stored_ids(server.upload_dir)
    assert (server.upload_dir / file_id).read_bytes() == data

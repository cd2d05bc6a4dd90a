"""Form uploads behave the same on both storage backends (SPEC §11): the same records, the
same errors, nothing left behind. Each test runs on the local dir and on SeaweedFS (S3).

Here: files of several S3 parts. The form tests of small files run on both backends in
test_http, test_form_input, test_asgi, test_limits, test_hostile and test_failures.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
from typing import Any

import httpx
import pytest

import upload_asgi
from backends import S3_PART_SIZE
from support import (
    Reply, call_app, chunks_of, field_part, file_part, form_body, form_content_type, http_scope, split_at,
)
from upload_service import early_answer
from test_http import check_created, post_body
from support import assert_error as check_error

BIG = 2 * S3_PART_SIZE + 12345  # a multipart upload on S3, with a last part


@pytest.mark.parametrize("size", [0, 5000, BIG], ids=["empty", "small", "multipart"])
async def test_upload_one_file(backend: Any, backend_client: httpx.AsyncClient, size: int) -> None:
    data = os.urandom(size)
    body = form_body([field_part("description", "d"), file_part(data, "a.txt", content_type="text/plain")])
    record = check_created(await post_body(backend_client, body))
    assert (record["filename"], record["content_type"], record["description"]) == ("a.txt", "text/plain", "d")
    backend.assert_stored(record, data)
    assert backend.stored_ids() == [record["id"]]


async def test_upload_multiple(backend: Any, backend_client: httpx.AsyncClient) -> None:
    datas = [b"", b"small", os.urandom(BIG)]
    body = form_body([file_part(d, f"{i}.bin", name="files") for i, d in enumerate(datas)])
    answer = check_created(await post_body(backend_client, body, "/upload-multiple"))
    assert answer["count"] == 3 and answer["total_size"] == sum(map(len, datas))
    for record, data in zip(answer["files"], datas):
        backend.assert_stored(record, data)
    assert sorted(backend.stored_ids()) == sorted(r["id"] for r in answer["files"])


async def test_upload_many_files(backend: Any, backend_client: httpx.AsyncClient) -> None:
    """More files than the S3 commit completes at once: every one stored, each with its record."""
    datas = [os.urandom(100 + i) for i in range(20)]
    body = form_body([file_part(d, f"{i}.bin", name="files") for i, d in enumerate(datas)])
    answer = check_created(await post_body(backend_client, body, "/upload-multiple"))
    assert answer["count"] == 20
    for record, data in zip(answer["files"], datas):
        backend.assert_stored(record, data)
    assert len(backend.stored_ids()) == 20


@pytest.mark.parametrize("case", ["sha256_mismatch", "second_file_cut", "file_too_large"])
async def test_refused_after_big_files_leaves_nothing(backend: Any, case: str) -> None:
    """Refused once a file has gone out (on S3 as parts of a multipart upload): none of it stays."""
    app = upload_asgi.create_app(backend.config(max_file_size=3 * S3_PART_SIZE))
    big = os.urandom(BIG)
    if case == "sha256_mismatch":
        body, path, expected = form_body([file_part(big), field_part("sha256", "0" * 64)]), "/upload", 422
    elif case == "second_file_cut":
        whole = form_body([file_part(big, "1", name="files"), file_part(big, "2", name="files")])
        body, path, expected = whole[: len(whole) - 1000], "/upload-multiple", 400
    else:
        body, path, expected = form_body([file_part(os.urandom(3 * S3_PART_SIZE + 1))]), "/upload", 413
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
        reply = await post_body(client, body, path)
    assert reply.status_code == expected, reply.text
    backend.assert_nothing_stored()
    if hasattr(app.store, "aclose"):
        await app.store.aclose()


async def test_disconnect_mid_upload_leaves_nothing(backend: Any, backend_app: upload_asgi.UploadApp) -> None:
    body = form_body([file_part(b"first", "1", name="files"), file_part(os.urandom(BIG), "2", name="files")])
    chunks = split_at(body, range(0, len(body) - 1000, 1024 * 1024))
    scope = http_scope("/upload-multiple", content_type=form_content_type())
    reply = await call_app(backend_app, scope, chunks[:-1], disconnect_after=True)
    assert reply.status is None  # a client that left gets no answer
    backend.assert_nothing_stored()


async def test_a_client_that_stalls_mid_file_gets_408_and_leaves_nothing(
    backend: Any, make_backend_app: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The idle timeout with a file on its way (on S3: a multipart upload with a part sent)."""
    monkeypatch.setattr(early_answer, "DRAIN_LIMIT_SECONDS", 0.2)  # the client says nothing more
    app = make_backend_app(idle_timeout=0.5)
    body = form_body([file_part(os.urandom(BIG))])
    chunks = chunks_of(body[: S3_PART_SIZE + 1024 * 1024], 256 * 1024)
    seen: list[str] = []
    never = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": True}
        for _ in range(40):  # within the idle timeout: the first part is on its way
            seen.extend(await asyncio.to_thread(backend.in_flight))
            if seen:
                break
            await asyncio.sleep(0.01)
        await never.wait()
        return {}

    reply = Reply()
    await asyncio.wait_for(app(http_scope("/upload", content_type=form_content_type()), receive, reply.record), 30)
    check_error(reply, 408, "request_timeout")
    assert len(seen) == 1
    backend.assert_nothing_stored()


async def test_error_then_success(backend: Any, backend_client: httpx.AsyncClient) -> None:
    data = os.urandom(BIG)
    body = form_body([file_part(data)])
    check_error(await post_body(backend_client, body[:-300]), 400, "malformed_multipart")
    backend.assert_nothing_stored()
    backend.assert_stored(check_created(await post_body(backend_client, body)), data)


async def test_health(backend: Any, backend_client: httpx.AsyncClient) -> None:
    reply = await backend_client.get("/health")
    assert reply.status_code == 200 and reply.json()["status"] == "ok"


async def test_a_resumable_upload_is_stored_like_a_form_upload(backend: Any, backend_client: httpx.AsyncClient) -> None:
    """tus creation, then PATCHes: the finished file lands in the store (test_s3resumable: what S3 holds meanwhile)."""
    data = os.urandom(BIG)
    tus = {"tus-resumable": "1.0.0"}
    created = await backend_client.post(
        "/files", headers={**tus, "upload-length": str(len(data)), "upload-metadata": "filename YS5iaW4="},
    )
    assert created.status_code == 201, created.text
    url = created.headers["location"]
    offset = 0
    for piece in (data[: S3_PART_SIZE + 1], data[S3_PART_SIZE + 1 :]):
        patched = await backend_client.patch(url, content=piece, headers={
            **tus, "upload-offset": str(offset), "content-type": "application/offset+octet-stream",
        })
        assert patched.status_code == 204, patched.text
        offset += len(piece)
        assert patched.headers["upload-offset"] == str(offset)
    record = (await backend_client.get(f"{url}/record")).json()
    assert (record["filename"], record["size"], record["sha256"]) == ("a.bin", len(data), hashlib.sha256(data).hexdigest())
    backend.assert_stored(record, data)
    assert backend.stored_ids() == [record["id"]]
    assert (await backend_client.get(url)).content == data

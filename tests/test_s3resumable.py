"""Resumable uploads on the S3 backend (upload_service/s3resumable.py), against a real SeaweedFS.

What only S3 has: an upload begun through one server and finished through another
(separate UPLOAD_DIRs, one bucket), one writer across servers (the lease), a kill -9
mid-PATCH resumed from the info's offset, nothing left in the bucket but the file and
its record, nothing in UPLOAD_DIR, and memory within parts in flight x part size. The
behaviour shared with the local backend runs on both in test_resumable.py.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import hashlib
import json
import time
import tracemalloc
from pathlib import Path
from typing import Any, AsyncIterator

import httpx
import pytest
from botocore.exceptions import ClientError

import upload_asgi
from backends import S3Backend, close_app
from s3server import BUCKET
from support import Server
from test_resumable import OCTETS, TUS, metric, payload, sha
from upload_service.errors import StorageUnavailable, UploadLocked
from upload_service.units import MiB

LIMIT = 64 * MiB


def in_progress(backend: S3Backend) -> list[str]:
    """What of resumable uploads is in the bucket: objects under .resumable/, multipart uploads."""
    return [n for n in backend.objects() if n.startswith(".resumable/")] + backend.uploads_in_progress()


def assert_only_stored(backend: S3Backend, record: dict[str, Any], data: bytes) -> None:
    """The file and its record, exactly; nothing else of the upload in the bucket or in UPLOAD_DIR."""
    backend.assert_stored(record, data)
    assert backend.objects() == sorted([record["id"], f"{record['id']}.json"])
    assert backend.uploads_in_progress() == []


def app_on(bucket: S3Backend, upload_dir: Path, **settings: Any) -> upload_asgi.UploadApp:
    """Another app server on the same bucket and prefix, with an UPLOAD_DIR of its own."""
    config = bucket.config(fsync=False, max_file_size=LIMIT, **settings)
    return upload_asgi.create_app(dataclasses.replace(config, upload_dir=upload_dir))


def client_of(app: upload_asgi.UploadApp) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t", timeout=60)


async def create(client: httpx.AsyncClient, length: int) -> str:
    """A tus upload of `length` bytes; its location."""
    reply = await client.post("/files", headers={**TUS, "Upload-Length": str(length)})
    assert reply.status_code == 201, reply.text
    return reply.headers["location"]


async def patch(client: httpx.AsyncClient, location: str, offset: int, data: Any, **headers: str) -> httpx.Response:
    return await client.patch(location, content=data, headers={**OCTETS, "Upload-Offset": str(offset), **headers})


async def offset_of(client: httpx.AsyncClient, location: str) -> int:
    reply = await client.head(location, headers=TUS)
    assert reply.status_code == 200, reply.text
    return int(reply.headers["upload-offset"])


@pytest.fixture
async def two_apps(bucket: S3Backend, tmp_path: Path) -> AsyncIterator[tuple[upload_asgi.UploadApp, upload_asgi.UploadApp]]:
    first, second = app_on(bucket, tmp_path / "a"), app_on(bucket, tmp_path / "b")
    yield first, second
    await close_app(first)
    await close_app(second)


async def test_begun_on_one_server_finished_on_another(bucket: S3Backend, two_apps: Any, tmp_path: Path) -> None:
    data = payload(13 * MiB + 12_345, seed=5)  # two parts of 5 MiB and a last one
    first, second = two_apps
    async with client_of(first) as a, client_of(second) as b:
        reply = await a.post("/files", headers={**TUS, "Upload-Length": str(len(data)), "Upload-Metadata": "filename eC5iaW4="})
        location = reply.headers["location"]
        assert (await patch(a, location, 0, data[: 3 * MiB])).status_code == 204
        assert (await patch(a, location, 3 * MiB, data[3 * MiB : 8 * MiB + 7])).status_code == 204  # a part and a tail
        assert await offset_of(b, location) == 8 * MiB + 7
        check = (await b.get(location)).json()
        assert check["error"] == "upload_incomplete"
        reply = await patch(b, location, 8 * MiB + 7, data[8 * MiB + 7 :])
        assert reply.status_code == 204, reply.text
        record = (await a.get(f"{location}/record")).json()
        assert record["sha256"] == sha(data) and record["size"] == len(data) and record["filename"] == "x.bin"
        assert (await a.get(location)).content == data
        # Server B never saw the first bytes: it read the finished object back once to hash it.
        assert metric((await b.get("/metrics")).text, "upload_asgi_resumable_rehashed_bytes_total") == len(data)
        assert metric((await a.get("/metrics")).text, "upload_asgi_resumable_rehashed_bytes_total") == 0
    assert_only_stored(bucket, record, data)
    for upload_dir in (tmp_path / "a", tmp_path / "b"):
        assert not upload_dir.exists() or list(upload_dir.rglob("*")) == []


async def test_one_writer_across_servers(bucket: S3Backend, two_apps: Any) -> None:
    """A PATCH through another server asks the upload's holder to let go (a stop object naming its
    lease, which it checks about once a second), and goes on from the offset HEAD gave: the holder's
    body, of no declared length, was not counted yet and is dropped. Never two writers at once; the
    stop object goes with them."""
    data = payload(6 * MiB, seed=6)
    first, second = two_apps
    release = asyncio.Event()

    async def held_body() -> AsyncIterator[bytes]:
        yield data[: 3 * MiB]
        await release.wait()
        yield data[3 * MiB :]

    async with client_of(first) as a, client_of(second) as b:
        location = await create(a, len(data))
        writing = asyncio.create_task(patch(a, location, 0, held_body()))
        deadline = time.monotonic() + 20
        while not any(n.endswith(".lock") for n in bucket.objects()) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert await offset_of(b, location) == 0  # HEAD needs no lease: the info before the PATCH
        reply = await patch(b, location, 0, data)
        assert reply.status_code == 204, reply.text
        assert (await writing).status_code == 400
        release.set()
        record = (await b.get(f"{location}/record")).json()
    assert_only_stored(bucket, record, data)


async def test_a_stop_its_holder_never_read_goes_with_the_upload(bucket: S3Backend, two_apps: Any) -> None:
    """A holder that reads no body (a DELETE, a PATCH storing the file) never sees a stop put for it:
    the request that put it removes it once the upload is gone, instead of the sweep an hour later."""
    first, second = two_apps
    async with client_of(first) as a, client_of(second) as b:
        location = await create(a, 6)
        upload_id = location.rsplit("/", 1)[1]
        holder = await asyncio.to_thread(first.resumable.store.acquire, upload_id)
        asking = asyncio.create_task(b.delete(location, headers=TUS))
        deadline = time.monotonic() + 10
        while f".resumable/{upload_id}.stop" not in bucket.objects():
            assert time.monotonic() < deadline, "no stop was put"
            await asyncio.sleep(0.05)
        await asyncio.to_thread(holder.terminate)
        assert (await asking).status_code == 404  # terminated meanwhile: nothing left to delete
    assert [name for name in bucket.objects() if name.startswith(".resumable/")] == []


async def test_a_dead_writers_lease_goes_stale(bucket: S3Backend, two_apps: Any) -> None:
    first, second = two_apps
    async with client_of(first) as a:
        location = await create(a, 6)
        assert (await patch(a, location, 0, b"abc")).status_code == 204
    upload_id = location.rsplit("/", 1)[1]
    lock = f"{bucket.prefix}/.resumable/{upload_id}.lock"
    bucket.s3.put_object(Bucket=BUCKET, Key=lock, Body=json.dumps({"expires": time.time() + 60}).encode())
    async with client_of(second) as b:
        assert (await patch(b, location, 3, b"def")).status_code == 423  # held, and not stale
        bucket.s3.put_object(Bucket=BUCKET, Key=lock, Body=json.dumps({"expires": time.time() - 1}).encode())
        assert (await patch(b, location, 3, b"def")).status_code == 204  # its holder died: taken over
        record = (await b.get(f"{location}/record")).json()
    assert_only_stored(bucket, record, b"abcdef")


async def test_a_taken_over_upload_never_reuses_the_old_holders_part_numbers(bucket: S3Backend, two_apps: Any) -> None:
    """The old holder may only have been slow: a part it was sending could still land, so the new
    holder numbers its parts past the ones the old one could have had in flight."""
    data = payload(12 * MiB, seed=15)
    first, second = two_apps
    async with client_of(first) as a:
        location = await create(a, len(data))
        assert (await patch(a, location, 0, data[: 6 * MiB])).status_code == 204  # part 1 and a tail
    upload_id = location.rsplit("/", 1)[1]
    lock = f"{bucket.prefix}/.resumable/{upload_id}.lock"
    bucket.s3.put_object(Bucket=BUCKET, Key=lock, Body=json.dumps({"expires": time.time() - 1}).encode())
    async with client_of(second) as b:
        assert (await patch(b, location, 6 * MiB, data[6 * MiB : 11 * MiB])).status_code == 204
        info = json.loads(bucket.object_bytes(f".resumable/{upload_id}.info"))
        in_flight = second.config.s3_parts_in_flight
        assert [number for number, _, _ in info["parts"]] == [1, 2 + in_flight + 1]
        assert (await patch(b, location, 11 * MiB, data[11 * MiB :])).status_code == 204
        record = (await b.get(f"{location}/record")).json()
    assert_only_stored(bucket, record, data)


async def test_a_patch_writes_the_info_once(bucket: S3Backend, two_apps: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its bytes and its new expiry in one PUT of the info; a PATCH of no bytes still renews the expiry."""
    first, second = two_apps
    s3 = first.resumable.store.s3
    real_call = s3.call
    info_puts: list[str] = []

    async def counting(operation: str, **params: Any) -> Any:
        if operation == "put_object" and params["Key"].endswith(".info"):
            info_puts.append(params["Key"])
        return await real_call(operation, **params)

    monkeypatch.setattr(s3, "call", counting)
    data = payload(300, seed=15)
    async with client_of(first) as a, client_of(second) as b:
        location = await create(a, len(data))
        info_puts.clear()
        assert (await patch(a, location, 0, data[:100])).status_code == 204
        assert len(info_puts) == 1
        expires = (await b.head(location, headers=TUS)).headers["upload-expires"]
        await asyncio.sleep(1.1)  # Upload-Expires counts in whole seconds
        assert (await patch(a, location, 100, b"")).status_code == 204
        assert len(info_puts) == 2
        assert (await b.head(location, headers=TUS)).headers["upload-expires"] != expires  # seen by another server
        assert (await patch(b, location, 100, data[100:])).status_code == 204
        record = (await a.get(f"{location}/record")).json()
    assert_only_stored(bucket, record, data)


async def test_memory_stays_within_the_parts_in_flight(bucket: S3Backend, tmp_path: Path) -> None:
    size = 40 * MiB
    app = app_on(bucket, tmp_path / "m", s3_parts_in_flight=2)

    async def body() -> AsyncIterator[bytes]:
        block = payload(256 * 1024, seed=9)
        for _ in range(size // len(block)):
            yield block

    try:
        async with client_of(app) as client:
            location = await create(client, size)
            tracemalloc.start()
            try:
                reply = await patch(client, location, 0, body())
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
            assert reply.status_code == 204, reply.text
            assert (await client.get(f"{location}/record")).json()["size"] == size
    finally:
        await close_app(app)
    # Two parts of 5 MiB (one filling, one sending) and a block on its way, not 40 MiB.
    assert peak < 14 * MiB, peak  # measured: 10.8 MiB


def server_env(bucket: S3Backend, **extra: str) -> dict[str, str]:
    return {**bucket.server_env(), "UPLOAD_FSYNC": "0", "UPLOAD_IDLE_TIMEOUT": "2", **extra}


@pytest.mark.slow
def test_kill_mid_patch_resumes_from_the_info(bucket: S3Backend, tmp_path: Path) -> None:
    from test_resumable import send_partial_patch

    data = payload(17 * MiB, seed=8)
    first = Server(tmp_path / "a", env=server_env(bucket)).start()
    try:
        with first.client() as http:
            location = http.post("/files", headers={**TUS, "Upload-Length": str(len(data))}).headers["location"]
            reply = http.patch(location, content=data[: 6 * MiB], headers={**OCTETS, "Upload-Offset": "0"})
            assert reply.status_code == 204
            sock = send_partial_patch(first.port, location, 6 * MiB, data[6 * MiB : 14 * MiB], len(data) - 6 * MiB)
            deadline = time.monotonic() + 20
            while len(bucket.s3.list_parts(Bucket=BUCKET, Key=f"{bucket.prefix}/{location[7:]}",
                                           UploadId=uploads(bucket)[0]).get("Parts", [])) < 2:
                assert time.monotonic() < deadline, "no part of the second PATCH reached the bucket"
                time.sleep(0.05)
    finally:
        first.kill()  # kill -9 mid-PATCH: a crash
        sock.close()
    with Server(tmp_path / "b", env=server_env(bucket)) as second, second.client() as http:
        reply = http.head(location, headers=TUS)
        assert int(reply.headers["upload-offset"]) == 6 * MiB  # the last info written
        deadline = time.monotonic() + 30
        while True:  # the dead server's lease goes stale (2 x the idle timeout, 5 s at least)
            reply = http.patch(location, content=data[6 * MiB :], headers={**OCTETS, "Upload-Offset": str(6 * MiB)})
            if reply.status_code != 423 or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert reply.status_code == 204, reply.text
        assert http.get(location).content == data
        record = http.get(f"{location}/record").json()
    assert record["sha256"] == sha(data)
    assert_only_stored(bucket, record, data)


@pytest.mark.slow
def test_a_silent_patch_is_taken_over_through_either_worker(bucket: S3Backend, tmp_path: Path) -> None:
    """With -w 2 the resuming PATCH lands in the worker that holds the upload (asked directly) or in
    the other (asked through a stop object): either way it is taken over, not a 423 until the idle
    timeout. The client resumes as tus clients do: from HEAD's offset, then from the 409's."""
    from test_resumable import send_partial_patch

    data = payload(1_000_000, seed=4)
    with Server(tmp_path / "u", env=server_env(bucket), args=["-w", "2"]) as server:
        for _ in range(4):
            with server.client() as http:
                location = http.post("/files", headers={**TUS, "Upload-Length": str(len(data))}).headers["location"]
            sock = send_partial_patch(server.port, location, 0, data[:300_000], len(data))
            lock = f".resumable/{location.rsplit('/', 1)[1]}.lock"
            deadline = time.monotonic() + 20
            while lock not in bucket.objects():
                assert time.monotonic() < deadline, "the silent PATCH never took its lease"
                time.sleep(0.05)
            with server.client() as http:  # a new connection: either worker
                offset = int(http.head(location, headers=TUS).headers["upload-offset"])
                reply = http.patch(location, content=data[offset:], headers={**OCTETS, "Upload-Offset": str(offset)})
                if reply.status_code == 409:  # the silent one kept what it got
                    offset = reply.json()["offset"]
                    reply = http.patch(location, content=data[offset:], headers={**OCTETS, "Upload-Offset": str(offset)})
                assert reply.status_code == 204, reply.text
                assert http.get(location).content == data
            assert sock.recv(65536).startswith(b"HTTP/1.1 400")
            sock.close()
    assert [name for name in bucket.objects() if name.startswith(".resumable/")] == []


def uploads(bucket: S3Backend) -> list[str]:
    answer = bucket.s3.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{bucket.prefix}/")
    return [u["UploadId"] for u in answer.get("Uploads", [])]


async def test_sweeps_leave_a_live_upload_and_remove_an_expired_one(bucket: S3Backend, tmp_path: Path) -> None:
    data = payload(7 * MiB, seed=4)
    app = app_on(bucket, tmp_path / "s", resumable_expiry=3)
    try:
        async with client_of(app) as client:
            location = await create(client, len(data) + 1)
            assert (await patch(client, location, 0, data)).status_code == 204
            assert len(bucket.uploads_in_progress()) == 1
            # The S3 store's sweep of abandoned multipart uploads leaves a live resumable upload's.
            assert await app.store.sweep(now=time.time() + 10**6) == 0
            assert await offset_of(client, location) == len(data)
            assert await asyncio.to_thread(app.resumable.sweep) == 0  # not expired yet
            await asyncio.sleep(3.2)
            assert await asyncio.to_thread(app.resumable.sweep) == 1
            assert (await client.head(location, headers=TUS)).status_code == 404
    finally:
        await close_app(app)
    bucket.assert_nothing_stored()


@pytest.mark.parametrize("race", ["renewed-before-the-lease", "changed-after-the-second-read"])
async def test_the_sweep_removes_only_the_info_version_it_read_expired(
    bucket: S3Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, race: str
) -> None:
    """The sweep's first read of an info may predate a PATCH that renewed it: it reads it again under the
    lease, and deletes that version only (If-Match), so an info written since is never removed."""
    app = app_on(bucket, tmp_path / "r")
    try:
        async with client_of(app) as client:
            location = await create(client, 10)
            assert (await patch(client, location, 0, b"abc")).status_code == 204
            store = app.resumable.store
            store.expiry = 0  # (an info this young is otherwise skipped unread)
            real_read_info = store.read_info
            reads = []

            async def stale_read(upload_id: str) -> Any:
                found = await real_read_info(upload_id)
                reads.append(upload_id)
                if race == "renewed-before-the-lease" and len(reads) == 1:
                    found[0].expires = time.time() - 1  # as it was before the PATCH renewed it
                elif race == "changed-after-the-second-read" and len(reads) <= 2:
                    found[0].expires = time.time() - 1
                    if len(reads) == 2:
                        found[1].etag = '"written-before-the-patch"'
                return found

            monkeypatch.setattr(store, "read_info", stale_read)
            assert await asyncio.to_thread(store.sweep, time.time()) == 0
            assert await offset_of(client, location) == 3
            assert (await patch(client, location, 3, b"defghij")).status_code == 204
            record = (await client.get(f"{location}/record")).json()
    finally:
        await close_app(app)
    assert_only_stored(bucket, record, b"abcdefghij")


def test_tuspy_through_hypercorn_on_s3(bucket: S3Backend, tmp_path: Path) -> None:
    from tusclient import client as tusclient

    data = payload(11 * MiB + 3, seed=7)
    path = tmp_path / "source.bin"
    path.write_bytes(data)
    with Server(tmp_path / "uploads", env=server_env(bucket)) as server:
        tus = tusclient.TusClient(f"{server.url}/files")
        first = tus.uploader(file_path=str(path), chunk_size=3 * MiB, metadata={"filename": "source.bin"},
                             upload_checksum=True)
        first.upload(stop_at=6 * MiB)
        resumed = tus.uploader(file_path=str(path), chunk_size=4 * MiB, url=first.url, upload_checksum=True)
        assert resumed.offset == 6 * MiB
        resumed.upload()
        with server.client() as http:
            assert http.get(first.url).content == data
            record = http.get(f"{first.url}/record").json()
            # Same server throughout: the hash state stayed in memory, nothing re-read.
            assert metric(http.get("/metrics").text, "upload_asgi_resumable_rehashed_bytes_total") == 0
    assert record["sha256"] == sha(data) and record["filename"] == "source.bin"
    assert_only_stored(bucket, record, data)


@pytest.mark.parametrize("changed", ["lease", "info"])
async def test_a_writer_that_lost_the_upload_commits_nothing(bucket: S3Backend, tmp_path: Path, changed: str) -> None:
    """Another writer took the lease over (ours went stale) or wrote the info: 423, nothing of ours counts."""
    app = app_on(bucket, tmp_path / "w", idle_timeout=2)  # a lease of 5 s, renewed after 1.25 s
    data = payload(2 * MiB, seed=2)
    go_on = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield data[:MiB]
        await go_on.wait()
        yield data[MiB:]

    try:
        async with client_of(app) as client:
            location = await create(client, len(data))
            key = f"{bucket.prefix}/.resumable/{location[7:]}.{'lock' if changed == 'lease' else 'info'}"
            writing = asyncio.create_task(patch(client, location, 0, body()))
            await asyncio.sleep(1.5)
            if changed == "lease":
                bucket.s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps({"expires": time.time() + 60}).encode())
            else:
                info = json.loads(bucket.object_bytes(key[len(bucket.prefix) + 1 :]))
                bucket.s3.put_object(Bucket=BUCKET, Key=key, Body=json.dumps({**info, "generation": 99}).encode())
            go_on.set()
            reply = await writing
            assert reply.status_code == 423, reply.text
            assert reply.json()["error"] == "upload_locked"
            assert "another writer" in reply.json()["detail"]
            if changed == "lease":
                bucket.s3.delete_object(Bucket=BUCKET, Key=key)  # the other writer is done
            assert await offset_of(client, location) == 0
            assert (await patch(client, location, 0, data)).status_code == 204
            record = (await client.get(f"{location}/record")).json()
    finally:
        await close_app(app)
    assert_only_stored(bucket, record, data)


async def test_an_info_write_whose_answer_was_lost_still_counts(
    bucket: S3Backend, two_apps: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The PUT of the info landed, its answer did not (a retry then sees 412): the tail it names stays."""
    first, second = two_apps
    store = first.resumable.store
    real_write_info = store.write_info
    lost = []

    async def answer_lost(info: Any, saved: Any, etag: Any) -> str:
        written = await real_write_info(info, saved, etag)
        if saved.tail is None or lost:
            return written
        lost.append(saved.tail)
        with pytest.raises(UploadLocked):  # what botocore's retry then gets: a 412
            await real_write_info(info, saved, etag)
        raise StorageUnavailable("the object store did not answer in time")

    monkeypatch.setattr(store, "write_info", answer_lost)
    data = payload(300, seed=14)
    async with client_of(first) as a, client_of(second) as b:
        location = await create(a, len(data))
        assert (await patch(a, location, 0, data[:100])).status_code == 204
        assert lost and await offset_of(b, location) == 100
        assert (await patch(b, location, 100, data[100:])).status_code == 204
        record = (await b.get(f"{location}/record")).json()
    assert_only_stored(bucket, record, data)


async def test_a_tail_not_as_its_info_says_is_503(bucket: S3Backend, two_apps: Any) -> None:
    first, _ = two_apps
    async with client_of(first) as client:
        location = await create(client, 200)
        assert (await patch(client, location, 0, b"x" * 100)).status_code == 204
        tail = next(n for n in bucket.objects() if ".tail-" in n)
        bucket.s3.put_object(Bucket=BUCKET, Key=f"{bucket.prefix}/{tail}", Body=b"x" * 50)
        reply = await patch(client, location, 100, b"y" * 100)
        assert reply.status_code == 503 and reply.json()["error"] == "storage_unavailable"
        assert await offset_of(client, location) == 100
        assert (await client.delete(location, headers=TUS)).status_code == 204
    bucket.assert_nothing_stored()


def complete_by_hand(bucket: S3Backend, upload_id: str, data: bytes) -> None:
    """What finishing did before a crash: the tail sent as the last part, the multipart upload completed."""
    info = json.loads(bucket.object_bytes(f".resumable/{upload_id}.info"))
    key = f"{bucket.prefix}/{upload_id}"
    parts = [{"PartNumber": n, "ETag": etag} for n, etag, _ in info["parts"]]
    tail = data[sum(size for _, _, size in info["parts"]):]
    if tail:
        number = len(parts) + 1
        sent = bucket.s3.upload_part(Bucket=BUCKET, Key=key, UploadId=info["upload_id"], PartNumber=number, Body=tail)
        parts.append({"PartNumber": number, "ETag": sent["ETag"]})
    bucket.s3.complete_multipart_upload(Bucket=BUCKET, Key=key, UploadId=info["upload_id"],
                                        MultipartUpload={"Parts": parts})


@pytest.mark.parametrize("size", [10 * MiB, 5 * MiB + 100], ids=["two-parts", "a-part-and-a-tail"])
async def test_completed_before_its_record_finishes_on_the_next_patch(bucket: S3Backend, two_apps: Any, size: int) -> None:
    """A crash after the multipart upload was completed but before the info or the record said so."""
    data = payload(size, seed=10)
    first, second = two_apps
    async with client_of(first) as a, client_of(second) as b:
        location = (await a.post("/files", headers={**TUS, "Upload-Defer-Length": "1"})).headers["location"]
        assert (await patch(a, location, 0, data)).status_code == 204
        complete_by_hand(bucket, location[7:], data)
        assert (await b.get(location)).status_code == 409  # no record: still an upload
        reply = await patch(b, location, len(data), b"", **{"Upload-Length": str(len(data))})
        assert reply.status_code == 204, reply.text
        record = (await a.get(f"{location}/record")).json()
        assert metric((await b.get("/metrics")).text, "upload_asgi_resumable_rehashed_bytes_total") == len(data)
    assert record["sha256"] == sha(data)
    assert_only_stored(bucket, record, data)


async def test_the_store_sweep_spares_a_completed_upload_without_its_record(bucket: S3Backend, two_apps: Any) -> None:
    """The object is there, its record not yet (a crash, or a client back after a day): not an orphan."""
    data = payload(10 * MiB, seed=12)
    first, second = two_apps
    async with client_of(first) as a, client_of(second) as b:
        location = (await a.post("/files", headers={**TUS, "Upload-Defer-Length": "1"})).headers["location"]
        assert (await patch(a, location, 0, data)).status_code == 204
        complete_by_hand(bucket, location[7:], data)
        assert await first.store.sweep(time.time() + first.store.sweep_after + 10) == 0
        reply = await patch(b, location, len(data), b"", **{"Upload-Length": str(len(data))})
        assert reply.status_code == 204, reply.text
        record = (await a.get(f"{location}/record")).json()
    assert_only_stored(bucket, record, data)


async def test_the_resumable_sweep_keeps_a_finished_file_whose_info_stayed(bucket: S3Backend, two_apps: Any) -> None:
    """Finishing wrote the record, then deleting the info failed (or the process died): the file stays."""
    data = payload(1000, seed=13)
    first, _ = two_apps
    async with client_of(first) as a:
        reply = await a.post("/files", headers={**TUS, **OCTETS, "Upload-Length": str(len(data))}, content=data)
        assert reply.status_code == 201, reply.text
        upload_id = reply.headers["location"][len("/files/"):]
        left = {"id": upload_id, "length": len(data), "metadata": {}, "expires": time.time() - 1, "sha256": None,
                "upload_id": None, "parts": [], "tail": None, "generation": 3, "completed": True}
        bucket.s3.put_object(Bucket=BUCKET, Key=f"{bucket.prefix}/.resumable/{upload_id}.info",
                             Body=json.dumps(left).encode())
        await asyncio.to_thread(first.resumable.store.sweep, time.time() + 3 * 86400)
        got = await a.get(f"/files/{upload_id}")
        record = (await a.get(f"/files/{upload_id}/record")).json()
    assert got.status_code == 200 and got.content == data
    assert_only_stored(bucket, record, data)


async def test_sweep_removes_what_a_crash_left_without_an_info(bucket: S3Backend, two_apps: Any) -> None:
    first, _ = two_apps
    orphan = "0123456789abcdef" * 2
    for name in (f"{orphan}.tail-3", f"{orphan}.lock"):
        bucket.s3.put_object(Bucket=BUCKET, Key=f"{bucket.prefix}/.resumable/{name}", Body=b"left")
    store = first.resumable.store
    assert await asyncio.to_thread(store.sweep, time.time()) == 0
    assert len(bucket.objects()) == 2  # young: maybe a creation under way
    assert await asyncio.to_thread(store.sweep, time.time() + 7200) == 0
    bucket.assert_nothing_stored()


async def test_a_lease_the_store_was_away_for_is_released_once_it_is_back(
    bucket: S3Backend, two_apps: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A request ends while the store is away: its lease stays, and would lock the upload (423) for
    twice the idle timeout after the store came back. It is deleted as soon as the store answers."""
    from upload_service import s3store

    monkeypatch.setattr(s3store, "CLEANUP_RETRY_SECONDS", 0.05)
    first, second = two_apps
    store = first.resumable.store
    real_delete = store.delete
    failed: list[str] = []

    async def away_once(key: str, if_match: Any = None) -> bool:
        if key.endswith(".lock") and if_match is not None and not failed:  # a release, not the probe
            failed.append(key)
            raise StorageUnavailable("down")
        return await real_delete(key, if_match)

    monkeypatch.setattr(store, "delete", away_once)
    data = payload(200, seed=16)
    async with client_of(first) as a, client_of(second) as b:
        location = await create(a, len(data))  # its lease, taken to write the info, is not released
        assert failed and "tried again later" in caplog.text
        deadline = time.monotonic() + 10
        while any(n.endswith(".lock") for n in bucket.objects()):
            assert time.monotonic() < deadline, "the lease stayed"
            await asyncio.sleep(0.05)
        assert (await patch(b, location, 0, data[:100])).status_code == 204
        assert (await patch(a, location, 100, data[100:])).status_code == 204
        record = (await b.get(f"{location}/record")).json()
    assert_only_stored(bucket, record, data)


async def test_a_multipart_upload_the_store_was_away_for_is_aborted_once_it_is_back(
    bucket: S3Backend, two_apps: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A PATCH taken back (its checksum fails) aborts the multipart upload it began; if the store
    is away then, the abort is tried again (the sweep leaves it while the upload's info is there)."""
    from upload_service import s3store

    monkeypatch.setattr(s3store, "CLEANUP_RETRY_SECONDS", 0.05)
    first, _ = two_apps
    s3 = first.resumable.store.s3
    real_abort = s3.abort_multipart
    failed: list[str] = []

    async def away_once(key: str, upload_id: str, within: float | None = None) -> None:
        if not failed:
            failed.append(upload_id)
            raise StorageUnavailable("down")
        await real_abort(key, upload_id)

    monkeypatch.setattr(s3, "abort_multipart", away_once)
    data = payload(12 * MiB, seed=17)
    wrong = "sha256 " + base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    async with client_of(first) as a:
        location = await create(a, len(data))
        reply = await patch(a, location, 0, data, **{"Upload-Checksum": wrong})
        assert reply.status_code == 460, reply.text
        assert failed and "tried again later" in caplog.text
        deadline = time.monotonic() + 10
        while bucket.uploads_in_progress():
            assert time.monotonic() < deadline, "the multipart upload stayed"
            await asyncio.sleep(0.05)
        assert (await patch(a, location, 0, data)).status_code == 204
        record = (await a.get(f"{location}/record")).json()
    assert_only_stored(bucket, record, data)


async def test_clean_up_calls_the_store_does_not_answer_hold_the_answer_a_moment_only(
    bucket: S3Backend, two_apps: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that hangs: the PATCH's own call ends at its deadline, then its clean-up (the abort of
    what it began, the lease's release) would wait as long again each (a 503 after ~271 s). Each waits
    CLEANUP_WAIT_SECONDS, then goes on in the background."""
    from upload_service import s3io, s3store

    monkeypatch.setattr(s3io, "CLEANUP_WAIT_SECONDS", 0.3)
    monkeypatch.setattr(s3store, "CLEANUP_RETRY_SECONDS", 0.05)
    first, _ = two_apps
    s3 = first.resumable.store.s3
    real_call = s3.call
    hung: list[str] = []

    async def hanging_once(operation: str, **params: Any) -> Any:
        release = operation == "delete_object" and params["Key"].endswith(".lock") \
            and params.get("IfMatch", '"not-its-etag"') != '"not-its-etag"'  # (not the first lease's probe)
        if operation == "abort_multipart_upload" or release:
            if operation not in hung:
                hung.append(operation)
                await asyncio.Event().wait()
        return await real_call(operation, **params)

    monkeypatch.setattr(s3, "call", hanging_once)
    data = payload(12 * MiB, seed=18)
    wrong = "sha256 " + base64.b64encode(hashlib.sha256(b"other").digest()).decode()
    async with client_of(first) as a:
        location = await create(a, len(data))  # its lease's release hangs: let go in the background
        started = time.monotonic()
        reply = await patch(a, location, 0, data, **{"Upload-Checksum": wrong})
        assert reply.status_code == 460, reply.text
        assert time.monotonic() - started < 5 and sorted(hung) == ["abort_multipart_upload", "delete_object"]
        deadline = time.monotonic() + 10
        while bucket.uploads_in_progress() or any(n.endswith(".lock") for n in bucket.objects()):
            assert time.monotonic() < deadline, "the multipart upload or the lease stayed"
            await asyncio.sleep(0.05)
        assert (await patch(a, location, 0, data)).status_code == 204
        record = (await a.get(f"{location}/record")).json()
    assert "tried again later" in caplog.text
    assert_only_stored(bucket, record, data)


async def test_a_store_that_ignores_conditional_writes_is_refused(
    bucket: S3Backend, two_apps: Any, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Without If-None-Match and If-Match the lease would not keep one writer at a time (SPEC §10)."""
    first, _ = two_apps
    s3 = first.resumable.store.s3
    real_call = s3.call

    puts = []

    async def ignoring_conditions(operation: str, **params: Any) -> Any:
        if operation == "put_object":
            params.pop("IfMatch", None)
            params.pop("IfNoneMatch", None)
            puts.append(params["Key"])
        return await real_call(operation, **params)

    monkeypatch.setattr(s3, "call", ignoring_conditions)
    async with client_of(first) as client:
        for _ in range(2):  # refused every time, not only when first found out
            reply = await client.post("/files", headers={**TUS, "Upload-Length": "3"})
            assert (reply.status_code, reply.json()["error"]) == (502, "storage_refused"), reply.text
            assert "conditional writes" in reply.json()["detail"]
        assert caplog.text.count("ignores conditional writes: resumable uploads are refused") == 1  # checked once
        assert len(puts) == 2  # the probe's first two, once
        bucket.assert_nothing_stored()
        reply = await client.post("/upload", files={"file": ("a.txt", b"abc")})  # forms need no conditions
        assert reply.status_code == 201, reply.text
    assert in_progress(bucket) == []


def s3_error(s3: Any, code: str, operation: str) -> StorageUnavailable:
    """What the S3 store raises when the store answers `code` (its cause, the ClientError, says it)."""
    cause = ClientError({"Error": {"Code": code, "Message": code}}, operation)
    error = s3.problem(cause, operation)
    error.__cause__ = cause
    return error


async def upload_in_three_requests(client: httpx.AsyncClient, data: bytes) -> dict[str, Any]:
    location = await create(client, len(data))
    third = len(data) // 3
    for start, stop in ((0, third), (third, 2 * third), (2 * third, len(data))):
        reply = await patch(client, location, start, data[start:stop])
        assert reply.status_code == 204, reply.text
    assert await offset_of(client, location) == len(data)
    return (await client.get(f"{location}/record")).json()


async def test_a_conditional_put_whose_answer_was_lost_is_not_another_writer(
    bucket: S3Backend, two_apps: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore sends a PUT again when its answer was lost: If-None-Match then finds our own lease
    or info, If-Match our own new ETag. Every conditional PUT here lands twice; none is a 423 or 500."""
    first, _ = two_apps
    s3 = first.resumable.store.s3
    real_call = s3.call
    twice = []

    async def answer_lost(operation: str, **params: Any) -> Any:
        if operation == "put_object" and ("IfMatch" in params or "IfNoneMatch" in params):
            twice.append(params["Key"].rsplit(".", 1)[-1])
            await real_call(operation, **params)  # it landed; its answer did not
        return await real_call(operation, **params)

    monkeypatch.setattr(s3, "call", answer_lost)
    data = payload(11 * MiB, seed=21)  # parts in each PATCH: the lease is renewed
    async with client_of(first) as client:
        record = await upload_in_three_requests(client, data)
    assert {"lock", "info"} <= set(twice)
    assert_only_stored(bucket, record, data)


async def test_if_match_on_a_key_that_is_gone_is_a_lost_lease_not_a_refusal(
    bucket: S3Backend, two_apps: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """AWS answers a PUT with If-Match on a missing key 404 NoSuchKey (SeaweedFS: 412): a writer
    whose lease another took over and let go meanwhile is told 423, not 502 storage_refused."""
    first, _ = two_apps
    store = first.resumable.store
    real_call = store.s3.call

    async def as_aws_answers(operation: str, **params: Any) -> Any:
        if operation == "put_object" and "IfMatch" in params \
                and await real_call("head_object", Key=params["Key"]) is None:
            raise s3_error(store.s3, "NoSuchKey", operation)
        return await real_call(operation, **params)

    monkeypatch.setattr(store.s3, "call", as_aws_answers)
    async with client_of(first) as client:
        location = await create(client, 3)  # its lease let go at the end of the request
    with pytest.raises(UploadLocked):
        await asyncio.to_thread(store.run, store.leases.renew(location.rsplit("/", 1)[1], '"an-old-etag"'))


@pytest.mark.parametrize("store_kind", ["refuses", "ignores"])
async def test_a_store_without_conditional_deletes_keeps_uploads_moving(
    bucket: S3Backend, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
    store_kind: str,
) -> None:
    """LocalStack answers a DELETE with If-Match 501; another store may delete whatever the ETag. The
    lease, the stop and an expired info are then deleted after reading their ETag: no PATCH waits for
    a lease its request let go (423 for minutes), nothing stays, and expired uploads are swept."""
    app = app_on(bucket, tmp_path / "s", resumable_expiry=2)
    store = app.resumable.store
    real_call = store.s3.call

    async def without_conditional_deletes(operation: str, **params: Any) -> Any:
        if operation == "delete_object" and "IfMatch" in params:
            if store_kind == "refuses":
                raise s3_error(store.s3, "NotImplemented", operation)
            del params["IfMatch"]
        return await real_call(operation, **params)

    monkeypatch.setattr(store.s3, "call", without_conditional_deletes)
    data = payload(1000, seed=22)
    try:
        async with client_of(app) as client:
            record = await upload_in_three_requests(client, data)
            assert store.conditional_deletes is False
            assert caplog.text.count("does not honour If-Match on DELETE") == 1
            assert_only_stored(bucket, record, data)
            expiring = await create(client, 10)
            await asyncio.sleep(2.2)
            assert await asyncio.to_thread(app.resumable.sweep) == 1
            assert (await client.head(expiring, headers=TUS)).status_code == 404
            assert (await client.delete(f"/files/{record['id']}")).status_code == 204
    finally:
        await close_app(app)
    bucket.assert_nothing_stored()


async def test_without_conditional_deletes_letting_go_never_removes_a_lease_taken_over(
    bucket: S3Backend, two_apps: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A holder held up past its lease lets go just as another server takes the lease over. Reading
    the ETag, then deleting, removed the newcomer's lease: a third writer then shared the upload
    with it, their parts numbered alike (InvalidPart, the upload lost). A release is a conditional
    PUT there, and the newcomer's lease stays."""
    first, _ = two_apps
    store = first.resumable.store
    real_call = store.s3.call
    armed = False

    async def taken_over_as_it_lets_go(operation: str, **params: Any) -> Any:
        nonlocal armed
        if operation == "delete_object" and "IfMatch" in params:
            del params["IfMatch"]  # a store that deletes whatever the ETag
        if armed and params.get("Key") == store.lock_key(upload_id) and operation in ("put_object", "delete_object"):
            armed = False
            held = await store.get_json(params["Key"])
            await store.put_json(params["Key"], {"holder": "b", "expires": time.time() + 60}, held[1])
        return await real_call(operation, **params)

    monkeypatch.setattr(store.s3, "call", taken_over_as_it_lets_go)
    async with client_of(first) as client:
        upload_id = (await create(client, 10)).rsplit("/", 1)[1]
    assert store.conditional_deletes is False
    lease, taken_over = await asyncio.to_thread(store.run, store.leases.take(upload_id))
    assert not taken_over  # its last holder let go: no late parts to fear
    armed = True
    await asyncio.to_thread(store.leases.let_go, upload_id, lease)
    held = await asyncio.to_thread(store.run, store.get_json(store.lock_key(upload_id)))
    assert held is not None and held[0]["holder"] == "b"


@pytest.mark.parametrize("problem, status, code", [("no_bucket", 502, "storage_refused"),
                                                   ("unreachable", 503, "storage_unavailable")])
async def test_a_store_that_cannot_be_used(
    bucket: S3Backend, tmp_path: Path, problem: str, status: int, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Startup does not wait for the bucket (its sweep runs in the background); creation is a clear 5xx,
    and so is a HEAD, logged with the detail that names the problem, not a traceback."""
    from support import free_port

    config = dataclasses.replace(bucket.config(fsync=False), upload_dir=tmp_path / "u")
    if problem == "no_bucket":
        config = dataclasses.replace(config, storage=f"s3://no-such-bucket/{bucket.prefix}")
    else:
        config = dataclasses.replace(config, s3_endpoint_url=f"http://127.0.0.1:{free_port()}")
    app = upload_asgi.create_app(config)
    started = time.monotonic()
    sent: list[dict[str, Any]] = []
    startup = iter([{"type": "lifespan.startup"}])

    async def receive() -> dict[str, Any]:
        return next(startup, None) or await asyncio.Event().wait()  # type: ignore[func-returns-value]

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    lifespan = asyncio.create_task(app({"type": "lifespan"}, receive, send))
    while not sent:
        await asyncio.sleep(0.01)
    assert sent == [{"type": "lifespan.startup.complete"}] and time.monotonic() - started < 1.5
    try:
        async with client_of(app) as client:
            reply = await client.post("/files", content=b"abc", headers={**OCTETS, "Upload-Length": "3"})
            assert (reply.status_code, reply.json()["error"]) == (status, code), reply.text
            head = await client.head("/files/" + "0" * 32, headers={"Tus-Resumable": "1.0.0"})
            assert head.status_code == status
    finally:
        lifespan.cancel()
        await close_app(app)
    failures = [r for r in caplog.records if r.getMessage().startswith("HEAD /files/")]
    assert failures and all(r.exc_info is None for r in failures), [r.getMessage() for r in failures]
    bucket.assert_nothing_stored()
    assert not (tmp_path / "u").exists()

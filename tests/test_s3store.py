"""The S3 backend (SPEC §11) against a real S3 server: SeaweedFS started by the tests.

Store-level: commit all or none, abort, ranges, listing, delete, the sweep, health.
App-level: form uploads through the app, refused uploads, a store that cannot be used,
memory per upload, two real servers sharing one bucket, a server killed mid-upload.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import socket
import threading
import time
from pathlib import Path
from typing import Any, AsyncIterator, Iterator

import aiohttp
import httpx
import pytest
from botocore.exceptions import ClientError
from hypercorn.utils import LifespanFailureError

import upload_asgi
from backends import S3Backend
from s3server import BUCKET, SeaweedFS
from support import (
    Server,
    field_part,
    file_part,
    form_body,
    form_content_type,
    free_port,
    read_vmhwm_kib,
    request_head,
    serving_pid,
)
from upload_service import s3io, s3store
from upload_service.errors import StorageRefused, StorageUnavailable
from upload_service.s3client import PartBody
from upload_service.s3store import S3Store
from upload_service.settings import Config
from upload_service.units import MiB

PART = 5 * MiB  # the smallest part S3 allows: multipart uploads with little data


# -- fixtures and checks ------------------------------------------------------------------


@pytest.fixture
def prefix(bucket: S3Backend) -> str:
    return bucket.prefix


@pytest.fixture
def s3(bucket: S3Backend) -> Any:
    """A plain botocore client, to look at the bucket or to meddle with it."""
    return bucket.s3


@pytest.fixture
async def store(seaweedfs: SeaweedFS, prefix: str) -> AsyncIterator[S3Store]:
    store = S3Store(BUCKET, prefix, endpoint_url=seaweedfs.endpoint_url, part_size=PART, parts_in_flight=2)
    yield store
    await store.aclose()


def make_record(file_id: str, data: bytes, filename: str = "f.bin") -> dict[str, Any]:
    return {
        "id": file_id, "filename": filename, "content_type": "application/octet-stream",
        "size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "description": None,
    }


async def write(sink: Any, data: bytes, block: int = 1 * MiB) -> None:
    """Write like the app: blocks on a thread (the sink blocks while parts are in flight)."""
    sink.open()

    def run() -> None:
        for i in range(0, len(data), block):
            sink.write(data[i : i + block])

    await asyncio.to_thread(run)


async def put(store: S3Store, *datas: bytes) -> list[dict[str, Any]]:
    sinks = [store.new_file() for _ in datas]
    for sink, data in zip(sinks, datas):
        await write(sink, data)
    records = [make_record(sink.id, data) for sink, data in zip(sinks, datas)]
    await store.commit(list(zip(sinks, records)))
    return records


# -- the store ------------------------------------------------------------------------------


async def test_commit_stores_small_and_multipart_files(bucket: S3Backend, store: S3Store, s3: Any) -> None:
    small, large = b"hello s3", os.urandom(2 * PART + 12345)
    sinks = [store.new_file(), store.new_file()]
    await write(sinks[0], small)
    await write(sinks[1], large)
    # Before the commit: the large file's parts are sent, but no object is visible.
    assert bucket.objects() == []
    assert bucket.uploads_in_progress() == [sinks[1].id]
    records = [make_record(sinks[0].id, small), make_record(sinks[1].id, large)]
    await store.commit(list(zip(sinks, records)))
    bucket.assert_stored(records[0], small)
    bucket.assert_stored(records[1], large)
    assert bucket.uploads_in_progress() == []
    assert await store.record(records[1]["id"]) == records[1]


@pytest.mark.parametrize("size", [0, PART, 2 * PART])
async def test_commit_edge_sizes(bucket: S3Backend, store: S3Store, size: int) -> None:
    """Empty, exactly one part, exactly two parts (no last part left to send)."""
    data = os.urandom(size)
    [record] = await put(store, data)
    bucket.assert_stored(record, data)


async def test_a_failed_commit_stores_nothing(bucket: S3Backend, store: S3Store, s3: Any, prefix: str) -> None:
    """The second file's multipart upload vanishes: the first file, already complete, goes too."""
    first, second = os.urandom(PART + 10), os.urandom(PART + 20)
    sinks = [store.new_file(), store.new_file()]
    await write(sinks[0], first)
    await write(sinks[1], second)
    [gone] = s3.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{prefix}/{sinks[1].id}")["Uploads"]
    s3.abort_multipart_upload(Bucket=BUCKET, Key=gone["Key"], UploadId=gone["UploadId"])
    records = [make_record(sinks[0].id, first), make_record(sinks[1].id, second)]
    with pytest.raises(StorageUnavailable):
        await store.commit(list(zip(sinks, records)))
    bucket.assert_nothing_stored()
    for sink in sinks:
        sink.abort()  # what the form path does next: nothing left to do
    bucket.assert_nothing_stored()


async def test_a_cancelled_commit_stores_nothing(bucket: S3Backend, store: S3Store) -> None:
    data = os.urandom(PART + 1)
    sink = store.new_file()
    await write(sink, data)
    task = asyncio.ensure_future(store.commit([(sink, make_record(sink.id, data))]))
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    bucket.assert_nothing_stored()


async def test_abort_leaves_no_multipart_upload(bucket: S3Backend, store: S3Store) -> None:
    sink = store.new_file()
    await write(sink, os.urandom(3 * PART))
    assert bucket.uploads_in_progress() == [sink.id]
    await asyncio.to_thread(sink.abort)
    await asyncio.to_thread(sink.abort)  # twice is fine
    bucket.assert_nothing_stored()


async def test_write_on_the_event_loop_is_refused(store: S3Store) -> None:
    """Blocking on the loop for the loop would hang for ever: it raises instead."""
    sink = store.new_file()
    with pytest.raises(RuntimeError, match="writer thread"):
        sink.write(b"x" * PART)


async def test_parts_in_memory_stay_within_the_bound(bucket: S3Backend, store: S3Store) -> None:
    """While parts are sent, the writer never gets more than parts_in_flight parts ahead."""
    data = os.urandom(6 * PART)
    sink = store.new_file()
    sent: list[int] = []
    most = 0
    real_upload_part = store.upload_part

    async def slow_upload_part(key: str, upload_id: str, number: int, part: bytes) -> str:
        nonlocal most
        sent.append(number)
        most = max(most, len([n for n in sent if n > 0]))
        await asyncio.sleep(0.2)
        etag = await real_upload_part(key, upload_id, number, part)
        sent[sent.index(number)] = -number
        return etag

    store.upload_part = slow_upload_part  # type: ignore[method-assign]
    await write(sink, data)
    # Never more than parts_in_flight parts sent at once; when that many are, the
    # writer waits (the next part fills only while fewer are being sent).
    assert most == store.parts_in_flight
    await store.commit([(sink, make_record(sink.id, data))])
    assert bucket.object_bytes(f"{sink.id}") == data


async def test_ranges_stream_the_right_bytes(store: S3Store) -> None:
    data = os.urandom(2 * PART + 777)
    [record] = await put(store, data)
    stored = await store.open(record["id"])
    assert stored is not None and stored.size == len(data) and stored.record == record

    async def read(start: int = 0, stop: int | None = None) -> bytes:
        return b"".join([chunk async for chunk in stored.chunks(start, stop)])

    assert await read() == data
    assert await read(PART - 3, PART + 3) == data[PART - 3 : PART + 3]
    assert await read(len(data) - 1) == data[-1:]
    assert await read(10, 10) == b""
    chunk_sizes = [len(chunk) async for chunk in stored.chunks()]
    assert max(chunk_sizes) <= 1 * MiB
    await stored.close()


async def test_unknown_and_malformed_ids(store: S3Store) -> None:
    for file_id in ("0" * 32, "../etc/passwd", "A" * 32, ""):
        assert await store.open(file_id) is None
        assert await store.record(file_id) is None
        assert await store.delete(file_id) is False


async def test_delete(bucket: S3Backend, store: S3Store) -> None:
    kept, gone = await put(store, b"kept", os.urandom(PART + 5))
    assert await store.delete(gone["id"]) is True
    assert await store.record(gone["id"]) is None
    assert await store.open(gone["id"]) is None
    assert bucket.objects() == sorted([kept["id"], f"{kept['id']}.json"])
    assert await store.delete(gone["id"]) is False


async def test_list_newest_first_in_pages(store: S3Store) -> None:
    """Newest first (LastModified is to the second on S3: the uploads are a second apart)."""
    records = []
    for i in range(3):
        if i:
            await asyncio.sleep(1.1)
        records += await put(store, f"file {i}".encode())
    first = await store.list(limit=2)
    assert [r["id"] for r in first.records] == [records[2]["id"], records[1]["id"]]
    assert first.next_cursor is not None
    second = await store.list(limit=2, cursor=first.next_cursor)
    assert second.records == [records[0]] and second.next_cursor is None
    everything = await store.list(limit=10)
    assert everything.records == records[::-1] and everything.next_cursor is None
    with pytest.raises(ValueError):
        await store.list(limit=2, cursor="not-a-cursor")


async def test_list_skips_objects_without_a_record(store: S3Store, s3: Any, prefix: str) -> None:
    [record] = await put(store, b"listed")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{'e' * 32}", Body=b"a file whose record never came")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/notes.json", Body=b"{}")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{'f' * 32}.json", Body=b"{not json")  # a corrupt record
    assert (await store.list(limit=10)).records == [record]
    with pytest.raises(ValueError):
        await store.list(limit=0)


async def test_sweep_aborts_old_uploads_and_keeps_young_ones(
    bucket: S3Backend, seaweedfs: SeaweedFS, s3: Any, prefix: str
) -> None:
    store = S3Store(BUCKET, prefix, endpoint_url=seaweedfs.endpoint_url, sweep_after=2.0)
    try:
        s3.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/{'a' * 32}")
        not_ours = s3.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/other-app/file")
        await asyncio.sleep(3.1)  # Initiated is to the second
        s3.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/{'b' * 32}")
        assert await store.sweep() == 1
        assert bucket.uploads_in_progress() == ["b" * 32, "other-app/file"]
        # A sweep far in the future takes the young one too, never what is not an upload of ours.
        assert await store.sweep(now=time.time() + 3600) == 1
        assert bucket.uploads_in_progress() == ["other-app/file"]
    finally:
        s3.abort_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/other-app/file", UploadId=not_ours["UploadId"])
        await store.aclose()


async def test_sweep_deletes_files_whose_record_never_came(store: S3Store, bucket: S3Backend, s3: Any) -> None:
    """A crash between completing a file and writing its record leaves an object no one lists."""
    kept = (await put(store, b"a whole stored file"))[0]["id"]
    orphans = ["0" * 32, kept[:-1] + ("0" if kept[-1] != "0" else "1"), "f" * 32]  # first, beside a kept one, last
    for name in orphans:
        s3.put_object(Bucket=BUCKET, Key=store.key(name), Body=b"no record")
    s3.put_object(Bucket=BUCKET, Key=store.key("not-an-id"), Body=b"not ours")
    assert await store.sweep() == 0  # young: maybe a commit writing its record right now
    assert await store.sweep(now=time.time() + store.sweep_after + 60) == 3
    assert bucket.objects() == sorted([kept, f"{kept}.json", "not-an-id"])
    assert (await store.open(kept)) is not None


async def test_a_store_without_multipart_listings_still_gets_its_orphans_swept(
    store: S3Store, bucket: S3Backend, s3: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """s3rver answers ListMultipartUploads with 501: the files without a record still go."""
    real_call = store.call

    async def without_multipart_listings(operation: str, **params: Any) -> Any:
        if operation == "list_multipart_uploads":
            missing = ClientError({"Error": {"Code": "NotImplemented", "Message": "no"}}, "ListMultipartUploads")
            raise store.problem(missing, operation) from missing
        return await real_call(operation, **params)

    monkeypatch.setattr(store, "call", without_multipart_listings)
    s3.put_object(Bucket=BUCKET, Key=store.key("0" * 32), Body=b"no record")
    assert await store.sweep(now=time.time() + store.sweep_after + 60) == 1
    assert bucket.objects() == []


async def test_prepare_sweeps_at_startup(bucket: S3Backend, seaweedfs: SeaweedFS, s3: Any, prefix: str) -> None:
    s3.create_multipart_upload(Bucket=BUCKET, Key=f"{prefix}/{'c' * 32}")
    await asyncio.sleep(1.1)
    store = S3Store(BUCKET, prefix, endpoint_url=seaweedfs.endpoint_url, sweep_after=1.0)
    try:
        store.prepare()
        store.prepare()  # one sweeper per loop
        for _ in range(100):
            if not bucket.uploads_in_progress():
                break
            await asyncio.sleep(0.1)
        assert bucket.uploads_in_progress() == []
    finally:
        await store.aclose()


async def test_health(store: S3Store) -> None:
    assert await store.health() == {"storage": store.url}


async def test_making_the_client_parses_no_model_file_on_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3's model files take ~0.1 s to parse: on the loop, every request in flight would wait."""
    import botocore.loaders
    from aiobotocore.session import get_session

    from upload_service import s3client

    for name, value in {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_CONFIG_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)
    session = get_session()
    session.register_component("data_loader", botocore.loaders.create_loader())  # nothing cached yet
    monkeypatch.setattr(s3client, "get_session", lambda: session)
    parsed_on = []
    parse = botocore.loaders.JSONFileLoader.load_file

    def spy(self: Any, *args: Any) -> Any:
        if (data := parse(self, *args)) is not None:  # None: no such file, only looked for
            parsed_on.append(threading.get_ident())
        return data

    monkeypatch.setattr(botocore.loaders.JSONFileLoader, "load_file", spy)
    client = await s3client.open_client(f"http://127.0.0.1:{free_port()}", 4)
    await client.close()
    assert parsed_on, "botocore read no model file: the spy is in the wrong place"
    assert threading.get_ident() not in parsed_on


@pytest.mark.parametrize("value", [
    "2026-12-01T19:45:22.000Z", "2026-12-01T19:45:22.123Z", "2026-12-01T19:45:22Z",
    "Tue, 01 Dec 2026 19:45:22 GMT", "1700000000", "2026-12-01T19:45:22+02:00",
])
def test_timestamps_parse_as_botocore_parses_them(value: str) -> None:
    """The client's fast path for S3's own form gives what botocore's dateutil gives, the rest goes to it."""
    from botocore.parsers import DEFAULT_TIMESTAMP_PARSER

    from upload_service.s3client import parse_timestamp

    assert parse_timestamp(value) == DEFAULT_TIMESTAMP_PARSER(value)
    assert parse_timestamp(value).timestamp() == DEFAULT_TIMESTAMP_PARSER(value).timestamp()


async def test_a_listing_page_is_parsed_with_the_fast_timestamps(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every key of a ListObjectsV2 page has its LastModified: dateutil took 3/4 of a page's parse."""
    from upload_service import s3client

    for name, value in {"AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret", "AWS_CONFIG_FILE": os.devnull}.items():
        monkeypatch.setenv(name, value)
    client = await s3client.open_client(f"http://127.0.0.1:{free_port()}", 4)
    try:
        # The parser each answer of this client goes through (botocore makes one per answer).
        parser = client._endpoint._response_parser_factory.create_parser("rest-xml")
        assert parser._timestamp_parser is s3client.parse_timestamp
    finally:
        await client.close()


@pytest.mark.parametrize(
    "problem, error, words",
    [
        ("no_bucket", StorageRefused, "does not exist"),
        ("bad_secret", StorageRefused, "AWS_SECRET_ACCESS_KEY"),
        # botocore retries a refused connection with backoff: on a busy machine past /health's 3 s
        ("unreachable", StorageUnavailable, "cannot reach|did not answer within"),
    ],
)
async def test_a_store_that_cannot_be_used(
    seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch, prefix: str, problem: str, error: type, words: str
) -> None:
    bucket, endpoint = BUCKET, seaweedfs.endpoint_url
    if problem == "no_bucket":
        bucket = "no-such-bucket"
    elif problem == "bad_secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    else:
        endpoint = f"http://127.0.0.1:{free_port()}"
    store = S3Store(bucket, prefix, endpoint_url=endpoint, part_size=PART)
    try:
        with pytest.raises(error, match=words) as raised:
            await store.health()
        assert raised.value.status == (502 if error is StorageRefused else 503)
        sink = store.new_file()
        with pytest.raises(error):
            await write(sink, os.urandom(PART))  # the first part starts the multipart upload
        await asyncio.to_thread(sink.abort)
    finally:
        await store.aclose()


# -- through the app ------------------------------------------------------------------------


@pytest.fixture
def s3_config(bucket: S3Backend) -> Config:
    return bucket.config(max_file_size=8 * PART)


@pytest.fixture
async def s3_client(s3_config: Config) -> AsyncIterator[httpx.AsyncClient]:
    app = upload_asgi.create_app(s3_config)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
        yield client
    await app.store.aclose()


async def test_a_listing_never_holds_the_loop_other_requests_need(
    s3_client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each page parses every key under the prefix (~30 ms a 1000): a listing runs on a loop of
    its own. Its stretch here blocks until another request has been answered, or 5 s."""
    answered, saw = threading.Event(), []

    async def long_parse(self: S3Store) -> AsyncIterator[tuple[int, str]]:
        answered.wait(5)
        saw.append(answered.is_set())
        return
        yield

    monkeypatch.setattr(S3Store, "_record_keys", long_parse)
    listing = asyncio.create_task(s3_client.get("/files"))
    await asyncio.sleep(0.1)
    reply = await s3_client.options("/files")
    answered.set()
    assert reply.status_code == 204
    assert (await listing).json() == {"files": [], "next_cursor": None}
    assert saw == [True]


async def post_form(client: httpx.AsyncClient, path: str, *parts: Any) -> httpx.Response:
    return await client.post(path, content=form_body(parts), headers={"content-type": form_content_type()})


async def test_upload_stores_the_object_and_its_record(bucket: S3Backend, s3_client: httpx.AsyncClient) -> None:
    data = os.urandom(2 * PART + 99)
    reply = await post_form(s3_client, "/upload", file_part(data, "big.bin"), field_part("description", "two parts"))
    assert reply.status_code == 201, reply.text
    record = reply.json()
    assert record["filename"] == "big.bin" and record["description"] == "two parts"
    bucket.assert_stored(record, data)
    assert bucket.uploads_in_progress() == []


async def test_upload_multiple(bucket: S3Backend, s3_client: httpx.AsyncClient) -> None:
    datas = [b"", b"small", os.urandom(PART + 1)]
    parts = [file_part(d, f"f{i}", name="files") for i, d in enumerate(datas)]
    reply = await post_form(s3_client, "/upload-multiple", *parts)
    assert reply.status_code == 201, reply.text
    answer = reply.json()
    assert answer["count"] == 3 and answer["total_size"] == sum(map(len, datas))
    for record, data in zip(answer["files"], datas):
        bucket.assert_stored(record, data)


@pytest.mark.parametrize("case", ["sha256_mismatch", "too_large", "cut_short", "no_file"])
async def test_refused_uploads_leave_nothing(bucket: S3Backend, s3_client: httpx.AsyncClient, case: str) -> None:
    data = os.urandom(2 * PART + 1)  # a multipart upload is under way when the refusal comes
    if case == "sha256_mismatch":
        body = form_body([file_part(data), field_part("sha256", "0" * 64)])
        expected = (422, "sha256_mismatch")
    elif case == "too_large":
        body = form_body([file_part(os.urandom(8 * PART + 1))])
        expected = (413, "payload_too_large")
    elif case == "cut_short":
        body = form_body([file_part(data)])[:-30]
        expected = (400, "malformed_multipart")
    else:
        body = form_body([field_part("description", "a form without its file")])
        expected = (422, "no_file")
    reply = await s3_client.post("/upload", content=body, headers={"content-type": form_content_type()})
    assert (reply.status_code, reply.json()["error"]) == expected
    bucket.assert_nothing_stored()


@pytest.mark.parametrize(
    "problem, status, code",
    [("no_bucket", 502, "storage_refused"), ("bad_secret", 502, "storage_refused"),
     ("unreachable", 503, "storage_unavailable")],
)
@pytest.mark.parametrize("size", [10, 2 * PART])
async def test_upload_to_a_store_that_cannot_be_used(
    bucket: S3Backend, s3_config: Config, monkeypatch: pytest.MonkeyPatch, prefix: str, problem: str, status: int,
    code: str, size: int,
) -> None:
    """A clear 5xx (the error before the commit for a big file, at it for a small one), /health 503."""
    changes: dict[str, Any] = {}
    if problem == "no_bucket":
        changes["storage"] = f"s3://no-such-bucket/{prefix}"
    elif problem == "bad_secret":
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
    else:
        changes["s3_endpoint_url"] = f"http://127.0.0.1:{free_port()}"
    config = Config(**{**s3_config.__dict__, **changes})
    app = upload_asgi.create_app(config)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver", timeout=60) as client:
        reply = await post_form(client, "/upload", file_part(os.urandom(size)))
        assert (reply.status_code, reply.json()["error"]) == (status, code), reply.text
        health = await client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        reason = {"no_bucket": "does not exist", "bad_secret": "refused access", "unreachable": "not answer|cannot reach"}
        assert re.search(reason[problem], health.json()["reason"]), health.text
    await app.store.aclose()
    bucket.assert_nothing_stored()


async def test_health_through_the_app(s3_client: httpx.AsyncClient, prefix: str) -> None:
    reply = await s3_client.get("/health")
    assert reply.status_code == 200
    assert reply.json()["status"] == "ok" and reply.json()["storage"] == f"s3://{BUCKET}/{prefix}"


def test_storage_setting_picks_the_store(bucket: S3Backend) -> None:
    config = Config.from_env({
        "UPLOAD_STORAGE": "s3://my-bucket/some/prefix/", "UPLOAD_S3_PART_SIZE": "16M",
        "UPLOAD_S3_PARTS_IN_FLIGHT": "4", "UPLOAD_S3_SWEEP_AFTER": "2h",
        "UPLOAD_S3_ENDPOINT_URL": "http://127.0.0.1:8333",
    })
    assert config.storage == "s3://my-bucket/some/prefix"
    store = upload_asgi.create_app(config).store
    assert isinstance(store, S3Store)
    assert (store.bucket, store.prefix, store.key("x"), store.endpoint_url) == (
        "my-bucket", "some/prefix", "some/prefix/x", "http://127.0.0.1:8333"
    )
    assert (store.part_size, store.parts_in_flight, store.sweep_after) == (16 * MiB, 4, 7200.0)
    assert S3Store("bucket").key("x") == "x"  # no prefix: keys at the top of the bucket
    assert type(upload_asgi.create_app(Config(storage="local")).store).__name__ == "LocalStore"


async def test_part_size_must_allow_the_largest_file(bucket: S3Backend, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 takes 10,000 parts: 5 MiB parts cannot hold a 50 GiB file; startup fails saying so."""
    env = {"UPLOAD_STORAGE": "s3://bucket/p", "UPLOAD_S3_PART_SIZE": "5M", "UPLOAD_MAX_FILE_SIZE": "50G"}
    with pytest.raises(upload_asgi.ConfigError, match="UPLOAD_S3_PART_SIZE.*UPLOAD_MAX_FILE_SIZE"):
        upload_asgi.create_app(Config.from_env(env))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    app = upload_asgi.create_app()  # from the environment: no raise, lifespan startup fails
    messages = iter([{"type": "lifespan.startup"}])
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return next(messages)

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    with pytest.raises(LifespanFailureError):  # raised when the server did not act on the message
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    assert sent[0]["type"] == "lifespan.startup.failed"
    assert "UPLOAD_S3_PART_SIZE" in sent[0]["message"]


# -- real servers ---------------------------------------------------------------------------


@pytest.fixture
def two_servers(bucket: S3Backend, tmp_path: Path) -> Iterator[tuple[Server, Server]]:
    env = bucket.server_env()
    with Server(tmp_path / "uploads-a", env=env) as a, Server(tmp_path / "uploads-b", env=env) as b:
        yield a, b


@pytest.mark.slow
def test_two_servers_share_one_bucket(bucket: S3Backend, two_servers: tuple[Server, Server]) -> None:
    """Each file uploaded through one server is downloaded, listed and deleted through the other."""
    a, b = two_servers
    uploads = []
    for server, data in ((a, os.urandom(3 * PART + 5)), (b, b"small one")):
        with server.client() as client:
            reply = client.post("/upload", content=form_body([file_part(data)]),
                                headers={"content-type": form_content_type()})
        assert reply.status_code == 201, reply.text
        bucket.assert_stored(reply.json(), data)
        uploads.append((server, reply.json(), data))
    records = [record for _, record, _ in uploads]
    assert bucket.objects() == sorted([*(r["id"] for r in records), *(f"{r['id']}.json" for r in records)])
    with a.client() as to_a, b.client() as to_b:
        for server, record, data in uploads:
            other = to_b if server is a else to_a
            url = f"/files/{record['id']}"
            download = other.get(url)
            assert download.status_code == 200 and download.content == data
            assert download.headers["etag"] == f'"{record["sha256"]}"'
            part = other.get(url, headers={"range": "bytes=1-4"})
            assert part.status_code == 206 and part.content == data[1:5]
            assert other.get(f"{url}/record").json() == record
            listed = other.get("/files?limit=10").json()["files"]
            assert record in listed
        for server, record, _ in uploads:
            other = to_b if server is a else to_a
            assert other.delete(f"/files/{record['id']}").status_code == 204
            assert (to_a if other is to_b else to_b).get(f"/files/{record['id']}").status_code == 404
        for client in (to_a, to_b):
            assert client.get("/health").json()["status"] == "ok"
            assert client.get("/files").json() == {"files": [], "next_cursor": None}
    bucket.assert_nothing_stored()
    for server in (a, b):  # nothing of a file in either server's own dir
        assert not server.upload_dir.exists() or list(server.upload_dir.rglob("*")) == []


@pytest.mark.slow
def test_memory_stays_within_parts_in_flight(bucket: S3Backend, tmp_path: Path, s3: Any, prefix: str) -> None:
    """A 256 MiB upload raises the server's peak RSS by about parts_in_flight x part size, not the file."""
    part_size, in_flight = 16 * MiB, 2
    env = {**bucket.server_env(), "UPLOAD_S3_PART_SIZE": "16M", "UPLOAD_S3_PARTS_IN_FLIGHT": str(in_flight)}
    size = 256 * MiB
    block = os.urandom(1 * MiB)
    digest = hashlib.sha256()
    with Server(tmp_path / "uploads", env=env) as server:
        with server.client() as client:  # a small upload first: the client and its pools exist
            assert client.post("/upload", content=form_body([file_part(b"warm")]),
                               headers={"content-type": form_content_type()}).status_code == 201
        before = read_vmhwm_kib(serving_pid(server))
        head = form_body([file_part(b"")]).split(b"\r\n\r\n\r\n")[0] + b"\r\n\r\n"
        tail = b"\r\n" + form_body([]).split(b"\r\n", 1)[0] + b"--\r\n"

        def body() -> Iterator[bytes]:
            yield head
            for _ in range(size // len(block)):
                digest.update(block)
                yield block
            yield tail

        with server.client(timeout=300) as client:
            reply = client.post("/upload", content=body(), headers={"content-type": form_content_type()})
        assert reply.status_code == 201, reply.text
        assert reply.json()["sha256"] == digest.hexdigest() and reply.json()["size"] == size
        grown = read_vmhwm_kib(serving_pid(server)) - before
    assert s3.head_object(Bucket=BUCKET, Key=f"{prefix}/{reply.json()['id']}")["ContentLength"] == size
    # 2 x 16 MiB, the write blocks (~3 MiB) and glibc keeping freed blocks for a while
    # (measured 23-26 MiB for 2 x 8 MiB; one more copy of each part would be 3 x 16 more).
    bound = in_flight * part_size * 3 // 2 + 8 * MiB
    assert grown * 1024 < bound, f"peak RSS grew {grown} KiB"


@pytest.mark.slow
def test_killed_server_leftovers_are_swept(bucket: S3Backend, tmp_path: Path) -> None:
    """kill -9 mid-upload leaves a multipart upload; a server starting later sweeps it."""
    env = bucket.server_env()
    with Server(tmp_path / "uploads-a", env=env) as crashing:
        body = form_body([file_part(os.urandom(4 * PART))])
        sock = socket.create_connection(("127.0.0.1", crashing.port))
        try:
            headers = [("Content-Type", form_content_type()), ("Content-Length", str(len(body)))]
            sock.sendall(request_head("/upload", headers))
            sock.sendall(body[: 3 * PART])  # two parts sent, the upload goes on
            deadline = time.monotonic() + 20
            while not bucket.uploads_in_progress() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert len(bucket.uploads_in_progress()) == 1
            crashing.kill()
        finally:
            sock.close()
    assert len(bucket.uploads_in_progress()) == 1 and bucket.objects() == []
    time.sleep(1.1)
    # A server with the default 24h leaves it (it could be a live server's); one told 1s sweeps it.
    with Server(tmp_path / "uploads-b", env=env) as patient:
        with patient.client() as client:
            assert client.get("/health").status_code == 200
        time.sleep(0.5)
        assert len(bucket.uploads_in_progress()) == 1
    with Server(tmp_path / "uploads-c", env={**env, "UPLOAD_S3_SWEEP_AFTER": "1"}):
        deadline = time.monotonic() + 20
        while bucket.uploads_in_progress() and time.monotonic() < deadline:
            time.sleep(0.1)
    bucket.assert_nothing_stored()


# -- error paths that a real server does not easily produce -----------------------------------


async def test_health_is_kept_a_few_seconds(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    assert await store.health() == {"storage": store.url}
    calls = 0

    async def failing(operation: str, **params: Any) -> Any:
        nonlocal calls
        calls += 1
        raise StorageUnavailable("down")

    monkeypatch.setattr(store, "call", failing)
    assert await store.health() == {"storage": store.url}  # the answer of a moment ago
    assert calls == 0
    monkeypatch.setattr(s3store, "HEALTH_TTL", 0.0)
    with pytest.raises(StorageUnavailable):
        await store.health()
    assert calls == 1


async def test_health_of_a_store_that_hangs_is_quick_and_one_probe(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store that takes connections and never answers: /health says so within HEALTH_TIMEOUT,
    and the probes that come meanwhile wait for the one HeadBucket under way."""
    calls = 0

    async def hanging(operation: str, **params: Any) -> Any:
        nonlocal calls
        calls += 1
        await asyncio.Event().wait()

    monkeypatch.setattr(store, "call", hanging)
    monkeypatch.setattr(s3store, "HEALTH_TIMEOUT", 0.3)
    started = time.monotonic()
    results = await asyncio.gather(*(store.health() for _ in range(5)), return_exceptions=True)
    assert time.monotonic() - started < 2
    assert calls == 1
    assert all(isinstance(r, StorageUnavailable) and "did not answer" in str(r) for r in results), results


async def test_a_store_that_takes_a_write_and_never_answers_fails_it_in_bounded_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """botocore sends a PutObject or UploadPart with `Expect: 100-continue`, and aiohttp then waits for
    the `100` with no read timeout: a store that accepted the connection and hung held the upload for
    as long (600 s and more). A call now ends once CALL_SECONDS pass with no answer and no body taken."""
    heads: list[bytes] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        await reader.read()  # never answers

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")
    monkeypatch.setattr(s3store, "CALL_SECONDS", 1.0)
    store = S3Store(BUCKET, "p", endpoint_url=f"http://127.0.0.1:{port}")
    try:
        for operation, params in (("put_object", {}), ("upload_part", {"UploadId": "u", "PartNumber": 1})):
            started = time.monotonic()
            with pytest.raises(StorageUnavailable, match="cannot reach"):
                await store.call(operation, Key="k", Body=PartBody([b"x" * (2 * MiB)]), **params)
            assert time.monotonic() - started < 1.0 + 1.5
        assert any(b"100-continue" in head.lower() for head in heads)
    finally:
        await store.aclose()
        server.close()


async def test_a_slow_store_that_keeps_taking_the_body_is_not_cut_off(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The deadline moves with the body: a part taken slowly (3.2 s, a piece each 0.8 s, for a 1 s
    deadline) goes through (a deadline of 90 s plus the body at 1 MB/s cut an 80 KB/s store off)."""
    monkeypatch.setattr(s3store, "CALL_SECONDS", 1.0)

    class SlowStore:
        async def upload_part(self, Body: PartBody, **params: Any) -> dict[str, str]:
            async for _ in Body:
                await asyncio.sleep(0.8)
            return {"ETag": "e"}

    async def client() -> SlowStore:
        return SlowStore()

    monkeypatch.setattr(store, "client", client)
    started = time.monotonic()
    answer = await store.call("upload_part", Key="k", UploadId="u", PartNumber=1, Body=PartBody([b"x" * MiB]))
    assert answer == {"ETag": "e"} and time.monotonic() - started > 3


async def test_no_credentials_is_refused_naming_them(
    seaweedfs: SeaweedFS, bucket: S3Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup off this machine
    store = S3Store(BUCKET, bucket.prefix, endpoint_url=seaweedfs.endpoint_url)
    try:
        with pytest.raises(StorageRefused, match="AWS_ACCESS_KEY_ID"):
            await store.health()
    finally:
        await store.aclose()


async def test_a_read_failing_mid_download_is_a_storage_error(store: S3Store, monkeypatch: pytest.MonkeyPatch) -> None:
    data = os.urandom(3 * MiB)
    [record] = await put(store, data)
    stored = await store.open(record["id"])
    real_call = store.call

    async def call_with_a_broken_body(operation: str, **params: Any) -> Any:
        answer = await real_call(operation, **params)
        body = answer["Body"]
        real_read = body.read
        reads = 0

        async def read(amount: int = -1) -> bytes:
            nonlocal reads
            reads += 1
            if reads > 1:
                raise aiohttp.ClientPayloadError("connection reset mid-body")
            return await real_read(amount)

        body.read = read
        return answer

    monkeypatch.setattr(store, "call", call_with_a_broken_body)
    with pytest.raises(StorageUnavailable, match="cannot reach"):
        async for _ in stored.chunks():
            pass


async def test_a_store_that_never_takes_a_part_frees_the_writer(
    store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The writer waits for parts in flight, not for ever: it fails with a 503."""
    monkeypatch.setattr(s3io, "THREAD_WAIT_SECONDS", 0.5)
    never = asyncio.Event()

    async def hanging_upload_part(key: str, upload_id: str, number: int, part: Any) -> str:
        await never.wait()
        return ""

    monkeypatch.setattr(store, "upload_part", hanging_upload_part)
    sink = store.new_file()
    with pytest.raises(StorageUnavailable, match="in time"):
        await write(sink, os.urandom(store.parts_in_flight * PART))
    never.set()
    await asyncio.to_thread(sink.abort)


def test_without_the_s3_extra_the_setting_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    for name in [m for m in sys.modules if m.split(".")[0] == "aiobotocore"] + ["aiobotocore"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    for name in ("upload_service.s3client", "upload_service.s3store"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    with pytest.raises(upload_asgi.ConfigError, match=r"UPLOAD_STORAGE: .*pip install 'upload-asgi\[s3\]'"):
        upload_asgi.create_app(Config(storage="s3://bucket/prefix"))


async def wait_until(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not in time"
        await asyncio.sleep(0.05)


async def test_an_abort_that_fails_is_tried_again(
    store: S3Store, bucket: S3Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The store was away when the upload failed: its multipart upload goes once it is back, not a day later."""
    monkeypatch.setattr(s3store, "CLEANUP_RETRY_SECONDS", 0.05)
    sink = store.new_file()
    await write(sink, os.urandom(PART))
    real_abort = store.abort_multipart
    tries = []

    async def failing_twice(key: str, upload_id: str, within: float | None = None) -> None:
        tries.append(key)
        if len(tries) <= 2:
            raise StorageUnavailable("down")
        await real_abort(key, upload_id)

    monkeypatch.setattr(store, "abort_multipart", failing_twice)
    await asyncio.to_thread(sink.abort)  # no raise: the upload failed anyway
    assert "tried again later" in caplog.text
    await wait_until(lambda: not bucket.uploads_in_progress())
    assert len(tries) == 3
    bucket.assert_nothing_stored()


async def test_an_abort_the_store_does_not_answer_holds_the_answer_a_moment_only(
    store: S3Store, bucket: S3Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A store that hangs failed the upload; its abort would hang as long (a second 90 s before the
    503): the answer waits CLEANUP_WAIT_SECONDS for it, then the abort goes on in the background."""
    monkeypatch.setattr(s3io, "CLEANUP_WAIT_SECONDS", 0.3)
    monkeypatch.setattr(s3store, "CLEANUP_RETRY_SECONDS", 0.05)
    sink = store.new_file()
    await write(sink, os.urandom(PART))
    real_call = store.call
    hanging = asyncio.Event()

    async def call(operation: str, **params: Any) -> Any:
        if operation == "abort_multipart_upload" and not hanging.is_set():
            hanging.set()
            await asyncio.Event().wait()
        return await real_call(operation, **params)

    monkeypatch.setattr(store, "call", call)
    started = time.monotonic()
    await asyncio.to_thread(sink.abort)
    assert time.monotonic() - started < 2 and "tried again later" in caplog.text
    await wait_until(lambda: not bucket.uploads_in_progress())
    bucket.assert_nothing_stored()


async def test_an_abort_that_keeps_failing_is_left_to_the_sweep(
    store: S3Store, bucket: S3Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(s3store, "CLEANUP_RETRY_SECONDS", 0.05)
    monkeypatch.setattr(s3store, "ABORT_RETRY_FOR_SECONDS", 0.5)
    sink = store.new_file()
    await write(sink, os.urandom(PART))

    async def failing_abort(key: str, upload_id: str, within: float | None = None) -> None:
        raise StorageUnavailable("down")

    monkeypatch.setattr(store, "abort_multipart", failing_abort)
    await asyncio.to_thread(sink.abort)
    await wait_until(lambda: "left to the sweep" in caplog.text)
    assert bucket.uploads_in_progress() == [sink.id]
    with pytest.raises(StorageUnavailable):  # aborting still fails (the sweeper logs it, tested below)
        await store.sweep(now=time.time() + store.sweep_after + 60)
    monkeypatch.undo()
    assert await store.sweep(now=time.time() + store.sweep_after + 60) == 1
    bucket.assert_nothing_stored()


async def test_an_abort_on_the_loop_is_left_to_a_task(store: S3Store, bucket: S3Backend) -> None:
    sink = store.new_file()
    await write(sink, os.urandom(PART))
    sink.abort()  # on the loop: must not block it
    for _ in range(100):
        if not bucket.uploads_in_progress():
            break
        await asyncio.sleep(0.05)
    bucket.assert_nothing_stored()


async def test_the_sweeper_survives_a_store_that_is_down(
    seaweedfs: SeaweedFS, bucket: S3Backend, caplog: pytest.LogCaptureFixture
) -> None:
    store = S3Store(BUCKET, bucket.prefix, endpoint_url=f"http://127.0.0.1:{free_port()}")
    try:
        store.prepare()
        for _ in range(200):
            if "sweeping" in caplog.text:
                break
            await asyncio.sleep(0.05)
        assert "sweeping s3://" in caplog.text and "failed" in caplog.text
        [sweeper] = store._sweepers.values()
        assert not sweeper.done()  # it sleeps until the next hour
    finally:
        await store.aclose()


async def test_a_failed_commit_is_removed_once_the_store_is_back(
    store: S3Store, bucket: S3Backend, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The record's PUT landed but its answer was lost, and then the store went away: the upload
    failed (5xx), so its file and record go once the store is back, or readers would see it stored."""
    monkeypatch.setattr(s3store, "CLEANUP_RETRY_SECONDS", 0.05)
    data = b"small"
    sink = store.new_file()
    await write(sink, data)
    real_call = store.call
    down = [True]

    async def store_going_down(operation: str, **params: Any) -> Any:
        if down[0] and operation == "delete_object":
            raise StorageUnavailable("down")
        answer = await real_call(operation, **params)
        if operation == "put_object" and params["Key"].endswith(".json"):
            raise StorageUnavailable("the answer was lost")
        return answer

    monkeypatch.setattr(store, "call", store_going_down)
    with pytest.raises(StorageUnavailable):
        await store.commit([(sink, make_record(sink.id, data))])
    assert "tried again later" in caplog.text
    assert await store.open(sink.id) is not None  # there, while the store is away
    down[0] = False
    await wait_until(lambda: bucket.objects() == [])
    assert await store.open(sink.id) is None
    bucket.assert_nothing_stored()


async def test_a_completion_whose_answer_was_lost_counts(
    store: S3Store, bucket: S3Backend, monkeypatch: pytest.MonkeyPatch
) -> None:
    """botocore retries a CompleteMultipartUpload whose answer was lost and gets NoSuchUpload: the
    object is there, whole, so the file is stored (not a 502 with the object left behind)."""
    data = os.urandom(PART + 10)
    sink = store.new_file()
    await write(sink, data)
    real_complete = store.complete_multipart

    async def answer_lost(key: str, upload_id: str, etags: list[str]) -> None:
        await real_complete(key, upload_id, etags)
        gone = ClientError({"Error": {"Code": "NoSuchUpload", "Message": "gone"}}, "CompleteMultipartUpload")
        raise store.problem(gone, "complete_multipart_upload") from gone  # what the retry sees

    monkeypatch.setattr(store, "complete_multipart", answer_lost)
    record = make_record(sink.id, data)
    await store.commit([(sink, record)])
    bucket.assert_stored(record, data)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uvicorn", "granian"])
def test_s3_under_other_servers(bucket: S3Backend, tmp_path: Path, kind: str) -> None:
    """uvicorn (uvloop) and granian: the parts handed to their loops, a download, a refusal."""
    data = os.urandom(2 * PART + 17)
    with Server(tmp_path / "uploads", env=bucket.server_env(), kind=kind) as server, server.client() as client:
        headers = {"content-type": form_content_type()}
        reply = client.post("/upload", content=form_body([file_part(data)]), headers=headers)
        assert reply.status_code == 201, reply.text
        bucket.assert_stored(reply.json(), data)
        download = client.get(f"/files/{reply.json()['id']}", headers={"range": "bytes=5242870-5242889"})
        assert download.status_code == 206 and download.content == data[5242870:5242890]
        wrong_digest = form_body([file_part(data), field_part("sha256", "0" * 64)])
        refused = client.post("/upload", content=wrong_digest, headers=headers)
        assert refused.status_code == 422
    assert bucket.uploads_in_progress() == [] and len(bucket.objects()) == 2

"""The files resource on S3 (SPEC §11): test_files' behaviour tests again, the app on SeaweedFS.

The tests below are imported from test_files, so pytest runs them here a second time with
this module's `app` and `client`: the same downloads, ranges, conditionals, records,
listing and deletes, answered from a bucket. Tests about the local store itself (its
files on disk, its sidecars, its ids renamed by hand), the tokens and the mount point
(nothing to do with storage; the mount test's two uploads are 20 ms apart, and S3 orders
the listing by the second) stay in test_files only.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any, AsyncIterator

import httpx
import pytest

import test_files
import upload_asgi
from backends import S3Backend
from test_files import (  # noqa: F401  (collected here: run again on S3)
    make_client,
    test_201_carries_location,
    test_a_client_that_leaves_stops_the_reads,
    test_a_delete_during_a_download_never_tears_it,
    test_a_file_shorter_than_promised_is_never_ended_as_whole,
    test_a_read_error_mid_download_cuts_the_answer,
    test_a_send_that_raises_oserror_ends_the_download_quietly,
    test_content_type_the_client_sent_badly_is_served_as_octet_stream,
    test_delete_then_404,
    test_download_whole_file_with_every_header,
    test_empty_file,
    test_head_ignores_range,
    test_head_is_get_without_the_body,
    test_if_modified_since,
    test_if_none_match_is_304,
    test_if_none_match_other_tag_is_200,
    test_if_range_on_a_download,
    test_list_bad_cursor_is_400,
    test_list_bad_limit_is_400,
    test_list_default_limit_and_empty,
    test_list_is_stable_while_files_come_and_go,
    test_list_newest_first_across_pages_with_link,
    test_multi_chunk_download_is_exact,
    test_non_ascii_filename_round_trips,
    test_other_methods_are_405_with_allow,
    test_record,
    test_several_or_unreadable_ranges_get_the_whole_file,
    test_single_range_is_206,
    test_unsatisfiable_range_is_416,
    upload,
)


@pytest.fixture
async def app(bucket: S3Backend) -> AsyncIterator[upload_asgi.UploadApp]:
    app = upload_asgi.create_app(bucket.config())
    yield app
    await app.store.aclose()


@pytest.fixture
async def client(app: upload_asgi.UploadApp) -> AsyncIterator[httpx.AsyncClient]:
    async with make_client(app) as client:
        yield client


@pytest.fixture(autouse=True)
def uploads_a_second_apart(monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 lists LastModified to the second: the listing tests' uploads a second apart."""

    async def upload_several(client: httpx.AsyncClient, count: int) -> list[dict[str, Any]]:
        records = []
        for i in range(count):
            if i:
                await asyncio.sleep(1.05)
            records.append(await upload(client, f"file {i}".encode(), f"{i}.txt", "text/plain"))
        await asyncio.sleep(1.05)  # and whatever the test uploads next is newer still
        return records

    monkeypatch.setattr(test_files, "upload_several", upload_several)


async def test_delete_leaves_nothing_in_the_bucket(bucket: S3Backend, client: httpx.AsyncClient) -> None:
    data = os.urandom(2 * 5 * 1024 * 1024 + 1)
    record = await upload(client, data)
    bucket.assert_stored(record, data)
    reply = await client.get(f"/files/{record['id']}", headers={"range": "bytes=5242870-5242889"})
    assert reply.status_code == 206 and reply.content == data[5242870:5242890]
    assert (await client.delete(f"/files/{record['id']}")).status_code == 204
    bucket.assert_nothing_stored()

"""The limits on S3: test_limits' in-process tests again, the app on SeaweedFS.

Imported from test_limits, so pytest runs them here a second time with this module's
`config` (S3 storage) and with test_limits' storage checks pointed at the bucket: a
request refused at any limit leaves no object and no multipart upload, a request at
its limits is stored whole.
"""

from __future__ import annotations

from dataclasses import replace
from typing import AsyncIterator

import pytest

import test_limits
import upload_asgi
from backends import S3Backend
from test_limits import (  # noqa: F401  (collected here: run again on S3)
    test_declared_length_at_the_limit_is_read,
    test_declared_length_over_the_limit_is_refused_before_the_body,
    test_empty_parts_count_too,
    test_file_at_its_limit_is_stored,
    test_file_over_its_limit,
    test_files_at_their_limit_are_stored,
    test_limits_are_independent_per_request,
    test_more_files_than_allowed,
    test_more_parts_than_allowed,
    test_request_at_its_limit_is_stored,
    test_request_over_its_limit_with_a_lying_content_length,
    test_request_over_its_limit_without_content_length,
    test_second_file_over_its_limit_removes_the_first,
    test_text_field_at_its_limit_is_kept,
    test_text_field_over_its_limit,
    test_unregistered_field_is_bounded_like_a_text_field,
)


@pytest.fixture
def config(bucket: S3Backend) -> upload_asgi.Config:
    return bucket.config()


@pytest.fixture(autouse=True)
async def checks_in_the_bucket(bucket: S3Backend, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    """test_limits' disk checks look in the bucket instead; its apps' clients are closed after."""
    apps: list[upload_asgi.UploadApp] = []

    def make_app(config: upload_asgi.Config, **limits: int) -> upload_asgi.UploadApp:
        app = upload_asgi.create_app(replace(config, fsync=False, **limits))
        apps.append(app)
        return app

    monkeypatch.setattr(test_limits, "make_app", make_app)
    monkeypatch.setattr(test_limits, "assert_stored", lambda _dir, record, data: bucket.assert_stored(record, data))
    monkeypatch.setattr(test_limits, "assert_nothing_stored", lambda upload_dir: bucket.assert_nothing_stored())
    yield
    for app in apps:
        await app.store.aclose()

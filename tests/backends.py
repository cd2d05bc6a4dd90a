"""The two storage backends as tests see them: a config for the app, and checks of what is stored.

`LocalBackend` looks in the upload dir; `S3Backend` in a SeaweedFS bucket under a prefix of
its own (and checks the upload dir stays empty). The `backend` fixture (conftest) gives one
of each to a test, so a behaviour test runs on both.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

import support
from s3server import BUCKET, SeaweedFS
from upload_service.settings import Config
from upload_service.units import MiB

S3_PART_SIZE = 5 * MiB  # the smallest S3 allows: a few MiB make a multipart upload


def use_seaweedfs(seaweedfs: SeaweedFS, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its credentials in the environment (botocore reads them there), and no developer's AWS profile."""
    for name, value in seaweedfs.env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    from upload_service import s3client

    monkeypatch.setattr(s3client, "get_session", session_with_a_shared_loader)


@functools.cache
def shared_loader() -> Any:
    import botocore.loaders

    return botocore.loaders.create_loader()


def session_with_a_shared_loader() -> Any:
    """A new aiobotocore session (credentials read afresh) whose loader is the tests' one:
    botocore parses S3's service model (~0.1 s) once, not for every app a test makes."""
    from aiobotocore.session import get_session

    session = get_session()
    session.register_component("data_loader", shared_loader())
    return session


async def close_app(app: Any) -> None:
    """Close the app's store client on this loop (the S3 store keeps one per loop), and the
    S3 resumable store's loop thread and client."""
    if hasattr(app.store, "aclose"):
        await app.store.aclose()
    resumable = getattr(app.resumable, "store", None)
    if hasattr(resumable, "close"):
        await asyncio.to_thread(resumable.close)


@functools.cache
def checking_client(seaweedfs: SeaweedFS) -> Any:
    """One blocking botocore client per SeaweedFS for the checks (making one takes ~70 ms)."""
    return seaweedfs.client()


class LocalBackend:
    name = "local"
    write_unit = MiB  # a writer thread's block (blocks.BLOCK_SIZE)
    # Records' mtimes order the listing; a kernel stamps them at its tick (1-4 ms).
    listing_tick = 0.02

    def __init__(self, upload_dir: Path) -> None:
        self.upload_dir = upload_dir

    def examples(self, count: int) -> int:
        """A property test's example count here (S3 runs fewer: each example is S3 calls)."""
        return count

    def sibling(self, upload_dir: Path) -> LocalBackend:
        """The same backend, empty: on another upload dir."""
        return LocalBackend(upload_dir)

    def config(self, **settings: Any) -> Config:
        return Config(upload_dir=self.upload_dir, **settings)

    def server_env(self) -> dict[str, str]:
        return {}

    def stored_ids(self) -> list[str]:
        return support.stored_ids(self.upload_dir) if self.upload_dir.exists() else []

    def assert_stored(self, record: dict[str, Any], data: bytes) -> None:
        support.assert_stored(self.upload_dir, record, data)

    def assert_nothing_stored(self) -> None:
        support.assert_nothing_stored(self.upload_dir)

    def stored_bytes(self, file_id: str) -> bytes:
        return (self.upload_dir / file_id).read_bytes()

    def stored_record(self, file_id: str) -> dict[str, Any]:
        return json.loads((self.upload_dir / f"{file_id}.json").read_text())

    def slow_writes(self, monkeypatch: pytest.MonkeyPatch, app: Any, seconds: float) -> None:
        """Make each `write_unit` of a file take `seconds` more: here, each block's write to disk."""
        from upload_service import localstore

        real = localstore.write_all

        def slow_write_all(fd: int, data: Any) -> None:
            time.sleep(seconds)  # on the writer thread
            real(fd, data)

        monkeypatch.setattr(localstore, "write_all", slow_write_all)

    def slow_commit(
        self, monkeypatch: pytest.MonkeyPatch, app: Any, committing: threading.Event, seconds: float
    ) -> None:
        """Make the app's commits take `seconds` more, once `committing` is set: here, each sidecar's write."""
        from upload_service import localstore

        real = localstore.write_sidecar

        def slow_write_sidecar(*args: Any, **kwargs: Any) -> Any:
            committing.set()
            time.sleep(seconds)  # on the commit's thread, which nothing can stop
            return real(*args, **kwargs)

        monkeypatch.setattr(localstore, "write_sidecar", slow_write_sidecar)

    def holds(self, record: dict[str, Any]) -> bool:
        """Whether the record's file and record are in place, and nothing of it is in flight."""
        file_id = record["id"]
        return (
            (self.upload_dir / file_id).is_file() and self.stored_record(file_id) == record
            and file_id not in self.in_flight()
        )

    def stored_names(self) -> list[str]:
        """Every file in the upload dir (staging dirs' files too), relative to it."""
        if not self.upload_dir.exists():
            return []
        return sorted(str(p.relative_to(self.upload_dir)) for p in self.upload_dir.rglob("*") if not p.is_dir())

    def in_flight(self) -> list[str]:
        """Files being written: the local store's partial files."""
        partial = self.upload_dir / ".partial"
        return sorted(p.name for p in partial.iterdir()) if partial.exists() else []

    def assert_nothing_in_flight(self) -> None:
        """No file being written is left (after an answer, stored or refused)."""
        assert self.in_flight() == []

    def remove(self, file_id: str) -> None:
        """Remove a stored file and its record behind the app's back (tests that reuse one app)."""
        (self.upload_dir / file_id).unlink()
        (self.upload_dir / f"{file_id}.json").unlink()

    def overwrite_record(self, file_id: str, data: bytes) -> None:
        """Put `data` where the file's record is (a sidecar a crash left empty, say)."""
        (self.upload_dir / f"{file_id}.json").write_bytes(data)


class S3Backend:
    name = "s3"
    write_unit = S3_PART_SIZE  # a part
    # LastModified is to the second on S3: uploads a listing must order, a second apart.
    listing_tick = 1.05

    def __init__(self, seaweedfs: SeaweedFS, upload_dir: Path, prefix: str) -> None:
        self.seaweedfs = seaweedfs
        self.upload_dir = upload_dir
        self.prefix = prefix
        self.s3 = checking_client(seaweedfs)

    def examples(self, count: int) -> int:
        return max(10, count // 10)

    def sibling(self, upload_dir: Path) -> S3Backend:
        """The same backend, empty: another prefix (and upload dir)."""
        return S3Backend(self.seaweedfs, upload_dir, f"t/{uuid.uuid4().hex[:12]}")

    @property
    def storage(self) -> str:
        return f"s3://{BUCKET}/{self.prefix}"

    def config(self, **settings: Any) -> Config:
        settings.setdefault("s3_part_size", S3_PART_SIZE)
        return Config(
            upload_dir=self.upload_dir, storage=self.storage, s3_endpoint_url=self.seaweedfs.endpoint_url, **settings
        )

    def server_env(self) -> dict[str, str]:
        return {**self.seaweedfs.env, "UPLOAD_STORAGE": self.storage, "UPLOAD_S3_PART_SIZE": "5M"}

    def objects(self) -> list[str]:
        """Keys under the prefix (the names after it)."""
        found = []
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=f"{self.prefix}/")
        for page in pages:
            found += [item["Key"][len(self.prefix) + 1 :] for item in page.get("Contents", [])]
        return sorted(found)

    def uploads_in_progress(self) -> list[str]:
        """Keys with a multipart upload in progress under the prefix."""
        answer = self.s3.list_multipart_uploads(Bucket=BUCKET, Prefix=f"{self.prefix}/")
        return sorted(u["Key"][len(self.prefix) + 1 :] for u in answer.get("Uploads", []))

    def stored_bytes(self, file_id: str) -> bytes:
        return self.object_bytes(file_id)

    def remove(self, file_id: str) -> None:
        for name in (file_id, f"{file_id}.json"):
            self.s3.delete_object(Bucket=BUCKET, Key=f"{self.prefix}/{name}")

    def overwrite_record(self, file_id: str, data: bytes) -> None:
        self.s3.put_object(Bucket=BUCKET, Key=f"{self.prefix}/{file_id}.json", Body=data)

    def object_bytes(self, name: str) -> bytes:
        return self.s3.get_object(Bucket=BUCKET, Key=f"{self.prefix}/{name}")["Body"].read()

    def stored_ids(self) -> list[str]:
        return [name for name in self.objects() if not name.endswith(".json")]

    def stored_record(self, file_id: str) -> dict[str, Any]:
        return json.loads(self.object_bytes(f"{file_id}.json"))

    def slow_writes(self, monkeypatch: pytest.MonkeyPatch, app: Any, seconds: float) -> None:
        """Here: each part's upload."""
        store = app.prepare()
        real = store.upload_part

        async def upload_part(*args: Any) -> str:
            await asyncio.sleep(seconds)
            return await real(*args)

        monkeypatch.setattr(store, "upload_part", upload_part)

    def slow_commit(
        self, monkeypatch: pytest.MonkeyPatch, app: Any, committing: threading.Event, seconds: float
    ) -> None:
        """Here: each record's PUT, the commit's last step."""
        store = app.prepare()
        real = store.call

        async def call(operation: str, **params: Any) -> Any:
            if operation == "put_object" and params["Key"].endswith(".json"):
                committing.set()
                await asyncio.sleep(seconds)
            return await real(operation, **params)

        monkeypatch.setattr(store, "call", call)

    def holds(self, record: dict[str, Any]) -> bool:
        file_id = record["id"]
        return file_id in self.objects() and self.stored_record(file_id) == record and file_id not in self.in_flight()

    def stored_names(self) -> list[str]:
        """Every object under the prefix, and every file in the upload dir."""
        local = [str(p.relative_to(self.upload_dir)) for p in self.upload_dir.rglob("*") if not p.is_dir()]
        return sorted(self.objects() + local)

    def in_flight(self) -> list[str]:
        """Files being written: multipart uploads in progress."""
        return self.uploads_in_progress()

    def assert_nothing_in_flight(self) -> None:
        assert self.uploads_in_progress() == []
        self.assert_local_dir_empty()

    def assert_local_dir_empty(self) -> None:
        # No file (the resumable staging dir may stay, empty).
        assert not self.upload_dir.exists() or [p for p in self.upload_dir.rglob("*") if not p.is_dir()] == []

    def assert_stored(self, record: dict[str, Any], data: bytes) -> None:
        """The object holds exactly `data`, its record object the record; nothing on local disk."""
        assert record["size"] == len(data)
        assert record["sha256"] == hashlib.sha256(data).hexdigest()
        assert self.object_bytes(record["id"]) == data
        assert json.loads(self.object_bytes(f"{record['id']}.json")) == record
        self.assert_local_dir_empty()

    def assert_nothing_stored(self) -> None:
        assert self.objects() == []
        assert self.uploads_in_progress() == []
        self.assert_local_dir_empty()

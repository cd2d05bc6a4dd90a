"""Resumable uploads against a model (hypothesis stateful): random sequences of tus and draft
creations, PATCHes (right, at a wrong offset, past the length, cut off mid-body, with a good or a
bad checksum), form uploads, HEADs, GETs, DELETEs, whole listings and restarts, in process on
each backend.

After every step the store holds exactly the files the model says were completed, each with the
bytes sent; locally, `.resumable/` holds exactly the uploads under way and `.partial/` nothing.
Every answer is the one the README gives for the case, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, consumes, invariant, multiple, precondition, rule

import upload_asgi
from backends import close_app
from support import Reply, file_part, form_body, form_content_type, http_scope
from upload_service.storage import is_file_id

TUS = [("Tus-Resumable", "1.0.0")]
# The draft's interop versions: 6 (drafts -03 to -05, tus-js-client's) also completes an upload
# whose offset reaches its known length; from 7 on only the client's `Upload-Complete: ?1` does.
DRAFT_VERSIONS = ("6", "8", "9")
MAX_LENGTH = 2_300_000  # past two of the writers' 1 MiB blocks
STREAM = hashlib.shake_256(b"model").digest(MAX_LENGTH + 1000)

lengths = st.one_of(st.integers(0, 3000), st.integers(0, MAX_LENGTH))
chunk_sizes = st.one_of(st.integers(1, 4096), st.integers(1, 1_200_000))


def content(upload: Upload, start: int, stop: int) -> bytes:
    """The bytes of `upload` from `start` to `stop`: each upload its own slice of one stream."""
    return STREAM[upload.seed + start : upload.seed + stop]


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


async def exchange(app: Any, scope: dict[str, Any], chunks: list[bytes], cut: bool) -> Reply:
    """One request as a server runs it: the body's events, then (unless the client is `cut` off
    after them) `receive` waits until the answer is sent, as a client still connected."""
    events = [{"type": "http.request", "body": chunk, "more_body": True} for chunk in chunks]
    events.append({"type": "http.disconnect"} if cut else {"type": "http.request", "body": b"", "more_body": False})
    answered = asyncio.Event()
    reply = Reply()

    async def receive() -> dict[str, Any]:
        if events:
            return events.pop(0)
        await answered.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        await reply.record(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            answered.set()

    await app(scope, receive, send)
    return reply


@dataclass
class Upload:
    path: str
    protocol: str  # "tus", the draft's interop version, or "form"
    seed: int
    length: int | None
    offset: int
    record: dict[str, Any] | None = None  # once stored

    @property
    def headers(self) -> list[tuple[str, str]]:
        if self.protocol == "form":
            return []
        return TUS if self.protocol == "tus" else [("Upload-Draft-Interop-Version", self.protocol)]

    @property
    def is_draft(self) -> bool:
        return self.protocol not in ("tus", "form")

    def completes_at(self, offset: int) -> bool:
        """Whether reaching `offset` stores the file without the client saying so."""
        return offset == self.length and self.protocol in ("tus", "6")


class ResumableModel(RuleBasedStateMachine):
    backend: Any = None  # set by the test

    uploads = Bundle("uploads")

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.app = self.new_app()
        self.live: dict[str, Upload] = {}
        self.seeds = 0

    def new_app(self) -> upload_asgi.UploadApp:
        return upload_asgi.create_app(self.backend.config(fsync=False, max_file_size=MAX_LENGTH))

    def call(self, path: str, method: str, headers: list[tuple[str, str]], body: bytes = b"",
             piece: int = 65536, cut_at: int | None = None, query: str = "") -> Reply:
        """One request; with `cut_at`, the client goes away after that many bytes of the body."""
        sent = body if cut_at is None else body[:cut_at]
        if body or method in ("POST", "PATCH"):
            headers = [*headers, ("Content-Length", str(len(body)))]
        scope = http_scope(path, method, headers)
        scope["query_string"] = query.lstrip("?").encode()
        piece = max(piece, len(body) // 64)  # a bounded number of events
        reply = self.loop.run_until_complete(exchange(self.app, scope, pieces(sent, piece), cut_at is not None))
        assert reply.status is None or reply.status < 500, (reply.status, reply.body)
        return reply

    def new_upload(self, protocol: str, length: int | None) -> Upload:
        self.seeds += 1
        return Upload("", protocol, self.seeds * 7919 % 1000, length, 0)

    def stored(self, upload: Upload, reply: Reply | None, record: dict[str, Any] | None = None) -> None:
        if record is None:
            record = json.loads(reply.body) if reply.body else self.record_of(upload)
        data = content(upload, 0, upload.offset)
        assert record["size"] == len(data) and record["sha256"] == hashlib.sha256(data).hexdigest()
        upload.record = record

    def record_of(self, upload: Upload) -> dict[str, Any]:
        reply = self.call(f"{upload.path}/record", "GET", [])
        assert reply.status == 200, (reply.status, reply.body)
        return json.loads(reply.body)

    # -- creations -----------------------------------------------------------------

    @rule(target=uploads, length=st.one_of(st.none(), lengths), first=lengths, piece=chunk_sizes)
    def create_tus(self, length: int | None, first: int, piece: int) -> Upload:
        upload = self.new_upload("tus", length)
        first = min(first, MAX_LENGTH if length is None else length)
        headers = [*TUS, ("Upload-Length", str(length)) if length is not None else ("Upload-Defer-Length", "1")]
        if first:
            headers.append(("Content-Type", "application/offset+octet-stream"))
        reply = self.call("/files", "POST", headers, content(upload, 0, first), piece)
        assert reply.status == 201, (reply.status, reply.body)
        assert int(reply.headers["upload-offset"]) == first
        upload.path, upload.offset = reply.headers["location"], first
        self.live[upload.path] = upload
        if upload.offset == length:
            self.stored(upload, reply)
        return upload

    @rule(target=uploads, version=st.sampled_from(DRAFT_VERSIONS), length=st.one_of(st.none(), lengths),
          first=lengths, complete=st.booleans(), piece=chunk_sizes)
    def create_draft(self, version: str, length: int | None, first: int, complete: bool, piece: int) -> Upload:
        upload = self.new_upload(version, length)
        first = length if complete and length is not None else min(first, MAX_LENGTH if length is None else length)
        headers = [*upload.headers, ("Upload-Complete", "?1" if complete else "?0")]
        if length is not None:
            headers.append(("Upload-Length", str(length)))
        reply = self.call("/files", "POST", headers, content(upload, 0, first), piece)
        assert reply.status == 201, (reply.status, reply.body)
        assert int(reply.headers["upload-offset"]) == first
        upload.path, upload.offset = reply.headers["location"], first
        self.live[upload.path] = upload
        if complete or upload.completes_at(first):
            upload.length = first
            self.stored(upload, reply)
        return upload

    @rule(target=uploads, sizes=st.lists(st.integers(0, 70_000), min_size=1, max_size=3), piece=chunk_sizes)
    def upload_a_form(self, sizes: list[int], piece: int) -> Any:
        files = [self.new_upload("form", size) for size in sizes]
        body = form_body(file_part(content(f, 0, f.length), f"f{i}.bin", "files") for i, f in enumerate(files))
        reply = self.call("/upload-multiple", "POST", [("Content-Type", form_content_type())], body, piece)
        assert reply.status == 201, (reply.status, reply.body)
        for upload, record in zip(files, json.loads(reply.body)["files"]):
            upload.path, upload.offset = f"/files/{record['id']}", upload.length
            self.live[upload.path] = upload
            self.stored(upload, reply=None, record=record)
        return multiple(*files)

    # -- appends -------------------------------------------------------------------

    def patch_headers(self, upload: Upload, offset: int) -> list[tuple[str, str]]:
        kind = "application/offset+octet-stream" if not upload.is_draft else "application/partial-upload"
        return [*upload.headers, ("Upload-Offset", str(offset)), ("Content-Type", kind)]

    def room(self, upload: Upload) -> int:
        return (MAX_LENGTH if upload.length is None else upload.length) - upload.offset

    @precondition(lambda self: any(u.record is None for u in self.live.values()))
    @rule(data=st.data(), size=chunk_sizes, piece=chunk_sizes, finish=st.booleans())
    def patch(self, data: Any, size: int, piece: int, finish: bool) -> None:
        """A right PATCH; for a deferred tus length or the draft, maybe saying this is the end."""
        upload = data.draw(st.sampled_from([u for u in self.live.values() if u.record is None]))
        size = min(size, self.room(upload))
        headers = self.patch_headers(upload, upload.offset)
        end = upload.offset + size
        if upload.is_draft:
            finish = finish or (upload.length is not None and end == upload.length and data.draw(st.booleans()))
            headers.append(("Upload-Complete", "?1" if finish and (upload.length in (None, end)) else "?0"))
        elif upload.length is None and finish:
            headers.append(("Upload-Length", str(end)))
            upload.length = end
        reply = self.call(upload.path, "PATCH", headers, content(upload, upload.offset, end), piece)
        upload.offset = end
        if upload.is_draft and (("Upload-Complete", "?1") in headers or upload.completes_at(end)):
            assert reply.status == 200, (reply.status, reply.body)
            upload.length = end
            self.stored(upload, reply)
            return
        assert reply.status == 204, (reply.status, reply.body)
        assert int(reply.headers["upload-offset"]) == end
        if upload.completes_at(end):
            self.stored(upload, reply)

    @precondition(lambda self: any(u.record is None for u in self.live.values()))
    @rule(data=st.data(), size=chunk_sizes, cut=st.floats(0, 1), piece=chunk_sizes)
    def patch_cut_off(self, data: Any, size: int, cut: float, piece: int) -> None:
        """The client goes away mid-body: what arrived is kept."""
        upload = data.draw(st.sampled_from([u for u in self.live.values() if u.record is None]))
        size = min(size, self.room(upload))
        if size < 2:
            return
        cut_at = min(size - 1, int(size * cut))
        headers = self.patch_headers(upload, upload.offset)
        if upload.is_draft:
            headers.append(("Upload-Complete", "?0"))
        end = upload.offset + size
        reply = self.call(upload.path, "PATCH", headers, content(upload, upload.offset, end), piece, cut_at)
        assert reply.status is None, (reply.status, reply.body)
        upload.offset += cut_at

    @precondition(lambda self: any(u.record is None and u.protocol == "tus" for u in self.live.values()))
    @rule(data=st.data(), size=chunk_sizes, good=st.booleans(), algorithm=st.sampled_from(["sha1", "sha256"]))
    def patch_with_checksum(self, data: Any, size: int, good: bool, algorithm: str) -> None:
        """tus checksum: a good one appends, a bad one is 460 and the chunk is dropped."""
        upload = data.draw(st.sampled_from([u for u in self.live.values() if u.record is None and u.protocol == "tus"]))
        size = min(size, self.room(upload))
        end = upload.offset + size
        chunk = content(upload, upload.offset, end)
        digest = hashlib.new(algorithm, chunk if good else chunk + b"x").digest()
        headers = [*self.patch_headers(upload, upload.offset), ("Upload-Checksum", f"{algorithm} {base64.b64encode(digest).decode()}")]
        reply = self.call(upload.path, "PATCH", headers, chunk)
        if not good:
            assert reply.status == 460, (reply.status, reply.body)
            return
        assert reply.status == 204, (reply.status, reply.body)
        upload.offset = end
        if end == upload.length:
            self.stored(upload, reply)

    @rule(upload=uploads, shift=st.integers(-5000, 5000).filter(bool), size=st.integers(0, 3000))
    def patch_at_a_wrong_offset(self, upload: Upload, shift: int, size: int) -> None:
        if upload.path not in self.live or upload.record is not None:
            return
        offset = max(0, upload.offset + shift)
        if offset == upload.offset:
            return
        headers = self.patch_headers(upload, offset)
        if upload.is_draft:
            headers.append(("Upload-Complete", "?0"))
        reply = self.call(upload.path, "PATCH", headers, bytes(size))
        assert reply.status == 409, (reply.status, reply.body)
        assert int(reply.headers["upload-offset"]) == upload.offset

    @precondition(lambda self: any(u.record is None and u.length is not None for u in self.live.values()))
    @rule(data=st.data(), over=st.integers(1, 5000))
    def patch_past_the_length(self, data: Any, over: int) -> None:
        upload = data.draw(st.sampled_from([u for u in self.live.values() if u.record is None and u.length is not None]))
        headers = self.patch_headers(upload, upload.offset)
        if upload.is_draft:
            headers.append(("Upload-Complete", "?0"))
        reply = self.call(upload.path, "PATCH", headers, bytes(upload.length - upload.offset + over))
        assert reply.status == (400 if upload.is_draft else 413), (reply.status, reply.body)

    @precondition(lambda self: any(u.record is not None and u.protocol != "form" for u in self.live.values()))
    @rule(data=st.data(), size=st.integers(1, 100))
    def patch_a_stored_file(self, data: Any, size: int) -> None:
        upload = data.draw(st.sampled_from([u for u in self.live.values() if u.record is not None and u.protocol != "form"]))
        headers = self.patch_headers(upload, upload.offset)
        if upload.is_draft:
            headers.append(("Upload-Complete", "?0"))
        reply = self.call(upload.path, "PATCH", headers, bytes(size))
        assert reply.status == (400 if upload.is_draft else 409), (reply.status, reply.body)

    # -- reads and deletes ---------------------------------------------------------

    @rule(upload=uploads)
    def head(self, upload: Upload) -> None:
        reply = self.call(upload.path, "HEAD", upload.headers)
        if upload.path not in self.live:
            assert reply.status == 404, reply.status
            return
        expected = 200 if not upload.is_draft or upload.record is not None else 204
        assert reply.status == expected, (reply.status, reply.headers)
        if upload.protocol == "form":  # no protocol spoken: the file's headers
            assert int(reply.headers["content-length"]) == upload.offset
            return
        assert int(reply.headers["upload-offset"]) == upload.offset
        if upload.is_draft:
            assert reply.headers["upload-complete"] == ("?1" if upload.record is not None else "?0")

    @rule(upload=uploads, start=st.integers(0, MAX_LENGTH))
    def get(self, upload: Upload, start: int) -> None:
        ranged = start > 0 and upload.record is not None and start < upload.offset
        reply = self.call(upload.path, "GET", [("Range", f"bytes={start}-")] if ranged else [])
        if upload.path not in self.live:
            assert reply.status == 404, reply.status
        elif upload.record is None:
            assert reply.status == 409, (reply.status, reply.body)
        else:
            assert reply.status == (206 if ranged else 200), reply.status
            assert reply.body == content(upload, start if ranged else 0, upload.offset)
            assert reply.headers["etag"] == f'"{upload.record["sha256"]}"'

    @rule(upload=consumes(uploads))
    def delete(self, upload: Upload) -> None:
        reply = self.call(upload.path, "DELETE", upload.headers)
        assert reply.status == (204 if upload.path in self.live else 404), (reply.status, reply.body)
        self.live.pop(upload.path, None)

    @rule(limit=st.integers(1, 7))
    def list_everything(self, limit: int) -> None:
        """Paging through the listing gives every stored file once, with its record."""
        listed, cursor = [], None
        while True:
            query = f"?limit={limit}" + (f"&cursor={cursor}" if cursor else "")
            reply = self.call("/files", "GET", [], query=query)
            assert reply.status == 200, (reply.status, reply.body)
            page = json.loads(reply.body)
            listed += page["files"]
            if (cursor := page.get("next_cursor")) is None:
                break
        stored = {u.record["id"]: u.record for u in self.live.values() if u.record is not None}
        assert sorted(r["id"] for r in listed) == sorted(stored)
        assert all(record == stored[record["id"]] for record in listed)

    @rule()
    def restart(self) -> None:
        """Another process takes over: it knows no upload's hash so far and reads the bytes back."""
        self.loop.run_until_complete(close_app(self.app))
        self.app = self.new_app()

    # -- what the store holds ------------------------------------------------------

    @invariant()
    def the_store_holds_what_was_completed(self) -> None:
        stored = {u.record["id"]: u for u in self.live.values() if u.record is not None}
        assert sorted(i for i in self.backend.stored_ids() if is_file_id(i)) == sorted(stored)
        for file_id, upload in stored.items():
            assert self.backend.stored_bytes(file_id) == content(upload, 0, upload.offset)

    @invariant()
    def staging_holds_the_uploads_under_way(self) -> None:
        if self.backend.name != "local":
            return
        under_way = {u.path.rsplit("/", 1)[1] for u in self.live.values() if u.record is None}
        staging = self.backend.upload_dir / ".resumable"
        names = sorted(p.name for p in staging.iterdir()) if staging.exists() else []
        assert names == sorted([*under_way, *(f"{i}.info" for i in under_way)])
        assert self.backend.in_flight() == []

    def teardown(self) -> None:
        try:
            for path in list(self.live):
                reply = self.call(path, "DELETE", self.live[path].headers)
                assert reply.status == 204, (reply.status, reply.body)
            self.backend.assert_nothing_stored()
        finally:
            self.loop.run_until_complete(close_app(self.app))
            self.loop.close()


def test_resumable_uploads_follow_the_model(backend: Any) -> None:
    ResumableModel.backend = backend
    run = ResumableModel.TestCase
    run.settings = settings(max_examples=backend.examples(100), stateful_step_count=25, deadline=None,
                            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    run().runTest()

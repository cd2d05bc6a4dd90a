"""The other apps the server benchmark runs under the same hypercorn.

- `drain_app`: reads every `http.request` and answers `200 {"received": N}`; what
  hypercorn itself delivers, the ceiling for any app.
- `store_app`: the work every upload endpoint must do and nothing more: SHA-256
  and a file write of the whole body, in 1 MiB blocks on one thread (one block in
  flight) while the loop reads on, with no multipart parsing; the file goes in
  `$STORE_DIR` and is removed once answered. Against `drain_app` it shows what
  hashing and storing cost under this hypercorn; against upload-asgi, what the
  multipart reading and the rest of the service cost on top.
- `commit_app`: what a durable small upload costs at least (SPEC §4) with no multipart
  parsing: the file is cut out of the bench's one-part form by two `find`s, hashed,
  written to `$STORE_DIR/.partial/<id>` and renamed into `$STORE_DIR`, then its JSON
  record the same way; all on the event loop, no fsync, answered `201` with the
  file's size and SHA-256. Against upload-asgi with `UPLOAD_FSYNC=0`, what the
  parsing and the rest of the service cost on a small upload.
- `starlette_app`: `await request.form()` (python-multipart, `UploadFile`), then
  SHA-256 of the file: the common way to take an upload in Python today.
- `fileresponse_app`: `GET /files/<id>` answered with Starlette's `FileResponse` of
  `$FILES_DIR/<id>`: the reference for upload-asgi's downloads of the same file.

    hypercorn bench.apps:drain_app
    STORE_DIR=/tmp hypercorn bench.apps:store_app
    STORE_DIR=/tmp hypercorn bench.apps:commit_app      # makes /tmp/.partial
    hypercorn bench.apps:starlette_app     # needs pip install -e '.[bench]'
    FILES_DIR=uploads hypercorn bench.apps:fileresponse_app
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]


async def answer_lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


async def answer_json(send: Any, record: dict[str, Any], status: int = 200) -> None:
    body = json.dumps(record).encode()
    await send({
        "type": "http.response.start",
        "status": status,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


async def drain_app(scope: Scope, receive: Any, send: Any) -> None:
    """Read the whole body, keep nothing, answer how many bytes came."""
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    received = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        received += len(message.get("body", b""))
        if not message.get("more_body", False):
            break
    await answer_json(send, {"received": received})


STORE_BLOCK = 1 << 20
_store_thread = ThreadPoolExecutor(1)


def store_block(fd: int, digest: Any, chunks: list[bytes]) -> None:
    data = b"".join(chunks)
    digest.update(data)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


async def store_app(scope: Scope, receive: Any, send: Any) -> None:
    """Hash and write the whole body (no parsing), answer its size and SHA-256."""
    if scope["type"] == "lifespan":
        await answer_lifespan(receive, send)
        return
    loop = asyncio.get_running_loop()
    fd, path = tempfile.mkstemp(dir=os.environ.get("STORE_DIR"))
    digest = hashlib.sha256()
    received = 0
    chunks: list[bytes] = []
    buffered = 0
    job: asyncio.Future[None] | None = None
    try:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            received += len(chunk)
            chunks.append(chunk)
            buffered += len(chunk)
            more = message.get("more_body", False)
            if buffered >= STORE_BLOCK or not more:
                if job is not None:
                    await job
                job = loop.run_in_executor(_store_thread, store_block, fd, digest, chunks)
                chunks, buffered = [], 0
            if not more:
                break
        await job
    finally:
        os.close(fd)
        os.unlink(path)
    await answer_json(send, {"received": received, "sha256": digest.hexdigest()})


async def commit_app(scope: Scope, receive: Any, send: Any) -> None:
    """Store the form's one file as SPEC §4 asks, with no parsing, on the loop; answer its size and SHA-256."""
    if scope["type"] == "lifespan":
        os.makedirs(os.path.join(os.environ["STORE_DIR"], ".partial"), exist_ok=True)
        await answer_lifespan(receive, send)
        return
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    body = b"".join(chunks)
    # The bench's form: one part, its headers, the file, "\r\n--boundary--\r\n".
    data = body[body.find(b"\r\n\r\n") + 4 : body.rfind(b"\r\n--", 0, len(body) - 2)]
    record = {"id": uuid.uuid4().hex, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    store = os.environ["STORE_DIR"]
    for name, content in ((record["id"], data), (record["id"] + ".json", json.dumps(record).encode())):
        partial = f"{store}/.partial/{name}"
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(content)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(partial, f"{store}/{name}")
    await answer_json(send, record, status=201)


def make_starlette_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def upload(request: Request) -> JSONResponse:
        async with request.form() as form:
            file = form["file"]
            digest = hashlib.sha256()
            size = 0
            await file.seek(0)
            while chunk := await file.read(1 << 20):
                digest.update(chunk)
                size += len(chunk)
            return JSONResponse(
                {"filename": file.filename, "size": size, "sha256": digest.hexdigest()}, status_code=201
            )

    return Starlette(routes=[Route("/upload", upload, methods=["POST"])])


_starlette: Any = None


async def starlette_app(scope: Scope, receive: Any, send: Any) -> None:
    """The Starlette app, built on first use so that the drain app never imports Starlette."""
    global _starlette
    if _starlette is None:
        _starlette = make_starlette_app()
    await _starlette(scope, receive, send)


def make_fileresponse_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, JSONResponse, Response
    from starlette.routing import Route

    async def download(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        path = os.path.join(os.environ["FILES_DIR"], file_id)
        if not file_id.isalnum() or not os.path.isfile(path):  # ids are hex; never a path outside
            return JSONResponse({"error": "not_found"}, status_code=404)
        return FileResponse(path)

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/files/{file_id}", download), Route("/health", health)])


_fileresponse: Any = None


async def fileresponse_app(scope: Scope, receive: Any, send: Any) -> None:
    """Starlette's FileResponse of `$FILES_DIR/<id>`, built on first use."""
    global _fileresponse
    if _fileresponse is None:
        _fileresponse = make_fileresponse_app()
    await _fileresponse(scope, receive, send)

"""The other apps the server benchmark runs under the same hypercorn.

- `drain_app`: reads every `http.request` and answers `200 {"received": N}`; what
  hypercorn itself delivers, the ceiling for any app.
- `starlette_app`: `await request.form()` (python-multipart, `UploadFile`), then
  SHA-256 of the file: the common way to take an upload in Python today.

    hypercorn bench.apps:drain_app
    hypercorn bench.apps:starlette_app     # needs pip install -e '.[bench]'
"""

from __future__ import annotations

import hashlib
import json
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
    body = json.dumps({"received": received}).encode()
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
    })
    await send({"type": "http.response.body", "body": body})


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

"""Host applications that mount upload-asgi under /files, for tests and as examples.

    hypercorn embed_apps:dispatcher   hypercorn's DispatcherMiddleware (forwards lifespan)
    hypercorn embed_apps:starlette    a Starlette app with Mount("/files", ...) (does not)

Both read UPLOAD_DIR and the other settings from the environment, like `upload_asgi:app`.
"""

from __future__ import annotations

from typing import Any

from hypercorn.middleware import DispatcherMiddleware
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route

import upload_asgi

HOST_TEXT = b"the host application"


async def host_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    """A minimal host: answers every path it owns with a short text, runs lifespan."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain"), (b"content-length", str(len(HOST_TEXT)).encode())],
    })
    await send({"type": "http.response.body", "body": HOST_TEXT})


# DispatcherMiddleware tries its mounts in order with str.startswith: "/files" first,
# then "" which matches everything else.
dispatcher = DispatcherMiddleware({"/files": upload_asgi.create_app(), "": host_app})


async def home(request: Any) -> PlainTextResponse:
    return PlainTextResponse(HOST_TEXT.decode())


# Starlette runs lifespan for itself only: the mounted app never sees lifespan.startup
# and must prepare its upload dir on first use.
starlette = Starlette(routes=[
    Route("/", home),
    Mount("/files", app=upload_asgi.create_app()),
    Mount("", app=host_app),  # everything else stays the host's
])

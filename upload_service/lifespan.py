"""Lifespan startup failure that a middleware cannot swallow.

hypercorn 0.18's `DispatcherMiddleware` forwards lifespan to every mounted app but
drops `lifespan.startup.failed` (it acts on the two `complete` messages only): a bad
setting then left the server waiting its `startup_timeout` (60 s) and ending in
`LifespanTimeoutError`, without the reason. hypercorn's own lifespan raises
`LifespanFailureError` from inside `send` when it gets the message; when `send`
returns instead, the app raises that error itself: hypercorn lets it through the
dispatcher's task group and stops at once, printing the reason. Other servers act on
the message before it returns (uvicorn then ignores the exception as a startup that
already failed). This can go when hypercorn's dispatcher forwards the failure.
"""

from __future__ import annotations

from hypercorn.utils import LifespanFailureError

from upload_service.asgi import Send


async def fail_startup(send: Send, reason: str) -> None:
    """Send `lifespan.startup.failed`; raise if nothing acted on it."""
    await send({"type": "lifespan.startup.failed", "message": reason})
    raise LifespanFailureError("startup", reason)

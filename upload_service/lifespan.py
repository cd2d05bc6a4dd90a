"""Two gaps of hypercorn 0.18 that lifespan startup closes.

A startup failure that a middleware cannot swallow: hypercorn 0.18's
`DispatcherMiddleware` forwards lifespan to every mounted app but drops
`lifespan.startup.failed` (it acts on the two `complete` messages only): a bad
setting then left the server waiting its `startup_timeout` (60 s) and ending in
`LifespanTimeoutError`, without the reason. hypercorn's own lifespan raises
`LifespanFailureError` from inside `send` when it gets the message; when `send`
returns instead, the app raises that error itself: hypercorn lets it through the
dispatcher's task group and stops at once, printing the reason. Other servers act on
the message before it returns (uvicorn then ignores the exception as a startup that
already failed). This can go when hypercorn's dispatcher forwards the failure.

Workers that finish their uploads on SIGTERM: with workers (`-w N`) hypercorn's main
process tells them to stop through a shared event, leaving SIGTERM at its default in
them; but once the first worker has stopped (an idle one stops at once) it sends
SIGTERM to the others, cutting their uploads short of `--graceful-timeout`. A worker
that ignores SIGTERM finishes them; the main process waits for it at exit.
"""

from __future__ import annotations

import multiprocessing
import signal
import sys
import threading

from hypercorn.utils import LifespanFailureError

from upload_service.asgi import Send


async def fail_startup(send: Send, reason: str) -> None:
    """Send `lifespan.startup.failed`; raise if nothing acted on it."""
    await send({"type": "lifespan.startup.failed", "message": reason})
    raise LifespanFailureError("startup", reason)


def finish_uploads_on_sigterm() -> None:
    """In a hypercorn worker process only (its SIGTERM left at the default): ignore SIGTERM."""
    if (
        ("hypercorn.asyncio.run" in sys.modules or "hypercorn.trio.run" in sys.modules)
        and multiprocessing.parent_process() is not None
        and threading.current_thread() is threading.main_thread()
        and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)

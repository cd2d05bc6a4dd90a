"""The embedding app's hooks: `before_upload(scope, headers)` and `on_upload(record[, scope])`.

`before_upload` is awaited once the headers have passed the app's own checks (token,
Content-Type, declared length) and before the first body byte is read: it may refuse
the request by raising `UploadRefused(status, detail)`. It gets the request's own
scope (what it stores in `scope["state"]` or under its own key, `on_upload` sees
again) and the headers as a dict. `on_upload` gets each stored record, and the scope
when it takes two positional parameters (a one-parameter callback keeps working).
Either may be a plain function or a coroutine function.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any, Callable

from upload_service.asgi import Scope
from upload_service.storage import Record

UploadCallback = Callable[..., Any]  # (record) or (record, scope); may return an awaitable
BeforeUpload = Callable[[Scope, dict[str, str]], Any]  # may return an awaitable


def request_headers(scope: Scope) -> dict[str, str]:
    """The request headers by lowercase name; repeated ones joined with ", " (RFC 9110 §5.3)."""
    headers: dict[str, str] = {}
    for key, value in scope.get("headers", ()):
        name, text = key.decode("latin-1").lower(), value.decode("latin-1")
        headers[name] = f"{headers[name]}, {text}" if name in headers else text
    return headers


def takes_scope(callback: UploadCallback) -> bool:
    """True if `callback` accepts a second positional argument (the scope)."""
    try:
        parameters = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: the old form
        return False
    positional = 0
    for parameter in parameters:
        if parameter.kind == parameter.VAR_POSITIONAL:
            return True
        if parameter.kind in (parameter.POSITIONAL_ONLY, parameter.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 2


class HookCancelled(Exception):
    """A hook raised CancelledError while its request was not being cancelled (it awaited
    something cancelled): the hook's failure, not the server letting go of the request."""


async def call(callback: Callable[..., Any], *args: Any) -> None:
    """Call a hook, awaiting what it returns if that is awaitable."""
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            await result
    except asyncio.CancelledError as exc:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise
        raise HookCancelled(f"{callback!r} raised CancelledError") from exc


async def before_upload(hook: BeforeUpload | None, scope: Scope) -> None:
    if hook is not None:
        await call(hook, scope, request_headers(scope))


async def on_upload(callback: UploadCallback, with_scope: bool, record: Record, scope: Scope) -> None:
    await call(callback, dict(record), scope) if with_scope else await call(callback, dict(record))

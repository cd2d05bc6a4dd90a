"""An app with hooks, served by hypercorn in tests/test_hooks.py (`hypercorn hook_apps:app`).

before_upload refuses any request without an `X-User` header (403) and any declared
body over 1 MiB for the user "small" (413 with its own code); on_upload writes the user
the hook put in the scope beside each stored file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import upload_asgi
from upload_asgi import UploadRefused


def before_upload(scope: dict[str, Any], headers: dict[str, str]) -> None:
    user = headers.get("x-user")
    if not user:
        raise UploadRefused(403, "who are you?", code="no_user")
    if user == "small" and int(headers.get("content-length", "0")) > 1024 * 1024:
        raise UploadRefused(413, "over your quota", code="quota", headers=[("Retry-After", "3600")])
    scope.setdefault("state", {})["user"] = user


async def on_upload(record: dict[str, Any], scope: dict[str, Any]) -> None:
    config = app.config
    (Path(config.upload_dir) / f"{record['id']}.user").write_text(scope["state"]["user"])


app = upload_asgi.create_app(on_upload=on_upload, before_upload=before_upload)

"""The upload page: `page.html` (shipped as package data) with the mount point filled in."""

from __future__ import annotations

import html
import re
from functools import lru_cache
from importlib import resources

from upload_service.asgi import json_bytes, url_root

# The page is self-contained: it may only talk to this server and post its form here.
# Inline script and style are its own (it puts client data in the DOM with textContent
# only); the policy keeps anything else from loading or sending data elsewhere.
PAGE_CSP = (
    b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
    b"img-src data:; connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)


@lru_cache(maxsize=1)
def page_template() -> str:
    return resources.files("upload_service").joinpath("page.html").read_text(encoding="utf-8")


def render_page(root_path: str, token_required: bool, read_token_required: bool = False) -> bytes:
    """Return the upload page, with its URLs under `root_path`."""
    root = url_root(root_path)
    values = {"root": root, "tokenRequired": token_required, "readTokenRequired": read_token_required}
    settings = json_bytes(values).decode()
    # Keep "</script>" or "<!--" in a value from ending the inline script; \u003c is
    # the same character to JSON. U+2028/9 are escaped for engines older than ES2019.
    settings = settings.replace("<", "\\u003c").replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
    slots = {"__SETTINGS__": settings, "__ROOT__": html.escape(root, quote=True)}
    # One pass, so a root_path containing "__ROOT__" is not substituted twice.
    return re.sub("__SETTINGS__|__ROOT__", lambda m: slots[m.group()], page_template()).encode()

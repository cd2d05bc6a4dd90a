"""CORS (issue 11): preflights, headers on answers, none when unconfigured; a real page in Chromium."""

from __future__ import annotations

import hashlib
import http.server
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any, Iterator

import pytest

import upload_asgi
from support import (
    Server,
    assert_nothing_stored,
    assert_stored,
    call_app,
    file_part,
    form_body,
    form_content_type,
    free_port,
    http_scope,
    stored_ids,
)
from upload_service.cors import ALLOW_HEADERS, EXPOSE_HEADERS
from upload_service.errors import ConfigError
from upload_service.settings import Config

PAGE_ORIGIN = "https://app.example"
CORS_HEADER_PREFIX = "access-control-"


def preflight(path: str, origin: str = PAGE_ORIGIN, method: str = "POST", headers: str = "authorization") -> dict:
    return http_scope(path, "OPTIONS", headers=[
        ("Origin", origin), ("Access-Control-Request-Method", method), ("Access-Control-Request-Headers", headers),
    ])


def cors_headers(reply: Any) -> dict[str, str]:
    return {k: v for k, v in reply.headers.items() if k.startswith(CORS_HEADER_PREFIX) or k == "vary"}


@pytest.fixture
def cors_app(config):
    return upload_asgi.create_app(replace(config, cors_origins=(PAGE_ORIGIN, "http://localhost:3000")))


@pytest.mark.parametrize("path", ["/upload", "/upload-multiple", "/files", "/files/" + "a" * 32, "/health"])
async def test_a_preflight_is_answered_with_the_methods_and_headers(cors_app, upload_dir, path):
    reply = await call_app(cors_app, preflight(path, headers="authorization, tus-resumable, upload-offset"))
    assert reply.status == 204 and reply.body == b""
    assert "content-length" not in reply.headers  # RFC 9110 §8.6: none in a 204
    assert cors_headers(reply) == {
        "access-control-allow-origin": PAGE_ORIGIN,
        "vary": "Origin",
        "access-control-allow-methods": "GET, HEAD, POST, PATCH, DELETE, OPTIONS",
        "access-control-allow-headers": ALLOW_HEADERS.decode(),
        "access-control-max-age": "600",
    }
    allowed = {h.strip().lower() for h in ALLOW_HEADERS.decode().split(",")}
    assert {"authorization", "content-type", "tus-resumable", "upload-length", "upload-offset", "upload-metadata",
            "upload-checksum", "upload-defer-length", "upload-complete", "upload-draft-interop-version",
            "repr-digest", "range", "if-none-match", "if-match", "if-unmodified-since",
            "x-request-id", "content-disposition"} <= allowed
    assert not upload_dir.exists()


@pytest.mark.parametrize(
    "requested, extra",
    [
        ("X-User, authorization", ", x-user"),  # a header of the host's own, for its hooks
        ("x-b, X-A, x-b, upload-offset", ", x-b, x-a"),
        ("x-a", ", x-a"),
        ("x a, x-b", ""),  # not a list of header names: the routes' own only
        ("x-a,,x-b", ""),
        ("", ""),
    ],
)
async def test_a_preflight_also_allows_the_other_headers_the_page_asks_for(cors_app, requested, extra):
    reply = await call_app(cors_app, preflight("/upload", headers=requested))
    assert reply.status == 204
    assert reply.headers["access-control-allow-headers"] == ALLOW_HEADERS.decode() + extra


async def test_a_preflight_from_another_origin_is_refused(cors_app, upload_dir):
    reply = await call_app(cors_app, preflight("/upload", origin="https://evil.example"))
    assert reply.status == 403
    reply.check_length()
    assert reply.json()["error"] == "cors_origin_not_allowed"
    assert cors_headers(reply) == {"vary": "Origin"}  # as every answer to a list of origins says


async def test_an_answer_to_an_allowed_origin_carries_cors_headers(cors_app, upload_dir):
    scope = http_scope("/upload", headers=[("Origin", "http://localhost:3000")], content_type=form_content_type())
    reply = await call_app(cors_app, scope, [form_body([file_part(b"hello", "a.txt")])])
    assert reply.status == 201
    assert cors_headers(reply) == {
        "access-control-allow-origin": "http://localhost:3000",
        "vary": "Origin",
        "access-control-expose-headers": EXPOSE_HEADERS.decode(),
    }
    exposed = {h.strip().lower() for h in EXPOSE_HEADERS.decode().split(",")}
    assert {"location", "etag", "upload-offset", "upload-length", "tus-resumable", "tus-version", "upload-expires",
            "repr-digest", "content-disposition", "content-range", "link", "www-authenticate"} <= exposed
    assert_stored(upload_dir, reply.json(), b"hello")
    # An error answer too: a page must be able to read why.
    refused = await call_app(cors_app, http_scope("/upload", headers=[("Origin", PAGE_ORIGIN)], content_type="text/plain"))
    assert refused.status == 415 and cors_headers(refused)["access-control-allow-origin"] == PAGE_ORIGIN


@pytest.mark.parametrize("origin", [[("Origin", "https://evil.example")], []], ids=["another-origin", "no-origin"])
async def test_an_answer_to_another_origin_or_none_has_no_cors_headers_but_varies(cors_app, origin):
    """A shared cache keyed without Origin would give this answer (no CORS headers) to a listed page."""
    reply = await call_app(cors_app, http_scope("/health", "GET", headers=origin))
    assert reply.status == 200 and cors_headers(reply) == {"vary": "Origin"}


async def test_any_origin(config, upload_dir):
    app = upload_asgi.create_app(replace(config, cors_origins="*"))
    reply = await call_app(app, preflight("/upload", origin="https://anyone.example"))
    assert reply.status == 204 and cors_headers(reply)["access-control-allow-origin"] == "*"
    assert "vary" not in reply.headers
    reply = await call_app(app, http_scope("/health", "GET", headers=[("Origin", "null")]))
    assert cors_headers(reply)["access-control-allow-origin"] == "*"


async def test_without_origins_there_are_no_cors_headers_at_all(app, upload_dir):
    reply = await call_app(app, preflight("/upload"))
    assert reply.status == 405  # an OPTIONS like any other: not a route's method
    assert cors_headers(reply) == {}
    scope = http_scope("/upload", headers=[("Origin", PAGE_ORIGIN)], content_type=form_content_type())
    reply = await call_app(app, scope, [form_body([file_part(b"x")])])
    assert reply.status == 201 and cors_headers(reply) == {}


async def test_a_plain_options_is_not_a_preflight(cors_app):
    # tus's capability request: OPTIONS without Access-Control-Request-Method goes to the routes.
    reply = await call_app(cors_app, http_scope("/upload", "OPTIONS", headers=[("Origin", PAGE_ORIGIN)]))
    assert reply.status == 405 and reply.headers["access-control-allow-origin"] == PAGE_ORIGIN


@pytest.mark.parametrize(
    "text, expected",
    [
        ("", ()),
        ("*", ("*",)),
        ("HTTPS://App.Example:443/, http://localhost:3000", ("https://app.example", "http://localhost:3000")),
        ("http://[::1]:8080", ("http://[::1]:8080",)),
        ("https://a.example,https://a.example", ("https://a.example",)),
    ],
)
def test_origins_setting(text, expected):
    assert Config.from_env({"UPLOAD_CORS_ORIGINS": text}).cors_origins == expected


@pytest.mark.parametrize("text", ["*, https://a.example", "ftp://a.example", "https://a.example/path", "a.example",
                                  "https://user@a.example", "https://a.example:99999"])
def test_bad_origins_name_the_variable(text):
    with pytest.raises(ConfigError, match="UPLOAD_CORS_ORIGINS: "):
        Config.from_env({"UPLOAD_CORS_ORIGINS": text})


# -- a real page on another origin, in headless Chromium ---------------------------------------

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

# The page a host serves on its own origin; it talks to the upload service on another.
PAGE = """<!doctype html><meta charset="utf-8"><title>host page</title><script>
function body(bytes) {
  const form = new FormData();
  form.append("file", new Blob([new Uint8Array(bytes)], {type: "application/octet-stream"}), "from-page.bin");
  return form;
}
async function upload(base, token, bytes, extraHeaders = {}) {
  try {
    const headers = token ? {Authorization: "Bearer " + token, ...extraHeaders} : extraHeaders;
    const r = await fetch(base + "/upload", {method: "POST", headers, body: body(bytes)});
    return {status: r.status, json: await r.json(), wwwAuthenticate: r.headers.get("WWW-Authenticate"),
            contentType: r.headers.get("Content-Type"), location: r.headers.get("Location")};
  } catch (e) { return {error: String(e)}; }
}
function xhrUpload(base, token, bytes) {
  return new Promise((resolve) => {
    const xhr = new XMLHttpRequest();
    const progress = [];
    xhr.upload.onprogress = (e) => progress.push(e.loaded);  // a listener: the browser preflights
    xhr.onload = () => resolve({status: xhr.status, json: JSON.parse(xhr.responseText), progress});
    xhr.onerror = () => resolve({error: "network error"});
    xhr.open("POST", base + "/upload");
    xhr.setRequestHeader("Authorization", "Bearer " + token);
    xhr.send(body(bytes));
  });
}
</script>"""


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    if not CHROMIUM.exists():
        pytest.skip("no /usr/bin/chromium: `apt-get install chromium` to run the browser tests")
    sync_api = pytest.importorskip("playwright.sync_api", reason="no Playwright: `pip install playwright`")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class PageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        data = PAGE.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/html; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def page_origin() -> Iterator[str]:
    """The host's page on its own origin: http://localhost:<port> (the upload service is 127.0.0.1)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), PageHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://localhost:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def open_page(chromium: Any, origin: str) -> Any:
    context = chromium.new_context()
    page = context.new_page()
    page.goto(origin + "/")
    return page


@pytest.mark.browser
def test_a_page_on_another_origin_uploads_and_reads_the_answer(chromium, page_origin, upload_dir):
    env = {"UPLOAD_FSYNC": "0", "UPLOAD_TOKEN": "s3cret", "UPLOAD_CORS_ORIGINS": page_origin}
    data = list(range(256)) * 400
    with Server(upload_dir, env=env) as server:
        page = open_page(chromium, page_origin)
        try:
            # Authorization makes it a preflighted request: OPTIONS first, then the POST.
            # With a header of the host's own (for its hooks), which the preflight must allow.
            done = page.evaluate(
                "([base, bytes]) => upload(base, 's3cret', bytes, {'X-Host-User': 'ann'})", [server.url, data]
            )
            xhr = page.evaluate("([base, bytes]) => xhrUpload(base, 's3cret', bytes)", [server.url, data])
            # Without the token: the 401 and its exposed WWW-Authenticate are readable from the page.
            refused = page.evaluate("([base, bytes]) => upload(base, '', bytes)", [server.url, [1, 2, 3]])
        finally:
            page.context.close()
    assert done.get("status") == 201, done
    record = done["json"]
    assert record["sha256"] == hashlib.sha256(bytes(data)).hexdigest() and record["filename"] == "from-page.bin"
    assert done["contentType"] == "application/json"  # the answer was shared with the page
    assert done["location"] == f"/files/{record['id']}"  # an exposed header
    assert_stored(upload_dir, record, bytes(data))
    assert xhr.get("status") == 201, xhr
    assert xhr["json"]["sha256"] == record["sha256"] and xhr["progress"][-1] > len(data)
    assert refused["status"] == 401 and refused["json"]["error"] == "unauthorized"
    assert refused["wwwAuthenticate"] == 'Bearer realm="upload"'
    assert len(stored_ids(upload_dir)) == 2


@pytest.mark.browser
def test_a_page_on_an_origin_not_listed_is_stopped_by_the_browser(chromium, page_origin, upload_dir):
    env = {"UPLOAD_FSYNC": "0", "UPLOAD_TOKEN": "s3cret", "UPLOAD_CORS_ORIGINS": "https://app.example"}
    with Server(upload_dir, env=env) as server:
        page = open_page(chromium, page_origin)
        try:
            done = page.evaluate("([base]) => upload(base, 's3cret', [1, 2, 3])", [server.url])
        finally:
            page.context.close()
    assert "Failed to fetch" in done.get("error", ""), done  # the preflight was refused: no POST sent
    assert_nothing_stored(upload_dir)


@pytest.mark.browser
def test_without_cors_a_page_on_another_origin_cannot_read_anything(chromium, page_origin, upload_dir):
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0", "UPLOAD_TOKEN": "s3cret"}) as server:
        page = open_page(chromium, page_origin)
        try:
            done = page.evaluate("([base]) => upload(base, 's3cret', [1, 2, 3])", [server.url])
        finally:
            page.context.close()
    assert "Failed to fetch" in done.get("error", ""), done
    assert_nothing_stored(upload_dir)

"""The upload page as HTML, without a browser: how it is served, what is substituted, what
it must never contain. tests/test_browser.py shows it working in Chromium."""

from __future__ import annotations

import json
import re
from urllib.parse import unquote
from dataclasses import replace
from html.parser import HTMLParser

import pytest

import upload_asgi
from upload_service import page as page_module
from support import call_app, http_scope

SETTINGS_RE = re.compile(r"var SETTINGS = (\{.*?\});\n")


def settings_of(page: str) -> dict:
    match = SETTINGS_RE.search(page)
    assert match, "no SETTINGS line"
    return json.loads(match.group(1))


class Elements(HTMLParser):
    """Every start tag with its attributes, and the text of inline scripts."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        self._in_script = tag == "script"

    def handle_endtag(self, tag):
        self._in_script = False

    def handle_data(self, data):
        if self._in_script:
            self.scripts.append(data)


def parse(page: str) -> Elements:
    elements = Elements()
    elements.feed(page)
    return elements


async def get_page(app, path: str = "/", root_path: str = "", method: str = "GET"):
    reply = await call_app(app, http_scope(path, method, root_path=root_path))
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/html; charset=utf-8"
    return reply


async def test_served_with_exact_length_and_head(app):
    reply = await get_page(app)
    reply.check_length()
    assert reply.body.startswith(b"<!doctype html>")
    head = await get_page(app, method="HEAD")
    assert head.body == b""
    assert head.headers["content-length"] == str(len(reply.body))


@pytest.mark.parametrize(
    "path, root_path, root",
    [
        pytest.param("/", "", "", id="top-level"),
        pytest.param("/files/", "/files", "/files", id="mounted"),
        pytest.param("/files", "/files", "/files", id="mounted-no-slash"),
        pytest.param("/a/b/", "/a/b/", "/a/b", id="root-path-with-trailing-slash"),
    ],
)
async def test_root_path_substituted(app, path, root_path, root):
    reply = await get_page(app, path, root_path)
    reply.check_length()
    page = reply.body.decode()
    assert "__ROOT__" not in page and "__SETTINGS__" not in page
    assert settings_of(page) == {"root": root, "tokenRequired": False, "readTokenRequired": False}
    forms = [attrs for tag, attrs in parse(page).tags if tag == "form"]
    assert [form["action"] for form in forms] == [f"{root}/upload"]  # the no-JavaScript fallback


async def test_token_required_follows_the_config(config):
    app = upload_asgi.create_app(replace(config, token="s3cret"))
    page = (await get_page(app)).body.decode()
    assert settings_of(page)["tokenRequired"] is True
    assert "s3cret" not in page  # the token itself never reaches the page


async def test_read_token_required_follows_the_config(config):
    app = upload_asgi.create_app(replace(config, read_token="r34d"))
    page = (await get_page(app)).body.decode()
    assert settings_of(page) == {"root": "", "tokenRequired": False, "readTokenRequired": True}
    assert "r34d" not in page


@pytest.mark.parametrize(
    "root_path",
    [
        pytest.param("/x</script><script>alert(1)</script>", id="script-close"),
        pytest.param('/x"><img src=y onerror=alert(1)>', id="attribute-break"),
        pytest.param("/x<!--", id="comment-open"),
        pytest.param("/__ROOT__/__SETTINGS__", id="placeholders"),
        pytest.param("/\u2028\u2029/é", id="line-separators"),
    ],
)
def test_hostile_root_path_stays_data(root_path):
    page = page_module.render_page(root_path, False).decode()
    template = page_module.page_template()
    assert page.count("</script>") == template.count("</script>")
    assert page.count("<!--") == template.count("<!--")
    assert page.count("<img") == template.count("<img")
    root = settings_of(page)["root"]  # a URL path: what a browser sends, and the server decodes back
    assert unquote(root) == root_path.rstrip("/") and root.isascii() and not any(c in root for c in '"<> #')
    forms = [attrs for tag, attrs in parse(page).tags if tag == "form"]
    assert forms[0]["action"] == root + "/upload"
    assert "\u2028" not in page.split("var SETTINGS", 1)[1].split("\n", 1)[0]


@pytest.mark.parametrize(
    "root_path, action",
    [("/x%41", "/x%2541/upload"), ("/c#", "/c%23/upload"), ("//double", "/double/upload"), ("/", "/upload")],
)
def test_the_form_posts_under_the_mount_point_as_a_url(root_path, action):
    """A `%` or `#` in a mount point is encoded (as in Location); `//x` would be another host's URL."""
    forms = [attrs for tag, attrs in parse(page_module.render_page(root_path, False).decode()).tags if tag == "form"]
    assert forms[0]["action"] == action


def test_self_contained_no_external_urls():
    page = page_module.render_page("", False).decode()
    assert not re.search(r"(?i)\b(?:https?|ftp|wss?):", page)
    for tag, attrs in parse(page).tags:
        for name in ("src", "href", "action"):
            value = attrs.get(name)
            if value is not None:
                assert not value.startswith("//"), (tag, attrs)
                assert value.startswith(("/", "data:")), (tag, attrs)
        assert not (tag == "script" and "src" in attrs)
        assert not (tag == "link" and attrs.get("rel") == "stylesheet")
    (style,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    assert "@import" not in style and "url(" not in style


def test_script_never_parses_data_as_html():
    scripts = "".join(parse(page_module.render_page("", False).decode()).scripts)
    assert "XMLHttpRequest" in scripts  # the script is there
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
        assert sink not in scripts, sink


def test_every_control_is_labelled():
    elements = parse(page_module.render_page("", True).decode())
    labelled = {attrs.get("for") for tag, attrs in elements.tags if tag == "label"}
    controls = [attrs for tag, attrs in elements.tags if tag in ("input", "select", "textarea")]
    assert len(controls) == 3  # token, description, file picker
    for attrs in controls:
        assert attrs.get("id") in labelled or attrs.get("aria-label"), attrs
    assert any(attrs.get("role") == "status" and attrs.get("aria-live") == "polite" for _, attrs in elements.tags)
    assert ("html", {"lang": "en"}) in elements.tags


async def test_page_is_served_with_a_strict_content_security_policy(app):
    reply = await call_app(app, http_scope("/", "GET"))
    policy = reply.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "form-action 'self'" in policy and "frame-ancestors 'none'" in policy
    assert reply.headers["x-content-type-options"] == "nosniff"

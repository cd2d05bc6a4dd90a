"""Logs (issue 11): a line per upload on stderr under a plain hypercorn; a host's config wins."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from typing import Iterator

import httpx
import pytest

import upload_asgi
from support import ROOT, Server, call_app, file_part, form_body, form_content_type, free_port, http_scope
from upload_service import logs
from upload_service.errors import ConfigError
from upload_service.settings import Config

LINE = re.compile(r"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d [+-]\d{4}\] \[\d+\] \[(\w+)\] upload_asgi: (.*)$")


def post(client, body: bytes, content_type: str | None = None):
    return client.post("/upload", content=body, headers={"content-type": content_type or form_content_type()})


def app_lines(text: str) -> list[tuple[str, str]]:
    return [m.groups() for m in map(LINE.match, text.splitlines()) if m]


def wait_for_lines(server: Server, count: int, timeout: float = 10.0) -> None:
    """A line is written once its answer is out (and its body drained): wait for it."""
    deadline = time.monotonic() + timeout
    while len([t for level, t in app_lines(server.log()) if level == "INFO"]) < count:
        assert time.monotonic() < deadline, server.log()
        time.sleep(0.05)


def test_plain_hypercorn_writes_a_line_per_stored_refused_and_failed_upload(upload_dir):
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}) as server, server.client() as client:
        stored = post(client, form_body([file_part(b"hello", "a.txt")]))
        assert stored.status_code == 201
        refused = post(client, b"x", "text/plain")
        assert refused.status_code == 415
        # A file where the store's partial dir must be: the store cannot write (500).
        (upload_dir / ".partial").rmdir()
        (upload_dir / ".partial").write_bytes(b"")
        failed = post(client, form_body([file_part(b"hello", "b.txt")]))
        assert failed.status_code == 500
        wait_for_lines(server, 3)
    lines = app_lines(server.log())
    record = stored.json()
    assert ("INFO", f"upload stored: id={record['id']} size=5 sha256={record['sha256']}") in [
        (level, text.split(" in ")[0]) for level, text in lines
    ]
    assert ("INFO", "upload refused: 415 unsupported_media_type after 0 bytes: "
                    "Content-Type must be multipart/form-data, not 'text/plain'") in lines
    assert any(level == "INFO" and text.startswith("upload failed: 500 internal_error") for level, text in lines)
    assert any(level == "ERROR" and text.startswith("upload failed:") for level, text in lines)
    # Each line is written once: no unformatted copy from Python's last-resort handler.
    assert "\nupload failed" not in server.log() and not server.log().startswith("upload failed")


def test_log_level_warning_keeps_the_info_lines_out(upload_dir):
    env = {"UPLOAD_FSYNC": "0", "UPLOAD_LOG_LEVEL": "warning"}
    with Server(upload_dir, env=env) as server, server.client() as client:
        assert post(client, form_body([file_part(b"hello", "a.txt")])).status_code == 201
        assert post(client, b"x", "text/plain").status_code == 415
    assert app_lines(server.log()) == []


def test_a_bad_log_level_stops_startup_naming_the_variable(upload_dir):
    server = Server(upload_dir, env={"UPLOAD_LOG_LEVEL": "loud"})
    with pytest.raises(RuntimeError, match="UPLOAD_LOG_LEVEL: 'loud' is not one of debug, info"):
        server.start()
    with pytest.raises(ConfigError, match="UPLOAD_LOG_LEVEL"):
        Config(log_level="verbose")


def test_a_host_log_config_gets_json_lines_and_no_fallback_copy(upload_dir, tmp_path):
    # The README's recipe: hypercorn --log-config json:logging.json with JsonFormatter.
    config = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "upload_service.logs.JsonFormatter"}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "json", "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": "INFO"},
        "loggers": {"hypercorn.error": {"handlers": ["stderr"], "propagate": False}},
    }
    path = tmp_path / "logging.json"
    path.write_text(json.dumps(config))
    args = ["--log-config", f"json:{path}"]
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}, args=args) as server, server.client() as client:
        record = post(client, form_body([file_part(b"hello", "a.txt")])).json()
        assert post(client, b"x", "text/plain").status_code == 415
    entries = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    ours = [e for e in entries if e["logger"] == "upload_asgi"]
    assert [(e["level"], e["outcome"], e.get("status"), e.get("id")) for e in ours] == [
        ("info", "stored", 201, record["id"]),
        ("info", "rejected", 415, None),
    ]
    assert ours[0]["sha256"] == record["sha256"] and ours[0]["size"] == 5
    assert app_lines(server.log()) == []  # the fallback stood down
    # hypercorn's own lines too, once each and as JSON (its plain handler replaced, not doubled)
    assert [e["message"] for e in entries if e["logger"] == "hypercorn.error"][:1] == [
        f"Running on http://127.0.0.1:{server.port} (CTRL + C to quit)"]
    assert "Running on" not in "".join(line for line in server.log().splitlines() if not line.startswith("{"))


# -- the rule, in process ------------------------------------------------------------


@pytest.fixture
def clean_logger():
    """The upload_asgi logger as a fresh process has it, restored afterwards."""
    logger = logging.getLogger("upload_asgi")
    saved = logger.handlers[:], logger.level, logs._level_is_ours
    logger.handlers[:] = []
    logger.setLevel(logging.NOTSET)
    logs._level_is_ours = False
    yield logger
    logger.handlers[:], level, logs._level_is_ours = saved
    logger.setLevel(level)


@contextlib.contextmanager
def no_root_handlers() -> Iterator[None]:
    """Root as an unconfigured process has it (pytest adds its capture handlers there)."""
    saved = logging.root.handlers[:]
    logging.root.handlers[:] = []
    try:
        yield
    finally:
        logging.root.handlers[:] = saved


def capture_stderr(monkeypatch) -> io.StringIO:
    stream = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stream)
    return stream


def test_fallback_writes_when_nothing_is_configured(clean_logger, monkeypatch, upload_dir):
    stderr = capture_stderr(monkeypatch)
    upload_asgi.create_app(Config(upload_dir=upload_dir))
    upload_asgi.create_app(Config(upload_dir=upload_dir))  # a second app adds no second handler
    with no_root_handlers():
        clean_logger.info("one line")
        clean_logger.debug("below the level")
    assert [text for _, text in app_lines(stderr.getvalue())] == ["one line"]


def test_fallback_stands_down_for_a_root_handler_added_later(clean_logger, monkeypatch, upload_dir):
    stderr = capture_stderr(monkeypatch)
    upload_asgi.create_app(Config(upload_dir=upload_dir))
    host = io.StringIO()
    with no_root_handlers():
        logging.root.addHandler(logging.StreamHandler(host))
        clean_logger.info("to the host")
    assert stderr.getvalue() == "" and host.getvalue() == "to the host\n"


def test_a_level_the_host_set_is_kept(clean_logger, monkeypatch, upload_dir):
    capture_stderr(monkeypatch)
    clean_logger.setLevel(logging.ERROR)
    upload_asgi.create_app(Config(upload_dir=upload_dir, log_level="debug"))
    assert clean_logger.level == logging.ERROR


def test_log_level_setting_applies(clean_logger, monkeypatch, upload_dir):
    capture_stderr(monkeypatch)
    upload_asgi.create_app(Config(upload_dir=upload_dir, log_level="warning"))
    assert clean_logger.level == logging.WARNING
    upload_asgi.create_app(Config(upload_dir=upload_dir, log_level="debug"))
    assert clean_logger.level == logging.DEBUG


def test_json_formatter_carries_the_facts():
    record = logging.LogRecord("upload_asgi", logging.INFO, __file__, 1, "upload %s", ("x",), None)
    record.upload = {"outcome": "stored", "size": 3}
    entry = json.loads(logs.JsonFormatter().format(record))
    assert entry["message"] == "upload x" and entry["outcome"] == "stored" and entry["size"] == 3
    assert entry["level"] == "info" and entry["time"].endswith("Z")


def test_the_lines_go_to_stderr_not_stdout(upload_dir, tmp_path):
    port = free_port()
    env = {**os.environ, "UPLOAD_DIR": str(upload_dir), "UPLOAD_FSYNC": "0", "PYTHONPATH": str(ROOT)}
    out, err = open(tmp_path / "stdout", "wb"), open(tmp_path / "stderr", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", "upload_asgi:app"],
        env=env, cwd=ROOT, stdout=out, stderr=err, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 20
        while "Running on" not in (tmp_path / "stderr").read_text():
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as client:
            assert client.post("/upload", files={"file": ("a.txt", b"abc")}).status_code == 201
        while "upload stored" not in (tmp_path / "stderr").read_text():
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
        out.close()
        err.close()
    assert [level for level, _ in app_lines((tmp_path / "stderr").read_text())] == ["INFO"]
    assert (tmp_path / "stdout").read_text() == ""


async def test_a_client_cannot_write_control_characters_into_the_log(caplog, upload_dir):
    """A path, a header: text a client chose reaches the lines; its line feeds, escapes and bells are
    written as escapes (a forged line, a coloured terminal), and what is printable stays."""
    app = upload_asgi.create_app(Config(upload_dir=upload_dir))
    headers = [("tus-resumable", "1.0.0"), ("content-type", "application/offset+octet-stream"), ("upload-offset", "0")]
    with caplog.at_level(logging.INFO, logger="upload_asgi"):
        reply = await call_app(app, http_scope("/files/x\n[INFO] forged \x1b[31mé\x07", "PATCH", headers))
    assert reply.status == 404
    (line,) = [r.getMessage() for r in caplog.records if "no upload" in r.getMessage()]
    assert line.endswith("no upload x\\x0a[INFO] forged \\x1b[31mé\\x07")


async def test_a_traceback_quoting_a_client_is_escaped_too(caplog, upload_dir):
    """An embedding app's hook that raises with a header's value in its message: the traceback's escape
    codes are written as escapes, its lines stay lines. And bidirectional overrides (U+202E shows what
    follows reversed) are escaped wherever they come from."""
    def refuse(scope, headers):
        raise LookupError(f"unknown user {headers.get('x-user')}")

    app = upload_asgi.create_app(Config(upload_dir=upload_dir), before_upload=refuse)
    user = "\x1b[2J\x1b[31mmallory\x1b[0m"
    with caplog.at_level(logging.INFO, logger="upload_asgi"):
        headers = [("x-user", user), ("content-type", form_content_type())]
        reply = await call_app(app, http_scope("/upload", "POST", headers), [form_body([file_part(b"x", "a.txt")])])
    assert reply.status == 500
    assert "LookupError: unknown user \\x1b[2J\\x1b[31mmallory\\x1b[0m\n" in caplog.text + "\n"
    assert "\x1b" not in caplog.text and "Traceback (most recent call last):\n" in caplog.text
    assert logs.escape_controls("report\u202efdp.exe") == "report\\u202efdp.exe"

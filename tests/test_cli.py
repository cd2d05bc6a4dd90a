"""The `upload-asgi` command and `python -m upload_asgi` (issue 11): help, checks, a real server."""

from __future__ import annotations

import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from support import ROOT, assert_stored, free_port
from upload_service import cli
from upload_service.settings import Config, describe, variables

SCRIPT = Path(sys.executable).parent / "upload-asgi"
COMMANDS = [
    pytest.param([str(SCRIPT)], id="console-script"),
    pytest.param([sys.executable, "-m", "upload_asgi"], id="python-m"),
]


def run(command: list[str], *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([*command, *args], env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_lists_the_options_and_every_setting_with_its_variable(command):
    if not SCRIPT.exists() and command[0] == str(SCRIPT):
        pytest.skip("the console script is not installed: pip install -e .")
    done = run(command, "--help")
    assert done.returncode == 0, done.stderr
    for option in ("--bind", "--workers", "--root-path", "--dir", "--graceful-timeout"):
        assert option in done.stdout
    for variable in variables().values():
        assert f"\n  {variable} " in done.stdout, variable
    assert "passed to hypercorn" in done.stdout


def test_help_shows_each_default_as_its_variable_takes_it(monkeypatch):
    """What --help shows as a default, set as that variable, gives the default back."""
    shown = {variable: default for variable, default, _ in describe()}
    assert (shown["UPLOAD_MAX_FILE_SIZE"], shown["UPLOAD_FSYNC"], shown["UPLOAD_IDLE_TIMEOUT"]) == ("10G", "1", "60")
    for name, variable in variables().items():
        monkeypatch.delenv(variable, raising=False)
        if shown[variable] != "unset":
            monkeypatch.setenv(variable, shown[variable])
    assert Config.from_env() == Config()


def test_a_bad_setting_stops_the_command_naming_the_variable(tmp_path):
    started = time.monotonic()
    done = run([sys.executable, "-m", "upload_asgi"], "--dir", str(tmp_path / "u"),
               env={"UPLOAD_MAX_FILE_SIZE": "lots"})
    assert done.returncode == 2
    assert "upload-asgi: UPLOAD_MAX_FILE_SIZE: 'lots' is not a size" in done.stderr
    assert time.monotonic() - started < 20
    assert not (tmp_path / "u").exists()


def test_an_upload_dir_that_cannot_be_used_stops_the_command(tmp_path):
    """The most common failure at startup: hypercorn would exit 0 after its worker failed."""
    (tmp_path / "a-file").write_text("not a dir")
    wanted = tmp_path / "a-file" / "uploads"
    done = run([sys.executable, "-m", "upload_asgi"], "--dir", str(wanted))
    assert done.returncode == 2
    assert f"upload-asgi: UPLOAD_DIR: cannot use {wanted}: Not a directory" in done.stderr


@pytest.mark.parametrize("value", ["2.5", "-5", "inf"])
def test_a_graceful_timeout_hypercorn_would_refuse_stops_the_command(value, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--graceful-timeout", value])
    assert stopped.value.code == 2
    assert "--graceful-timeout" in capsys.readouterr().err


def test_a_large_graceful_timeout_reaches_hypercorn_as_written():
    args, rest = cli.build_parser().parse_known_args(["--graceful-timeout", "1000000"])
    assert cli.hypercorn_argv(args, rest)[-3:-1] == ["--graceful-timeout", "1000000"]


def test_hypercorn_gets_the_defaults_and_the_options_it_does_not_know():
    args, rest = cli.build_parser().parse_known_args(["--dir", "x", "--certfile", "c.pem", "--access-logfile", "-"])
    argv = cli.hypercorn_argv(args, rest)
    assert argv[:3] == [sys.executable, "-m", "hypercorn"]
    assert argv[3:] == [
        "--bind", "127.0.0.1:8000", "--workers", "1", "--graceful-timeout", "60",
        "--certfile", "c.pem", "--access-logfile", "-", "upload_asgi:app",
    ]
    args, rest = cli.build_parser().parse_known_args(["-b", "0.0.0.0:1", "-b", "[::]:1", "-w", "4", "--root-path", "/f"])
    assert cli.hypercorn_argv(args, rest)[3:] == [
        "--bind", "0.0.0.0:1", "--bind", "[::]:1", "--workers", "4", "--graceful-timeout", "60",
        "--root-path", "/f", "upload_asgi:app",
    ]


@pytest.mark.slow
@pytest.mark.parametrize("command", COMMANDS)
def test_the_command_serves_an_upload(tmp_path, command):
    if not SCRIPT.exists() and command[0] == str(SCRIPT):
        pytest.skip("the console script is not installed: pip install -e .")
    port = free_port()
    upload_dir = tmp_path / "stored here"
    log = open(tmp_path / "server.log", "wb")
    env = {**os.environ, "UPLOAD_FSYNC": "0", "PYTHONPATH": str(ROOT)}
    env.pop("UPLOAD_DIR", None)
    proc = subprocess.Popen(
        [*command, "--bind", f"127.0.0.1:{port}", "--dir", str(upload_dir), "--workers", "2",
         "--root-path", "/files"],
        env=env, cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
                break
            except OSError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
        data = os.urandom(300_000)
        # Paths as the README's nginx passes them on: whole, the prefix kept.
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            reply = client.post("/files/upload", files={"file": ("a.bin", data)})
            assert reply.status_code == 201, reply.text
            record = reply.json()
            assert "/files/upload" in client.get("/files/").text  # the page, built from --root-path
            assert reply.headers["location"] == f"/files/files/{record['id']}"  # under the mount point
            assert client.get(reply.headers["location"]).content == data
            assert record["sha256"] == hashlib.sha256(data).hexdigest()
            assert 'upload_asgi_stored_files_total 1.0' in client.get("/files/metrics").text
        assert_stored(upload_dir, record, data)
    finally:
        os.kill(proc.pid, signal.SIGTERM)  # the exec'd hypercorn's main process
        proc.wait(timeout=30)
        log.close()
    assert proc.returncode == 0
    assert "upload stored: id=" + record["id"] in (tmp_path / "server.log").read_text()

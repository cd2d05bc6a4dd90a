"""Configuration (SPEC §5): every variable parsed, defaults, and a bad value stops startup naming it."""

from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypercorn.utils import LifespanFailureError

import upload_asgi
from upload_asgi import Config, ConfigError
from upload_service import settings
from upload_service.units import GiB, KiB, MiB
from support import ROOT, free_port

# -- every variable read, with its parsed value -----------------------------------


@pytest.mark.parametrize(
    "variable, text, setting, value",
    [
        pytest.param("UPLOAD_DIR", "/srv/files", "upload_dir", Path("/srv/files"), id="dir"),
        pytest.param("UPLOAD_MAX_FILE_SIZE", "10G", "max_file_size", 10 * GiB, id="file-10G"),
        pytest.param("UPLOAD_MAX_FILE_SIZE", "123", "max_file_size", 123, id="file-bytes"),
        pytest.param("UPLOAD_MAX_REQUEST_SIZE", "500M", "max_request_size", 500 * MiB, id="request-500M"),
        pytest.param("UPLOAD_MAX_REQUEST_SIZE", "2T", "max_request_size", 2 * 1024 * GiB, id="request-2T"),
        pytest.param("UPLOAD_MAX_FILES", "7", "max_files", 7, id="files"),
        pytest.param("UPLOAD_MAX_PARTS", " 9 ", "max_parts", 9, id="parts"),
        pytest.param("UPLOAD_MAX_FIELD_SIZE", "64K", "max_field_size", 64 * KiB, id="field-64K"),
        pytest.param("UPLOAD_TOKEN", "s3cr3t-T0ken_~+/=", "token", "s3cr3t-T0ken_~+/=", id="token"),
        pytest.param("UPLOAD_TOKEN", "", "token", None, id="token-empty-means-none"),
        pytest.param("UPLOAD_FSYNC", "0", "fsync", False, id="fsync-0"),
        pytest.param("UPLOAD_FSYNC", "1", "fsync", True, id="fsync-1"),
        pytest.param("UPLOAD_FSYNC", "off", "fsync", False, id="fsync-off"),
        pytest.param("UPLOAD_IDLE_TIMEOUT", "2.5", "idle_timeout", 2.5, id="idle"),
        pytest.param("UPLOAD_MAX_CONCURRENT", "3", "max_concurrent", 3, id="concurrent"),
        pytest.param("UPLOAD_MIN_RATE", "16K", "min_rate", 16 * KiB, id="rate"),
        pytest.param("UPLOAD_MIN_RATE", "0", "min_rate", 0, id="rate-off"),
        pytest.param("UPLOAD_RESUMABLE_EXPIRY", "30m", "resumable_expiry", 1800.0, id="expiry-30m"),
        pytest.param("UPLOAD_RESUMABLE_EXPIRY", "90", "resumable_expiry", 90.0, id="expiry-seconds"),
        pytest.param("UPLOAD_RESUMABLE_EXPIRY", "3650d", "resumable_expiry", 3650 * 86400.0, id="expiry-ten-years"),
        pytest.param("UPLOAD_READ_TOKEN", "r34d", "read_token", "r34d", id="read-token"),
    ],
)
def test_each_variable_is_read(variable, text, setting, value):
    config = Config.from_env({variable: text})
    assert getattr(config, setting) == value
    # Every other setting keeps its default.
    defaults = Config()
    for name in settings.variables():
        if name != setting:
            assert getattr(config, name) == getattr(defaults, name)


def test_every_setting_has_a_variable_documented_in_the_readme():
    assert set(settings.variables()) == {f.name for f in Config.__dataclass_fields__.values()}
    variables = set(settings.variables().values())
    assert {
        "UPLOAD_DIR", "UPLOAD_MAX_FILE_SIZE", "UPLOAD_MAX_REQUEST_SIZE", "UPLOAD_MAX_FILES",
        "UPLOAD_MAX_PARTS", "UPLOAD_MAX_FIELD_SIZE", "UPLOAD_TOKEN", "UPLOAD_FSYNC",
        "UPLOAD_IDLE_TIMEOUT", "UPLOAD_MAX_CONCURRENT", "UPLOAD_MIN_RATE", "UPLOAD_RESUMABLE_EXPIRY",
    } <= variables
    readme = (ROOT / "README.md").read_text()
    assert [v for v in sorted(variables) if f"`{v}`" not in readme] == []


def test_defaults():
    config = Config.from_env({})
    assert config == Config()
    assert config.upload_dir == Path("uploads")
    assert config.max_file_size == 10 * GiB
    assert config.max_request_size == 10 * GiB + 1 * MiB
    assert config.max_files == 100
    assert config.max_parts == 200
    assert config.max_field_size == 64 * KiB
    assert config.token is None
    assert config.fsync is True
    assert config.idle_timeout == 60.0
    assert config.max_concurrent == 64
    assert config.min_rate == 1024
    assert (config.storage, config.s3_endpoint_url) == ("local", None)
    assert (config.s3_part_size, config.s3_parts_in_flight, config.s3_sweep_after) == (8 * MiB, 2, 86400.0)


def test_from_env_reads_os_environ(monkeypatch, tmp_path):
    monkeypatch.setenv("UPLOAD_DIR", str(tmp_path))
    monkeypatch.setenv("UPLOAD_MAX_FILE_SIZE", "1M")
    config = Config.from_env()
    assert config.upload_dir == tmp_path
    assert config.max_file_size == MiB


@pytest.mark.parametrize(
    "text, size",
    [
        ("0", 0), ("1", 1), ("1048576", MiB), ("1K", KiB), ("64k", 64 * KiB), ("1M", MiB),
        ("500M", 500 * MiB), ("10G", 10 * GiB), ("1T", 1024 * GiB), ("10GB", 10 * GiB),
        ("10GiB", 10 * GiB), (" 5 M ", 5 * MiB),
    ],
)
def test_parse_size_is_binary(text, size):
    assert settings.parse_size(text) == size


@pytest.mark.parametrize(
    "text", ["", "M", "1.5G", "-1", "10X", "10 G B", "ten", "1e9", "0x10", "1_000", "\uff11\uff10M", "\u0661K"]
)
def test_parse_size_refuses(text):
    with pytest.raises(ValueError):
        settings.parse_size(text)


# -- a bad value names its variable ---------------------------------------------------

BAD_VALUES = [
    pytest.param("UPLOAD_DIR", "", id="dir-empty"),
    pytest.param("UPLOAD_DIR", "up\0loads", id="dir-nul"),
    pytest.param("UPLOAD_DIR", "/srv/uploads ", id="dir-trailing-space"),
    pytest.param("UPLOAD_DIR", " /srv/uploads", id="dir-leading-space"),
    pytest.param("UPLOAD_DIR", "~/uploads", id="dir-tilde"),
    pytest.param("UPLOAD_DIR", "s3://uploads", id="dir-url"),
    pytest.param("UPLOAD_MAX_FILE_SIZE", "lots", id="file-word"),
    pytest.param("UPLOAD_MAX_FILE_SIZE", "0", id="file-zero"),
    pytest.param("UPLOAD_MAX_FILE_SIZE", "1.5G", id="file-fraction"),
    pytest.param("UPLOAD_MAX_FILE_SIZE", "99999999999999T", id="file-past-2**63"),
    pytest.param("UPLOAD_MAX_REQUEST_SIZE", "-1", id="request-negative"),
    pytest.param("UPLOAD_MAX_FILES", "many", id="files-word"),
    pytest.param("UPLOAD_MAX_FILES", "0", id="files-zero"),
    pytest.param("UPLOAD_MAX_FILES", "\uff15", id="files-fullwidth-digit"),
    pytest.param("UPLOAD_MAX_FILES", "1_000", id="files-underscore"),
    pytest.param("UPLOAD_MAX_PARTS", "-3", id="parts-negative"),
    pytest.param("UPLOAD_MAX_FIELD_SIZE", "64Q", id="field-unit"),
    pytest.param("UPLOAD_TOKEN", "two words", id="token-space"),
    pytest.param("UPLOAD_TOKEN", "caf\u00e9", id="token-non-ascii"),
    pytest.param("UPLOAD_READ_TOKEN", "two words", id="read-token-space"),
    pytest.param("UPLOAD_FSYNC", "maybe", id="fsync-word"),
    pytest.param("UPLOAD_FSYNC", "2", id="fsync-2"),
    pytest.param("UPLOAD_IDLE_TIMEOUT", "soon", id="idle-word"),
    pytest.param("UPLOAD_IDLE_TIMEOUT", "0", id="idle-zero"),
    pytest.param("UPLOAD_IDLE_TIMEOUT", "nan", id="idle-nan"),
    pytest.param("UPLOAD_IDLE_TIMEOUT", "inf", id="idle-inf"),
    pytest.param("UPLOAD_IDLE_TIMEOUT", "1_0", id="idle-underscore"),
    pytest.param("UPLOAD_IDLE_TIMEOUT", "\u0663", id="idle-arabic-digit"),
    pytest.param("UPLOAD_MAX_CONCURRENT", "0", id="concurrent-zero"),
    pytest.param("UPLOAD_MAX_CONCURRENT", "4.5", id="concurrent-fraction"),
    pytest.param("UPLOAD_MIN_RATE", "-1", id="rate-negative"),
    pytest.param("UPLOAD_MIN_RATE", "fast", id="rate-word"),
    pytest.param("UPLOAD_RESUMABLE_EXPIRY", "0", id="expiry-zero"),
    pytest.param("UPLOAD_RESUMABLE_EXPIRY", "a day", id="expiry-words"),
    pytest.param("UPLOAD_RESUMABLE_EXPIRY", "3651d", id="expiry-past-ten-years"),
    pytest.param("UPLOAD_RESUMABLE_EXPIRY", "\uff11d", id="expiry-fullwidth-digit"),
    pytest.param("UPLOAD_RESUMABLE_EXPIRY", "100000000d", id="expiry-past-year-9999"),
    pytest.param("UPLOAD_CORS_ORIGINS", "example.com/upload", id="cors-not-an-origin"),
    pytest.param("UPLOAD_CORS_ORIGINS", "*, https://a.example", id="cors-star-and-more"),
    pytest.param("UPLOAD_LOG_LEVEL", "loud", id="log-level-word"),
    pytest.param("UPLOAD_STORAGE", "ftp://bucket", id="storage-scheme"),
    pytest.param("UPLOAD_STORAGE", "s3://Bad_Bucket/x", id="storage-bucket"),
    pytest.param("UPLOAD_S3_ENDPOINT_URL", "localhost:8333", id="endpoint-no-scheme"),
    pytest.param("UPLOAD_S3_PART_SIZE", "4M", id="part-under-5M"),
    pytest.param("UPLOAD_S3_PART_SIZE", "6G", id="part-over-5G"),
    pytest.param("UPLOAD_S3_PARTS_IN_FLIGHT", "0", id="in-flight-zero"),
    pytest.param("UPLOAD_S3_SWEEP_AFTER", "soon", id="sweep-word"),
    pytest.param("UPLOAD_S3_SWEEP_AFTER", "0", id="sweep-zero"),
]


@pytest.mark.parametrize("variable, text", BAD_VALUES)
def test_bad_value_names_the_variable(variable, text):
    with pytest.raises(ConfigError) as caught:
        Config.from_env({variable: text})
    assert str(caught.value).startswith(f"{variable}: ")


def test_every_variable_has_a_bad_value_tested():
    tested = {p.values[0] for p in BAD_VALUES}
    assert tested == set(settings.variables().values())


POSITIVE_SETTINGS = sorted(
    f.name for f in dataclasses.fields(Config) if f.metadata["check"] in (settings.check_whole, settings.check_seconds)
)


@pytest.mark.parametrize("setting", POSITIVE_SETTINGS)
def test_config_object_refuses_non_positive(setting, tmp_path):
    with pytest.raises(ConfigError, match=settings.variables()[setting]):
        Config(upload_dir=tmp_path, **{setting: 0})


@pytest.mark.parametrize(
    "setting, value",
    [
        pytest.param("upload_dir", "", id="dir-empty"),
        pytest.param("upload_dir", "  ", id="dir-blank"),
        pytest.param("upload_dir", 42, id="dir-number"),
        pytest.param("token", "two words", id="token-space"),
        pytest.param("token", "jeton-é", id="token-non-ascii"),
        pytest.param("token", 1234, id="token-number"),
        pytest.param("fsync", "0", id="fsync-string"),
        pytest.param("fsync", 0, id="fsync-int"),
        pytest.param("max_files", 1.5, id="files-fraction"),
        pytest.param("max_file_size", "10G", id="size-string"),
        pytest.param("max_concurrent", True, id="concurrent-bool"),
        pytest.param("idle_timeout", float("nan"), id="idle-nan"),
        pytest.param("idle_timeout", float("inf"), id="idle-inf"),
        pytest.param("idle_timeout", "60", id="idle-string"),
        pytest.param("min_rate", -1, id="rate-negative"),
        pytest.param("min_rate", 0.5, id="rate-fraction"),
        pytest.param("min_rate", 2**63, id="rate-past-2**63"),
        pytest.param("max_file_size", 2**63, id="size-past-2**63"),
    ],
)
def test_config_object_refuses_what_the_environment_would(setting, value, tmp_path):
    """Config(...) in code is held to the environment's rules (README: raises at once)."""
    values = {"upload_dir": tmp_path, setting: value}
    with pytest.raises(ConfigError, match=settings.variables()[setting]):
        Config(**values)


def test_config_object_takes_whole_floats(tmp_path):
    config = Config(upload_dir=tmp_path, max_request_size=2e9, min_rate=0.0)
    assert config.max_request_size == 2_000_000_000 and isinstance(config.max_request_size, int)
    assert config.min_rate == 0 and isinstance(config.min_rate, int)


def test_config_object_takes_good_values(tmp_path):
    config = Config(upload_dir=str(tmp_path), token="", idle_timeout=5, max_files=3, fsync=False)
    assert config.upload_dir == tmp_path and isinstance(config.upload_dir, Path)
    assert config.token is None
    assert config.idle_timeout == 5.0 and isinstance(config.idle_timeout, float)
    assert (config.max_files, config.fsync) == (3, False)


# -- a bad environment stops startup -------------------------------------------------


async def run_lifespan(app) -> list[dict]:
    """Send lifespan.startup (and shutdown if it started) and return what the app sent."""
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent: list[dict] = []

    async def receive():
        return incoming.pop(0)

    async def send(message):
        sent.append(message)

    try:
        await app({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    except LifespanFailureError:  # raised after a startup.failed that send did not act on
        assert sent[-1]["type"] == "lifespan.startup.failed"
    return sent


async def test_bad_env_fails_lifespan_startup(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("UPLOAD_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("UPLOAD_MAX_REQUEST_SIZE", "big")
    app = upload_asgi.create_app()  # neither raises nor logs: the failure shows at startup
    assert "UPLOAD_MAX_REQUEST_SIZE" not in caplog.text
    sent = await run_lifespan(app)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert sent[0]["message"].startswith("UPLOAD_MAX_REQUEST_SIZE: ")
    assert "UPLOAD_MAX_REQUEST_SIZE" in caplog.text
    assert not (tmp_path / "uploads").exists()


async def test_bad_env_without_lifespan_answers_500(monkeypatch, tmp_path, caplog):
    from support import call_app, http_scope

    monkeypatch.setenv("UPLOAD_DIR", str(tmp_path / "uploads"))
    monkeypatch.setenv("UPLOAD_FSYNC", "sometimes")
    app = upload_asgi.create_app()
    reply = await call_app(app, http_scope("/health", "GET"))
    assert reply.status == 500
    reply.check_length()
    assert reply.json()["error"] == "internal_error"
    assert "UPLOAD_FSYNC" not in reply.body.decode()  # the detail stays in the server log
    assert "upload-asgi is misconfigured: UPLOAD_FSYNC" in caplog.text


async def test_good_env_starts(monkeypatch, tmp_path):
    monkeypatch.setenv("UPLOAD_DIR", str(tmp_path / "uploads"))
    sent = await run_lifespan(upload_asgi.create_app())
    assert [m["type"] for m in sent] == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
    assert (tmp_path / "uploads" / ".partial").is_dir()


async def test_unusable_upload_dir_fails_startup_naming_it(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    app = upload_asgi.create_app(Config(upload_dir=blocker / "uploads"))
    sent = await run_lifespan(app)
    assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
    assert sent[0]["message"].startswith("UPLOAD_DIR: ")
    assert str(blocker / "uploads") in sent[0]["message"]


async def test_an_upload_dir_where_commits_fail_fails_startup(tmp_path):
    """A `.partial/` on another file system (here tmpfs): every commit's rename would fail
    (EXDEV), so startup fails, not each upload with a 500."""
    if not Path("/dev/shm").is_dir() or os.stat("/dev/shm").st_dev == os.stat(tmp_path).st_dev:
        pytest.skip("needs /dev/shm on another file system")
    elsewhere = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        (tmp_path / "uploads").mkdir()
        (tmp_path / "uploads" / ".partial").symlink_to(elsewhere)
        sent = await run_lifespan(upload_asgi.create_app(Config(upload_dir=tmp_path / "uploads")))
        assert [m["type"] for m in sent] == ["lifespan.startup.failed"]
        assert sent[0]["message"].startswith("UPLOAD_DIR: ")
        assert os.listdir(elsewhere) == [] and os.listdir(tmp_path / "uploads") == [".partial"]
    finally:
        shutil.rmtree(elsewhere)


def run_hypercorn(tmp_path: Path, env: dict[str, str], workers: str) -> subprocess.CompletedProcess:
    full_env = {
        **os.environ,
        "UPLOAD_DIR": str(tmp_path / "uploads"),
        "PYTHONPATH": str(ROOT),
        **env,
    }
    return subprocess.run(
        [sys.executable, "-m", "hypercorn", "-w", workers, "--bind", f"127.0.0.1:{free_port()}",
         "upload_asgi:app"],
        env=full_env, cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


def test_hypercorn_with_bad_env_exits_naming_the_variable(tmp_path):
    """`hypercorn -w 0` serves in its own process: a bad value makes it exit non-zero."""
    done = run_hypercorn(tmp_path, {"UPLOAD_MAX_FILE_SIZE": "lots"}, workers="0")
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert "UPLOAD_MAX_FILE_SIZE: 'lots' is not a size" in output


def test_hypercorn_workers_with_bad_env_exit_naming_the_variable(tmp_path):
    """With workers (`-w 1`, the default) the server stops too and prints the message.

    Its exit status is 0: hypercorn 0.18's run() overwrites the failed worker's exit
    code with that of an empty second join (pgjones/hypercorn#269, PR #372).
    """
    done = run_hypercorn(tmp_path, {"UPLOAD_IDLE_TIMEOUT": "-5"}, workers="1")
    output = done.stdout + done.stderr
    assert "UPLOAD_IDLE_TIMEOUT: '-5' is not a positive number of seconds" in output
    assert "Lifespan failure in startup" in output
    assert "Running on" not in output  # it never listened

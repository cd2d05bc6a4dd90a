"""Settings: one table of every setting with its variable, parser, check and default.

Each field of `Config` is declared with `setting(...)`: adding a setting is that one
edit. `Config.from_env()` reads the environment; a `Config(...)` built in code is held
to the same checks; any bad value raises `ConfigError` naming the variable.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Mapping

from upload_service.cors import check_origins, parse_origins
from upload_service.errors import ConfigError
from upload_service.logs import parse_log_level
from upload_service.units import GiB, KiB, MiB, TiB

# Defaults: generous for real files, bounded for everything that lives in memory.
DEFAULT_MAX_FILE_SIZE = 10 * GiB  # an ISO or a disk image; not "any size you like"
DEFAULT_MAX_REQUEST_SIZE = 10 * GiB + 1 * MiB  # one maximal file plus its form around it
DEFAULT_MAX_FILES = 100
DEFAULT_MAX_PARTS = 200  # files and fields together
DEFAULT_MAX_FIELD_SIZE = 64 * KiB  # text fields are held in memory
DEFAULT_IDLE_TIMEOUT = 60.0  # seconds; a browser on a bad link stalls for less
# Bytes per second a body must average once its first idle-timeout has passed: a client
# trickling a byte a minute would otherwise hold an upload slot for ever, and
# UPLOAD_MAX_CONCURRENT of them would shut everyone else out. 1 KiB/s is far below any
# real link; 0 turns the check off.
DEFAULT_MIN_RATE = 1 * KiB
DEFAULT_MAX_CONCURRENT = 64  # each upload holds an fd and up to ~3 MiB of write blocks (~5 for many files)
# An incomplete resumable upload untouched this long is swept (tus expiration). A day
# covers a laptop closed overnight; each PATCH starts the time again.
DEFAULT_RESUMABLE_EXPIRY = 24 * 3600.0
# Ten years: far past any real client's patience, and far from the year 9999, past which
# Upload-Expires (an HTTP-date) cannot be written.
MAX_RESUMABLE_EXPIRY = 3650 * 24 * 3600.0
# S3 (SPEC §11): parts of 8 MiB, two per upload in memory at once (one filling while one
# is sent); S3 refuses parts under 5 MiB (but the last) and over 5 GiB.
DEFAULT_S3_PART_SIZE = 8 * MiB
S3_MIN_PART_SIZE = 5 * MiB
S3_MAX_PART_SIZE = 5 * GiB
DEFAULT_S3_PARTS_IN_FLIGHT = 2
DEFAULT_S3_SWEEP_AFTER = 24 * 3600.0  # a multipart upload older than this is a crashed server's


# -- parsers (environment text -> value) -------------------------------------------

# ASCII digits only: int() and float() also take "1_000" and other scripts' digits.
SIZE_RE = re.compile(r"\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*", re.IGNORECASE | re.ASCII)
SIZE_UNITS = {"": 1, "K": KiB, "M": MiB, "G": GiB, "T": TiB}
DURATION_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", re.IGNORECASE | re.ASCII)
DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
COUNT_RE = re.compile(r"\s*\d+\s*", re.ASCII)
SECONDS_RE = re.compile(r"\s*\d+(?:\.\d+)?\s*", re.ASCII)
# The largest file offset (off_t): a size or count past it is a typo, and tus clients read
# Tus-Max-Size as a signed 64-bit integer.
MAX_WHOLE = 2**63 - 1


def parse_size(text: str) -> int:
    """Parse `123`, `64K`, `500M`, `10G` (binary units: 1M = 2**20 bytes)."""
    match = SIZE_RE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a size like 1048576, 64K, 500M or 10G")
    return int(match.group(1)) * SIZE_UNITS[match.group(2).upper()]


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{text!r} is not 1 or 0")


def parse_seconds(text: str) -> float:
    if not SECONDS_RE.fullmatch(text) or not float(text) > 0:
        raise ValueError(f"{text!r} is not a positive number of seconds")
    return float(text)


def parse_duration(text: str) -> float:
    """Parse seconds, or `90s`, `30m`, `24h`, `7d`."""
    match = DURATION_RE.fullmatch(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 3600, 30m, 24h or 7d")
    return float(match.group(1)) * DURATION_UNITS[match.group(2).lower()]


def parse_count(text: str) -> int:
    if not COUNT_RE.fullmatch(text):
        raise ValueError(f"{text!r} is not a whole number")
    return int(text)


def parse_dir(text: str) -> Path:
    # An empty UPLOAD_DIR would silently mean the working directory.
    if not text.strip() or "\0" in text:
        raise ValueError(f"{text!r} is not a directory path")
    if text != text.strip():  # an env file's stray space would name another directory
        raise ValueError(f"{text!r} begins or ends with white space")
    if text.startswith("~"):  # only a shell expands it; env files and systemd do not
        raise ValueError(f"{text!r} begins with '~': write the full path")
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", text):  # it would store under ./s3:/bucket
        raise ValueError(f"{text!r} is a URL, not a directory: an object store goes in UPLOAD_STORAGE")
    return Path(text)


def parse_token(text: str) -> str:
    # RFC 6750 §2.1: a bearer token is visible ASCII; anything else could never match a header.
    if any(not "!" <= c <= "~" for c in text):
        raise ValueError("the token must be visible ASCII characters without spaces")
    return text


# s3://<bucket>/<prefix>: a bucket name as S3 allows it (3-63 of a-z 0-9 . -), any prefix.
S3_URL_RE = re.compile(r"s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?")


def parse_storage(text: str) -> str:
    """`local`, or `s3://<bucket>/<prefix>` (the prefix may be empty)."""
    value = text.strip()
    if value == "local":
        return value
    match = S3_URL_RE.fullmatch(value)
    if not match:
        raise ValueError(f"{text!r} is not 'local' or 's3://<bucket>/<prefix>'")
    prefix = (match.group(2) or "").strip("/")
    if "//" in prefix or any(ord(c) < 32 or c == "\x7f" for c in prefix):
        raise ValueError(f"{text!r}: the prefix must be path segments without empty ones or control characters")
    return f"s3://{match.group(1)}/{prefix}" if prefix else f"s3://{match.group(1)}"


def parse_url(text: str) -> str | None:
    value = text.strip()
    if not value:
        return None
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ValueError(f"{text!r} is not an http:// or https:// URL")
    return value


# -- checks (any value, from code or parsed -> the value kept) ------------------------


def check_dir(value: Any) -> Path:
    if isinstance(value, str):
        return parse_dir(value)
    if not isinstance(value, os.PathLike):
        raise TypeError(f"{value!r} is not a directory path")
    path = Path(value)
    if "\0" in str(path):
        raise ValueError(f"{value!r} is not a directory path")
    return path


def as_whole(value: Any) -> int:
    if isinstance(value, float) and value.is_integer():  # 2e9 in code means 2000000000
        return int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{value!r} is not a whole number")
    return value


def check_whole(value: Any) -> int:
    value = as_whole(value)
    if not 0 < value <= MAX_WHOLE:
        raise ValueError(f"must be from 1 to 2**63 - 1, got {value!r}")
    return value


def check_rate(value: Any) -> int:
    value = as_whole(value)
    if not 0 <= value <= MAX_WHOLE:
        raise ValueError(f"must be 0 (off) to 2**63 - 1, got {value!r}")
    return value


def check_seconds(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{value!r} is not a number of seconds")
    if not 0 < value < float("inf"):  # NaN fails both
        raise ValueError(f"must be a positive number of seconds, got {value!r}")
    return float(value)


def check_expiry(value: Any) -> float:
    seconds = check_seconds(value)
    if seconds > MAX_RESUMABLE_EXPIRY:
        raise ValueError(f"must be at most 3650d (ten years), got {value!r} seconds")
    return seconds


def check_flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise TypeError(f"{value!r} is not True or False")
    return value


def check_token(value: Any) -> str | None:
    if value is None or value == "":  # no token
        return None
    if not isinstance(value, str):
        raise TypeError("the token must be a string")
    return parse_token(value)


def check_storage(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not 'local' or 's3://<bucket>/<prefix>'")
    return parse_storage(value)


def check_url(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a URL")
    return parse_url(value)


def check_part_size(value: Any) -> int:
    value = as_whole(value)
    if not S3_MIN_PART_SIZE <= value <= S3_MAX_PART_SIZE:
        raise ValueError(f"must be from 5M to 5G (S3's part limits), got {value!r}")
    return value


def check_log_level(value: Any) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{value!r} is not a log level name")
    return parse_log_level(value)


def setting(variable: str, parse: Callable[[str], Any], check: Callable[[Any], Any], default: Any, help: str) -> Any:
    """Declare a Config field: its environment variable, parser, check and default."""
    meta = {"variable": variable, "parse": parse, "check": check, "help": help}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class Config:
    upload_dir: Path = setting("UPLOAD_DIR", parse_dir, check_dir, Path("uploads"), "where stored files go (created)")
    max_file_size: int = setting(
        "UPLOAD_MAX_FILE_SIZE", parse_size, check_whole, DEFAULT_MAX_FILE_SIZE, "bytes per file (10G, 500M...)"
    )
    max_request_size: int = setting(
        "UPLOAD_MAX_REQUEST_SIZE", parse_size, check_whole, DEFAULT_MAX_REQUEST_SIZE, "bytes per request body"
    )
    max_files: int = setting("UPLOAD_MAX_FILES", parse_count, check_whole, DEFAULT_MAX_FILES, "file parts per request")
    max_parts: int = setting(
        "UPLOAD_MAX_PARTS", parse_count, check_whole, DEFAULT_MAX_PARTS, "parts per request, files and fields"
    )
    max_field_size: int = setting(
        "UPLOAD_MAX_FIELD_SIZE", parse_size, check_whole, DEFAULT_MAX_FIELD_SIZE, "bytes per text field (in memory)"
    )
    token: str | None = setting("UPLOAD_TOKEN", parse_token, check_token, None, "bearer token for writes (unset: open)")
    read_token: str | None = setting(
        "UPLOAD_READ_TOKEN", parse_token, check_token, None, "bearer token for reads of /files (unset: open)"
    )
    fsync: bool = setting("UPLOAD_FSYNC", parse_bool, check_flag, True, "1: fsync before a file is stored; 0: skip")
    idle_timeout: float = setting(
        "UPLOAD_IDLE_TIMEOUT", parse_seconds, check_seconds, DEFAULT_IDLE_TIMEOUT, "seconds without a body byte: 408"
    )
    max_concurrent: int = setting(
        "UPLOAD_MAX_CONCURRENT", parse_count, check_whole, DEFAULT_MAX_CONCURRENT, "uploads at once per worker: 503"
    )
    min_rate: int = setting(
        "UPLOAD_MIN_RATE", parse_size, check_rate, DEFAULT_MIN_RATE, "bytes/s a body must average (0: off)"
    )
    resumable_expiry: float = setting(
        "UPLOAD_RESUMABLE_EXPIRY", parse_duration, check_expiry, DEFAULT_RESUMABLE_EXPIRY,
        "an incomplete resumable upload idle this long is removed (3600, 30m, 24h, 7d; at most 3650d)",
    )

    storage: str = setting(
        "UPLOAD_STORAGE", parse_storage, check_storage, "local", "local (UPLOAD_DIR) or s3://<bucket>/<prefix>"
    )
    s3_endpoint_url: str | None = setting(
        "UPLOAD_S3_ENDPOINT_URL", parse_url, check_url, None, "S3-compatible endpoint (unset: AWS)"
    )
    s3_part_size: int = setting(
        "UPLOAD_S3_PART_SIZE", parse_size, check_part_size, DEFAULT_S3_PART_SIZE, "bytes per S3 part (5M to 5G)"
    )
    s3_parts_in_flight: int = setting(
        "UPLOAD_S3_PARTS_IN_FLIGHT", parse_count, check_whole, DEFAULT_S3_PARTS_IN_FLIGHT,
        "S3 parts in memory per upload",
    )
    s3_sweep_after: float = setting(
        "UPLOAD_S3_SWEEP_AFTER", parse_duration, check_seconds, DEFAULT_S3_SWEEP_AFTER,
        "age at which a multipart upload is a crashed server's (24h, 30m, seconds)",
    )
    cors_origins: tuple[str, ...] = setting(
        "UPLOAD_CORS_ORIGINS", parse_origins, check_origins, (), "origins pages may upload from: a,b or * (unset: no CORS)"
    )
    log_level: str = setting(
        "UPLOAD_LOG_LEVEL", parse_log_level, check_log_level, "info",
        "debug, info (a line per upload), warning, error, critical",
    )

    def __post_init__(self) -> None:
        # Values given in code are held to the same rules as the environment's.
        for f in fields(self):
            try:
                object.__setattr__(self, f.name, f.metadata["check"](getattr(self, f.name)))
            except (TypeError, ValueError) as exc:
                raise ConfigError(f"{f.metadata['variable']}: {exc}") from None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Config:
        """Read every setting from its environment variable; unset means default."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            text = environ.get(f.metadata["variable"])
            if text is None:
                continue
            try:
                values[f.name] = f.metadata["parse"](text)
            except ValueError as exc:
                raise ConfigError(f"{f.metadata['variable']}: {exc}") from None
        return cls(**values)


def variables() -> dict[str, str]:
    """Each setting's name and its environment variable."""
    return {f.name: f.metadata["variable"] for f in fields(Config)}


def describe() -> list[tuple[str, str, str]]:
    """(variable, default as one would set it, help) for every setting, for `--help`."""
    return [(f.metadata["variable"], format_default(f.metadata["parse"], f.default), f.metadata["help"])
            for f in fields(Config)]


def format_default(parse: Callable[[str], Any], value: Any) -> str:
    """A default in the form its variable takes: 10G, 1, 24h; "unset" for none."""
    if value is None or value == ():
        return "unset"
    if value == 0 and not isinstance(value, bool):
        return "0"
    if parse is parse_bool:
        return "1" if value else "0"
    if parse is parse_size:
        unit = next(unit for unit in "GMK " if value % SIZE_UNITS[unit.strip()] == 0)
        return f"{value // SIZE_UNITS[unit.strip()]}{unit.strip()}"
    if parse is parse_duration:
        unit = next(unit for unit in "dhm " if value % DURATION_UNITS[unit.strip()] == 0)
        return f"{value // DURATION_UNITS[unit.strip()]:g}{unit.strip()}"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)

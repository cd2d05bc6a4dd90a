"""Logging: the app's lines reach stderr when nobody configured logging, and not otherwise.

Every module logs to the `upload_asgi` logger. Under a plain `hypercorn upload_asgi:app`
nothing handles it: hypercorn configures only its own `hypercorn.*` loggers, so INFO
lines were dropped and WARNING and up came out through Python's unformatted last-resort
handler. The rule (README "Logs"):

- `UPLOAD_LOG_LEVEL` (default `info`) sets the `upload_asgi` logger's level, unless
  the host set that level itself before the app was created;
- a `FallbackHandler` on that logger writes one formatted line to stderr for each
  record, but only while no other handler would get the record (none on the logger,
  none on its ancestors it propagates to, root included): like `logging.lastResort`,
  at our level and with a format. A host that configures logging (`basicConfig`,
  `dictConfig`, hypercorn's `--log-config`), before or after the app is created,
  gets the records in its own handlers and none from us.

Text a client chose (a path, a header's value in an error's detail) reaches our lines as
arguments: `EscapeControls` writes their control characters as escapes, so a line can
neither end early and forge the next nor colour a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

LOGGER_NAME = "upload_asgi"
LEVELS = ("debug", "info", "warning", "error", "critical")
# The shape of hypercorn's own error log lines, so both read alike on one stderr.
LINE_FORMAT = "%(asctime)s [%(process)d] [%(levelname)s] %(name)s: %(message)s"
DATE_FORMAT = "[%Y-%m-%d %H:%M:%S %z]"

logger = logging.getLogger(LOGGER_NAME)

# C0 controls but tab, DEL, C1 controls; the Unicode line and paragraph separators, and the
# bidirectional controls (U+202E shows what follows reversed).
_CONTROLS = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F, *range(0x80, 0xA0)) if c != 0x09}
_CONTROLS.update({c: f"\\u{c:04x}" for c in (0x061C, 0x200E, 0x200F, 0x2028, 0x2029, *range(0x202A, 0x202F),
                                               *range(0x2066, 0x206A))})
_TRACEBACK_CONTROLS = {c: escaped for c, escaped in _CONTROLS.items() if c != 0x0A}  # its lines stay lines
_formatter = logging.Formatter()  # formats a traceback as a handler's would


def escape_controls(text: str, controls: dict[int, str] = _CONTROLS) -> str:
    return text if text.isprintable() else text.translate(controls)


class EscapeControls(logging.Filter):
    """Escape the control characters of a record's text arguments (its message is ours) and of its
    traceback (but its line feeds)."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple):
            record.args = tuple(escape_controls(a) if isinstance(a, str) else a for a in args)
        elif isinstance(args, dict):
            record.args = {k: escape_controls(a) if isinstance(a, str) else a for k, a in args.items()}
        if record.exc_info and record.exc_text is None:  # an exception's message may quote a client
            record.exc_text = escape_controls(_formatter.formatException(record.exc_info), _TRACEBACK_CONTROLS)
        return True


def parse_log_level(text: str) -> str:
    level = text.strip().lower()
    if level not in LEVELS:
        raise ValueError(f"{text!r} is not one of {', '.join(LEVELS)}")
    return level


class FallbackHandler(logging.StreamHandler):
    """Write to stderr only when no other handler would take the record."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter(LINE_FORMAT, DATE_FORMAT))

    @property
    def stream(self) -> Any:  # the sys.stderr of the moment (a test or a host may swap it)
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass

    def handle(self, record: logging.LogRecord) -> bool:
        if others_would_handle(logging.getLogger(record.name)):
            return False
        return super().handle(record)


def others_would_handle(start: logging.Logger) -> bool:
    """True if a handler other than a FallbackHandler is on `start` or an ancestor it reaches."""
    current: logging.Logger | None = start
    while current is not None:
        if any(not isinstance(h, FallbackHandler) for h in current.handlers):
            return True
        if not current.propagate:
            return False
        current = current.parent  # type: ignore[assignment]
    return False


_level_is_ours = False


def set_up_logging(level: str) -> None:
    """Install the fallback handler once per process and apply UPLOAD_LOG_LEVEL."""
    global _level_is_ours
    if not any(isinstance(h, FallbackHandler) for h in logger.handlers):
        logger.addHandler(FallbackHandler())
    if not any(isinstance(f, EscapeControls) for f in logger.filters):
        logger.addFilter(EscapeControls())
    if logger.level == logging.NOTSET or _level_is_ours:
        logger.setLevel(level.upper())
        _level_is_ours = True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, and the upload's facts.

    For a host's logging config (README "Logs"): `"()": "upload_service.logs.JsonFormatter"`.
    """

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "process": record.process,
            "message": record.getMessage(),
        }
        upload = getattr(record, "upload", None)
        if isinstance(upload, dict):
            entry.update(upload)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, separators=(",", ":"))

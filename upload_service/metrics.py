"""What happened to each upload: counters for /metrics (Prometheus text) and a log line.

The series live in prometheus-client, for its multiprocess mode: under `hypercorn -w N`
each worker is a process with its own counters, and a scrape is answered by whichever
worker gets it; in multiprocess mode every worker writes its values to small mmap
files in one directory and each scrape sums them all (`metricsdir.py`, README
"Monitoring"). A single process (tests, `-w 0`, uvicorn) keeps plain per-app counters.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

from upload_service.errors import ClientGone, ServiceUnavailable, UploadError, UploadRefused, as_upload_error
from upload_service.metricsdir import SharedDir, use_multiprocess_values
from upload_service.storage import Record

logger = logging.getLogger("upload_asgi")

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)
# partial: a resumable PATCH (or a creation with a body) that kept its bytes
OUTCOMES = ("stored", "partial", "rejected", "failed", "disconnected")


class Series:
    """The prometheus-client metrics of one app (one process's share, in multiprocess mode)."""

    def __init__(self, registry: CollectorRegistry | None) -> None:
        self.uploads = Counter(
            "upload_asgi_uploads", "Upload requests by outcome.", ["outcome"], registry=registry
        )
        for outcome in OUTCOMES:
            self.uploads.labels(outcome)  # every outcome shows, at 0 until it happens
        self.received = Counter(
            "upload_asgi_received_bytes", "Request body bytes received by upload routes.", registry=registry
        )
        self.stored_bytes = Counter("upload_asgi_stored_bytes", "Bytes of files stored.", registry=registry)
        self.stored_files = Counter("upload_asgi_stored_files", "Files stored.", registry=registry)
        self.rehashed = Counter(
            "upload_asgi_resumable_rehashed_bytes",
            "Bytes of resumable uploads re-read from storage to hash (another process wrote them).",
            registry=registry,
        )
        # livesum: the workers alive now; a dead worker's file is dropped at the next scrape.
        self.in_flight = Gauge(
            "upload_asgi_uploads_in_flight", "Uploads being received now.",
            registry=registry, multiprocess_mode="livesum",
        )
        self.duration = Histogram(
            "upload_asgi_upload_duration_seconds", "Time from request start to answer.",
            buckets=DURATION_BUCKETS, registry=registry,
        )


class WithoutCreated:
    """A registry's families without the `_created` samples (not part of our exposition)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Any]:
        for family in self.registry.collect():
            family.samples = [s for s in family.samples if not s.name.endswith("_created")]
            yield family


_process_series: Series | None = None  # multiprocess mode: one set per process, shared by its apps


class Metrics:
    """The counters behind /metrics and /health.

    `in_flight`, `files_stored`, `bytes_stored`, `bytes_received`, `rehashed_bytes` and `outcomes` are
    this app's own numbers (`in_flight` bounds UPLOAD_MAX_CONCURRENT per worker); each
    change also moves the Prometheus series, which `exposition()` writes out, summed
    over every worker in multiprocess mode.
    """

    def __init__(self, shared: SharedDir | None = None) -> None:
        global _process_series
        self.outcomes: dict[str, int] = {}
        self._in_flight = self._files_stored = self._bytes_stored = self._bytes_received = 0
        self._rehashed_bytes = 0
        self.shared = shared
        if shared is None:
            self._registry = CollectorRegistry(auto_describe=True)
            self._series = Series(self._registry)
            return
        use_multiprocess_values(shared.path)
        if _process_series is None:
            _process_series = Series(None)  # unregistered: the collector reads the files
        self._series = _process_series
        self._registry = CollectorRegistry()
        MultiProcessCollector(self._registry, shared.path)

    def observe(self, outcome: str, seconds: float) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self._series.uploads.labels(outcome).inc()
        self._series.duration.observe(seconds)

    # Each counter is read and added to (`metrics.bytes_stored += n`) by the handlers.
    @property
    def in_flight(self) -> int:
        return self._in_flight

    @in_flight.setter
    def in_flight(self, value: int) -> None:
        self._series.in_flight.inc(value - self._in_flight)
        self._in_flight = value

    @property
    def files_stored(self) -> int:
        return self._files_stored

    @files_stored.setter
    def files_stored(self, value: int) -> None:
        self._series.stored_files.inc(value - self._files_stored)
        self._files_stored = value

    @property
    def bytes_stored(self) -> int:
        return self._bytes_stored

    @bytes_stored.setter
    def bytes_stored(self, value: int) -> None:
        self._series.stored_bytes.inc(value - self._bytes_stored)
        self._bytes_stored = value

    @property
    def bytes_received(self) -> int:
        return self._bytes_received

    @bytes_received.setter
    def bytes_received(self, value: int) -> None:
        self._series.received.inc(value - self._bytes_received)
        self._bytes_received = value

    @property
    def rehashed_bytes(self) -> int:
        return self._rehashed_bytes

    @rehashed_bytes.setter
    def rehashed_bytes(self, value: int) -> None:
        self._series.rehashed.inc(value - self._rehashed_bytes)
        self._rehashed_bytes = value

    def exposition(self) -> str:
        """Prometheus text: this app's series, or every worker's summed in multiprocess mode."""
        if self.shared is None:
            return generate_latest(WithoutCreated(self._registry)).decode()
        self.shared.before_scrape()
        with self.shared.reading():
            return generate_latest(self._registry).decode()


def outcome_of(error: BaseException | None) -> str:
    if error is None:
        return "stored"
    if isinstance(error, (ClientGone, asyncio.CancelledError)):  # cancelled: the server let go
        return "disconnected"
    return "failed" if is_server_fault(as_upload_error(error)) else "rejected"


def is_server_fault(error: UploadError) -> bool:
    """A 5xx for something that went wrong here; too_many_uploads is load shed on purpose,
    and a refusal by the embedding app's before_upload hook is its decision."""
    return error.status >= 500 and not isinstance(error, (ServiceUnavailable, UploadRefused))


def log_outcome(error: BaseException | None, received: int, seconds: float, stored: list[Record]) -> None:
    """Log one line per stored file, and one for a request that failed (after storing, too).

    Each line also carries its facts as `extra={"upload": {...}}` for a structured
    formatter (`upload_service.logs.JsonFormatter`).
    """
    facts: dict[str, object] = {"outcome": outcome_of(error), "received_bytes": received, "seconds": round(seconds, 6)}
    rate = received / seconds / 1e6 if seconds > 0 else 0.0
    # Stored and then failed too (the on_upload hook; a tus length that completed the upload of a
    # refused PATCH): each stored file has its line all the same, before the failure's.
    answered = {"status": 201} if error is None else {}
    for record in stored:
        logger.info(
            "upload stored: id=%s size=%d sha256=%s in %.3f s (%.1f MB/s)",
            record["id"], record["size"], record["sha256"], seconds, rate,
            extra={"upload": {**facts, "outcome": "stored", **answered, "id": record["id"], "size": record["size"],
                              "sha256": record["sha256"]}},
        )
    if error is None:
        return
    if isinstance(error, ClientGone):
        logger.info("upload abandoned by the client after %d bytes", received, extra={"upload": facts})
    elif isinstance(error, asyncio.CancelledError):
        logger.info("upload cancelled by the server after %d bytes", received, extra={"upload": facts})
    else:
        failure = as_upload_error(error)
        logger.info(
            "upload %s: %d %s after %d bytes: %s",
            facts["outcome"] if facts["outcome"] == "failed" else "refused",
            failure.status, failure.code, received, failure.detail,
            extra={"upload": {**facts, "status": failure.status, "error": failure.code}},
        )

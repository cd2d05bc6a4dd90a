"""What happened to each upload: counters for /metrics (Prometheus text) and a log line."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from upload_service.storage import Record
from upload_service.errors import ClientGone, ServiceUnavailable, UploadError, as_upload_error

logger = logging.getLogger("upload_asgi")

DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0)


@dataclass
class Metrics:
    """Counters for /metrics; one set per app (per worker process)."""

    outcomes: dict[str, int] = field(default_factory=dict)
    bytes_received: int = 0
    bytes_stored: int = 0
    files_stored: int = 0
    in_flight: int = 0
    duration_counts: list[int] = field(default_factory=lambda: [0] * len(DURATION_BUCKETS))
    duration_sum: float = 0.0
    duration_count: int = 0

    def observe(self, outcome: str, seconds: float) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1
        self.duration_sum += seconds
        self.duration_count += 1
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self.duration_counts[i] += 1

    def exposition(self) -> str:
        lines = [
            "# HELP upload_asgi_uploads_total Upload requests by outcome.",
            "# TYPE upload_asgi_uploads_total counter",
        ]
        for outcome in sorted(set(self.outcomes) | {"stored", "rejected", "failed", "disconnected"}):
            lines.append(f'upload_asgi_uploads_total{{outcome="{outcome}"}} {self.outcomes.get(outcome, 0)}')
        lines += [
            "# HELP upload_asgi_received_bytes_total Request body bytes received by upload routes.",
            "# TYPE upload_asgi_received_bytes_total counter",
            f"upload_asgi_received_bytes_total {self.bytes_received}",
            "# HELP upload_asgi_stored_bytes_total Bytes of files stored.",
            "# TYPE upload_asgi_stored_bytes_total counter",
            f"upload_asgi_stored_bytes_total {self.bytes_stored}",
            "# HELP upload_asgi_stored_files_total Files stored.",
            "# TYPE upload_asgi_stored_files_total counter",
            f"upload_asgi_stored_files_total {self.files_stored}",
            "# HELP upload_asgi_uploads_in_flight Uploads being received now.",
            "# TYPE upload_asgi_uploads_in_flight gauge",
            f"upload_asgi_uploads_in_flight {self.in_flight}",
            "# HELP upload_asgi_upload_duration_seconds Time from request start to answer.",
            "# TYPE upload_asgi_upload_duration_seconds histogram",
        ]
        for bound, count in zip(DURATION_BUCKETS, self.duration_counts):
            lines.append(f'upload_asgi_upload_duration_seconds_bucket{{le="{bound}"}} {count}')
        lines += [
            f'upload_asgi_upload_duration_seconds_bucket{{le="+Inf"}} {self.duration_count}',
            f"upload_asgi_upload_duration_seconds_sum {self.duration_sum:.6f}",
            f"upload_asgi_upload_duration_seconds_count {self.duration_count}",
        ]
        return "\n".join(lines) + "\n"


def outcome_of(error: BaseException | None) -> str:
    if error is None:
        return "stored"
    if isinstance(error, (ClientGone, asyncio.CancelledError)):  # cancelled: the server let go
        return "disconnected"
    return "failed" if is_server_fault(as_upload_error(error)) else "rejected"


def is_server_fault(error: UploadError) -> bool:
    """A 5xx for something that went wrong here; too_many_uploads is load shed on purpose."""
    return error.status >= 500 and not isinstance(error, ServiceUnavailable)


def log_outcome(error: BaseException | None, received: int, seconds: float, stored: list[Record]) -> None:
    """Log one line per stored file, or one line for a request that stored nothing."""
    if error is None:
        rate = received / seconds / 1e6 if seconds > 0 else 0.0
        for record in stored:
            logger.info(
                "upload stored: id=%s size=%d sha256=%s in %.3f s (%.1f MB/s)",
                record["id"], record["size"], record["sha256"], seconds, rate,
            )
    elif isinstance(error, ClientGone):
        logger.info("upload abandoned by the client after %d bytes", received)
    elif isinstance(error, asyncio.CancelledError):
        logger.info("upload cancelled by the server after %d bytes", received)
    else:
        failure = as_upload_error(error)
        logger.info(
            "upload refused: %d %s after %d bytes: %s",
            failure.status, failure.code, received, failure.detail,
        )

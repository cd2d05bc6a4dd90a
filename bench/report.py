"""Figures: samples, medians, ratios, the table, the JSON file, the machine."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

MB = 10**6  # throughput is in MB/s with 1 MB = 10^6 bytes
RESULTS = Path(__file__).resolve().parent / "results" / "latest.json"


def summary(samples: list[float]) -> dict[str, Any]:
    return {
        "median": statistics.median(samples),
        "min": min(samples),
        "max": max(samples),
        "samples": [round(s, 1) for s in samples],
    }


@dataclass
class Figure:
    """One line of the table: a subject's MB/s (or uploads/s) against a ceiling's, from the same run."""

    name: str
    what: str
    ceiling_what: str
    bytes: int
    subject: list[float] = field(default_factory=list)  # MB/s (or `unit`) per run
    ceiling: list[float] = field(default_factory=list)
    target: float | None = None  # the least ratio SPEC §7 asks for
    extra: dict[str, Any] = field(default_factory=dict)
    unit: str = "MB/s"  # or "uploads/s"

    def add(self, subject_mbps: float | None = None, ceiling_mbps: float | None = None) -> None:
        if subject_mbps is not None:
            self.subject.append(subject_mbps)
        if ceiling_mbps is not None:
            self.ceiling.append(ceiling_mbps)

    @property
    def subject_median(self) -> float:
        return statistics.median(self.subject)

    @property
    def ratio(self) -> float:
        return statistics.median(self.subject) / statistics.median(self.ceiling)

    def as_json(self) -> dict[str, Any]:
        key = UNIT_KEYS[self.unit]
        out = {
            "what": self.what,
            "ceiling_what": self.ceiling_what,
            "bytes": self.bytes,
            "unit": self.unit,
            "runs": len(self.subject),
            key: summary(self.subject),
            f"ceiling_{key}": summary(self.ceiling),
            "ratio": self.ratio,
            "target": self.target,
            "meets_target": None if self.target is None else self.ratio >= self.target,
        }
        out.update(self.extra)
        return out


# The JSON key of each unit's series: "mbps" and "ceiling_mbps", or "uploads_per_s" and ...
UNIT_KEYS = {"MB/s": "mbps", "uploads/s": "uploads_per_s"}


def mbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / MB


def size_text(nbytes: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= scale and nbytes % scale == 0:
            return f"{nbytes // scale} {unit}"
    if nbytes >= 1 << 20:
        return f"{nbytes / (1 << 20):.1f} MiB"
    return f"{nbytes} B"


def progress(line: str) -> None:
    """One line per run, to stderr, so that stdout holds only the table."""
    print(line, file=sys.stderr, flush=True)


def machine() -> dict[str, Any]:
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "nproc": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
    }


def table(figures: list[Figure]) -> str:
    """The summary table, Markdown, one line per figure."""
    lines = [
        "| figure | size | median (min–max) | ceiling median (min–max) | ratio | target | notes |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for f in figures:
        s, c = summary(f.subject), summary(f.ceiling)
        target = "" if f.target is None else f"≥ {f.target:g} {'ok' if f.ratio >= f.target else 'MISSED'}"
        notes = "; ".join(f"{k} {v}" for k, v in f.extra.items() if k in NOTE_KEYS)
        lines.append(
            f"| {f.name} | {size_text(f.bytes)} | {s['median']:.0f} {f.unit} ({s['min']:.0f}–{s['max']:.0f}) "
            f"| {f.ceiling_what}: {c['median']:.0f} ({c['min']:.0f}–{c['max']:.0f}) "
            f"| {f.ratio:.2f} | {target} | {notes} |"
        )
    return "\n".join(lines)


# Extra fields short enough for the table's notes column.
NOTE_KEYS = (
    "cpu_s_per_gb",
    "ceiling_cpu_s_per_gb",
    "runqueue_wait_s_per_s",
    "peak_rss_mib",
    "peak_rss_growth_mib",
    "intact",
    "sfd_alone_mbps",
    "cpu_ms_per_upload",
    "ceiling_cpu_ms_per_upload",
    "reconnects",
    "client_cpu_share",
    "not_available",
)


def write_json(
    path: Path, figures: list[Figure], checks: list[dict[str, Any]], args: dict[str, Any],
    load_at_start: tuple[float, float, float] | None = None,
) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "unit": "MB/s, 1 MB = 10^6 bytes (uploads/s where a figure's unit says so); ratio = median / ceiling median, same run",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # Other work on the machine shows here: 1-, 5- and 15-minute load averages.
        "machine": machine() | {"loadavg_at_start": load_at_start, "loadavg_at_end": os.getloadavg()},
        "args": args,
        "figures": {f.name: f.as_json() for f in figures},
        "targets": checks,
    }
    path.write_text(json.dumps(payload, indent=1) + "\n")

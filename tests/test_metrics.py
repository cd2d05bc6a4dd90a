"""GET /metrics (Prometheus text format 0.0.4) and GET /health, checked by a strict parser."""

from __future__ import annotations

import asyncio
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest

import upload_asgi
from upload_service.metricsdir import SharedDir, summed, write_values
from support import (
    ROOT,
    Reply,
    Server,
    assert_nothing_stored,
    call_app,
    field_part,
    file_part,
    form_body,
    form_content_type,
    http_scope,
)

# -- a strict parser for the Prometheus text exposition format ---------------------------------
# https://prometheus.io/docs/instrumenting/exposition_formats/#text-based-format

METRIC_NAME = r"[a-zA-Z_:][a-zA-Z0-9_:]*"
LABEL_NAME = r"[a-zA-Z_][a-zA-Z0-9_]*"
LABEL_VALUE = r'"(?:[^"\\\n]|\\[\\"n])*"'
LABEL = rf"({LABEL_NAME})=({LABEL_VALUE})"
VALUE = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?|[+-]Inf|NaN"
SAMPLE_RE = re.compile(
    rf"(?P<name>{METRIC_NAME})"
    rf"(?:\{{(?P<labels>(?:{LABEL_NAME}={LABEL_VALUE}(?:,{LABEL_NAME}={LABEL_VALUE})*,?)?)\}})?"
    rf" (?P<value>{VALUE})(?: (?P<timestamp>-?\d+))?"
)
TYPES = {"counter", "gauge", "histogram", "summary", "untyped"}
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")


class ExpositionError(AssertionError):
    pass


@dataclass
class Family:
    name: str
    type: str | None = None
    help: str | None = None
    samples: list[tuple[str, dict[str, str], float]] = field(default_factory=list)

    def value(self, name: str | None = None, **labels: str) -> float:
        """The value of the one sample with this name and exactly these labels."""
        name = name or self.name
        found = [v for n, l, v in self.samples if n == name and l == labels]
        if len(found) != 1:
            raise KeyError(f"{name}{labels}: {len(found)} samples")
        return found[0]


def unescape_label(quoted: str) -> str:
    return re.sub(r"\\(.)", lambda m: {"n": "\n"}.get(m.group(1), m.group(1)), quoted[1:-1])


def parse_labels(text: str | None) -> dict[str, str]:
    labels: dict[str, str] = {}
    for match in re.finditer(LABEL, text or ""):
        if match.group(1) in labels:
            raise ExpositionError(f"label {match.group(1)} given twice")
        labels[match.group(1)] = unescape_label(match.group(2))
    return labels


def parse_exposition(text: str) -> dict[str, Family]:
    """Parse Prometheus text format, refusing anything a scraper could misread."""
    if not text.endswith("\n"):
        raise ExpositionError("the exposition must end with a line feed")
    families: dict[str, Family] = {}
    finished: set[str] = set()
    current: str | None = None
    series: set[tuple[str, frozenset]] = set()

    def enter(name: str) -> Family:
        nonlocal current
        if name != current:
            if name in finished:
                raise ExpositionError(f"the lines of {name} are not one group")
            if current is not None:
                finished.add(current)
            current = name
        return families.setdefault(name, Family(name))

    def family_of(sample: str) -> Family:
        if sample in families and families[sample].type != "histogram":
            return families[sample]
        for suffix in HISTOGRAM_SUFFIXES:
            base = sample[: -len(suffix)]
            if sample.endswith(suffix) and families.get(base) and families[base].type == "histogram":
                return families[base]
        raise ExpositionError(f"sample {sample} has no TYPE line before it")

    for number, line in enumerate(text[:-1].split("\n"), 1):
        if line.startswith("#"):
            parts = line.split(" ", 3)
            if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                if len(parts) != 4 or not re.fullmatch(METRIC_NAME, parts[2]):
                    raise ExpositionError(f"line {number}: bad {parts[1]} line {line!r}")
                family = enter(parts[2])
                if parts[1] == "TYPE":
                    if family.type is not None or family.samples:
                        raise ExpositionError(f"line {number}: TYPE of {family.name} again or after samples")
                    if parts[3] not in TYPES:
                        raise ExpositionError(f"line {number}: unknown type {parts[3]!r}")
                    family.type = parts[3]
                else:
                    if family.help is not None:
                        raise ExpositionError(f"line {number}: second HELP for {family.name}")
                    if re.search(r"\\[^\\n]", parts[3]):
                        raise ExpositionError(f"line {number}: bad escape in HELP")
                    family.help = parts[3]
            continue  # any other comment
        if not line.strip():
            continue
        match = SAMPLE_RE.fullmatch(line)
        if not match:
            raise ExpositionError(f"line {number}: not a sample line: {line!r}")
        name, labels = match.group("name"), parse_labels(match.group("labels"))
        family = family_of(name)
        enter(family.name)
        key = (name, frozenset(labels.items()))
        if key in series:
            raise ExpositionError(f"line {number}: series {name}{labels} twice")
        series.add(key)
        value = float(match.group("value"))
        if family.type == "counter" and not value >= 0:
            raise ExpositionError(f"line {number}: counter {name} is {value}")
        if family.type == "histogram" and (name.endswith("_bucket") != ("le" in labels)):
            raise ExpositionError(f"line {number}: le belongs on _bucket samples only")
        family.samples.append((name, labels, value))

    for family in families.values():
        if family.type is None or family.help is None:
            raise ExpositionError(f"{family.name} lacks TYPE or HELP")
        if not family.samples:
            raise ExpositionError(f"{family.name} has no samples")
        if family.type == "histogram":
            check_histogram(family)
    return families


def check_histogram(family: Family) -> None:
    groups: dict[frozenset, dict[str, Any]] = {}
    for name, labels, value in family.samples:
        rest = frozenset((k, v) for k, v in labels.items() if k != "le")
        group = groups.setdefault(rest, {"buckets": [], "sum": None, "count": None})
        if name.endswith("_bucket"):
            group["buckets"].append((float(labels["le"]), value))
        else:
            group[name.rsplit("_", 1)[1]] = value
    for rest, group in groups.items():
        bounds = [b for b, _ in group["buckets"]]
        counts = [c for _, c in group["buckets"]]
        where = f"{family.name}{dict(rest)}"
        if not bounds or bounds[-1] != math.inf:
            raise ExpositionError(f"{where}: no +Inf bucket last")
        if any(a >= b for a, b in zip(bounds, bounds[1:])):
            raise ExpositionError(f"{where}: bucket bounds not increasing: {bounds}")
        if any(a > b for a, b in zip(counts, counts[1:])):
            raise ExpositionError(f"{where}: bucket counts not cumulative: {counts}")
        if group["count"] is None or group["sum"] is None:
            raise ExpositionError(f"{where}: _sum or _count missing")
        if counts[-1] != group["count"]:
            raise ExpositionError(f"{where}: +Inf bucket {counts[-1]} != _count {group['count']}")
        if any(c != int(c) for c in counts):
            raise ExpositionError(f"{where}: fractional bucket count")


GOOD = """\
# HELP a_total Things.
# TYPE a_total counter
a_total{kind="x"} 1
a_total{kind="y\\"\\\\\\n"} 2.5e3
# some other comment
# HELP h Durations.
# TYPE h histogram
h_bucket{le="0.1"} 1
h_bucket{le="1"} 3
h_bucket{le="+Inf"} 4
h_sum 7.25
h_count 4
"""


def test_parser_accepts_a_good_exposition():
    families = parse_exposition(GOOD)
    assert families["a_total"].value(kind='y"\\\n') == 2500
    assert families["h"].value("h_count") == 4


@pytest.mark.parametrize(
    ("broken", "why"),
    [
        pytest.param(GOOD[:-1], "end with a line feed", id="no-final-newline"),
        pytest.param(GOOD.replace('h_bucket{le="1"} 3', 'h_bucket{le="1"} 0'), "cumulative", id="bucket-decreases"),
        pytest.param(GOOD.replace("h_count 4", "h_count 5"), "!= _count", id="inf-not-count"),
        pytest.param(GOOD.replace('h_bucket{le="+Inf"} 4\n', ""), "+Inf", id="no-inf-bucket"),
        pytest.param(GOOD.replace("h_sum 7.25\n", ""), "_sum", id="no-sum"),
        pytest.param(GOOD.replace('le="0.1"', 'le="2"'), "increasing", id="bounds-out-of-order"),
        pytest.param(GOOD.replace("# TYPE a_total counter\n", ""), "TYPE", id="no-type"),
        pytest.param(GOOD.replace("# HELP a_total Things.\n", ""), "HELP", id="no-help"),
        pytest.param(GOOD + 'a_total{kind="z"} 1\n', "one group", id="family-split"),
        pytest.param(GOOD.replace('a_total{kind="x"} 1', 'a_total{kind="y\\"\\\\\\n"} 1'), "twice", id="dup-series"),
        pytest.param(GOOD.replace('{kind="x"}', "{kind=x}"), "not a sample", id="unquoted-label"),
        pytest.param(GOOD.replace('{kind="x"}', '{kind="\\q"}'), "not a sample", id="bad-escape"),
        pytest.param(GOOD.replace("a_total{kind=\"x\"} 1", "a_total{kind=\"x\"} one"), "not a sample", id="bad-value"),
        pytest.param(GOOD.replace("a_total{kind=\"x\"} 1", "a_total{kind=\"x\"} -1"), "counter", id="negative-counter"),
        pytest.param(GOOD.replace("counter", "countr"), "unknown type", id="bad-type"),
        pytest.param(GOOD.replace("h_sum 7.25", 'h_sum{le="1"} 7.25'), "le belongs", id="le-on-sum"),
    ],
)
def test_parser_refuses_broken_expositions(broken, why):
    with pytest.raises(ExpositionError, match=re.escape(why)):
        parse_exposition(broken)


# -- /metrics and /health of the app --------------------------------------------------------


async def scrape(app: Any) -> dict[str, Family]:
    reply = await call_app(app, http_scope("/metrics", method="GET"))
    assert reply.status == 200
    reply.check_length()
    assert reply.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse_exposition(reply.body.decode("utf-8"))


def snapshot(families: dict[str, Family]) -> dict[str, float]:
    """The numbers the tests follow, flattened."""
    uploads = families["upload_asgi_uploads_total"]
    duration = families["upload_asgi_upload_duration_seconds"]
    values = {
        f"uploads.{labels['outcome']}": value for _, labels, value in uploads.samples
    }
    values.update({
        "received": families["upload_asgi_received_bytes_total"].value(),
        "stored_bytes": families["upload_asgi_stored_bytes_total"].value(),
        "stored_files": families["upload_asgi_stored_files_total"].value(),
        "in_flight": families["upload_asgi_uploads_in_flight"].value(),
        "duration_count": duration.value("upload_asgi_upload_duration_seconds_count"),
    })
    return values


def moved(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after if after.get(k, 0) != before.get(k, 0)}


async def test_metrics_of_a_fresh_app(app):
    families = await scrape(app)
    types = {name: family.type for name, family in families.items()}
    assert types == {
        "upload_asgi_uploads_total": "counter",
        "upload_asgi_received_bytes_total": "counter",
        "upload_asgi_stored_bytes_total": "counter",
        "upload_asgi_stored_files_total": "counter",
        "upload_asgi_resumable_rehashed_bytes_total": "counter",
        "upload_asgi_uploads_in_flight": "gauge",
        "upload_asgi_upload_duration_seconds": "histogram",
    }
    values = snapshot(families)
    assert {k for k in values if k.startswith("uploads.")} >= {
        "uploads.stored", "uploads.partial", "uploads.rejected", "uploads.failed", "uploads.disconnected"
    }
    assert all(v == 0 for v in values.values())
    head = await call_app(app, http_scope("/metrics", method="HEAD"))
    assert head.status == 200 and head.body == b"" and int(head.headers["content-length"]) > 0


async def test_counters_move_with_each_outcome(config, upload_dir):
    def failing_hook(record: dict) -> None:
        if record["filename"] == "hook-fails.bin":
            raise RuntimeError("hook down")

    app = upload_asgi.create_app(replace(config, max_file_size=64 * 1024), on_upload=failing_hook)
    upload = http_scope("/upload", content_type=form_content_type())

    async def step(chunks: list[bytes], scope: dict = upload, disconnect: bool = False) -> tuple[Reply, dict]:
        before = snapshot(await scrape(app))
        reply = await call_app(app, scope, chunks, disconnect_after=disconnect)
        return reply, moved(before, snapshot(await scrape(app)))

    data = os.urandom(10_000)
    body = form_body([field_part("description", "d"), file_part(data)])
    reply, delta = await step([body[:5000], body[5000:]])
    assert reply.status == 201
    assert delta == {"uploads.stored": 1, "received": len(body), "stored_bytes": len(data),
                     "stored_files": 1, "duration_count": 1}

    several = form_body([file_part(b"a" * 100, name="files"), file_part(b"b" * 200, name="files")])
    multiple = http_scope("/upload-multiple", content_type=form_content_type())
    reply, delta = await step([several], multiple)
    assert reply.status == 201
    assert delta == {"uploads.stored": 1, "received": len(several), "stored_bytes": 300,
                     "stored_files": 2, "duration_count": 1}

    too_big = form_body([file_part(os.urandom(200_000))])
    reply, delta = await step([too_big[i : i + 16384] for i in range(0, len(too_big), 16384)])
    assert reply.status == 413
    received = delta.pop("received")
    assert 64 * 1024 < received < len(too_big)  # stopped soon after the limit
    assert delta == {"uploads.rejected": 1, "duration_count": 1}

    declared = http_scope("/upload", content_type=form_content_type(),
                          headers=[("content-length", str(config.max_request_size + 1))])
    reply, delta = await step([b"never read"], declared)
    assert reply.status == 413
    assert delta == {"uploads.rejected": 1, "duration_count": 1}  # not a byte received

    no_file = form_body([field_part("description", "only text")])
    reply, delta = await step([no_file])
    assert reply.status == 422
    assert delta == {"uploads.rejected": 1, "received": len(no_file), "duration_count": 1}

    mismatch = form_body([file_part(b"abc"), field_part("sha256", "f" * 64)])
    reply, delta = await step([mismatch])
    assert reply.status == 422
    assert delta == {"uploads.rejected": 1, "received": len(mismatch), "duration_count": 1}

    half = body[: len(body) // 2]
    reply, delta = await step([half], disconnect=True)
    assert reply.status is None
    assert delta == {"uploads.disconnected": 1, "received": len(half), "duration_count": 1}

    smuggling = http_scope("/upload", content_type=form_content_type(),
                           headers=[("transfer-encoding", "chunked"), ("content-length", "5")])
    reply, delta = await step([body], smuggling)
    assert reply.status == 400 and reply.json()["error"] == "ambiguous_length"
    assert delta == {"uploads.rejected": 1, "duration_count": 1}  # refused at the door, still an upload refused

    hooked = form_body([file_part(b"stored, then the hook fails", "hook-fails.bin")])
    reply, delta = await step([hooked])
    assert reply.status == 500
    assert delta == {"uploads.failed": 1, "received": len(hooked), "stored_bytes": 27,
                     "stored_files": 1, "duration_count": 1}

    final = await scrape(app)
    duration = final["upload_asgi_upload_duration_seconds"]
    assert duration.value("upload_asgi_upload_duration_seconds_count") == 9
    assert duration.value("upload_asgi_upload_duration_seconds_sum") > 0
    assert snapshot(final)["in_flight"] == 0


class HeldInProcess:
    """An upload fed to the app by hand: its first chunk, then held until released."""

    def __init__(self, app: Any, body: bytes, first: int, disconnect: bool = False) -> None:
        self.release = asyncio.Event()
        self.waiting = asyncio.Event()  # the app asked for the second chunk
        self.reply = Reply()
        chunks = [{"type": "http.request", "body": body[:first], "more_body": True}]

        async def receive() -> dict:
            if chunks:
                return chunks.pop()
            self.waiting.set()
            await self.release.wait()
            if disconnect:
                return {"type": "http.disconnect"}
            return {"type": "http.request", "body": body[first:], "more_body": False}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.start":
                self.reply.status = message["status"]
            elif message["type"] == "http.response.body":
                self.reply.body += message.get("body", b"")

        self.task = asyncio.create_task(app(http_scope("/upload", content_type=form_content_type()), receive, send))

    async def finish(self) -> Reply:
        self.release.set()
        await asyncio.wait_for(self.task, 10)
        return self.reply


async def test_health_and_metrics_count_uploads_in_flight(app, upload_dir):
    async def health() -> dict:
        reply = await call_app(app, http_scope("/health", method="GET"))
        assert reply.status == 200
        reply.check_length()
        return reply.json()

    idle = await health()
    assert idle["status"] == "ok" and idle["uploads_in_flight"] == 0
    assert 0 < idle["free_bytes"] <= shutil.disk_usage(upload_dir).total

    body = form_body([file_part(os.urandom(300_000))])
    first = HeldInProcess(app, body, 1000)
    second = HeldInProcess(app, body, 150_000, disconnect=True)
    await asyncio.wait_for(first.waiting.wait(), 10)
    await asyncio.wait_for(second.waiting.wait(), 10)
    assert (await health())["uploads_in_flight"] == 2
    assert snapshot(await scrape(app))["in_flight"] == 2

    assert (await first.finish()).status == 201
    assert (await health())["uploads_in_flight"] == 1
    assert (await second.finish()).status is None  # disconnected: no answer
    assert (await health())["uploads_in_flight"] == 0
    values = snapshot(await scrape(app))
    assert (values["uploads.stored"], values["uploads.disconnected"], values["in_flight"]) == (1, 1, 0)


# -- through hypercorn ------------------------------------------------------------------------


@pytest.mark.slow
def test_health_and_metrics_through_hypercorn_with_an_upload_held_open(upload_dir):
    env = {"UPLOAD_FSYNC": "0", "UPLOAD_MAX_REQUEST_SIZE": "8M"}
    with Server(upload_dir, env=env) as server, server.client() as client:

        def values() -> dict[str, float]:
            response = client.get("/metrics")
            assert response.status_code == 200
            return snapshot(parse_exposition(response.text))

        start = values()
        data = os.urandom(2_000_000)
        body = form_body([file_part(data)])
        head = (
            "POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: {form_content_type()}\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode()
        sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
        try:
            sock.sendall(head + body[:1_500_000])  # more than one 1 MiB block
            deadline = time.monotonic() + 20
            while client.get("/health").json()["uploads_in_flight"] != 1:
                assert time.monotonic() < deadline, "the held upload never showed as in flight"
                time.sleep(0.05)
            health = client.get("/health").json()
            assert health["status"] == "ok"
            assert 0 < health["free_bytes"] <= shutil.disk_usage(upload_dir).total
            assert values()["in_flight"] == 1
            while not any((upload_dir / ".partial").iterdir()):  # it is being written
                assert time.monotonic() < deadline, "the held upload's first block never reached the disk"
                time.sleep(0.05)
        finally:
            sock.close()  # the client goes away mid-upload

        deadline = time.monotonic() + 20
        while (now := values())["in_flight"] != 0:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert_nothing_stored(upload_dir)

        stored = client.post("/upload", files={"file": ("ok.bin", data)})
        assert stored.status_code == 201
        too_large = client.post("/upload", files={"file": ("big.bin", os.urandom(9 * 1024 * 1024))})
        assert too_large.status_code == 413
        end = values()

    delta = moved(start, end)
    received_disconnect = moved(start, now)["received"]
    assert 0 < received_disconnect <= len(body)
    assert delta.pop("uploads.stored") == 1
    assert delta.pop("uploads.disconnected") == 1
    assert delta.pop("uploads.rejected") == 1  # the 413, refused by its Content-Length
    assert delta.pop("stored_files") == 1
    assert delta.pop("stored_bytes") == len(data)
    assert delta.pop("duration_count") == 3
    assert delta.pop("received") > len(data)
    assert delta == {}


# -- several workers (issue 11): every scrape shows every worker's totals -----------------------


def scrapes_by_worker(server: Server, client: httpx.Client, want_workers: int, most: int = 80) -> dict[str, list]:
    """Scrape on new connections until `want_workers` different workers have answered."""
    seen: dict[str, list] = {}
    for _ in range(most):
        response = client.get("/metrics", headers={"connection": "close"})
        assert response.status_code == 200
        worker = None
        deadline = time.monotonic() + 10
        while worker is None:  # hypercorn writes the access line once the answer is out
            lines = re.findall(r"<(\d+)> GET /metrics 200$", server.log(), re.MULTILINE)
            if len(lines) > sum(len(v) for v in seen.values()):
                worker = lines[-1]
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.02)
        seen.setdefault(worker, []).append(snapshot(parse_exposition(response.text)))
        if len(seen) >= want_workers:
            break
    return seen


@pytest.mark.slow
def test_every_scrape_shows_the_totals_of_all_workers(upload_dir):
    args = ["-w", "2", "--access-logfile", "-", "--access-logformat", "%(p)s %(m)s %(U)s %(s)s"]
    blobs = [os.urandom(100_000 + i) for i in range(6)]
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}, args=args) as server, server.client() as client:
        deadline = time.monotonic() + 30
        while len(set(re.findall(r"\[(\d+)\] \[INFO\] Running on", server.log()))) < 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        for i, data in enumerate(blobs):
            body = form_body([file_part(data, f"{i}.bin")])
            headers = {"content-type": form_content_type(), "connection": "close"}
            assert client.post("/upload", content=body, headers=headers).status_code == 201
        assert client.post("/upload", content=b"x", headers={"content-type": "text/plain"}).status_code == 415
        seen = scrapes_by_worker(server, client, want_workers=2)
    assert len(seen) == 2, f"one worker answered every scrape: {list(seen)}"
    expected = {
        "uploads.stored": 6, "uploads.rejected": 1, "uploads.failed": 0, "uploads.disconnected": 0,
        "stored_files": 6, "stored_bytes": sum(map(len, blobs)), "in_flight": 0, "duration_count": 7,
    }
    for worker, snapshots in seen.items():
        for values in snapshots:
            assert {k: values[k] for k in expected} == expected, worker
            assert values["received"] > sum(map(len, blobs))


def test_the_run_directory_is_private_and_dead_runs_go(tmp_path, monkeypatch):
    from upload_service import metricsdir as metrics

    dead = subprocess_pid_that_exited()
    old_run = tmp_path / f"{metrics.RUN_DIR_PREFIX}{dead}-1"
    old_run.mkdir()
    (old_run / "counter_1.db").write_bytes(b"")
    live_run = tmp_path / f"{metrics.RUN_DIR_PREFIX}{os.getpid()}-1"
    live_run.mkdir()
    metrics.remove_dead_runs(tmp_path)
    assert not old_run.exists() and live_run.exists()

    shared = tmp_path / "open-to-all"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(OSError, match="not a private directory"):
        metrics.make_private_dir(shared)
    link = tmp_path / "link"
    link.symlink_to(live_run)
    with pytest.raises(OSError, match="not a private directory"):
        metrics.make_private_dir(link)
    metrics.make_private_dir(tmp_path / "mine")
    assert (tmp_path / "mine").stat().st_mode & 0o777 == 0o700


def test_a_single_process_keeps_plain_counters(monkeypatch):
    from upload_service import metricsdir

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    assert metricsdir.shared_dir() is None
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "/somewhere")
    assert metricsdir.shared_dir() == metricsdir.SharedDir("/somewhere", ours=False)  # the operator's: never folded


# -- the files of exited workers, folded -------------------------------------------------

WORKER = """
import sys
from upload_service.metrics import Metrics
from upload_service.metricsdir import SharedDir
metrics = Metrics(SharedDir(sys.argv[1], ours=False))
metrics.observe("stored", 0.2)
metrics.observe("stored", 3.0)
metrics.files_stored += 2
metrics.bytes_stored += int(sys.argv[2])
metrics.bytes_received += int(sys.argv[2]) + 10
"""


def worker_that_exited(path, stored_bytes: int) -> None:
    """A worker process that stored two files, writing its series to `path`, and exited."""
    subprocess.run([sys.executable, "-c", WORKER, str(path), str(stored_bytes)], cwd=ROOT, check=True)


def scraped(path) -> str:
    from prometheus_client import CollectorRegistry, generate_latest
    from prometheus_client.multiprocess import MultiProcessCollector

    registry = CollectorRegistry()
    MultiProcessCollector(registry, str(path))
    return generate_latest(registry).decode()


def folded_kinds(path) -> set[str]:
    """The counter and histogram files in `path` (gauges are not folded)."""
    return {f.name for f in path.glob("*.db") if not f.name.startswith("gauge_")}


def test_the_files_of_exited_workers_fold_into_one_archive_per_kind(tmp_path):
    shared = SharedDir(str(tmp_path), ours=True)
    for stored_bytes in (100, 200, 300):
        worker_that_exited(tmp_path, stored_bytes)
    live = tmp_path / f"counter_{os.getpid()}.db"  # a worker still running: its file stays its own
    shutil.copy(next(tmp_path.glob("counter_*.db")), live)
    before = scraped(tmp_path)
    shared.fold_exited_workers()
    assert sorted(scraped(tmp_path).splitlines()) == sorted(before.splitlines())
    assert folded_kinds(tmp_path) == {"counter_archive-1.db", "histogram_archive-1.db", live.name}
    live.unlink()
    worker_that_exited(tmp_path, 400)
    shared.fold_exited_workers()
    assert folded_kinds(tmp_path) == {"counter_archive-2.db", "histogram_archive-2.db"}
    values = snapshot(parse_exposition(scraped(tmp_path)))
    assert values["uploads.stored"] == 8 and values["stored_files"] == 8 and values["duration_count"] == 8
    assert values["stored_bytes"] == 1000 and values["received"] == 1040


@pytest.mark.parametrize("cut", ["before the new archive", "after the new archive"])
def test_a_fold_cut_short_is_undone_or_finished_by_the_next(tmp_path, cut):
    shared = SharedDir(str(tmp_path), ours=True)
    worker_that_exited(tmp_path, 100)
    shared.fold_exited_workers()
    worker_that_exited(tmp_path, 200)
    worker_that_exited(tmp_path, 300)
    expected = sorted(scraped(tmp_path).splitlines())
    # The second fold of counters, cut short: the files moved aside, the new archive in or not.
    exited = [f for f in tmp_path.glob("counter_*.db") if "archive" not in f.name]
    staging = tmp_path / ".folding-counter-2"
    staging.mkdir()
    if cut == "after the new archive":
        write_values(tmp_path / "counter_archive-2.db", summed([tmp_path / "counter_archive-1.db", *exited]))
    else:
        (tmp_path / ".counter_archive-2.tmp").write_bytes(b"half")
    for file in exited:
        file.rename(staging / file.name)
    shared.fold_exited_workers()
    assert sorted(scraped(tmp_path).splitlines()) == expected
    assert folded_kinds(tmp_path) == {"counter_archive-2.db", "histogram_archive-2.db"}
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == [".lock"]


def test_a_fold_waits_for_a_scrape_that_is_reading(tmp_path):
    shared = SharedDir(str(tmp_path), ours=True)
    worker_that_exited(tmp_path, 100)
    unfolded = folded_kinds(tmp_path)
    with shared.reading():
        folding = threading.Thread(target=shared.fold_exited_workers)
        folding.start()
        folding.join(0.5)
        assert folding.is_alive() and folded_kinds(tmp_path) == unfolded
    folding.join(10)
    assert folded_kinds(tmp_path) == {"counter_archive-1.db", "histogram_archive-1.db"}


def test_an_unreadable_file_of_an_exited_worker_is_set_aside_not_a_failed_start(tmp_path):
    """A worker killed as it made its file leaves it empty or torn: prometheus-client cannot read it
    (a scrape failed on it for good, and a fold that raised stopped the next worker's start)."""
    shared = SharedDir(str(tmp_path), ours=True)
    worker_that_exited(tmp_path, 100)
    good = scraped(tmp_path)
    dead = subprocess_pid_that_exited()
    (tmp_path / f"counter_{dead}.db").write_bytes(b"")
    (tmp_path / f"histogram_{dead}.db").write_bytes(b"\xff\xff\x00\x00" + bytes(60))  # says more than it holds
    shared.fold_exited_workers()
    assert folded_kinds(tmp_path) == {"counter_archive-1.db", "histogram_archive-1.db"}
    assert {p.name for p in tmp_path.glob("*.unreadable")} == {f".counter_{dead}.db.unreadable", f".histogram_{dead}.db.unreadable"}
    assert sorted(scraped(tmp_path).splitlines()) == sorted(good.splitlines())


def test_a_lock_held_by_a_stopped_process_delays_a_scrape_or_a_fold_a_moment_only(tmp_path, monkeypatch):
    """A process stopped while it holds the lock (SIGSTOP, a debugger) froze every scrape and held
    the next worker's start: a scrape now waits SCRAPE_LOCK_WAIT_SECONDS (50 ms) and reads without
    the lock, a fold waits LOCK_WAIT_SECONDS and is left for later."""
    import fcntl

    from upload_service import metricsdir

    monkeypatch.setattr(metricsdir, "LOCK_WAIT_SECONDS", 0.3)
    shared = SharedDir(str(tmp_path), ours=True)
    worker_that_exited(tmp_path, 100)
    unfolded = folded_kinds(tmp_path)
    with open(tmp_path / ".lock", "ab") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX)
        started = time.monotonic()
        with shared.reading():
            pass
        assert time.monotonic() - started < 0.5
        assert shared.fold_exited_workers(wait=metricsdir.LOCK_WAIT_SECONDS) is False
        assert time.monotonic() - started < 2
    assert folded_kinds(tmp_path) == unfolded
    shutil.rmtree(tmp_path)
    with shared.reading():  # the directory gone (a tmp cleaner): a scrape still answers
        pass


def test_a_scrape_folds_the_files_of_workers_gone_since_the_last_start(tmp_path):
    """An unreadable file of an exited worker (killed as it made it) failed every scrape until a
    worker started (under uvicorn --workers 2, for good): a scrape folds exited workers first."""
    from upload_service.metricsdir import forget_dead_workers

    worker_that_exited(tmp_path, 100)
    forget_dead_workers(str(tmp_path))  # its in-flight gauge: a scrape drops it first anyway
    good = scraped(tmp_path)
    (tmp_path / f"counter_{subprocess_pid_that_exited()}.db").write_bytes(b"")
    with pytest.raises(Exception):
        scraped(tmp_path)
    SharedDir(str(tmp_path), ours=True).before_scrape()  # what Metrics.exposition does first
    assert sorted(scraped(tmp_path).splitlines()) == sorted(good.splitlines())
    assert folded_kinds(tmp_path) == {"counter_archive-1.db", "histogram_archive-1.db"}


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.mark.slow
def test_totals_survive_worker_restarts(upload_dir):
    # --max-requests 2: a worker is replaced after its third to fifth request (hypercorn 0.18
    # takes the jitter from --max-requests, not --max-requests-jitter), so 12 uploads on two
    # workers restart one at least; the counts of the workers that left stay in every later scrape.
    uploads = 12
    args = ["-w", "2", "--max-requests", "2", "--max-requests-jitter", "0"]
    with Server(upload_dir, env={"UPLOAD_FSYNC": "0"}, args=args) as server:
        deadline = time.monotonic() + 30
        while len(set(re.findall(r"\[(\d+)\] \[INFO\] Running on", server.log()))) < 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        first_workers = set(server.pids()[1:])
        for i in range(uploads):
            with server.client() as client:  # a connection per upload: any worker may take it
                body = form_body([file_part(b"x" * (1000 + i), f"{i}.bin")])
                reply = client.post("/upload", content=body,
                                    headers={"content-type": form_content_type(), "connection": "close"})
                assert reply.status_code == 201, reply.text
        deadline = time.monotonic() + 30
        while not set(server.pids()[1:]) - first_workers:
            assert time.monotonic() < deadline, "no worker was restarted"
            time.sleep(0.05)
        with server.client() as client:
            values = snapshot(parse_exposition(client.get("/metrics", headers={"connection": "close"}).text))
        # The workers that left are folded into one archive as the next starts: the files stay few.
        run_dir, = Path(tempfile.gettempdir()).glob(f"upload-asgi-metrics-{server.proc.pid}-*")
        deadline = time.monotonic() + 30
        while unfolded_workers(run_dir, alive=set(server.pids()[1:])) > 1 or not list(run_dir.glob("counter_archive-*.db")):
            assert time.monotonic() < deadline, os.listdir(run_dir)
            time.sleep(0.05)
    assert values["uploads.stored"] == uploads and values["stored_files"] == uploads
    assert values["stored_bytes"] == sum(1000 + i for i in range(uploads))
    assert values["in_flight"] == 0


def unfolded_workers(run_dir: Path, alive: set[int]) -> int:
    """Counter files of workers that exited (a worker that starts folds them)."""
    pids = [int(name[len("counter_"):-3]) for name in os.listdir(run_dir) if re.fullmatch(r"counter_\d+\.db", name)]
    return len([pid for pid in pids if pid not in alive])

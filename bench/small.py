"""Many small uploads: uploads per second over keep-alive connections.

Three workloads: 16 KiB files one client at a time, 16 KiB files 16 clients at a
time, 1 MiB files 16 at a time. Each client holds one keep-alive connection and
sends the next upload as soon as the last answer came (reconnecting only if the
server closes). For a fixed time per run, under each ASGI server asked for:
upload-asgi with `UPLOAD_FSYNC=0` and with `UPLOAD_FSYNC=1`, Starlette's
`request.form()` app under the same server, aiohttp.web on its own server, and the
floor: `bench.apps:commit_app` (SPEC §4's commit of the file alone, no parsing)
under the same server; runs interleaved. Every answer is checked (201, size, SHA-256).

The client is asyncio on uvloop over raw streams: the request (head and body) is
built once and written whole; the answer's head is parsed by hand and its JSON
checked. It runs in the bench's own process, apart from every server; its CPU
share is recorded (`client_cpu_share`: CPU seconds per second of the run).

    python -m bench.small [--quick] [--servers hypercorn,uvicorn] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import resource
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import payloads, report
from bench.payloads import KiB, MiB
from bench.report import Figure, progress
from bench.server import Peer, Subject, run_part_alone, server_env
from bench.servers import ASGI_SERVERS, Server, empty_dir

try:
    import uvloop
except ImportError:  # pragma: no cover - the bench extra installs it (uvicorn[standard])
    uvloop = None

# name, file size, clients at a time
WORKLOADS = (("16KiB.c1", 16 * KiB, 1), ("16KiB.c16", 16 * KiB, 16), ("1MiB.c16", 1 * MiB, 16))


@dataclass
class Load:
    """One workload's request, built once, and what its answers must say."""

    size: int
    clients: int
    request: bytes
    sha256: str

    @classmethod
    def build(cls, size: int, clients: int) -> Load:
        data = payloads.random_bytes(size, seed=payloads.SEED + size)
        body = payloads.file_form(data)
        head = (f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Content-Type: {payloads.CONTENT_TYPE}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
        return cls(size, clients, head + body, hashlib.sha256(data).hexdigest())


@dataclass
class Tally:
    done: int = 0
    reconnects: int = 0
    last: float = 0.0
    bad: list[str] = field(default_factory=list)


def parse_head(head: bytes) -> tuple[int, int, bool]:
    """Status, Content-Length, and whether the server will close the connection."""
    lines = head.split(b"\r\n")
    status = int(lines[0].split()[1])
    length, close = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"connection" and value.strip().lower() == b"close":
            close = True
    return status, length, close


async def one_client(port: int, load: Load, deadline: float, tally: Tally) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < deadline and not tally.bad:
            writer.write(load.request)
            await writer.drain()
            status, length, close = parse_head(await reader.readuntil(b"\r\n\r\n"))
            body = await reader.readexactly(length)
            record = json.loads(body) if status == 201 else {}
            if record.get("size") != load.size or record.get("sha256") != load.sha256:
                tally.bad.append(f"{status} {body[:200]!r}")
                return
            tally.done += 1
            tally.last = time.perf_counter()
            if close:
                writer.close()
                tally.reconnects += 1
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
    finally:
        writer.close()


async def drive(port: int, load: Load, seconds: float) -> tuple[Tally, float]:
    tally = Tally()
    started = time.perf_counter()
    await asyncio.gather(*(one_client(port, load, started + seconds, tally) for _ in range(load.clients)))
    return tally, started


def new_loop() -> asyncio.AbstractEventLoop:
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


@dataclass
class Rate:
    per_s: float
    cpu_ms_per_upload: float  # the server's
    client_cpu_share: float
    reconnects: int


def measure(server: Server, load: Load, seconds: float) -> Rate:
    """Uploads per second from the first request to the last answer; every answer checked."""
    cpu = server.cpu_seconds()
    client = resource.getrusage(resource.RUSAGE_SELF)
    loop = new_loop()
    try:
        tally, started = loop.run_until_complete(drive(server.port, load, seconds))
    finally:
        loop.close()
    used = resource.getrusage(resource.RUSAGE_SELF)
    cpu = server.cpu_seconds() - cpu
    if tally.bad or not tally.done:
        raise RuntimeError(f"{server}: a small upload was not stored intact: {tally.bad[:1]}")
    wall = tally.last - started
    client_cpu = used.ru_utime + used.ru_stime - client.ru_utime - client.ru_stime
    return Rate(tally.done / wall, cpu * 1000 / tally.done, client_cpu / wall, tally.reconnects)


@dataclass
class Contenders:
    kind: str
    fsync_off: Subject
    fsync_on: Subject
    starlette: Server
    aiohttp: Peer
    commit: Server
    commit_dir: Path

    def runs(self) -> list[tuple[str, Server, Path | None]]:
        return [
            ("fsync_off", self.fsync_off.server, self.fsync_off.upload_dir),
            ("starlette", self.starlette, None),
            ("fsync_on", self.fsync_on.server, self.fsync_on.upload_dir),
            ("aiohttp", self.aiohttp.server, self.aiohttp.store_dir),
            ("commit", self.commit, self.commit_dir),
        ]

    def empty_stores(self) -> None:
        for _who, _server, store in self.runs():
            if store is not None:
                empty_dir(store)


def bench_kind(kind: str, seconds: float, repeats: int, settle: float, workdir: Path, env: dict[str, str],
               args: tuple[str, ...]) -> list[Figure]:
    tmp = workdir / f"small-starlette-{kind}"
    tmp.mkdir()
    commit_dir = workdir / f"small-commit-{kind}"
    commit_dir.mkdir()
    c = Contenders(
        kind,
        Subject(workdir, f"small-off-{kind}", env=env, args=args, kind=kind, fsync=False),
        Subject(workdir, f"small-on-{kind}", env=env, args=args, kind=kind, fsync=True),
        Server("bench.apps:starlette_app", workdir, env={**env, "TMPDIR": str(tmp)}, args=args, kind=kind),
        Peer(workdir, f"small-{kind}", env),
        Server("bench.apps:commit_app", workdir, env={**env, "STORE_DIR": str(commit_dir)}, args=args, kind=kind),
        commit_dir,
    )
    figures = []
    with c.fsync_off.server, c.fsync_on.server, c.starlette, c.aiohttp.server, c.commit:
        for name, size, clients in WORKLOADS:
            # What a workload stored stays until it is over: deleting thousands of files
            # slows every file creation here for 20-90 s after (bench/README, noise).
            c.empty_stores()
            waited = settle_file_system(workdir, settle)
            progress(f"small {kind} {name}: the file system settled in {waited:.0f} s")
            load = Load.build(size, clients)
            # Warm up, unmeasured, each for as long as a run: for ~3-6 s after the settle wait,
            # files are still created slowly, and with a short warm-up the first contender of the
            # first run paid for it (4x fewer uploads/s, whichever app it was; bench/README).
            for _who, server, _store in c.runs():
                measure(server, load, seconds)
            figures += bench_workload(c, name, load, seconds, repeats)
        c.empty_stores()
    return figures


def settle_file_system(workdir: Path, most: float) -> float:
    """After many files are deleted, creating a file here costs 0.3-0.9 ms instead of ~0.03
    for 20-90 s, from a second or two after the deletes (bench/README, noise). Wait until that
    is over: two probes in a row under 0.1 ms a file, at most `most` s; return the seconds."""
    probe = workdir / "settle-probe"
    probe.mkdir(exist_ok=True)
    data = bytes(16 * 1024)
    started = time.monotonic()
    os.sync()
    time.sleep(min(most, 3.0))
    calm = 0
    while time.monotonic() - started < most and calm < 2:
        before = time.perf_counter()
        for i in range(500):
            (probe / str(i)).write_bytes(data)
        calm = calm + 1 if (time.perf_counter() - before) / 500 < 0.0001 else 0
        empty_dir(probe)  # files never flushed: deleting them leaves nothing to slow what follows
        time.sleep(1)
    return time.monotonic() - started


def bench_workload(c: Contenders, name: str, load: Load, seconds: float, repeats: int) -> list[Figure]:
    size = report.size_text(load.size)
    where = f"{load.clients} at a time, keep-alive, under {c.kind}"

    def figure(key: str, what: str, ceiling: str) -> Figure:
        return Figure(f"small.{c.kind}.{name}.{key}", f"{what}, {size} files {where}", ceiling, load.size,
                      target=1.0 if key.endswith(("vs_starlette", "vs_aiohttp")) else None, unit="uploads/s")

    figures = {
        f"{fsync}.{peer}": figure(f"{fsync}.{peer}", f"upload-asgi UPLOAD_FSYNC={int(fsync == 'fsync_on')}",
                                  "Starlette request.form()" if peer == "vs_starlette" else "aiohttp.web")
        for fsync in ("fsync_off", "fsync_on") for peer in ("vs_starlette", "vs_aiohttp")
    }
    figures["fsync_cost"] = figure("fsync_cost", "upload-asgi UPLOAD_FSYNC=1", "upload-asgi UPLOAD_FSYNC=0")
    figures["fsync_off.vs_commit"] = figure("fsync_off.vs_commit", "upload-asgi UPLOAD_FSYNC=0",
                                            "the commit alone (bench.apps:commit_app)")
    rates: dict[str, list[Rate]] = {}
    for run in range(repeats):
        runs = c.runs()
        seen: dict[str, Rate] = {}
        for who, server, _store in (runs if run % 2 == 0 else reversed(runs)):
            seen[who] = measure(server, load, seconds)
            rates.setdefault(who, []).append(seen[who])
        for fsync in ("fsync_off", "fsync_on"):
            figures[f"{fsync}.vs_starlette"].add(seen[fsync].per_s, seen["starlette"].per_s)
            figures[f"{fsync}.vs_aiohttp"].add(seen[fsync].per_s, seen["aiohttp"].per_s)
        figures["fsync_cost"].add(seen["fsync_on"].per_s, seen["fsync_off"].per_s)
        figures["fsync_off.vs_commit"].add(seen["fsync_off"].per_s, seen["commit"].per_s)
        progress(f"small {c.kind} {name} run {run + 1}/{repeats}: uploads/s upload-asgi "
                 f"{seen['fsync_off'].per_s:.0f} (fsync {seen['fsync_on'].per_s:.0f}), "
                 f"Starlette {seen['starlette'].per_s:.0f}, aiohttp.web {seen['aiohttp'].per_s:.0f}, "
                 f"the commit alone {seen['commit'].per_s:.0f}")

    def median(who: str, what: str) -> float:
        values = sorted(getattr(r, what) for r in rates[who])
        return round(values[len(values) // 2], 2)

    peer_of = {"vs_starlette": "starlette", "vs_aiohttp": "aiohttp", "vs_commit": "commit"}
    for key, fig in figures.items():
        who, _, peer = key.partition(".") if key != "fsync_cost" else ("fsync_on", "", "")
        fig.extra["cpu_ms_per_upload"] = median(who, "cpu_ms_per_upload")
        reference = peer_of.get(peer, "fsync_off")
        fig.extra["ceiling_cpu_ms_per_upload"] = median(reference, "cpu_ms_per_upload")
        fig.extra["client_cpu_share"] = median(who, "client_cpu_share")
        fig.extra["reconnects"] = sum(r.reconnects for r in rates[who])
    return list(figures.values())


QUICK = {"seconds": 0.3, "repeats": 1, "settle": 0.0}
FULL = {"seconds": 2.5, "repeats": 3, "settle": 90.0}


def run(quick: bool, workdir: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
        servers: tuple[str, ...] = ASGI_SERVERS) -> list[Figure]:
    plan = QUICK if quick else FULL
    figures = []
    for kind in servers:
        figures += bench_kind(kind, plan["seconds"], plan["repeats"], plan["settle"], workdir, env or {}, args)
    return figures


def main(argv: list[str] | None = None) -> int:
    def run_part(args: argparse.Namespace, workdir: Path) -> tuple[list[Figure], dict[str, str]]:
        env = server_env(args.server_env)
        return run(args.quick, workdir, env, tuple(args.server_arg), args.servers), {}

    return run_part_alone("python -m bench.small", __doc__, run_part, argv)


if __name__ == "__main__":
    sys.exit(main())

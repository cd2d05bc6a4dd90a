"""Through real servers on loopback, with a raw-socket client (bench/client.py).

Scenario 3: one upload at a time, `Content-Length` and chunked, of a medium and a
large body (100 MiB and 1 GiB; `--quick`: 8 and 32 MiB), to upload-asgi under each
ASGI server asked for (`--servers`: hypercorn, uvicorn, granian), against, under
the same server in the same run: the drain-only app (the server's own ceiling), the
store-only app (SHA-256 + write of the body, no parsing: what hashing and storing
cost, the limit for any endpoint that must do both) and Starlette's
`await request.form()`; and aiohttp.web's multipart reader on aiohttp's own server
(bench/aiohttp_app.py), interleaved in the same run. The server's peak RSS (VmHWM)
after a 1 MiB upload and after the large ones, and its CPU seconds per GB.

Scenario 4: 8 and 32 simultaneous 50 MiB uploads under hypercorn, aggregate MB/s,
every stored SHA-256 checked, against one upload of the same size on the same
server; with one worker and with `-w 2`.

    python -m bench.server [--quick] [--servers hypercorn,uvicorn] [--json PATH]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench import payloads, report
from bench.client import Answer, check_drained, check_stored, send_upload
from bench.payloads import MiB, Upload
from bench.report import Figure, mbps, progress
from bench.servers import ASGI_SERVERS, Server, empty_dir


class Subject:
    """The upload app under `kind`, its upload dir emptied after each run."""

    def __init__(self, workdir: Path, name: str, workers: int = 1, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = (), kind: str = "hypercorn", fsync: bool = False) -> None:
        self.upload_dir = workdir / f"uploads-{name}"
        self.server = Server(
            "upload_asgi:app", workdir, workers=workers, args=args, kind=kind,
            # The peers log nothing per request (access logs are off for every server), so
            # neither do we: our per-upload INFO line costs ~5% of a small upload's CPU.
            env={"UPLOAD_DIR": str(self.upload_dir), "UPLOAD_FSYNC": "1" if fsync else "0",
                 "UPLOAD_LOG_LEVEL": "warning", **(env or {})},
        )

    def upload(self, upload: Upload, chunked: bool = False) -> Answer:
        answer = send_upload(self.server.port, upload, chunked)
        intact = check_stored(answer, upload)
        empty_dir(self.upload_dir)
        if not intact:
            raise RuntimeError(f"upload-asgi did not store the upload intact: {answer.status} {answer.body[:300]!r}")
        return answer


class Peer:
    """aiohttp.web on its own server, its store dir emptied after each run."""

    def __init__(self, workdir: Path, name: str, env: dict[str, str] | None = None) -> None:
        self.store_dir = workdir / f"aiohttp-{name}"
        self.store_dir.mkdir(exist_ok=True)
        self.server = Server("bench.aiohttp_app", workdir, kind="aiohttp",
                             env={**(env or {}), "STORE_DIR": str(self.store_dir)})

    def upload(self, upload: Upload) -> Answer:
        answer = send_upload(self.server.port, upload)
        empty_dir(self.store_dir)
        if not check_stored(answer, upload):
            raise RuntimeError(f"aiohttp.web did not store the upload intact: {answer.status} {answer.body[:300]!r}")
        return answer


@dataclass
class Usage:
    cpu: float  # server CPU seconds per GB of body
    waiting: float  # seconds the server's threads waited for a CPU, per second of upload


def timed(server: Server, send: Callable[[], Answer], nbytes: int) -> tuple[Answer, Usage]:
    """Run `send()`; return its answer and what it cost the server."""
    cpu, waited = server.cpu_seconds(), server.runqueue_wait()
    answer = send()
    cpu, waited = server.cpu_seconds() - cpu, server.runqueue_wait() - waited
    return answer, Usage(cpu / (nbytes / 1e9), waited / answer.seconds)


# -- scenario 3: one upload at a time ----------------------------------------------


@dataclass
class Apps:
    """Everything one server kind runs in scenario 3, plus the aiohttp peer."""

    kind: str
    subject: Subject
    drain: Server
    store: Server
    starlette: Server
    aiohttp: Peer


def bench_single(kind: str, sizes: dict[str, int], repeats: dict[str, int], workdir: Path,
                 env: dict[str, str], args: tuple[str, ...]) -> list[Figure]:
    starlette_tmp = workdir / f"starlette-tmp-{kind}"
    starlette_tmp.mkdir()
    store_dir = workdir / f"store-only-{kind}"
    store_dir.mkdir()
    apps = Apps(
        kind,
        Subject(workdir, f"single-{kind}", env=env, args=args, kind=kind),
        Server("bench.apps:drain_app", workdir, env=env, args=args, kind=kind),
        Server("bench.apps:store_app", workdir, env={**env, "STORE_DIR": str(store_dir)}, args=args, kind=kind),
        Server("bench.apps:starlette_app", workdir, env={**env, "TMPDIR": str(starlette_tmp)}, args=args, kind=kind),
        Peer(workdir, f"single-{kind}", env),
    )
    figures = []
    with apps.subject.server, apps.drain, apps.store, apps.starlette, apps.aiohttp.server:
        apps.subject.upload(payloads.upload(1 * MiB))
        rss_small = apps.subject.server.peak_rss_mib()
        block = payloads.random_bytes(payloads.BLOCK_SIZE)
        for role, size in sizes.items():
            upload = payloads.upload(size, block)
            upload.sha256, upload.body_sha256  # computed before any clock starts
            if role == "medium":  # warm every server up, unmeasured
                for _who, _server, send in plan_runs(apps, upload):
                    send()
            figures += bench_size(role, upload, repeats[role], apps)
        rss_large = apps.subject.server.peak_rss_mib()
        large = next(f for f in figures if f.name == f"e2e.{kind}.large.content-length")
        large.extra["peak_rss_mib"] = round(rss_large, 1)
        large.extra["peak_rss_1MiB_mib"] = round(rss_small, 1)
        large.extra["peak_rss_growth_mib"] = round(rss_large - rss_small, 1)
        large.extra["drain_peak_rss_mib"] = round(apps.drain.peak_rss_mib(), 1)
        large.extra["starlette_peak_rss_mib"] = round(apps.starlette.peak_rss_mib(), 1)
        large.extra["aiohttp_peak_rss_mib"] = round(apps.aiohttp.server.peak_rss_mib(), 1)
        progress(f"upload-asgi under {kind} peak RSS: {rss_small:.1f} MiB after 1 MiB, "
                 f"{rss_large:.1f} MiB after the large uploads")
    return figures


Run = tuple[str, Server, Callable[[], Answer]]


def plan_runs(apps: Apps, upload: Upload) -> list[Run]:
    """One upload to each app, in the order of an even run (odd runs go backwards)."""
    def drained(server: Server, chunked: bool = False, hashed: bool = False) -> Callable[[], Answer]:
        def send() -> Answer:
            answer = send_upload(server.port, upload, chunked)
            if not check_drained(answer, upload, hashed=hashed):
                raise RuntimeError(f"{server} answered {answer.status} {answer.body[:200]!r}")
            return answer
        return send

    def stored(server: Server) -> Callable[[], Answer]:
        def send() -> Answer:
            answer = send_upload(server.port, upload)
            if not check_stored(answer, upload):
                raise RuntimeError(f"{server} answered {answer.status} {answer.body[:200]!r}")
            return answer
        return send

    return [
        ("drain", apps.drain, drained(apps.drain)),
        ("store", apps.store, drained(apps.store, hashed=True)),
        ("subject", apps.subject.server, lambda: apps.subject.upload(upload)),
        ("drain-chunked", apps.drain, drained(apps.drain, chunked=True)),
        ("subject-chunked", apps.subject.server, lambda: apps.subject.upload(upload, chunked=True)),
        ("starlette", apps.starlette, stored(apps.starlette)),
        ("aiohttp", apps.aiohttp.server, lambda: apps.aiohttp.upload(upload)),
    ]


def bench_size(role: str, upload: Upload, repeats: int, apps: Apps) -> list[Figure]:
    kind = apps.kind
    size = report.size_text(upload.size)
    default = kind == "hypercorn"  # SPEC §7's ratios to store-only and Starlette are hypercorn's

    def figure(name: str, what: str, ceiling: str, target: float | None = None) -> Figure:
        return Figure(f"e2e.{kind}.{role}.{name}", f"{what} under {kind}, {size}", ceiling, upload.body_length,
                      target=target)

    drain_what = f"drain-only app under {kind}"
    figures = {
        "content-length": figure("content-length", "upload-asgi, content-length", drain_what),
        "chunked": figure("chunked", "upload-asgi, chunked", f"{drain_what}, chunked"),
        "store-only": figure("store-only", "store-only app (SHA-256 + write, no parsing)", drain_what),
        "vs_store": figure("vs_store", "upload-asgi against the store-only app", "store-only app",
                           0.95 if default else None),
        "starlette": figure("starlette", "Starlette request.form() + SHA-256", drain_what),
        "vs_starlette": figure("vs_starlette", "upload-asgi against Starlette request.form()", "Starlette",
                               2.5 if default else None),
        "aiohttp": Figure(f"e2e.{kind}.{role}.aiohttp",
                          f"aiohttp.web multipart + SHA-256 + write on its own server, {size}",
                          drain_what, upload.body_length),
        "vs_aiohttp": figure("vs_aiohttp", "upload-asgi against aiohttp.web on its own server", "aiohttp.web"),
    }
    usage: dict[str, list[Usage]] = {}
    for run in range(repeats):
        seen: dict[str, float] = {}
        runs = plan_runs(apps, upload)
        for who, server, send in (runs if run % 2 == 0 else reversed(runs)):
            answer, cost = timed(server, send, upload.body_length)
            seen[who] = mbps(upload.body_length, answer.seconds)
            usage.setdefault(who, []).append(cost)
        figures["content-length"].add(seen["subject"], seen["drain"])
        figures["chunked"].add(seen["subject-chunked"], seen["drain-chunked"])
        figures["store-only"].add(seen["store"], seen["drain"])
        figures["vs_store"].add(seen["subject"], seen["store"])
        figures["starlette"].add(seen["starlette"], seen["drain"])
        figures["vs_starlette"].add(seen["subject"], seen["starlette"])
        figures["aiohttp"].add(seen["aiohttp"], seen["drain"])
        figures["vs_aiohttp"].add(seen["subject"], seen["aiohttp"])
        progress(
            f"e2e {kind} {role} {size} run {run + 1}/{repeats}: upload-asgi {seen['subject']:.0f} MB/s "
            f"(chunked {seen['subject-chunked']:.0f}), drain-only {seen['drain']:.0f} "
            f"(chunked {seen['drain-chunked']:.0f}), store-only {seen['store']:.0f}, "
            f"Starlette {seen['starlette']:.0f}, aiohttp.web {seen['aiohttp']:.0f}"
        )

    def median(who: str, what: str) -> float:
        return round(statistics.median(getattr(u, what) for u in usage[who]), 2)

    content_length = figures["content-length"]
    content_length.extra["cpu_s_per_gb"] = median("subject", "cpu")
    content_length.extra["ceiling_cpu_s_per_gb"] = median("drain", "cpu")
    content_length.extra["runqueue_wait_s_per_s"] = median("subject", "waiting")
    content_length.extra["ceiling_runqueue_wait_s_per_s"] = median("drain", "waiting")
    figures["store-only"].extra["cpu_s_per_gb"] = median("store", "cpu")
    figures["starlette"].extra["cpu_s_per_gb"] = median("starlette", "cpu")
    figures["aiohttp"].extra["cpu_s_per_gb"] = median("aiohttp", "cpu")
    return list(figures.values())


# -- scenario 4: many at once -------------------------------------------------------------


def bench_concurrency(size: int, counts: tuple[int, ...], repeats: int, workdir: Path,
                      env: dict[str, str], args: tuple[str, ...]) -> list[Figure]:
    upload = payloads.upload(size, payloads.random_bytes(payloads.BLOCK_SIZE, seed=payloads.SEED + 1))
    upload.sha256
    figures = []
    for workers in (1, 2):
        subject = Subject(workdir, f"w{workers}", workers=workers, env=env, args=args)
        with subject.server:
            subject.upload(payloads.upload(1 * MiB))
            for count in counts:
                figure = Figure(
                    f"concurrency.{count}.w{workers}",
                    f"{count} simultaneous uploads of {report.size_text(size)}, hypercorn -w {workers}, aggregate",
                    "one upload", upload.body_length * count,
                    target=(0.95 if workers == 1 else 1.0) if count == 32 else None,
                )
                intact = total = 0
                for run in range(repeats):
                    single = subject.upload(upload)
                    seconds, answers = upload_many(subject.server.port, upload, count)
                    total += count
                    intact += sum(check_stored(a, upload) for a in answers)
                    empty_dir(subject.upload_dir)
                    figure.add(mbps(upload.body_length * count, seconds), mbps(upload.body_length, single.seconds))
                    progress(
                        f"{figure.name} run {run + 1}/{repeats}: {figure.subject[-1]:.0f} MB/s aggregate, "
                        f"one upload {figure.ceiling[-1]:.0f} MB/s, intact {intact}/{total}"
                    )
                figure.extra["intact"] = f"{intact}/{total}"
                figure.extra["all_intact"] = intact == total
                figures.append(figure)
    return figures


def upload_many(port: int, upload: Upload, count: int) -> tuple[float, list[Answer]]:
    """Start `count` uploads together; return the wall seconds until the last answer."""
    start = threading.Barrier(count + 1)

    def one() -> Answer:
        start.wait()
        try:
            return send_upload(port, upload)
        except OSError as exc:
            return Answer(0, str(exc).encode(), 0.0)

    with ThreadPoolExecutor(max_workers=count) as pool:
        futures = [pool.submit(one) for _ in range(count)]
        start.wait()
        started = time.perf_counter()
        answers = [f.result() for f in futures]
        seconds = time.perf_counter() - started
    return seconds, answers


# -- running ----------------------------------------------------------------------------------


QUICK = {"sizes": {"medium": 8 * MiB, "large": 32 * MiB}, "repeats": {"medium": 2, "large": 2},
         "concurrent_size": 2 * MiB, "concurrent_repeats": 2}
FULL = {"sizes": {"medium": 100 * MiB, "large": 1024 * MiB}, "repeats": {"medium": 5, "large": 3},
        "concurrent_size": 50 * MiB, "concurrent_repeats": 3}


def run(quick: bool, workdir: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = (),
        servers: tuple[str, ...] = ASGI_SERVERS, sizes: tuple[str, ...] = ("medium", "large"),
        concurrency: bool = True) -> list[Figure]:
    """Scenario 3 under each of `servers`, then scenario 4 under hypercorn.

    `env` goes to every server alike (subject and references); `args` to every hypercorn.
    """
    plan = QUICK if quick else FULL
    env = env or {}
    chosen = {role: plan["sizes"][role] for role in sizes}
    if "large" not in chosen:  # the memory figures sit on the large upload
        raise ValueError("scenario 3 needs the large size")
    figures = []
    for kind in servers:
        figures += bench_single(kind, chosen, plan["repeats"], workdir, env, args)
    if concurrency:
        figures += bench_concurrency(plan["concurrent_size"], (8, 32), plan["concurrent_repeats"], workdir, env, args)
    return figures


def servers_option(text: str) -> tuple[str, ...]:
    chosen = tuple(s.strip() for s in text.split(",") if s.strip())
    unknown = [s for s in chosen if s not in ASGI_SERVERS]
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"servers are a comma-separated list of {', '.join(ASGI_SERVERS)}")
    return chosen


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--servers", type=servers_option, default=ASGI_SERVERS, metavar="LIST",
                        help=f"ASGI servers to run every server figure under (default: {','.join(ASGI_SERVERS)})")
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every server, e.g. MALLOC_TOP_PAD_=67108864 (repeatable)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="a hypercorn option for every hypercorn, e.g. --server-arg=--backlog=200 (repeatable)")


def server_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--server-env wants NAME=VALUE, not {pair!r}")
        env[name] = value
    return env


Part = Callable[[argparse.Namespace, Path], "tuple[list[Figure], dict[str, str]]"]


def run_part_alone(prog: str, doc: str, run_part: Part, argv: list[str] | None) -> int:
    """`main` of a bench part run on its own: options, a temp dir, the table, the JSON."""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small bodies, few runs")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    add_server_options(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="upload-asgi-bench-") as tmp:
        figures, skipped = run_part(args, Path(tmp))
    if figures:
        print(report.table(figures))
    for name, note in skipped.items():
        print(f"{name}: {note}")
    if args.json:
        report.write_json(args.json, figures, [], vars(args) | {"json": str(args.json), "skipped": skipped})
    return 0


def main(argv: list[str] | None = None) -> int:
    def run_part(args: argparse.Namespace, workdir: Path) -> tuple[list[Figure], dict[str, str]]:
        env = server_env(args.server_env)
        return run(args.quick, workdir, env, tuple(args.server_arg), args.servers), {}

    return run_part_alone("python -m bench.server", __doc__, run_part, argv)


if __name__ == "__main__":
    sys.exit(main())

"""Through hypercorn on loopback, with a raw-socket client.

Scenario 3: one upload at a time, `Content-Length` and chunked, of a medium and a
large body (100 MiB and 1 GiB; `--quick`: 8 and 32 MiB), to `hypercorn upload_asgi:app`,
against a drain-only app under the same hypercorn in the same run. The server's peak
RSS (VmHWM of the worker process) after a 1 MiB upload and after the large ones,
and its CPU seconds per GB (utime + stime of the worker, before and after). With
`Content-Length`, also a store-only app (SHA-256 + write of the body, no parsing):
what hashing and storing cost, and so what is left for the multipart reading.

Scenario 4: 8 and 32 simultaneous 50 MiB uploads, aggregate MB/s, every stored
SHA-256 checked, against one upload of the same size on the same server; with one
worker and with `-w 2`.

Scenario 5: Starlette's `await request.form()` + SHA-256 of the `UploadFile`, under
the same hypercorn, same run.

The client sends a pre-built head, then one pre-built block again and again with
`sendall` (chunked: the block framed once as a chunk), so that it costs the server
as little CPU as a client can: the two share this machine's cores.

    python -m bench.server [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import payloads, report
from bench.payloads import MiB, Upload
from bench.report import Figure, mbps, progress

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


# -- the client -------------------------------------------------------------------


@dataclass
class Answer:
    status: int
    body: bytes
    seconds: float

    def json(self) -> Any:
        return json.loads(self.body)


def request_head(port: int, length: int | None) -> bytes:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return (
        f"POST /upload HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
        f"Content-Type: {payloads.CONTENT_TYPE}\r\n{framing}\r\nConnection: close\r\n\r\n"
    ).encode()


def chunk(data: bytes) -> bytes:
    return b"%x\r\n" % len(data) + data + b"\r\n"


_FRAMED: dict[int, bytes] = {}


def framed_block(block: bytes) -> bytes:
    """The block as one HTTP chunk, built once per block."""
    if id(block) not in _FRAMED:
        _FRAMED[id(block)] = chunk(block)
    return _FRAMED[id(block)]


def send_upload(port: int, upload: Upload, chunked: bool = False, timeout: float = 600.0) -> Answer:
    """POST the upload on a new connection; return the answer and the seconds it took."""
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        try:
            if chunked:
                sock.sendall(request_head(port, None) + chunk(upload.head))
                block = framed_block(upload.block)
                for _ in range(upload.repeats):
                    sock.sendall(block)
                sock.sendall(chunk(upload.tail) + b"0\r\n\r\n")
            else:
                sock.sendall(request_head(port, upload.body_length) + upload.head)
                for _ in range(upload.repeats):
                    sock.sendall(upload.block)
                sock.sendall(upload.tail)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered early; read what it said
        status, body = read_answer(sock)
    return Answer(status, body, time.perf_counter() - started)


def read_answer(sock: socket.socket) -> tuple[int, bytes]:
    data = b""
    while b"\r\n\r\n" not in data:
        received = sock.recv(65536)
        if not received:
            raise ConnectionError(f"the server closed the connection without an answer: {data[:200]!r}")
        data += received
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    length = next((int(v) for k, _, v in (l.partition(":") for l in lines[1:]) if k.lower() == "content-length"), None)
    while length is None or len(body) < length:
        received = sock.recv(65536)
        if not received:
            break
        body += received
    return status, body


def check_stored(answer: Answer, upload: Upload) -> bool:
    """The upload app stored exactly what was sent."""
    if answer.status != 201:
        return False
    record = answer.json()
    return record["size"] == upload.size and record["sha256"] == upload.sha256


def check_drained(answer: Answer, upload: Upload, hashed: bool = False) -> bool:
    """The drain-only (or, `hashed`, the store-only) app read the whole body."""
    if answer.status != 200:
        return False
    record = answer.json()
    return record["received"] == upload.body_length and (not hashed or record["sha256"] == upload.body_sha256)


# -- the server -------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Hypercorn:
    """`hypercorn APP` in a subprocess on a free loopback port; its workers measured through /proc."""

    def __init__(self, app: str, workdir: Path, env: dict[str, str] | None = None, workers: int = 1,
                 args: tuple[str, ...] = ()) -> None:
        self.app = app
        self.port = free_port()
        self.cmd = [sys.executable, "-m", "hypercorn", "--bind", f"127.0.0.1:{self.port}",
                    "--workers", str(workers), *args, app]
        self.workers = workers
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.log_path = workdir / f"hypercorn-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> Hypercorn:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hypercorn {self.app} exited {self.proc.returncode}: {self.log()}")
            if len(self.worker_pids()) == self.workers and self.answers():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"hypercorn {self.app} did not start in {timeout}s: {self.log()}")

    def answers(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as sock:
                sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                return sock.recv(16).startswith(b"HTTP/1.1")
        except OSError:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def worker_pids(self) -> list[int]:
        """The processes that serve: hypercorn's spawned workers (not its resource tracker)."""
        assert self.proc is not None
        out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(self.proc.pid)], capture_output=True, text=True)
        pids = []
        for pid in map(int, out.stdout.split()):
            try:
                if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    pids.append(pid)
            except OSError:
                pass
        return pids

    def cpu_seconds(self) -> float:
        """utime + stime of the workers so far, in seconds."""
        total = 0
        for pid in self.worker_pids():
            fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
        return total / CLOCK_TICKS

    def runqueue_wait(self) -> float:
        """Seconds the workers' threads have waited for a CPU (busy machine: high)."""
        total = 0
        for pid in self.worker_pids():
            for task in os.listdir(f"/proc/{pid}/task"):
                try:
                    total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[1])
                except (OSError, IndexError):
                    pass  # a thread that just ended, or no schedstats in this kernel
        return total / 1e9

    def peak_rss_mib(self) -> float:
        """The largest VmHWM among the workers, in MiB."""
        peak = 0
        for pid in self.worker_pids():
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]))
        return peak / 1024

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # our own session: the server and its workers
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
        self._log.close()
        self.proc = None

    def __enter__(self) -> Hypercorn:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def empty_dir(directory: Path) -> None:
    for entry in os.scandir(directory):
        if entry.is_file():
            os.unlink(entry.path)


class Subject:
    """The upload app under hypercorn, its upload dir emptied after each run."""

    def __init__(self, workdir: Path, name: str, workers: int = 1, env: dict[str, str] | None = None,
                 args: tuple[str, ...] = ()) -> None:
        self.upload_dir = workdir / f"uploads-{name}"
        self.server = Hypercorn(
            "upload_asgi:app", workdir, workers=workers, args=args,
            env={"UPLOAD_DIR": str(self.upload_dir), "UPLOAD_FSYNC": "0", **(env or {})},
        )

    def upload(self, upload: Upload, chunked: bool = False) -> Answer:
        answer = send_upload(self.server.port, upload, chunked)
        intact = check_stored(answer, upload)
        empty_dir(self.upload_dir)
        if not intact:
            raise RuntimeError(f"upload-asgi did not store the upload intact: {answer.status} {answer.body[:300]!r}")
        return answer


@dataclass
class Usage:
    cpu: float  # server CPU seconds per GB of body
    waiting: float  # seconds the server's threads waited for a CPU, per second of upload


def timed(server: Hypercorn, send: Any, nbytes: int) -> tuple[Answer, Usage]:
    """Run `send()`; return its answer and what it cost the server."""
    cpu, waited = server.cpu_seconds(), server.runqueue_wait()
    answer = send()
    cpu, waited = server.cpu_seconds() - cpu, server.runqueue_wait() - waited
    return answer, Usage(cpu / (nbytes / 1e9), waited / answer.seconds)


# -- scenario 3 and 5: one upload at a time ----------------------------------------------


def bench_single(sizes: dict[str, int], repeats: dict[str, int], workdir: Path, env: dict[str, str],
                 args: tuple[str, ...]) -> list[Figure]:
    starlette_tmp = workdir / "starlette-tmp"
    starlette_tmp.mkdir()
    subject = Subject(workdir, "single", env=env, args=args)
    drain = Hypercorn("bench.apps:drain_app", workdir, env=env, args=args)
    store_dir = workdir / "store-only"
    store_dir.mkdir()
    store = Hypercorn("bench.apps:store_app", workdir, env={**env, "STORE_DIR": str(store_dir)}, args=args)
    starlette = Hypercorn("bench.apps:starlette_app", workdir, env={**env, "TMPDIR": str(starlette_tmp)}, args=args)
    figures = []
    with subject.server, drain, store, starlette:
        subject.upload(payloads.upload(1 * MiB))
        rss_small = subject.server.peak_rss_mib()
        block = payloads.random_bytes(payloads.BLOCK_SIZE)
        for role, size in sizes.items():
            upload = payloads.upload(size, block)
            upload.sha256, upload.body_sha256  # computed before any clock starts
            if role == "medium":  # warm every server up, unmeasured
                subject.upload(upload)
                send_upload(drain.port, upload)
                send_upload(store.port, upload)
                send_upload(starlette.port, upload)
            figures += bench_size(role, upload, repeats[role], subject, drain, store, starlette)
        rss_large = subject.server.peak_rss_mib()
        large = next(f for f in figures if f.name == "e2e.large.content-length")
        large.extra["peak_rss_mib"] = round(rss_large, 1)
        large.extra["peak_rss_1MiB_mib"] = round(rss_small, 1)
        large.extra["peak_rss_growth_mib"] = round(rss_large - rss_small, 1)
        large.extra["drain_peak_rss_mib"] = round(drain.peak_rss_mib(), 1)
        large.extra["starlette_peak_rss_mib"] = round(starlette.peak_rss_mib(), 1)
        progress(f"upload-asgi peak RSS: {rss_small:.1f} MiB after 1 MiB, {rss_large:.1f} MiB after the large uploads")
    return figures


def bench_size(role: str, upload: Upload, repeats: int, subject: Subject, drain: Hypercorn,
               store: Hypercorn, starlette: Hypercorn) -> list[Figure]:
    size = report.size_text(upload.size)
    figures = {
        framing: Figure(f"e2e.{role}.{framing}", f"upload-asgi under hypercorn, {framing}, {size}",
                        "drain-only app", upload.body_length, target=0.80 if framing == "content-length" else None)
        for framing in ("content-length", "chunked")
    }
    starlette_figure = Figure(f"e2e.{role}.starlette", f"Starlette request.form() + SHA-256, content-length, {size}",
                              "drain-only app", upload.body_length)
    store_figure = Figure(f"e2e.{role}.store-only", f"store-only app (SHA-256 + write, no parsing), content-length, {size}",
                          "drain-only app", upload.body_length)
    versus_store = Figure(f"e2e.{role}.vs_store", f"upload-asgi against the store-only app, {size}",
                          "store-only app", upload.body_length)
    versus = Figure(f"e2e.{role}.vs_starlette", f"upload-asgi against Starlette request.form(), {size}",
                    "Starlette", upload.body_length, target=4.0)
    usage: dict[str, list[Usage]] = {"subject": [], "drain": [], "store": [], "starlette": []}
    for run in range(repeats):
        for framing, figure in figures.items():
            chunked = framing == "chunked"
            runs = [("drain", drain, lambda: send_upload(drain.port, upload, chunked)),
                    ("subject", subject.server, lambda: subject.upload(upload, chunked))]
            if not chunked:
                runs.insert(1, ("store", store, lambda: send_upload(store.port, upload)))
            if run % 2:
                runs.reverse()
            for who, server, send in runs:
                answer, cost = timed(server, send, upload.body_length)
                seen = mbps(upload.body_length, answer.seconds)
                if who == "subject":
                    figure.add(subject_mbps=seen)
                elif not check_drained(answer, upload, hashed=who == "store"):
                    raise RuntimeError(f"the {who} app answered {answer.status} {answer.body[:200]!r}")
                elif who == "drain":
                    figure.add(ceiling_mbps=seen)
                else:
                    store_figure.add(subject_mbps=seen)
                if not chunked:
                    usage[who].append(cost)
        answer, cost = timed(starlette, lambda: send_upload(starlette.port, upload), upload.body_length)
        if not check_stored(answer, upload):
            raise RuntimeError(f"the Starlette app answered {answer.status} {answer.body[:200]!r}")
        usage["starlette"].append(cost)
        starlette_figure.add(mbps(upload.body_length, answer.seconds), figures["content-length"].ceiling[-1])
        cl, ch = figures["content-length"], figures["chunked"]
        versus.add(cl.subject[-1], starlette_figure.subject[-1])
        store_figure.add(ceiling_mbps=cl.ceiling[-1])
        versus_store.add(cl.subject[-1], store_figure.subject[-1])
        progress(
            f"e2e {role} {size} run {run + 1}/{repeats}: upload-asgi {cl.subject[-1]:.0f} MB/s "
            f"(chunked {ch.subject[-1]:.0f}), drain-only {cl.ceiling[-1]:.0f} (chunked {ch.ceiling[-1]:.0f}), "
            f"store-only {store_figure.subject[-1]:.0f}, "
            f"Starlette {starlette_figure.subject[-1]:.0f}"
        )
    def median(who: str, what: str) -> float:
        return round(statistics.median(getattr(u, what) for u in usage[who]), 2)

    content_length = figures["content-length"]
    content_length.extra["cpu_s_per_gb"] = median("subject", "cpu")
    content_length.extra["ceiling_cpu_s_per_gb"] = median("drain", "cpu")
    content_length.extra["runqueue_wait_s_per_s"] = median("subject", "waiting")
    content_length.extra["ceiling_runqueue_wait_s_per_s"] = median("drain", "waiting")
    store_figure.extra["cpu_s_per_gb"] = median("store", "cpu")
    starlette_figure.extra["cpu_s_per_gb"] = median("starlette", "cpu")
    return [*figures.values(), store_figure, versus_store, starlette_figure, versus]


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
                    target=1.0 if count == 32 else None,
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


def run(quick: bool, workdir: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()) -> list[Figure]:
    """Run scenarios 3 to 5; `env` and `args` go to every server alike (subject and references)."""
    plan = QUICK if quick else FULL
    env = env or {}
    figures = bench_single(plan["sizes"], plan["repeats"], workdir, env, args)
    figures += bench_concurrency(plan["concurrent_size"], (8, 32), plan["concurrent_repeats"], workdir, env, args)
    return figures


def add_server_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an environment variable for every server, e.g. MALLOC_TOP_PAD_=67108864 (repeatable)")
    parser.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                        help="a hypercorn option for every server, e.g. --server-arg=--backlog=200 (repeatable)")


def server_env(pairs: list[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise SystemExit(f"--server-env wants NAME=VALUE, not {pair!r}")
        env[name] = value
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.server", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small bodies, few runs")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    add_server_options(parser)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="upload-asgi-bench-") as tmp:
        figures = run(args.quick, Path(tmp), server_env(args.server_env), tuple(args.server_arg))
    print(report.table(figures))
    if args.json:
        report.write_json(args.json, figures, [], vars(args) | {"json": str(args.json)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

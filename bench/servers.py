"""Server processes for the benchmarks: one app under hypercorn, uvicorn or granian, or aiohttp's own.

Each starts in its own session on a free loopback port and is measured through
/proc: CPU seconds (utime + stime), time its threads waited for a CPU, peak RSS.
The serving processes are the started process and every descendant of it
(hypercorn's and granian's workers are child processes; uvicorn with one worker
and aiohttp serve in the started process itself), minus multiprocessing's
resource tracker.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# The ASGI servers `--servers` picks from; "aiohttp" is aiohttp.web on its own server (a peer app).
ASGI_SERVERS = ("hypercorn", "uvicorn", "granian")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(kind: str, app: str, port: int, workers: int, args: tuple[str, ...]) -> list[str]:
    """The command line that serves `app` (module:attr) on `port`; access logs off for all."""
    py = sys.executable
    if kind == "hypercorn":
        return [py, "-m", "hypercorn", "--bind", f"127.0.0.1:{port}", "--workers", str(workers), *args, app]
    if kind == "uvicorn":
        many = ["--workers", str(workers)] if workers > 1 else []
        return [py, "-m", "uvicorn", "--host", "127.0.0.1", "--port", str(port), "--loop", "uvloop",
                "--http", "httptools", "--no-access-log", "--log-level", "warning", *many, *args, app]
    if kind == "granian":
        return [py, "-m", "granian", "--interface", "asgi", "--host", "127.0.0.1", "--port", str(port),
                "--workers", str(workers), "--no-ws", "--log-level", "warning", *args, app]
    if kind == "aiohttp":
        return [py, "-m", "bench.aiohttp_app", "--port", str(port), *args]
    raise ValueError(f"unknown server {kind!r}")


def descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True)
    children = [int(p) for p in out.stdout.split()]
    return children + [d for c in children for d in descendants(c)]


class Server:
    """`kind` serving `app` in a subprocess on a free loopback port."""

    def __init__(self, app: str, workdir: Path, env: dict[str, str] | None = None, workers: int = 1,
                 args: tuple[str, ...] = (), kind: str = "hypercorn") -> None:
        self.app = app
        self.kind = kind
        self.port = free_port()
        self.workers = workers
        # Options like --backlog are hypercorn's: they go to hypercorn only.
        self.cmd = server_command(kind, app, self.port, workers, args if kind == "hypercorn" else ())
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
        self.log_path = workdir / f"{kind}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def __repr__(self) -> str:
        return f"{self.kind} {self.app} :{self.port}"

    def start(self, timeout: float = 30.0) -> Server:
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=ROOT, stdout=self._log,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self} exited {self.proc.returncode}: {self.log()}")
            if self.ready() and self.answers():
                return self
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self} did not start in {timeout}s: {self.log()}")

    def ready(self) -> bool:
        """Every worker process is up (hypercorn and uvicorn -w N spawn them through multiprocessing)."""
        if self.workers == 1 or self.kind not in ("hypercorn", "uvicorn"):
            return True
        return len(self.serving_pids()) >= self.workers

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

    def serving_pids(self) -> list[int]:
        """The processes that serve: hypercorn's spawned workers, or the process and its children."""
        assert self.proc is not None
        pids = []
        for pid in [self.proc.pid, *descendants(self.proc.pid)]:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"resource_tracker" in cmdline:
                continue
            if self.kind == "hypercorn" and b"spawn_main" not in cmdline:
                continue  # hypercorn's parent only watches its workers
            if self.kind == "uvicorn" and self.workers > 1 and b"spawn_main" not in cmdline:
                continue
            pids.append(pid)
        return pids

    def cpu_seconds(self) -> float:
        """utime + stime of the serving processes so far, in seconds."""
        total = 0
        for pid in self.serving_pids():
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
        return total / CLOCK_TICKS

    def runqueue_wait(self) -> float:
        """Seconds the serving threads have waited for a CPU (busy machine: high)."""
        total = 0
        for pid in self.serving_pids():
            try:
                tasks = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for task in tasks:
                try:
                    total += int(Path(f"/proc/{pid}/task/{task}/schedstat").read_text().split()[1])
                except (OSError, IndexError):
                    pass  # a thread that just ended, or no schedstats in this kernel
        return total / 1e9

    def peak_rss_mib(self) -> float:
        """The largest VmHWM among the serving processes, in MiB."""
        peak = 0
        for pid in self.serving_pids():
            try:
                status = Path(f"/proc/{pid}/status").read_text()
            except OSError:
                continue
            for line in status.splitlines():
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

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


# The name the rest of the bench grew up with.
Hypercorn = Server


def empty_dir(directory: Path) -> None:
    """Remove the files (not the subdirectories) of `directory`."""
    for entry in os.scandir(directory):
        if entry.is_file():
            os.unlink(entry.path)

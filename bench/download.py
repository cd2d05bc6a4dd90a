"""Downloads through hypercorn on loopback: upload-asgi's GET /files/<id> against Starlette's FileResponse.

One file of 1 GiB (`--quick`: 64 MiB), placed in an upload dir as a stored file (data and
record, as a commit leaves them), is downloaded again and again by a raw-socket client
that reads into one reused buffer and keeps nothing, from:

- the subject: `hypercorn upload_asgi:app` (1 worker, UPLOAD_DIR = that dir);
- the ceiling: `hypercorn bench.download:starlette_files_app`, a Starlette app whose
  `/files/{id}` answers `FileResponse` of the same file (same page cache, same server).

Runs alternate (ceiling first on even runs). Before the timed runs each server's
answer is checked once: status 200, Content-Length, and the SHA-256 of every byte.
Reported: MB/s median (1 MB = 10^6 bytes), the ratio (SPEC §7 asks >= 0.90), and the
serving worker's peak RSS (VmHWM) after a warm-up and after the downloads.

    python -m bench.download [--quick] [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import report
from bench.payloads import MiB
from bench.report import Figure, mbps, progress
from bench.server import Hypercorn

GiB = 1024 * MiB
READ_BUFFER = 1 * MiB
FILE_ID = "0123456789abcdef0123456789abcdef"


# -- the ceiling app ----------------------------------------------------------------


def make_starlette_files_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import FileResponse, Response
    from starlette.routing import Route

    directory = Path(os.environ.get("FILES_DIR", "uploads"))

    async def download(request: Request) -> Response:
        file_id = request.path_params["file_id"]
        if len(file_id) != 32 or not all(c in "0123456789abcdef" for c in file_id):
            return Response(status_code=404)
        return FileResponse(directory / file_id, filename="big.bin")

    async def health(request: Request) -> Response:
        return Response(b"ok")

    return Starlette(routes=[Route("/files/{file_id}", download), Route("/health", health)])


_starlette: Any = None


async def starlette_files_app(scope: Any, receive: Any, send: Any) -> None:
    """Built on first use, so that importing this module needs no Starlette."""
    global _starlette
    if _starlette is None:
        _starlette = make_starlette_files_app()
    await _starlette(scope, receive, send)


# -- the stored file and the client ----------------------------------------------------


def place_file(upload_dir: Path, size: int) -> str:
    """Write a `size`-byte file and its record as a commit would; return its SHA-256."""
    upload_dir.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MiB)
    digest = hashlib.sha256()
    with open(upload_dir / FILE_ID, "wb") as f:
        for _ in range(size // MiB):
            f.write(block)
            digest.update(block)
    record = {"id": FILE_ID, "filename": "big.bin", "content_type": "application/octet-stream", "size": size,
              "sha256": digest.hexdigest(), "description": None, "created": "2026-01-01T00:00:00Z"}
    (upload_dir / f"{FILE_ID}.json").write_text(json.dumps(record))
    return digest.hexdigest()


def download(port: int, check: bool = False) -> tuple[float, int, str | None]:
    """GET /files/<id>; return (seconds, bytes of body, SHA-256 if `check`)."""
    buffer = bytearray(READ_BUFFER)
    view = memoryview(buffer)
    digest = hashlib.sha256() if check else None
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=120) as sock:
        sock.sendall(f"GET /files/{FILE_ID} HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            data = sock.recv(65536)
            if not data:
                raise RuntimeError(f"closed before an answer: {head!r}")
            head += data
        head, _, rest = head.partition(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        headers = dict(line.split(b":", 1) for line in head.split(b"\r\n")[1:])
        length = int({k.strip().lower(): v for k, v in headers.items()}[b"content-length"])
        if status != 200:
            raise RuntimeError(f"status {status}")
        received = len(rest)
        if digest is not None:
            digest.update(rest)
        while received < length:
            n = sock.recv_into(view)
            if not n:
                raise RuntimeError(f"closed after {received} of {length} bytes")
            if digest is not None:
                digest.update(view[:n])
            received += n
    return time.perf_counter() - started, received, None if digest is None else digest.hexdigest()


# -- the run -------------------------------------------------------------------------------


def bench_download(size: int, repeats: int, workdir: Path) -> Figure:
    upload_dir = workdir / "uploads"
    expected = place_file(upload_dir, size)
    env = {"UPLOAD_DIR": str(upload_dir), "FILES_DIR": str(upload_dir), "UPLOAD_FSYNC": "0"}
    figure = Figure(f"download.{report.size_text(size).replace(' ', '')}", "upload-asgi GET /files/<id>",
                    "starlette FileResponse", size, target=0.90)
    with Hypercorn("upload_asgi:app", workdir, env=env) as ours, \
            Hypercorn("bench.download:starlette_files_app", workdir, env=env) as theirs:
        for name, server in (("upload-asgi", ours), ("starlette", theirs)):
            _, received, sha = download(server.port, check=True)
            if (received, sha) != (size, expected):
                raise RuntimeError(f"{name} served {received} bytes with SHA-256 {sha}, not the file")
        rss_warm = ours.peak_rss_mib()
        for run in range(repeats):
            order = [("ceiling", theirs), ("subject", ours)]
            for role, server in order if run % 2 == 0 else order[::-1]:
                seconds, received, _ = download(server.port)
                assert received == size
                rate = mbps(size, seconds)
                figure.add(**{f"{role}_mbps": rate})
                progress(f"{figure.name} run {run + 1}/{repeats} {role}: {rate:.0f} MB/s")
        figure.extra.update({
            "peak_rss_mib": round(ours.peak_rss_mib(), 1),
            "peak_rss_growth_mib": round(ours.peak_rss_mib() - rss_warm, 1),
            "ceiling_peak_rss_mib": round(theirs.peak_rss_mib(), 1),
            "intact": True,
        })
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB, 3 runs")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per server (default 5, quick 3)")
    parser.add_argument("--json", type=Path, default=None, help="write the figure as JSON here")
    args = parser.parse_args(argv)
    size = 64 * MiB if args.quick else GiB
    repeats = args.repeats or (3 if args.quick else 5)
    with tempfile.TemporaryDirectory(prefix="bench-download-") as tmp:
        figure = bench_download(size, repeats, Path(tmp))
    print(report.table([figure]))
    ok = figure.ratio >= (figure.target or 0)
    print(f"\nSPEC §7: download ratio {figure.ratio:.2f} (>= {figure.target:g}: {'ok' if ok else 'MISSED'}); "
          f"peak RSS {figure.extra['peak_rss_mib']} MiB (+{figure.extra['peak_rss_growth_mib']} MiB while serving)")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"download": figure.as_json(), "machine": report.machine()}, indent=1))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""What a resume costs when the worker that wrote the first half is gone.

`python -m bench` measures tus against one `POST /upload` (bench/resources.py:
`tus.large`, and `tus.resume_50pct` with a dropped connection, same worker). This
adds the case it cannot: a server restart at 50%. One file of 1 GiB (`--quick`:
64 MiB) is sent as tus `PATCH`es of 64 MiB (`--quick`: 8 MiB), each on a new
connection, against the same bytes in one `POST /upload`; then the second half is
`PATCH`ed to the worker that wrote the first half (it kept the SHA-256 state),
against the same after a restart (the new worker re-reads the first half to hash it).

    python -m bench.resumable [--quick] [--repeats N] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import tempfile
import time
from pathlib import Path

from bench import payloads, report
from bench.payloads import MiB, Upload
from bench.report import Figure, mbps, progress
from bench.client import read_answer, send_upload
from bench.servers import Server as Hypercorn

GiB = 1024 * MiB


def request(port: int, head: str, blocks: list[bytes] | tuple[bytes, ...] = (), repeats: int = 1) -> tuple[int, dict[str, str], bytes]:
    """Send a request (head text without the blank line, then `blocks` `repeats` times); the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=600) as sock:
        sock.sendall(head.encode() + b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        for _ in range(repeats):
            for block in blocks:
                sock.sendall(block)
        status, body = read_answer(sock)
    return status, {}, body


def create(port: int, length: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(
            f"POST /files HTTP/1.1\r\nHost: 127.0.0.1\r\nTus-Resumable: 1.0.0\r\nUpload-Length: {length}\r\n"
            "Content-Length: 0\r\nConnection: close\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
    for line in data.split(b"\r\n"):
        if line.lower().startswith(b"location:"):
            return line.split(b":", 1)[1].strip().decode()
    raise RuntimeError(f"no Location: {data[:300]!r}")


def patch(port: int, location: str, offset: int, block: bytes, repeats: int) -> int:
    head = (
        f"PATCH {location} HTTP/1.1\r\nTus-Resumable: 1.0.0\r\nContent-Type: application/offset+octet-stream\r\n"
        f"Upload-Offset: {offset}\r\nContent-Length: {len(block) * repeats}\r\n"
    )
    status, _, body = request(port, head, (block,), repeats)
    if status != 204:
        raise RuntimeError(f"PATCH at {offset}: {status} {body[:300]!r}")
    return offset + len(block) * repeats


def send_in_patches(port: int, upload: Upload, patch_size: int) -> str:
    location = create(port, upload.size)
    per_patch = patch_size // len(upload.block)
    offset = 0
    while offset < upload.size:
        repeats = min(per_patch, (upload.size - offset) // len(upload.block))
        offset = patch(port, location, offset, upload.block, repeats)
    return location


def stored_sha256(upload_dir: Path, location: str) -> str:
    return json.loads((upload_dir / f"{location.rsplit('/', 1)[1]}.json").read_text())["sha256"]


def run(quick: bool, repeats: int, workdir: Path) -> list[Figure]:
    size = 64 * MiB if quick else 1 * GiB
    patch_size = 8 * MiB if quick else 64 * MiB
    upload = payloads.upload(size)
    upload_dir = workdir / "uploads"
    env = {"UPLOAD_DIR": str(upload_dir), "UPLOAD_FSYNC": "0"}
    pieces = Figure(
        f"tus {report.size_text(size)} in {report.size_text(patch_size)} PATCHes",
        "POST /files + PATCHes, new connection each", "one POST /upload, same bytes", size, target=0.90,
    )
    resume = Figure(
        f"resume {report.size_text(size)} at 50%", "second half after a restart (re-hash)",
        "second half to the same worker (kept state)", size // 2,
    )
    half = upload.repeats // 2
    server = Hypercorn("upload_asgi:app", workdir, env).start()
    try:
        for run_number in range(repeats):
            answer = send_upload(server.port, upload)
            assert answer.status == 201 and answer.json()["sha256"] == upload.sha256, answer.body[:300]
            started = time.perf_counter()
            location = send_in_patches(server.port, upload, patch_size)
            seconds = time.perf_counter() - started
            assert stored_sha256(upload_dir, location) == upload.sha256
            pieces.add(mbps(size, seconds), mbps(size, answer.seconds))
            progress(f"run {run_number + 1}: PATCHes {mbps(size, seconds):.0f} MB/s, POST {mbps(size, answer.seconds):.0f} MB/s")
            # Resume at 50%, same worker:
            location = create(server.port, size)
            patch(server.port, location, 0, upload.block, half)
            started = time.perf_counter()
            patch(server.port, location, half * len(upload.block), upload.block, upload.repeats - half)
            kept = time.perf_counter() - started
            assert stored_sha256(upload_dir, location) == upload.sha256
            # ... and after a restart:
            location = create(server.port, size)
            patch(server.port, location, 0, upload.block, half)
            server.stop()
            server = Hypercorn("upload_asgi:app", workdir, env).start()
            started = time.perf_counter()
            patch(server.port, location, half * len(upload.block), upload.block, upload.repeats - half)
            restarted = time.perf_counter() - started
            assert stored_sha256(upload_dir, location) == upload.sha256
            resume.add(mbps(size // 2, restarted), mbps(size // 2, kept))
            resume.extra.setdefault("rehash_cost_seconds", []).append(round(restarted - kept, 3))
            progress(f"run {run_number + 1}: resume kept {kept:.2f} s, after restart {restarted:.2f} s")
            for path in upload_dir.iterdir():
                if path.is_file():
                    path.unlink()
    finally:
        server.stop()
    return [pieces, resume]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="64 MiB in 8 MiB PATCHes")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-resumable-") as workdir:
        figures = run(args.quick, args.repeats, Path(workdir))
    print(report.table(figures))
    if args.json:
        args.json.write_text(json.dumps({f.name: f.as_json() for f in figures}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

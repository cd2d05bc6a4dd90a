"""In process: the ASGI callable fed from memory, and the parser alone.

Scenario 1 feeds `http.request` events (64 KiB or 1 MiB bodies, sliced before the
clock starts) straight to `create_app(Config(fsync=False))`: no server, no socket.
Its ceiling writes the same chunks to the same directory while hashing them with
SHA-256 (`os.write` + `hashlib`, one thread): what storing the bytes costs at least.

Scenario 2 runs the form reader (the framer) with every part sent to a target that
only counts, against SHA-256 of the same bytes: how much the parsing costs next to
the hash that must be computed anyway; streaming-form-data's parser alone beside it.

    python -m bench.inprocess [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import payloads, report
from bench.payloads import KiB, MiB
from bench.report import Figure, mbps, progress

from streaming_form_data import StreamingFormDataParser
from streaming_form_data.targets import BaseTarget

import targets
from upload_service.framing import PartInfo
import upload_asgi


# -- scenario 1: the ASGI callable ------------------------------------------------


def upload_scope(body_length: int) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/upload",
        "raw_path": b"/upload",
        "root_path": "",
        "query_string": b"",
        "headers": [
            (b"content-type", payloads.CONTENT_TYPE.encode()),
            (b"content-length", str(body_length).encode()),
        ],
        "client": ("127.0.0.1", 5000),
        "server": ("127.0.0.1", 8000),
    }


async def upload_once(app: Any, chunks: list[bytes], body_length: int, sha256: str) -> float:
    """Feed one body to the app; return the seconds it took; check the stored record."""
    events = [{"type": "http.request", "body": c, "more_body": True} for c in chunks]
    events.append({"type": "http.request", "body": b"", "more_body": False})
    pending = iter(events)
    answer: dict[str, Any] = {}

    async def receive() -> dict[str, Any]:
        return next(pending, {"type": "http.disconnect"})

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            answer["status"] = message["status"]
        else:
            answer["body"] = answer.get("body", b"") + message.get("body", b"")

    scope = upload_scope(body_length)
    started = time.perf_counter()
    await app(scope, receive, send)
    seconds = time.perf_counter() - started
    if answer.get("status") != 201 or sha256.encode() not in answer.get("body", b""):
        raise RuntimeError(f"the app did not store the upload intact: {answer}")
    return seconds


def write_and_hash(chunks: list[bytes], directory: Path) -> float:
    """The ceiling: write the chunks to a new file in `directory` while hashing them."""
    path = directory / "ceiling.bin"
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    digest = hashlib.sha256()
    try:
        for chunk in chunks:
            digest.update(chunk)
            os.write(fd, chunk)
    finally:
        os.close(fd)
    digest.hexdigest()
    seconds = time.perf_counter() - started
    os.unlink(path)
    return seconds


def empty_dir(directory: Path) -> None:
    for entry in os.scandir(directory):
        if entry.is_file():
            os.unlink(entry.path)


def bench_asgi(size: int, repeats: int, workdir: Path) -> list[Figure]:
    upload_dir = workdir / "inprocess"
    app = upload_asgi.create_app(upload_asgi.Config(upload_dir=upload_dir, fsync=False, log_level="warning"))
    app.prepare()
    cases = [
        ("random", payloads.random_bytes(size), 64 * KiB),
        ("random", None, 1 * MiB),
        ("crlf_text", payloads.crlf_text(size), 64 * KiB),
    ]
    figures = []
    data = b""
    loop = asyncio.new_event_loop()
    try:
        for name, content, chunk_size in cases:
            data = content if content is not None else data
            body = payloads.file_form(data)
            chunks = payloads.slices(body, chunk_size)
            sha256 = hashlib.sha256(data).hexdigest()
            write_and_hash(chunks, upload_dir)  # warm up, unmeasured
            loop.run_until_complete(upload_once(app, chunks, len(body), sha256))
            empty_dir(upload_dir)
            figure = Figure(
                f"inprocess.{name}.{report.size_text(chunk_size).replace(' ', '')}",
                f"ASGI callable, {name} file, {report.size_text(chunk_size)} http.request events, fsync off",
                "write+SHA-256",
                len(body),
                target=0.90 if name == "random" else None,
            )
            for run in range(repeats):
                # Alternate which goes first, so that neither always runs on a warmer cache.
                order = (0, 1) if run % 2 == 0 else (1, 0)
                for which in order:
                    if which == 0:
                        seconds = write_and_hash(chunks, upload_dir)
                        figure.add(ceiling_mbps=mbps(len(body), seconds))
                    else:
                        seconds = loop.run_until_complete(upload_once(app, chunks, len(body), sha256))
                        empty_dir(upload_dir)
                        figure.add(subject_mbps=mbps(len(body), seconds))
                progress(
                    f"{figure.name} run {run + 1}/{repeats}: app {figure.subject[-1]:.0f} MB/s, "
                    f"write+SHA-256 {figure.ceiling[-1]:.0f} MB/s"
                )
            figures.append(figure)
    finally:
        loop.close()
        shutil.rmtree(upload_dir, ignore_errors=True)
    return figures


# -- scenario 2: the parser alone -----------------------------------------------------


class CountingTarget(BaseTarget):
    """A target that only counts what it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.size = 0

    def on_data_received(self, chunk: bytes) -> None:
        self.size += len(chunk)


class CountingFormReader(targets.FormReader):
    """Our form reader (the framer), with every part sent to a counting target."""

    def __init__(self, boundary: bytes, limits: targets.FormLimits) -> None:
        super().__init__(boundary, None, limits, file_field="file", text_fields=())
        self.counted: list[CountingTarget] = []

    def _open_target(self, info: PartInfo) -> BaseTarget:
        target = CountingTarget()
        self.counted.append(target)
        return target


def parse_once(chunks: list[bytes]) -> tuple[float, int]:
    limits = targets.FormLimits(max_file_size=1 << 62, max_field_size=1 << 62, max_files=1 << 30, max_parts=1 << 30)
    reader = CountingFormReader(payloads.BOUNDARY.encode(), limits)
    started = time.perf_counter()
    for chunk in chunks:
        reader.feed(chunk)
    reader.close()
    seconds = time.perf_counter() - started
    return seconds, sum(t.size for t in reader.counted)


def parse_sfd_alone(chunks: list[bytes]) -> float:
    """streaming-form-data's parser by itself, for comparison."""
    parser = StreamingFormDataParser(headers={"Content-Type": payloads.CONTENT_TYPE})
    parser.register("*", CountingTarget(), matches=lambda _registered, _name: True)
    started = time.perf_counter()
    for chunk in chunks:
        parser.data_received(chunk)
    return time.perf_counter() - started


def hash_only(chunks: list[bytes]) -> float:
    started = time.perf_counter()
    digest = hashlib.sha256()
    for chunk in chunks:
        digest.update(chunk)
    digest.hexdigest()
    return time.perf_counter() - started


def bench_parser(size: int, repeats: int) -> list[Figure]:
    figures = []
    for name, body in payloads.parser_payloads(size).items():
        chunks = payloads.slices(body, 64 * KiB)
        figure = Figure(
            f"parser.{name}",
            f"the framer, counting targets, {name}, 64 KiB chunks",
            "SHA-256",
            len(body),
        )
        sfd: list[float] = []
        for run in range(repeats):
            seconds, counted = parse_once(chunks)
            if not counted or counted >= len(body):
                raise RuntimeError(f"the parser read {counted} bytes of parts from {name}")
            figure.add(subject_mbps=mbps(len(body), seconds))
            figure.add(ceiling_mbps=mbps(len(body), hash_only(chunks)))
            sfd.append(mbps(len(body), parse_sfd_alone(chunks)))
            progress(
                f"{figure.name} run {run + 1}/{repeats}: parser {figure.subject[-1]:.0f} MB/s, "
                f"SHA-256 {figure.ceiling[-1]:.0f} MB/s, streaming-form-data alone {sfd[-1]:.0f} MB/s"
            )
        figure.extra["sfd_alone_mbps"] = round(sorted(sfd)[len(sfd) // 2])
        figures.append(figure)
    return figures


# -- running ----------------------------------------------------------------------------


# --quick --check gates on the in-process ratio: 5 runs, of 64 MiB (at 16 MiB the first blocks
# into cold page-cache pages weigh enough to read ~0.05 lower than a long upload does).
QUICK = {"asgi_size": 64 * MiB, "parser_size": 4 * MiB, "repeats": 5}
FULL = {"asgi_size": 256 * MiB, "parser_size": 32 * MiB, "repeats": 5}


def run(quick: bool, workdir: Path) -> list[Figure]:
    sizes = QUICK if quick else FULL
    figures = bench_asgi(sizes["asgi_size"], sizes["repeats"], workdir)
    figures += bench_parser(sizes["parser_size"], sizes["repeats"])
    return figures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inprocess", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small payloads, few runs")
    parser.add_argument("--json", type=Path, help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="upload-asgi-bench-") as tmp:
        figures = run(args.quick, Path(tmp))
    print(report.table(figures))
    if args.json:
        report.write_json(args.json, figures, [], vars(args) | {"json": str(args.json)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The files resource and resumable uploads, through hypercorn (SPEC §9, §10).

Downloads: `GET /files/<id>` of a 1 GiB file (`--quick`: 32 MiB) from upload-asgi,
against Starlette's `FileResponse` of the same stored file under the same hypercorn,
interleaved; the client counts the body into one reused buffer (its SHA-256 checked
on the unmeasured first download from each). upload-asgi's peak RSS after a 1 MiB
download and after the large ones.

tus: a 1 GiB upload (`--quick`: 32 MiB) as `POST /files` (`Tus-Resumable: 1.0.0`,
`Upload-Length`) then 16 `PATCH`es of 64 MiB (`--quick`: 2 MiB), against one
`POST /upload` of the same file, interleaved; and the same tus upload with the link
dropped halfway through a `PATCH` at 50%, then `HEAD` for the offset and the rest
sent from there. Every finished upload's record (`GET /files/<id>/record`) must
have the file's size and SHA-256.

Until those routes exist (a `404` or `405` on them) each figure is skipped with a
note saying so, never measured against something else.

    python -m bench.resources [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

from bench import payloads, report
from bench.client import Response, request, send_upload, check_stored
from bench.payloads import MiB, Upload
from bench.report import Figure, mbps, progress
from bench.server import Subject, run_part_alone, server_env
from bench.servers import Server, empty_dir

TUS = {"Tus-Resumable": "1.0.0"}
NOT_THERE = (404, 405)


class NotAvailable(Exception):
    """The route this figure measures does not exist in this upload-asgi (yet)."""


# -- downloads --------------------------------------------------------------------


def post_file(subject: Subject, upload: Upload) -> str:
    """Store `upload` with one POST /upload; its id. Kept on disk (unlike Subject.upload)."""
    answer = send_upload(subject.server.port, upload)
    if not check_stored(answer, upload):
        raise RuntimeError(f"upload-asgi did not store the upload: {answer.status} {answer.body[:200]!r}")
    return answer.json()["id"]


def download(server: Server, file_id: str, size: int, digest: bool = False) -> Response:
    response = request(server.port, "GET", f"/files/{file_id}", keep=False, digest=digest)
    if response.status in NOT_THERE and server.app.startswith("upload_asgi"):
        raise NotAvailable(f"GET /files/<id> answered {response.status}")
    if response.status != 200 or response.received != size:
        raise RuntimeError(f"{server}: GET /files/{file_id} answered {response.status} with {response.received} bytes")
    return response


def bench_download(size: int, repeats: int, workdir: Path, env: dict[str, str], args: tuple[str, ...]) -> Figure:
    subject = Subject(workdir, "downloads", env=env, args=args)
    subject.upload_dir.mkdir(parents=True, exist_ok=True)
    reference = Server("bench.apps:fileresponse_app", workdir, env={**env, "FILES_DIR": str(subject.upload_dir)},
                       args=args)
    with subject.server, reference:
        small = payloads.upload(1 * MiB)
        small_id = post_file(subject, small)
        download(subject.server, small_id, small.size)
        rss_small = subject.server.peak_rss_mib()
        upload = payloads.upload(size, payloads.random_bytes(payloads.BLOCK_SIZE, seed=payloads.SEED + 2))
        file_id = post_file(subject, upload)
        for server in (subject.server, reference):  # warm up, unmeasured, and check the bytes once
            got = download(server, file_id, size, digest=True)
            if got.sha256 != upload.sha256:
                raise RuntimeError(f"{server}: GET /files/{file_id} sent other bytes")
        figure = Figure("download.large", f"upload-asgi GET /files/<id> under hypercorn, {report.size_text(size)}",
                        "Starlette FileResponse", size, target=0.90)
        cpu: dict[str, list[float]] = {"subject": [], "reference": []}
        for run in range(repeats):
            order = [("subject", subject.server), ("reference", reference)]
            seen = {}
            for who, server in (order if run % 2 == 0 else reversed(order)):
                before = server.cpu_seconds()
                seen[who] = mbps(size, download(server, file_id, size).seconds)
                cpu[who].append((server.cpu_seconds() - before) / (size / 1e9))
            figure.add(seen["subject"], seen["reference"])
            progress(f"download {report.size_text(size)} run {run + 1}/{repeats}: upload-asgi "
                     f"{seen['subject']:.0f} MB/s, Starlette FileResponse {seen['reference']:.0f} MB/s")
        rss_large = subject.server.peak_rss_mib()
        figure.extra.update({
            "cpu_s_per_gb": round(sorted(cpu["subject"])[repeats // 2], 2),
            "ceiling_cpu_s_per_gb": round(sorted(cpu["reference"])[repeats // 2], 2),
            "peak_rss_mib": round(rss_large, 1),
            "peak_rss_1MiB_mib": round(rss_small, 1),
            "peak_rss_growth_mib": round(rss_large - rss_small, 1),
            "reference_peak_rss_mib": round(reference.peak_rss_mib(), 1),
        })
    return figure


# -- tus ----------------------------------------------------------------------------


def body_blocks(upload: Upload, start: int, end: int) -> Iterator[bytes]:
    """The file's bytes [start, end) as slices of the repeated block (no copy of the whole)."""
    block = memoryview(upload.block)
    offset = start
    while offset < end:
        within = offset % len(block)
        piece = block[within : within + min(len(block) - within, end - offset)]
        yield piece
        offset += len(piece)


def tus_create(port: int, size: int) -> str:
    answer = request(port, "POST", "/files", {**TUS, "Upload-Length": str(size)}, length=0)
    if answer.status in NOT_THERE:
        raise NotAvailable(f"POST /files (tus creation) answered {answer.status}")
    if answer.status != 201 or "location" not in answer.headers:
        raise RuntimeError(f"tus creation answered {answer.status} {answer.headers} {answer.body[:200]!r}")
    return urlsplit(answer.headers["location"]).path


def tus_patch(port: int, path: str, upload: Upload, offset: int, end: int, drop_after: int | None = None) -> Response:
    headers = {**TUS, "Upload-Offset": str(offset), "Content-Type": "application/offset+octet-stream"}
    return request(port, "PATCH", path, headers, body_blocks(upload, offset, end), length=end - offset,
                   drop_after=drop_after)


def tus_offset(port: int, path: str) -> int:
    answer = request(port, "HEAD", path, TUS)
    if answer.status not in (200, 204) or "upload-offset" not in answer.headers:
        raise RuntimeError(f"tus HEAD answered {answer.status} {answer.headers}")
    return int(answer.headers["upload-offset"])


def tus_send(port: int, path: str, upload: Upload, offset: int, piece: int) -> int:
    """PATCH from `offset` to the end, `piece` bytes at a time (the first ends on a piece boundary)."""
    while offset < upload.size:
        end = min(upload.size, (offset // piece + 1) * piece)
        answer = tus_patch(port, path, upload, offset, end)
        if answer.status != 204 or int(answer.headers.get("upload-offset", -1)) != end:
            raise RuntimeError(f"tus PATCH at {offset} answered {answer.status} {answer.headers} {answer.body[:200]!r}")
        offset = end
    return offset


def tus_finish(port: int, path: str, upload: Upload) -> None:
    """The finished upload's record has the whole file's size and SHA-256; then it is deleted."""
    record = request(port, "GET", f"{path}/record")
    if record.status != 200 or record.json().get("sha256") != upload.sha256 or record.json().get("size") != upload.size:
        raise RuntimeError(f"tus upload {path} ended as {record.status} {record.body[:300]!r}")
    request(port, "DELETE", path)


def tus_upload(port: int, upload: Upload, piece: int) -> float:
    started = time.perf_counter()
    path = tus_create(port, upload.size)
    tus_send(port, path, upload, 0, piece)
    seconds = time.perf_counter() - started
    tus_finish(port, path, upload)
    return seconds


@dataclass
class Resumed:
    seconds: float
    dropped_at: int  # bytes the server had been sent when the link dropped
    resumed_at: int  # the offset HEAD gave afterwards


def tus_resume(port: int, upload: Upload, piece: int) -> Resumed:
    """A tus upload whose link drops halfway through the PATCH that crosses 50%, then resumed."""
    half = upload.size // 2
    started = time.perf_counter()
    path = tus_create(port, upload.size)
    # PATCHes up to half a piece before 50%, then one whose link drops at 50%.
    offset = tus_send_until(port, path, upload, half - piece // 2, piece)
    tus_patch(port, path, upload, offset, offset + piece, drop_after=half - offset)
    resumed_at = settled_offset(port, path)
    if resumed_at > half:
        raise RuntimeError(f"tus HEAD after a drop at {half} claims {resumed_at} bytes")
    retry_send(port, path, upload, resumed_at, piece)
    seconds = time.perf_counter() - started
    tus_finish(port, path, upload)
    return Resumed(seconds, half, resumed_at)


def tus_send_until(port: int, path: str, upload: Upload, until: int, piece: int) -> int:
    offset = 0
    while offset < until:
        end = min(until, offset + piece)
        answer = tus_patch(port, path, upload, offset, end)
        if answer.status != 204:
            raise RuntimeError(f"tus PATCH at {offset} answered {answer.status} {answer.body[:200]!r}")
        offset = end
    return offset


def settled_offset(port: int, path: str, timeout: float = 10.0) -> int:
    """HEAD until the offset stops moving: the server may still be storing what it read before the drop."""
    deadline = time.monotonic() + timeout
    offset = tus_offset(port, path)
    while time.monotonic() < deadline:
        time.sleep(0.05)
        again = tus_offset(port, path)
        if again == offset:
            return offset
        offset = again
    return offset


def retry_send(port: int, path: str, upload: Upload, offset: int, piece: int, tries: int = 5) -> None:
    """Send the rest; a 409/423 (the dropped PATCH still holds the upload) means HEAD again and retry."""
    for _ in range(tries):
        try:
            tus_send(port, path, upload, offset, piece)
            return
        except RuntimeError as exc:
            if " 409 " not in str(exc) and " 423 " not in str(exc):
                raise
            time.sleep(0.2)
            offset = settled_offset(port, path)
    raise RuntimeError(f"tus upload {path} could not be resumed in {tries} tries")


def bench_tus(size: int, piece: int, repeats: int, workdir: Path, env: dict[str, str],
              args: tuple[str, ...]) -> list[Figure]:
    subject = Subject(workdir, "tus", env=env, args=args)
    upload = payloads.upload(size, payloads.random_bytes(payloads.BLOCK_SIZE, seed=payloads.SEED + 3))
    upload.sha256
    port = subject.server.port
    with subject.server:
        tus_upload(port, upload, piece)  # warm up; NotAvailable until the route exists
        subject.upload(upload)
        whole = Figure("tus.large", f"tus upload, {report.size_text(piece)} PATCHes, "
                       f"{report.size_text(size)}, under hypercorn", "one POST /upload", size, target=0.90)
        resumed = Figure("tus.resume_50pct", f"tus upload dropped at 50% and resumed, {report.size_text(size)}",
                         "one POST /upload", size)
        lost = []
        for run in range(repeats):
            order = ["post", "tus", "resume"]
            seen: dict[str, float] = {}
            for who in (order if run % 2 == 0 else reversed(order)):
                if who == "post":
                    seen[who] = mbps(size, subject.upload(upload).seconds)
                elif who == "tus":
                    seen[who] = mbps(size, tus_upload(port, upload, piece))
                else:
                    r = tus_resume(port, upload, piece)
                    seen[who] = mbps(size, r.seconds)
                    lost.append(r.dropped_at - r.resumed_at)
            empty_dir(subject.upload_dir)
            whole.add(seen["tus"], seen["post"])
            resumed.add(seen["resume"], seen["post"])
            progress(f"tus {report.size_text(size)} run {run + 1}/{repeats}: tus {seen['tus']:.0f} MB/s, resumed "
                     f"{seen['resume']:.0f} MB/s (resent {lost[-1]} bytes), one POST {seen['post']:.0f} MB/s")
        resumed.extra["resent_bytes_max"] = max(lost)
    return [whole, resumed]


# -- running ----------------------------------------------------------------------------


QUICK = {"size": 32 * MiB, "piece": 2 * MiB, "repeats": 2}
FULL = {"size": 1024 * MiB, "piece": 64 * MiB, "repeats": 3}


def run(quick: bool, workdir: Path, env: dict[str, str] | None = None,
        args: tuple[str, ...] = ()) -> tuple[list[Figure], dict[str, str]]:
    """The figures measured, and a note for each one skipped because its route is not there."""
    plan = QUICK if quick else FULL
    env = env or {}
    figures: list[Figure] = []
    skipped: dict[str, str] = {}
    try:
        figures.append(bench_download(plan["size"], plan["repeats"], workdir, env, args))
    except NotAvailable as exc:
        skipped["download.large"] = f"not available: {exc}"
    try:
        figures += bench_tus(plan["size"], plan["piece"], plan["repeats"], workdir, env, args)
    except NotAvailable as exc:
        skipped["tus.large"] = skipped["tus.resume_50pct"] = f"not available: {exc}"
    for name, note in skipped.items():
        progress(f"{name}: {note}")
    return figures, skipped


def main(argv: list[str] | None = None) -> int:
    def run_part(args: argparse.Namespace, workdir: Path) -> tuple[list[Figure], dict[str, str]]:
        return run(args.quick, workdir, server_env(args.server_env), tuple(args.server_arg))

    return run_part_alone("python -m bench.resources", __doc__, run_part, argv)


if __name__ == "__main__":
    sys.exit(main())

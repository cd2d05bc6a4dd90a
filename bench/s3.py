"""The S3 backend: a form upload to SeaweedFS through upload-asgi, against the same bytes
put by aiobotocore directly (multipart, 8 MiB parts, 2 in flight: what the app does).

Both in the same run, alternating, against one `weed mini` on loopback (started as the
tests start it, `tests/s3server.py`). Reported: MB/s median of each, the ratio, and the
serving process's peak RSS (SPEC §7: at most parts in flight x part size above a 1 MiB
upload's). SeaweedFS on the same 2 cores is most of the cost here.

    python -m bench.s3 [--size-mib 1024] [--repeats 2] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import payloads, report
from bench.client import check_stored, send_upload
from bench.payloads import MiB
from bench.report import Figure, mbps, progress
from bench.servers import Server

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from s3server import BUCKET, SeaweedFS  # noqa: E402  (the tests' SeaweedFS starter)

PART_SIZE = 8 * MiB  # UPLOAD_S3_PART_SIZE's default
PARTS_IN_FLIGHT = 2


async def put_directly(endpoint: str, upload: payloads.Upload, key: str) -> float:
    """Seconds to put the upload's bytes as one multipart object with aiobotocore."""
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    config = AioConfig(
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    blocks_per_part = PART_SIZE // len(upload.block)
    parts = upload.repeats // blocks_per_part
    async with get_session().create_client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config) as s3:
        started = time.perf_counter()
        upload_id = (await s3.create_multipart_upload(Bucket=BUCKET, Key=key))["UploadId"]
        slots = asyncio.Semaphore(PARTS_IN_FLIGHT)

        async def put_part(number: int) -> str:
            async with slots:
                body = upload.block * blocks_per_part
                answer = await s3.upload_part(Bucket=BUCKET, Key=key, UploadId=upload_id, PartNumber=number, Body=body)
                return answer["ETag"]

        etags = await asyncio.gather(*(put_part(n) for n in range(1, parts + 1)))
        await s3.complete_multipart_upload(
            Bucket=BUCKET, Key=key, UploadId=upload_id,
            MultipartUpload={"Parts": [{"PartNumber": n, "ETag": e} for n, e in enumerate(etags, 1)]},
        )
        seconds = time.perf_counter() - started
        await s3.delete_object(Bucket=BUCKET, Key=key)
        return seconds


def run(size: int, repeats: int, workdir: Path) -> Figure:
    upload = payloads.upload(size, payloads.random_bytes(MiB))
    small = payloads.upload(MiB, upload.block)
    figure = Figure("s3.form_upload", "form upload to SeaweedFS through upload-asgi (hypercorn)",
                    "the same bytes put by aiobotocore", size)
    with SeaweedFS(workdir / "weed") as weed:
        for name, value in weed.env.items():
            os.environ[name] = value
        os.environ["AWS_CONFIG_FILE"] = os.devnull
        env = {**weed.env, "UPLOAD_STORAGE": f"s3://{BUCKET}/bench", "UPLOAD_LOG_LEVEL": "warning",
               "AWS_CONFIG_FILE": os.devnull, "UPLOAD_DIR": str(workdir / "uploads")}
        with Server("upload_asgi:app", workdir, env=env) as server:
            if not check_stored(send_upload(server.port, small), small):
                raise RuntimeError("upload-asgi did not store a 1 MiB upload in S3 intact")
            rss_small = server.peak_rss_mib()
            for i in range(repeats):
                progress(f"s3 run {i + 1}/{repeats}")
                direct = asyncio.run(put_directly(weed.endpoint_url, upload, f"bench/direct-{i}"))
                answer = send_upload(server.port, upload)
                if not check_stored(answer, upload):
                    raise RuntimeError(f"upload-asgi did not store the upload in S3 intact: {answer.status}")
                figure.add(mbps(upload.body_length, answer.seconds), mbps(size, direct))
            rss_large = server.peak_rss_mib()
    figure.extra.update(
        peak_rss_1MiB_mib=round(rss_small, 1), peak_rss_mib=round(rss_large, 1),
        peak_rss_growth_mib=round(rss_large - rss_small, 1),
        bound_mib=PARTS_IN_FLIGHT * PART_SIZE // MiB,
    )
    return figure


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.s3", description=__doc__.split("\n\n")[0])
    parser.add_argument("--size-mib", type=int, default=1024, help="upload size (a multiple of 8)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--json", type=Path, help="also write the figure to this JSON file")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="upload-asgi-bench-s3-") as tmp:
        figure = run(args.size_mib * MiB, args.repeats, Path(tmp))
    print(report.table([figure]))
    print(f"peak RSS: {figure.extra}")
    if args.json:
        report.write_json(args.json, [figure], [], vars(args) | {"json": str(args.json)})
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The peer: aiohttp.web's multipart reader on aiohttp's own server, as its docs show it.

`POST /upload` reads the form with `request.multipart()`; the part named `file` is
read with `part.read_chunk(1 MiB)` (`BENCH_AIOHTTP_CHUNK` changes it), each chunk
hashed with SHA-256 and written to a new file in `$STORE_DIR` on the event loop, as
the aiohttp docs' example does (no fsync, no thread). The docs' example uses
`read_chunk()`'s default, 8 KiB, which costs twice the CPU per GB (measured here:
2.7 CPU s/GB at 8 KiB, 2.1 at 64 KiB, 1.2 at 1 MiB): the peer is the aiohttp user
who picked a large chunk, so that the comparison never flatters upload-asgi. The file stays (the bench empties the dir); the answer is
`201 {"size": N, "sha256": hex}`. `GET /health` answers 200.

    STORE_DIR=/tmp python -m bench.aiohttp_app --port 8080
"""

from __future__ import annotations

import argparse
import hashlib
import os
import uuid

from aiohttp import web

CHUNK = int(os.environ.get("BENCH_AIOHTTP_CHUNK", str(1 << 20)))  # read_chunk()'s default is 8192


async def upload(request: web.Request) -> web.Response:
    reader = await request.multipart()
    record = None
    async for part in reader:
        if part.name != "file":
            await part.release()
            continue
        digest = hashlib.sha256()
        size = 0
        path = os.path.join(os.environ.get("STORE_DIR", "."), uuid.uuid4().hex)
        with open(path, "wb") as f:
            while chunk := await part.read_chunk(CHUNK):
                digest.update(chunk)
                f.write(chunk)
                size += len(chunk)
        record = {"filename": part.filename, "size": size, "sha256": digest.hexdigest()}
    if record is None:
        return web.json_response({"error": "no_file"}, status=422)
    return web.json_response(record, status=201)


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def make_app() -> web.Application:
    app = web.Application()
    app.add_routes([web.post("/upload", upload), web.get("/health", health)])
    return app


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.aiohttp_app", description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    web.run_app(make_app(), host="127.0.0.1", port=args.port, access_log=None, print=None)


if __name__ == "__main__":
    main()

"""Several workers on one upload dir: no collisions, and no worker's startup sweep
deletes a file another live worker is writing or committing (SPEC §4, §8)."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import re
import threading
import time

import httpx
import pytest

from support import (
    HeldUpload,
    wait_for,
    Server,
    assert_stored,
    field_part,
    file_part,
    form_body,
    form_content_type,
    stored_ids,
)

MiB = 1024 * 1024


# -- hypercorn -w 2 ------------------------------------------------------------------------------


def served_by(log: str) -> dict[str, int]:
    """Count access-log lines per worker pid (format "%(p)s %(m)s %(U)s %(s)s")."""
    counts: dict[str, int] = {}
    for pid in re.findall(r"<(\d+)> POST /upload 201$", log, re.MULTILINE):
        counts[pid] = counts.get(pid, 0) + 1
    return counts


@pytest.mark.slow
def test_two_workers_take_16_concurrent_uploads(upload_dir):
    args = ["-w", "2", "--access-logfile", "-", "--access-logformat", "%(p)s %(m)s %(U)s %(s)s"]
    blobs = [os.urandom(2 * MiB + i * 4099) for i in range(16)]
    with Server(upload_dir, env={"UPLOAD_FSYNC": "1"}, args=args) as server:
        # The port answers as soon as one worker listens; on a busy machine the second
        # may start after all 16 uploads are done. Wait for both, so that both can serve.
        deadline = time.monotonic() + 30
        while len(set(re.findall(r"\[(\d+)\] \[INFO\] Running on", server.log()))) < 2:
            assert time.monotonic() < deadline, server.log()
            time.sleep(0.05)
        barrier = threading.Barrier(16)

        def upload(i: int) -> httpx.Response:
            body = form_body([field_part("description", f"upload {i}"), file_part(blobs[i], f"{i}.bin")])
            with server.client() as client:
                barrier.wait(timeout=30)  # all 16 in flight together
                return client.post("/upload", content=body, headers={"content-type": form_content_type()})

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            responses = list(pool.map(upload, range(16)))
        # A worker writes its access line after the answer is out, and Server.stop's
        # SIGTERM to the process group kills workers at once (they install no handler
        # for it: README "Shutdown"), so wait for the lines before stopping.
        deadline = time.monotonic() + 10
        while sum(served_by(server.log()).values()) < 16 and time.monotonic() < deadline:
            time.sleep(0.05)
    log = server.log()

    assert [r.status_code for r in responses] == [201] * 16, [r.text for r in responses]
    records = [r.json() for r in responses]
    assert len({r["id"] for r in records}) == 16
    for i, (record, data) in enumerate(zip(records, blobs)):
        assert record["description"] == f"upload {i}"
        assert_stored(upload_dir, record, data)
    assert stored_ids(upload_dir) == sorted(r["id"] for r in records)
    assert sorted(p.name for p in upload_dir.iterdir()) == sorted(
        [".partial", *(r["id"] for r in records), *(f"{r['id']}.json" for r in records)]
    )
    assert list((upload_dir / ".partial").iterdir()) == []
    assert len(set(re.findall(r"\[(\d+)\] \[INFO\] Running on", log))) == 2  # two workers listened
    # Which worker took which upload is the kernel's choice; report it, don't assert it.
    counts = served_by(log)
    assert sum(counts.values()) == 16
    print("uploads per worker pid:", counts)




@pytest.mark.slow
def test_a_restarted_worker_sweeps_stale_files_but_not_a_live_upload(upload_dir):
    """`--max-requests 2`: a worker exits after its third request and hypercorn starts
    a new one, whose lifespan startup sweeps .partial/ while another worker is still
    receiving an upload into it."""
    args = ["-w", "2", "--max-requests", "2", "--max-requests-jitter", "0", "--graceful-timeout", "60"]
    env = {"UPLOAD_FSYNC": "0", "UPLOAD_IDLE_TIMEOUT": "120"}
    data = os.urandom(4 * MiB)
    body = form_body([file_part(data, "in-flight.bin")])
    partial_dir = upload_dir / ".partial"
    with Server(upload_dir, env=env, args=args) as server:
        # The port accepts as soon as the parent binds it; wait until both workers have
        # run their startup sweep and listen ("Running on" follows lifespan startup).
        wait_for(lambda: server.log().count("Running on") == 2)
        first_workers = set(server.pids()[1:])
        held = HeldUpload(server.port, body, first=2 * MiB)  # > one 1 MiB write block
        try:
            wait_for(lambda: partial_dir.is_dir() and any(p.stat().st_size > 0 for p in partial_dir.iterdir()))
            [live] = list(partial_dir.iterdir())
            stale = partial_dir / "ffffffffffffffffffffffffffffffff"
            stale.write_bytes(b"left by a worker that was killed")

            # Plain requests, one connection each, until a new worker has started and swept.
            requests = 0
            while stale.exists():
                assert requests < 40, f"no worker restarted: {server.log()}"
                with server.client(timeout=30) as client:
                    assert client.get("/health", headers={"connection": "close"}).status_code == 200
                requests += 1
            assert set(server.pids()[1:]) - first_workers, "a new worker process"
            assert live.exists(), "the live upload's partial file was swept"

            status, record = held.finish()
        finally:
            held.close()
    assert status == 201, record
    assert record["sha256"] == hashlib.sha256(data).hexdigest()
    assert_stored(upload_dir, record, data)
    assert list(partial_dir.iterdir()) == []

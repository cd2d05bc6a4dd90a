"""Several workers on one upload dir: no collisions, and no worker's startup sweep
deletes a file another live worker is writing or committing (SPEC §4, §8)."""

from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from upload_service import localstore
from support import (
    BOUNDARY,
    Server,
    assert_stored,
    field_part,
    file_part,
    form_body,
    form_content_type,
    stored_ids,
)
from targets import FormLimits, FormReader
from upload_service.localstore import LocalStore, prepare_upload_dir, sweep_stale_partials

MiB = 1024 * 1024


def new_reader(store: LocalStore) -> FormReader:
    limits = FormLimits(max_file_size=MiB, max_field_size=1024, max_files=10, max_parts=20)
    return FormReader(BOUNDARY.encode(), store, limits, file_field="file", text_fields=())


# -- the lock protocol, driven directly -----------------------------------------------------


def test_sweep_spares_a_file_locked_by_another_process(tmp_path):
    partial_dir = prepare_upload_dir(tmp_path / "uploads")
    live = partial_dir / "live"
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import fcntl, os, sys\n"
         f"fd = os.open({str(live)!r}, os.O_WRONLY | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX)\n"
         "print('locked', flush=True)\n"
         "sys.stdin.read()\n"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        (partial_dir / "stale").write_bytes(b"no one holds me")
        assert sweep_stale_partials(partial_dir) == 1
        assert [p.name for p in partial_dir.iterdir()] == ["live"]
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    # Its process is gone, so is the lock: the next sweep takes it.
    assert sweep_stale_partials(partial_dir) == 1
    assert list(partial_dir.iterdir()) == []


def test_a_new_partial_file_survives_a_sweep_that_locks_it_first(tmp_path, monkeypatch):
    """The race between O_CREAT and flock: a sweep in another worker opens the fresh,
    not yet locked file, locks it and unlinks it. The writer must wait for that lock
    (not fail with EWOULDBLOCK) and then start over with a new file."""
    partial_dir = prepare_upload_dir(tmp_path / "uploads")
    real_open = os.open
    raced = []

    def open_then_sweep_wins(path, flags, *args):
        fd = real_open(path, flags, *args)
        if flags & os.O_EXCL and not raced:
            raced.append(path)
            sweeper = real_open(path, os.O_RDONLY)
            fcntl.flock(sweeper, fcntl.LOCK_EX | fcntl.LOCK_NB)  # the sweep got there first

            def finish_sweep() -> None:
                os.unlink(path)
                os.close(sweeper)

            threading.Timer(0.2, finish_sweep).start()
        return fd

    monkeypatch.setattr(localstore.os, "open", open_then_sweep_wins)
    path = partial_dir / "0123456789abcdef0123456789abcdef"
    fd = localstore.create_locked(path)
    monkeypatch.undo()
    try:
        assert raced == [path]
        os.write(fd, b"written after the race")
        assert path.read_bytes() == b"written after the race"  # a live, linked file
        assert sweep_stale_partials(partial_dir) == 0  # and locked
    finally:
        os.close(fd)


def test_partial_files_stay_locked_until_they_leave_partial(tmp_path, monkeypatch):
    """A worker starting while another commits a multi-file upload must not sweep the
    files that are finished but not yet renamed."""
    upload_dir = tmp_path / "uploads"
    store = LocalStore(upload_dir, fsync=False)
    store.prepare()
    partial_dir = store.partial_dir
    files = [os.urandom(1000 + i) for i in range(3)]
    body = form_body([file_part(data, f"{i}.bin") for i, data in enumerate(files)])
    reader = new_reader(store)
    reader.feed(body)
    reader.close()
    records = [{"id": t.id, "size": t.size} for t in reader.files]
    assert len(records) == 3

    real_write_sidecar = localstore.write_sidecar
    swept = []

    def sweep_then_write(*args, **kwargs):
        swept.append(sweep_stale_partials(partial_dir))  # another worker starts now
        return real_write_sidecar(*args, **kwargs)

    monkeypatch.setattr(localstore, "write_sidecar", sweep_then_write)
    store.commit_files([(t.sink, r) for t, r in zip(reader.files, records)])
    assert swept == [0, 0, 0]
    for record, data in zip(records, files):
        assert (upload_dir / record["id"]).read_bytes() == data
        assert json.loads((upload_dir / f"{record['id']}.json").read_text()) == record
    assert list(partial_dir.iterdir()) == []
    # Committed files are closed: nothing keeps them locked or open.
    for record in records:
        fd = os.open(upload_dir / record["id"], os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            os.close(fd)


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
    log = server.log()  # once stopped: a worker writes its access line after the answer is out

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


class HeldUpload:
    """An HTTP/1.1 upload sent by hand: head and first bytes now, the rest on demand."""

    def __init__(self, port: int, body: bytes, first: int) -> None:
        self.body = body
        self.first = first
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=30)
        head = (
            "POST /upload HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: {form_content_type()}\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        self.sock.sendall(head.encode() + body[:first])

    def finish(self) -> tuple[int, dict]:
        self.sock.sendall(self.body[self.first :])
        data = b""
        while b"\r\n\r\n" not in data:
            data += self.sock.recv(65536)
        head, _, rest = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
        while len(rest) < length:
            rest += self.sock.recv(65536)
        return int(head.split()[1]), json.loads(rest[:length])

    def close(self) -> None:
        self.sock.close()


def wait_for(condition, timeout: float = 30.0, every: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(every)


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

"""upload_service/localstore.py driven directly: the commit, the partial sweep."""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import subprocess
import sys
import threading

import pytest

import upload_asgi
from support import file_part, form_body, multi_body, partial_files, reader_for
from upload_service import localstore
from upload_service.localstore import LocalStore, prepare_upload_dir, sweep_stale_partials


# -- commit and the partial sweep --------------------------------------------------------


def test_commit_files_moves_and_writes_sidecars(store, partial_dir):
    upload_dir = store.upload_dir
    body, files = multi_body()
    reader = reader_for(store)
    reader.feed(body)
    reader.close()
    records = [{"id": t.id, "filename": t.filename, "size": t.size} for t in reader.files]
    store.commit_files([(t.sink, r) for t, r in zip(reader.files, records)])
    assert list(partial_dir.iterdir()) == []
    for record, (_, _, data) in zip(records, files):
        assert (upload_dir / record["id"]).read_bytes() == data
        assert json.loads((upload_dir / f"{record['id']}.json").read_text()) == record
    assert len(list(upload_dir.iterdir())) == 2 * len(files) + 1  # + .partial/


KILLED_IN_COMMIT = """
import os, sys
from upload_service import localstore
upload_dir, files, die_at = localstore.Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
store = localstore.LocalStore(upload_dir, fsync=False)
store.prepare()
kept = store.new_file()
kept.open(); kept.write(b"stored before")
store.commit_files([(kept, {"id": kept.id, "size": 13})])
real, calls = localstore.write_sidecar, []
def write_sidecar(*args):
    calls.append(1)
    if len(calls) == die_at:
        os._exit(9)  # killed between moving a file in and writing its record
    real(*args)
localstore.write_sidecar = write_sidecar
sinks = [store.new_file() for _ in range(files)]
for sink in sinks:
    sink.open(); sink.write(b"x" * 1000)
print(kept.id, flush=True)
store.commit_files([(sink, {"id": sink.id, "size": 1000}) for sink in sinks])
"""


@pytest.mark.parametrize("files, die_at", [(1, 1), (3, 1), (3, 2), (3, 3)])
def test_a_commit_killed_half_way_leaves_nothing_after_the_next_start(tmp_path, files, die_at):
    """SPEC §4: all of a request's files or none, across a kill -9 inside the commit too; no
    stored file without its record. A file stored before stays."""
    upload_dir = tmp_path / "uploads"
    run = subprocess.run([sys.executable, "-c", KILLED_IN_COMMIT, str(upload_dir), str(files), str(die_at)],
                         capture_output=True, text=True, cwd=localstore.Path(upload_asgi.__file__).parent)
    assert run.returncode == 9, run.stderr
    kept = run.stdout.strip()
    assert len(os.listdir(upload_dir)) > 3  # what the kill left: files, maybe records, the marker
    prepare_upload_dir(upload_dir)
    assert sorted(os.listdir(upload_dir)) == sorted([".partial", kept, f"{kept}.json"])
    assert os.listdir(upload_dir / ".partial") == []


def test_prepare_upload_dir_creates_and_sweeps_only_stale_files(tmp_path):
    upload_dir = tmp_path / "deep" / "uploads"
    LocalStore(upload_dir).prepare()
    partial_dir = upload_dir / ".partial"
    assert partial_dir == upload_dir / ".partial" and partial_dir.is_dir()
    stale = partial_dir / "stale"
    stale.write_bytes(b"left by a crashed process")
    live = partial_dir / "live"
    fd = os.open(live, os.O_WRONLY | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another worker is writing it
        assert sweep_stale_partials(partial_dir) == 1
        assert sorted(p.name for p in partial_dir.iterdir()) == ["live"]
    finally:
        os.close(fd)
    LocalStore(upload_dir).prepare()  # the lock is gone: now it is stale
    assert list(partial_dir.iterdir()) == []


# -- the lock protocol: several workers on one upload dir ---------------------------


HOLD_LOCK = """
import fcntl, os, sys
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX)
print("locked", flush=True)
sys.stdin.read()
"""


def test_sweep_keeps_a_file_another_process_is_writing(tmp_path):
    partial_dir = localstore.prepare_upload_dir(tmp_path / "uploads")
    live = partial_dir / localstore.new_file_id()
    stale = partial_dir / localstore.new_file_id()
    stale.write_bytes(b"left by a crashed process")
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(live)], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout.readline() == b"locked\n"
        assert localstore.sweep_stale_partials(partial_dir) == 1
        assert partial_files(tmp_path / "uploads") == [live]
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    # Its process is gone, so is its lock: now the file is stale.
    assert localstore.sweep_stale_partials(partial_dir) == 1
    assert partial_files(tmp_path / "uploads") == []


def test_sweep_keeps_a_file_this_process_is_writing(tmp_path):
    """flock belongs to the open file: a sweep in the same process (another app) sees it too."""
    partial_dir = localstore.prepare_upload_dir(tmp_path / "uploads")
    path = partial_dir / localstore.new_file_id()
    fd = localstore.create_locked(path)
    try:
        os.write(fd, b"in flight")
        assert localstore.sweep_stale_partials(partial_dir) == 0
        assert path.read_bytes() == b"in flight"
        # A second app on the same dir prepares it at its startup: the file stays.
        other = upload_asgi.create_app(upload_asgi.Config(upload_dir=tmp_path / "uploads"))
        other.prepare()
        assert path.exists()
    finally:
        os.close(fd)
    assert localstore.sweep_stale_partials(partial_dir) == 1


def test_sweep_ignores_what_it_cannot_open(tmp_path):
    partial_dir = localstore.prepare_upload_dir(tmp_path / "uploads")
    (partial_dir / "dangling").symlink_to(tmp_path / "nowhere")
    assert localstore.sweep_stale_partials(partial_dir) == 0


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


def test_a_sweep_undoes_nothing_of_a_commit_that_ended_while_it_looked(tmp_path, monkeypatch):
    """A starting worker opened a live commit's marker, and the commit ended (files stored, marker
    removed, then unlocked) before the sweep took the lock: the files it names stay stored."""
    store = LocalStore(tmp_path / "uploads", fsync=False)
    store.prepare()
    sinks = [store.new_file() for _ in range(2)]
    for sink in sinks:
        sink.open()
        sink.write(b"kept")
    records = [{"id": sink.id, "size": 4} for sink in sinks]
    marker_fd, marker = store.begin_commit([sinks[1].id, sinks[0].id])  # the commit's, held
    real_open = os.open
    ended = []

    def open_then_the_commit_ends(path, flags, *args):
        fd = real_open(path, flags, *args)
        if path == marker and not ended:
            ended.append(path)
            store.commit_files(list(zip(sinks, records)))
            localstore.end_commit(marker_fd, marker)
        return fd

    monkeypatch.setattr(localstore.os, "open", open_then_the_commit_ends)
    localstore.undo_dead_commits(store.upload_dir, store.partial_dir)
    monkeypatch.undo()
    assert ended == [marker]
    for sink, record in zip(sinks, records):
        assert (store.upload_dir / sink.id).read_bytes() == b"kept"
        assert json.loads((store.upload_dir / f"{sink.id}.json").read_text()) == record


def test_the_startup_probe_survives_another_workers_sweep(tmp_path, monkeypatch):
    """Workers start together: one's sweep of `.partial/` runs while another's probe of the commit
    (create in `.partial/`, rename into the dir) is between the two: that start must not fail."""
    upload_dir = tmp_path / "uploads"
    prepare_upload_dir(upload_dir)
    real_rename = os.rename
    swept = []

    def sweep_then_rename(src, dst, *args, **kwargs):
        if not swept:
            swept.append(sweep_stale_partials(upload_dir / ".partial"))
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(localstore.os, "rename", sweep_then_rename)
    localstore.check_commits_work(upload_dir, upload_dir / ".partial")
    monkeypatch.undo()
    assert swept == [0]
    assert sorted(os.listdir(upload_dir)) == [".partial"] and os.listdir(upload_dir / ".partial") == []


def test_partial_files_stay_locked_until_they_leave_partial(tmp_path, monkeypatch):
    """A worker starting while another commits a multi-file upload must not sweep the
    files that are finished but not yet renamed."""
    upload_dir = tmp_path / "uploads"
    store = LocalStore(upload_dir, fsync=False)
    store.prepare()
    partial_dir = store.partial_dir
    files = [os.urandom(1000 + i) for i in range(3)]
    body = form_body([file_part(data, f"{i}.bin") for i, data in enumerate(files)])
    reader = reader_for(store, file_field="file")
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


@pytest.mark.parametrize(
    "fsync, files, size, on_the_loop",
    [(False, 1, 100, True), (False, localstore.INLINE_COMMIT_FILES, 100, True),
     (False, localstore.INLINE_COMMIT_FILES + 1, 100, False), (True, 1, 100, False),
     (False, 1, localstore.INLINE_COMMIT_BYTES + 1, False)],
)
def test_a_cheap_commit_runs_on_the_loop_and_others_on_a_thread(tmp_path, monkeypatch, fsync, files, size, on_the_loop):
    """Without fsync, a few small files commit on the event loop: a thread hand-off would cost
    more than the work. What fsyncs, many files or many bytes go to a thread: the loop never
    waits on a disk (on NFS a close flushes what a file still has in memory)."""
    store = LocalStore(tmp_path / "uploads", fsync=fsync)
    store.prepare()
    datas = [os.urandom(size + i) for i in range(files)]
    reader = reader_for(store, file_field="file")
    reader.feed(form_body([file_part(data, f"{i}.bin") for i, data in enumerate(datas)]))
    reader.close()
    records = [{"id": t.id, "size": t.size} for t in reader.files]
    threads = []
    real_commit_files = store.commit_files

    def commit_files(*args):
        threads.append(threading.current_thread())
        return real_commit_files(*args)

    monkeypatch.setattr(store, "commit_files", commit_files)
    asyncio.run(store.commit([(t.sink, r) for t, r in zip(reader.files, records)], before=reader.write_held))
    assert (threads == [threading.main_thread()]) is on_the_loop
    for record, data in zip(records, datas):
        assert (store.upload_dir / record["id"]).read_bytes() == data


def test_a_lock_that_fails_otherwise_than_busy_closes_what_it_opened(tmp_path, monkeypatch) -> None:
    """lock_if_unheld: a flock failing with another error (ENOLCK on some network file systems) is
    raised, and its fd does not stay open (a sweep of many markers would run out of fds)."""
    marker = tmp_path / "x.commit"
    marker.write_bytes(b"")

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    before = len(os.listdir("/proc/self/fd"))
    for _ in range(20):
        with pytest.raises(OSError):
            localstore.lock_if_unheld(str(marker))
    assert len(os.listdir("/proc/self/fd")) == before

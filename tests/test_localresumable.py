"""The local ResumableStore driven directly: the lock, the kept or re-read SHA-256, discard, sweep."""

from __future__ import annotations

import fcntl
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from upload_service import localresumable
from upload_service.localresumable import LocalResumableStore
from upload_service.localstore import LocalStore
from upload_service.storage import UploadBusy


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def payload(size: int, seed: int = 1) -> bytes:
    return hashlib.shake_256(seed.to_bytes(4, "big")).digest(size)


def resumable_files(upload_dir: Path) -> list[str]:
    staging = upload_dir / ".resumable"
    return sorted(p.name for p in staging.iterdir()) if staging.exists() else []



@pytest.fixture
def rstore(upload_dir: Path) -> LocalResumableStore:
    store = LocalStore(upload_dir, fsync=True)
    store.prepare()
    return LocalResumableStore(store.upload_dir, store.fsync)


def test_store_keeps_the_hash_state_while_offsets_match(rstore: LocalResumableStore, upload_dir: Path) -> None:
    data = payload(3_000_001)
    upload = rstore.create(len(data), {}, time.time() + 60, None)
    upload.append(data[:1_000_000])
    upload.release()
    again = rstore.acquire(upload.info.id)
    assert again.info.offset == 1_000_000
    again.append(data[1_000_000:])
    assert again.sha256() == sha(data)
    assert again.rehashed_bytes == 0  # the state was kept in this process
    again.finish({"id": upload.info.id, "size": len(data), "sha256": sha(data)})
    assert (upload_dir / upload.info.id).read_bytes() == data
    assert resumable_files(upload_dir) == []


def test_store_rehashes_from_disk_in_another_process(rstore: LocalResumableStore, upload_dir: Path) -> None:
    data = payload(2_500_000)
    upload = rstore.create(len(data), {}, time.time() + 60, None)
    upload.append(data[:2_000_000])
    upload.release()
    elsewhere = LocalResumableStore(upload_dir, True)  # a restarted or other worker
    again = elsewhere.acquire(upload.info.id)
    again.append(data[2_000_000:])
    assert again.sha256() == sha(data)
    assert again.rehashed_bytes == 2_000_000


def test_store_one_writer_at_a_time(rstore: LocalResumableStore) -> None:
    upload = rstore.create(10, {}, time.time() + 60, None)
    with pytest.raises(UploadBusy):
        rstore.acquire(upload.info.id)
    with pytest.raises(UploadBusy):
        LocalResumableStore(rstore.upload_dir, rstore.fsync).acquire(upload.info.id)
    upload.release()
    rstore.acquire(upload.info.id).release()


def test_store_a_writer_in_another_process_is_asked_to_stop(rstore: LocalResumableStore, upload_dir: Path) -> None:
    """Another worker's request asks the holder to let go (a stop file); whoever takes the
    upload next clears the request; a request left behind goes with its upload."""
    upload = rstore.create(10, {}, time.time() + 60, None)
    elsewhere = LocalResumableStore(upload_dir, True)
    assert not upload.stop_asked()
    with pytest.raises(UploadBusy):
        elsewhere.acquire(upload.info.id)
    elsewhere.ask_to_stop(upload.info.id)
    assert upload.stop_asked()
    upload.release()
    taken = elsewhere.acquire(upload.info.id)
    assert not taken.stop_asked()
    rstore.ask_to_stop(taken.info.id)  # asked, then the upload was removed
    taken.terminate()
    assert resumable_files(upload_dir) == []
    gone = rstore.create(10, {}, time.time() + 60, None)
    rstore.ask_to_stop(gone.info.id)
    (upload_dir / ".resumable" / gone.info.id).unlink()  # a crash inside finish: data moved, info and stop left
    gone.release()
    rstore.sweep(time.time())
    assert resumable_files(upload_dir) == []


@pytest.mark.parametrize("end", ["terminate", "finish"])
def test_store_asking_a_holder_that_just_let_go_leaves_no_stop_file(
    rstore: LocalResumableStore, upload_dir: Path, end: str
) -> None:
    """The race of two DELETEs (or a PATCH storing the file and a DELETE): the second found the
    upload busy, and asks after the holder removed it and its stop file."""
    upload = rstore.create(3, {}, time.time() + 60, None)
    upload.append(b"abc")
    elsewhere = LocalResumableStore(upload_dir, True)
    with pytest.raises(UploadBusy):
        elsewhere.acquire(upload.info.id)
    if end == "terminate":
        upload.terminate()
    else:
        upload.finish({"id": upload.info.id, "size": 3, "sha256": sha(b"abc")})
    elsewhere.ask_to_stop(upload.info.id)
    assert resumable_files(upload_dir) == []
    assert elsewhere.acquire(upload.info.id) is None


KILLED_IN_FINISH = """
import os, sys, time
from pathlib import Path
from upload_service import localresumable
store = localresumable.LocalResumableStore(Path(sys.argv[1]), False)
upload = store.create(3000, {}, time.time() + 60, None)
upload.append(bytes(range(250)) * 12)
print(upload.info.id, flush=True)
localresumable.write_sidecar = lambda *args: os._exit(9)  # killed between moving the bytes in and the record
upload.finish({"id": upload.info.id, "size": 3000})
"""


def test_store_a_finish_killed_half_way_is_resumable_again(upload_dir: Path) -> None:
    """The bytes were moved into the upload dir, the record never written: the next start's
    sweeps move them back (never a stored file without a record, never an upload lost)."""
    data = bytes(range(250)) * 12
    LocalStore(upload_dir, fsync=False).prepare()
    run = subprocess.run([sys.executable, "-c", KILLED_IN_FINISH, str(upload_dir)], capture_output=True, text=True,
                         cwd=Path(localresumable.__file__).parent.parent)
    assert run.returncode == 9, run.stderr
    upload_id = run.stdout.strip()
    assert (upload_dir / upload_id).exists() and not (upload_dir / f"{upload_id}.json").exists()
    LocalStore(upload_dir, fsync=False).prepare()  # as at startup: the form store's sweep first
    store = LocalResumableStore(upload_dir, False)
    store.sweep(time.time())
    assert resumable_files(upload_dir) == sorted([upload_id, f"{upload_id}.info"])
    assert sorted(os.listdir(upload_dir)) == [".partial", ".resumable"]
    upload = store.acquire(upload_id)
    assert upload.info.offset == 3000 and upload.sha256() == sha(data)
    upload.finish({"id": upload_id, "size": 3000})
    assert (upload_dir / upload_id).read_bytes() == data and resumable_files(upload_dir) == []


def left_inside_finish(rstore: LocalResumableStore, upload_dir: Path, data: bytes) -> str:
    """An upload as a kill -9 inside `finish` leaves it: its bytes moved in, no record, its info kept."""
    upload = rstore.create(len(data), {}, time.time() + 3600, None)
    upload.append(data)
    upload.save_info()
    os.rename(rstore.data_path(upload.info.id), upload_dir / upload.info.id)
    upload.release()
    return upload.info.id


def is_whole_again(rstore: LocalResumableStore, upload_id: str, data: bytes) -> bool:
    return rstore.data_path(upload_id).read_bytes() == data and rstore.info_path(upload_id).exists()


@pytest.mark.parametrize("moved_back", ["before this sweep looks", "between its open and its lock"])
def test_a_sweep_keeps_an_upload_another_workers_sweep_moved_back(
    rstore: LocalResumableStore, upload_dir: Path, monkeypatch: pytest.MonkeyPatch, moved_back: str
) -> None:
    """Workers starting together after a crash inside `finish`: one's sweep moves the bytes back
    while another's looks at them. The upload stays whole (not its info removed, not a failed start)."""
    data = payload(1000)
    upload_id = left_inside_finish(rstore, upload_dir, data)
    other = LocalResumableStore(upload_dir, True)
    if moved_back == "before this sweep looks":
        assert other._finishing_or_restored(upload_id)
    else:
        lock_if_unheld = localresumable.lock_if_unheld

        def opened_then_moved_back(path: str) -> int:
            monkeypatch.setattr(localresumable, "lock_if_unheld", lock_if_unheld)  # the other's own
            fd = os.open(path, os.O_RDONLY)
            assert other._finishing_or_restored(upload_id)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd

        monkeypatch.setattr(localresumable, "lock_if_unheld", opened_then_moved_back)
    assert rstore._finishing_or_restored(upload_id)
    rstore.sweep(time.time())
    assert is_whole_again(rstore, upload_id, data)
    assert sorted(os.listdir(upload_dir)) == [".partial", ".resumable"]


STARTING_WORKER = """
import sys, time
from pathlib import Path
from upload_service.localresumable import LocalResumableStore
from upload_service.localstore import LocalStore
upload_dir, start = Path(sys.argv[1]), float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
LocalStore(upload_dir, fsync=False).prepare()
LocalResumableStore(upload_dir, False).sweep(time.time())
"""


@pytest.mark.slow
def test_workers_starting_together_after_a_crash_keep_every_upload(rstore: LocalResumableStore, upload_dir: Path) -> None:
    """`hypercorn -w 4` started after a kill -9 inside `finish` of many uploads: the four startup
    sweeps at once start cleanly and leave every upload whole (they lost some, or failed a start)."""
    uploads = {left_inside_finish(rstore, upload_dir, payload(512, i)): payload(512, i) for i in range(300)}
    for round_ in range(3):
        if round_:
            for upload_id in uploads:
                os.rename(rstore.data_path(upload_id), upload_dir / upload_id)
        start = time.time() + 2
        workers = [
            subprocess.Popen([sys.executable, "-c", STARTING_WORKER, str(upload_dir), str(start)],
                             cwd=Path(localresumable.__file__).parent.parent, stderr=subprocess.PIPE, text=True)
            for _ in range(4)
        ]
        for worker in workers:
            _, errors = worker.communicate(timeout=60)
            assert worker.returncode == 0, errors
        assert all(is_whole_again(rstore, upload_id, data) for upload_id, data in uploads.items())


def test_store_discard_takes_back_a_piece(rstore: LocalResumableStore) -> None:
    upload = rstore.create(None, {}, time.time() + 60, None)
    upload.append(b"kept")
    upload.mark(durable=True)
    upload.append(b"unverified")
    upload.discard()
    assert upload.info.offset == 4
    assert upload.sha256() == sha(b"kept")
    assert rstore.data_path(upload.info.id).read_bytes() == b"kept"


def test_store_unverified_bytes_of_a_dead_writer_are_dropped(rstore: LocalResumableStore) -> None:
    upload = rstore.create(None, {}, time.time() + 60, None)
    upload.append(b"kept")
    upload.mark(durable=True)
    upload.append(b"unverified")
    upload.release()  # as if its process died here: neither keep nor discard
    elsewhere = LocalResumableStore(rstore.upload_dir, rstore.fsync)
    assert elsewhere.peek(upload.info.id).offset == 4
    again = elsewhere.acquire(upload.info.id)
    assert again.info.offset == 4
    assert again.sha256() == sha(b"kept")


def test_store_sweep(rstore: LocalResumableStore, upload_dir: Path) -> None:
    expired = rstore.create(None, {}, time.time() - 1, None)
    expired.append(b"old")
    expired.release()
    held = rstore.create(None, {}, time.time() - 1, None)  # expired but being written: stays
    alive = rstore.create(None, {}, time.time() + 60, None)
    alive.release()
    orphan = upload_dir / ".resumable" / ("ab" * 16)  # a crash between data file and info
    orphan.write_bytes(b"x")
    assert rstore.sweep(time.time()) == 2
    assert resumable_files(upload_dir) == sorted(
        [held.info.id, f"{held.info.id}.info", alive.info.id, f"{alive.info.id}.info"]
    )
    held.release()
    assert rstore.sweep(time.time()) == 1


def test_a_sweep_between_creation_and_its_lock_does_not_lose_the_upload(
    rstore: LocalResumableStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep (another worker's, or this one's thread) that finds a new data file before its
    creator locked it takes it for a crash's leftover and removes it: the creator must notice
    and start over, or its client gets 201 for an upload that is gone (404 on the next PATCH)."""
    real_open = os.open
    swept = []

    def open_then_sweep(path: Any, flags: int, *args: Any) -> int:
        fd = real_open(path, flags, *args)
        if flags & os.O_EXCL and not swept:
            swept.append(rstore.sweep(time.time()))
        return fd

    monkeypatch.setattr(os, "open", open_then_sweep)
    upload = rstore.create(None, {}, time.time() + 60, None)
    monkeypatch.undo()
    assert swept == [1]
    upload.append(b"kept")
    upload.keep()
    upload.release()
    assert rstore.peek(upload.info.id).offset == 4
    assert rstore.acquire(upload.info.id).info.offset == 4


def test_store_sweep_decides_on_the_info_read_under_the_lock(
    rstore: LocalResumableStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A PATCH that renews the expiry and lets go between the sweep's first read and its lock: the upload stays."""
    upload = rstore.create(None, {}, time.time() - 1, None)
    upload.append(b"abc")
    upload.release()
    real_read_info = rstore.read_info
    renewed = []

    def read_then_renew(upload_id: str) -> Any:
        saved = real_read_info(upload_id)
        if not renewed:  # the PATCH comes in right after this read
            renewed.append(True)
            patching = rstore.acquire(upload_id)
            patching.info.expires = time.time() + 60
            patching.save_info()
            patching.release()
        return saved

    monkeypatch.setattr(rstore, "read_info", read_then_renew)
    assert rstore.sweep(time.time()) == 0
    assert rstore.peek(upload.info.id).offset == 3

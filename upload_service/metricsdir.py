"""The directory where the workers of one server share their metric values.

prometheus-client's multiprocess mode: each worker process writes its series to mmap
files there (`counter_<pid>.db`, `histogram_<pid>.db`, `gauge_livesum_<pid>.db`) and
every scrape sums them all. The directory is `PROMETHEUS_MULTIPROC_DIR` when set (the
operator's), or else, for a process started by `multiprocessing` (every hypercorn
worker, also with `-w 1`), one that the workers of the same server run find by their
parent: `<tmp>/upload-asgi-metrics-<parent pid>-<its start time>`.

A worker that exited leaves its counter and histogram files, which keep its counts in
the totals. In a directory of ours, each worker that starts folds those files into one
archive per kind, so that restarts (`--max-requests`) do not grow the directory and the
cost of every scrape; scrapes hold a shared lock that a fold takes alone.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import re
import shutil
import stat
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from prometheus_client import values
from prometheus_client.mmap_dict import MmapedDict
from prometheus_client.multiprocess import mark_process_dead

logger = logging.getLogger("upload_asgi")

MULTIPROC_VARIABLE = "PROMETHEUS_MULTIPROC_DIR"
RUN_DIR_PREFIX = "upload-asgi-metrics-"
LIVE_GAUGE_FILE = re.compile(r"gauge_live\w+_(\d+)\.db")
FOLDED_KINDS = ("counter", "histogram")  # summed over every worker that ever ran
LOCK_FILE = ".lock"  # not `*.db`: prometheus-client reads only those
# How long a starting worker's fold waits for the lock: a process stopped while holding it
# (SIGSTOP, a debugger) must not hold the start; the fold is then left for later.
LOCK_WAIT_SECONDS = 2.0
# A scrape, on the event loop, waits as long as a fold takes (milliseconds), then reads without
# the lock (that one scrape may count a folding worker twice or not at all) and folds nothing.
SCRAPE_LOCK_WAIT_SECONDS = 0.05


@dataclass(frozen=True)
class SharedDir:
    path: str
    ours: bool  # made here: folded and locked; not the operator's PROMETHEUS_MULTIPROC_DIR

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Hold off a fold while a scrape reads the files (it would see a kind twice or not at all)."""
        if not self.ours:
            yield
            return
        with locked(self.path, fcntl.LOCK_SH, SCRAPE_LOCK_WAIT_SECONDS):
            yield

    def fold_exited_workers(self, wait: float = LOCK_WAIT_SECONDS) -> bool:
        """Fold the counter and histogram files of workers that exited into one archive per kind;
        False if another process held the lock past `wait` (the next start or scrape will)."""
        with locked(self.path, fcntl.LOCK_EX, wait) as held:
            if held:
                for kind in FOLDED_KINDS:
                    fold(Path(self.path), kind)
            return held

    def before_scrape(self) -> None:
        """Drop the in-flight gauges of workers gone; fold exited workers' files if there are any
        (one that cannot be read, a worker killed as it made it, would fail every scrape)."""
        forget_dead_workers(self.path)
        if self.ours and any_exited_worker(Path(self.path)):
            try:
                self.fold_exited_workers(SCRAPE_LOCK_WAIT_SECONDS)
            except Exception:  # the scrape answers all the same
                logger.warning("metrics: folding exited workers in %s failed", self.path, exc_info=True)


def shared_dir() -> SharedDir | None:
    """Where the workers of this server run share their values; None for plain counters."""
    explicit = os.environ.get(MULTIPROC_VARIABLE) or os.environ.get(MULTIPROC_VARIABLE.lower())
    if explicit:
        return SharedDir(explicit, ours=False)
    parent = multiprocessing.parent_process()
    if parent is None or parent.pid is None:
        return None
    path = Path(tempfile.gettempdir()) / f"{RUN_DIR_PREFIX}{parent.pid}-{start_time(parent.pid)}"
    try:
        make_private_dir(path)
    except OSError as exc:
        logger.warning("metrics stay per worker: cannot use %s (%s)", path, exc)
        return None
    remove_dead_runs(path.parent)
    shared = SharedDir(str(path), ours=True)
    try:
        if not shared.fold_exited_workers():
            logger.warning("metrics: %s stayed locked; exited workers are folded later", path)
    except Exception:  # never a reason for a worker not to start
        logger.warning("metrics of exited workers stay unfolded in %s", path, exc_info=True)
    return shared


def start_time(pid: int) -> str:
    """The process's start time in clock ticks since boot (Linux), so a reused pid is told apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return fields[19]  # field 22 of proc(5), counted after "pid (comm)"
    except (OSError, IndexError):
        return "0"


def make_private_dir(path: Path) -> None:
    """Create `path` for this user only, or accept it if this user made it (another worker)."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    info = path.lstat()  # not a symlink someone else planted in the shared temp dir
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{path} is not a private directory of this user")


def remove_dead_runs(tmp: Path) -> None:
    """Remove the directories of server runs whose parent process is gone."""
    for entry in tmp.glob(RUN_DIR_PREFIX + "*"):
        pid = entry.name[len(RUN_DIR_PREFIX) :].split("-")[0]
        if pid.isdigit() and not is_alive(int(pid)):
            shutil.rmtree(entry, ignore_errors=True)


def is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, someone else's
        return True
    return True


def use_multiprocess_values(path: str) -> None:
    """Make prometheus-client write this process's values to mmap files under `path`.

    It picks its value class when first imported, from the environment; a directory
    chosen here, later, is set the same way before any of our series exist.
    """
    os.environ[MULTIPROC_VARIABLE] = path
    if values.ValueClass is values.MutexValue:
        values.ValueClass = values.MultiProcessValue()


def forget_dead_workers(path: str) -> None:
    """Drop the in-flight gauge files of workers that died (a crash or a restart)."""
    try:
        names = os.listdir(path)
    except OSError:
        return
    for name in names:
        match = LIVE_GAUGE_FILE.fullmatch(name)
        if match and not is_alive(int(match[1])):
            mark_process_dead(int(match[1]), path)


# -- folding the files of exited workers -------------------------------------------


@contextmanager
def locked(path: str, how: int, wait: float) -> Iterator[bool]:
    """Hold the directory's lock (let go when the file closes, or the process dies); say whether
    it was had within `wait` seconds. A directory gone (a tmp cleaner) is not locked either."""
    try:
        lock = open(os.path.join(path, LOCK_FILE), "ab")
    except OSError:
        yield False
        return
    with lock:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(lock, how | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    yield False
                    return
                time.sleep(0.01)
        yield True


def fold(path: Path, kind: str) -> None:
    """Sum the `kind` files of exited workers into a new archive, in steps a crash can undo.

    The files move into a staging directory first; the new archive (generation + 1) is
    renamed in whole; then the old archive and the staging directory go. A fold cut
    short is finished or undone by the next (`finish_cut_short_fold`).
    """
    finish_cut_short_fold(path, kind)
    exited = [f for f in path.glob(f"{kind}_*.db") if (pid := worker_of(f, kind)) and not is_alive(pid)]
    if not exited:
        return
    archive = newest_archive(path, kind)
    generation = archive_generation(archive, kind) + 1 if archive else 1
    staging = path / f".folding-{kind}-{generation}"
    staging.mkdir()
    for file in exited:
        file.rename(staging / file.name)
    totals = summed([archive]) if archive else {}
    for file in staging.iterdir():
        try:
            add_values(totals, file)
        except Exception as exc:  # empty or torn (a worker killed as it made it): set aside
            file.rename(path / f".{file.name}.unreadable")
            logger.warning("metrics: %s of an exited worker cannot be read (%r); its counts are left out", file.name, exc)
    temporary = path / f".{kind}_archive-{generation}.tmp"
    write_values(temporary, totals)
    temporary.rename(path / f"{kind}_archive-{generation}.db")
    if archive:
        archive.unlink()
    shutil.rmtree(staging)


def finish_cut_short_fold(path: Path, kind: str) -> None:
    for staging in path.glob(f".folding-{kind}-*"):
        generation = int(staging.name.rsplit("-", 1)[1])
        if (path / f"{kind}_archive-{generation}.db").exists():  # folded: only the clean-up was cut
            for archive in path.glob(f"{kind}_archive-*.db"):
                if archive_generation(archive, kind) < generation:
                    archive.unlink()
        else:  # not folded: the files go back as they were
            for file in staging.iterdir():
                file.rename(path / file.name)
        shutil.rmtree(staging)
    for temporary in path.glob(f".{kind}_archive-*.tmp"):
        temporary.unlink()


def any_exited_worker(path: Path) -> bool:
    return any((pid := worker_of(f, kind)) and not is_alive(pid) for kind in FOLDED_KINDS for f in path.glob(f"{kind}_*.db"))


def worker_of(file: Path, kind: str) -> int | None:
    """The pid in `<kind>_<pid>.db`; None for an archive."""
    pid = file.name[len(kind) + 1 : -len(".db")]
    return int(pid) if pid.isdigit() else None


def newest_archive(path: Path, kind: str) -> Path | None:
    return max(path.glob(f"{kind}_archive-*.db"), key=lambda a: archive_generation(a, kind), default=None)


def archive_generation(archive: Path, kind: str) -> int:
    return int(archive.name[len(f"{kind}_archive-") : -len(".db")])


def summed(files: Iterable[Path]) -> dict[str, float]:
    """Each series' value summed over `files`, as a scrape sums counters and histogram buckets."""
    totals: dict[str, float] = {}
    for file in files:
        add_values(totals, file)
    return totals


def add_values(totals: dict[str, float], file: Path) -> None:
    values = {key: value for key, value, *_ in MmapedDict.read_all_values_from_file(str(file))}  # all, or raise
    for key, value in values.items():
        totals[key] = totals.get(key, 0.0) + value


def write_values(file: Path, totals: dict[str, float]) -> None:
    archive = MmapedDict(str(file))
    try:
        for key, value in totals.items():
            archive.write_value(key, value, 0.0)
    finally:
        archive.close()

"""One process owns a folder at a time: an advisory lock held for a whole stage.

Two ``train`` processes on one run, or two ``add-data`` runs on one dataset, would each read the
folder's state at their start and rewrite it at their end (best.pth, history/, log.jsonl,
extra.csv), so the second silently undoes the first. ``FolderLock`` refuses the second process
in one line that names the holder (pid, host, stage, start time).

The lock is a POSIX record lock (``fcntl.lockf``) on a small hidden file beside the folder
(``models/.<run>.lock``: a run folder may be moved aside while its lock is held) or inside it
(``<data>/.lock``). The kernel releases it when its process dies, however it dies, so a lock is
never stuck; a record lock belongs to the process alone (unlike ``flock``, it is not shared with
the children it forked: loader workers that outlive a SIGKILLed trainer by a few seconds do not
keep its run locked). The file a killed holder leaves behind still names it, and the next process
says that it takes the lock over. A clean release removes the file. Where record locks are
unsupported (some network file systems), the recorded pid is checked instead: alive on this host =
held.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from types import TracebackType

from pipeline.core.errors import UserError
from pipeline.core.files import FILE_MODE, _pid_alive, write_error

_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class LockError(UserError):
    """The folder is owned by another live process."""


def _holder_text(record: dict) -> str:
    def field(key: str) -> str:  # one short line whatever the file holds
        return " ".join(str(record.get(key, "?")).split())[:80] or "?"

    return f"pid {field('pid')} on {field('host')} ({field('stage')}, started {field('started')})"


def _read_record(fd: int) -> dict:
    try:
        data = os.pread(fd, 4096, 0)
        record = json.loads(data.decode("utf-8")) if data.strip() else {}
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


class FolderLock:
    """``with FolderLock(lock_file, what, stage):`` or ``acquire()`` / ``release()``.

    ``what`` names the thing owned in messages (``run models/r``), ``stage`` the owner's stage.
    """

    def __init__(self, path: str | Path, what: str, stage: str, make_parent: bool = True, wait: float = 0.0) -> None:
        self.path, self.what, self.stage, self.make_parent = Path(path), what, stage, make_parent
        self.wait = wait  # seconds to wait for a holder to finish before refusing (for short read-modify-writes)
        self._fd: int | None = None
        self.took_over: dict | None = None  # the record a dead holder left, when this lock took it over

    def acquire(self) -> FolderLock:
        if self.make_parent:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.parent.is_dir():
            return self  # nothing to own: the stage reports the missing folder in its own words
        deadline = time.monotonic() + self.wait
        while True:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, FILE_MODE)
            except OSError as exc:
                if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                    return self  # a folder this process cannot write: its writes fail with their own message
                raise
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
                record = _read_record(fd)
                os.close(fd)
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise self._refusal(record) from None
            except OSError as exc:
                if exc.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise
                record = _read_record(fd)  # no record locks here: a live recorded process on this host holds it
                pid = record.get("pid")
                if record.get("host") == socket.gethostname() and isinstance(pid, int) and 0 < pid != os.getpid() \
                        and _pid_alive(pid):
                    os.close(fd)
                    raise self._refusal(record) from None
            # The previous holder removes the file as it releases: a lock on a removed file guards nothing.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _read_record(fd)
        if previous:
            self.took_over = previous
            print(f"{self.what}: taking over the lock left by {_holder_text(previous)}: that process is gone "
                  f"(killed?); {self.path} now names this one", file=sys.stderr, flush=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "stage": self.stage,
                  "started": dt.datetime.now().isoformat(timespec="seconds")}
        self._fd = fd
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        except OSError as exc:  # a full disk: not even the record fits; let go, say where and how much is free
            self.release()
            raise write_error(self.path, exc) from exc
        return self

    def _refusal(self, record: dict) -> LockError:
        return LockError(f"{self.what}: in use by {_holder_text(record) if record else 'another process'}; "
                         f"wait for it to finish or stop it (lock file {self.path})")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            self.path.unlink(missing_ok=True)  # while still held: nobody can take the old file meanwhile
        finally:
            fcntl.lockf(fd, fcntl.LOCK_UN)
            os.close(fd)  # (closing any descriptor of the file would release a record lock: this is the only one)

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.release()


def run_lock(models_root: str | Path, run: str, stage: str = "train") -> FolderLock:
    """The lock of ``models/<run>``: the hidden file ``models/.<run>.lock`` beside the folder."""
    root = Path(models_root)
    return FolderLock(root / f".{run}.lock", f"run {root / run}", stage)


def file_lock(path: str | Path, stage: str, wait: float) -> FolderLock:
    """The lock of one shared file that several stages rewrite (``submit/leaderboard.csv``): the hidden
    ``.<name>.lock`` beside it, waited for up to ``wait`` seconds (its holders hold it for a moment)."""
    path = Path(path)
    return FolderLock(path.with_name(f".{path.name}.lock"), str(path), stage, wait=wait)


def data_lock(root: str | Path, stage: str) -> FolderLock:
    """The lock of a dataset folder (extra.csv, extra/, splits.csv, patches/): ``<data>/.lock``."""
    return FolderLock(Path(root) / ".lock", f"data folder {root}", stage, make_parent=False)

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

A lock is a lock or the stage does not run: a lock file that cannot be opened, locked or written
(another user's, immutable, a folder or a FIFO in its place) refuses the stage in one line naming
the file and the reason. Lock files are opened without following symbolic links (``O_NOFOLLOW``)
and only when they are regular files with one name, so a planted link or hard link never makes a
stage truncate or write the file it points to.

A shared lock (``shared=True``: a train reading a data folder's patches) lets any number of readers
in and keeps the owners out (``patchify``, ``prepare``, ``add-data`` rewrite what the readers read);
readers write no record and leave the file in place (other readers may hold it), and the kernel
names them when an owner is refused.
"""

from __future__ import annotations

import datetime as dt
import errno
import fcntl
import json
import os
import socket
import stat
import struct
import sys
import time
from pathlib import Path
from types import TracebackType

from pipeline.core.errors import UserError
from pipeline.core.files import FILE_MODE, _pid_alive, write_error

_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
_HELD = (errno.EAGAIN, errno.EACCES)  # lockf(LOCK_NB) when another process holds a conflicting lock
_NOT_MINE = (errno.EACCES, errno.EPERM, errno.EROFS)  # a file or folder this process may not write
# struct flock of 64-bit Linux (short type, short whence, off_t start, off_t len, pid_t pid, padding)
_FLOCK = "@hhqqi4x"


class LockError(UserError):
    """The folder is owned by another live process, or its lock cannot be taken."""


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


def _blocker(fd: int) -> tuple[bool, int] | None:
    """(shared, pid) of a lock another process holds on ``fd``'s file, as the kernel reports it
    (64-bit Linux; None elsewhere, or when nothing holds it now)."""
    if not sys.platform.startswith("linux") or struct.calcsize("P") != 8:
        return None
    try:
        answer = fcntl.fcntl(fd, fcntl.F_GETLK, struct.pack(_FLOCK, fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0))
    except OSError:
        return None
    kind, _whence, _start, _length, pid = struct.unpack(_FLOCK, answer)
    return None if kind == fcntl.F_UNLCK or pid <= 0 else (kind == fcntl.F_RDLCK, pid)


def _takeover_reason(record: dict) -> str:
    """Why a lock file's recorded holder no longer holds it (the kernel let this process lock it)."""
    pid, host = record.get("pid"), record.get("host")
    if host != socket.gethostname() or not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
        return "it holds the lock no more (the kernel released it: that process ended or lost it)"
    if _pid_alive(pid):
        return (f"pid {pid} is alive but holds the lock no more (another process has its number now, or it "
                "let go without removing the file)")
    return "that process is gone (killed?)"


def _reason(exc: OSError) -> str:
    what = exc.strerror or type(exc).__name__
    hint = {errno.EACCES: "this user may not write it: another user's lock file, or the folder's permissions",
            errno.EPERM: "an immutable file (lsattr shows 'i'), or another user's in a sticky folder",
            errno.EROFS: "the folder is on a read-only file system",
            errno.EISDIR: "a folder is in its place"}.get(exc.errno or -1)
    return f"{what}: {hint}" if hint else what


class FolderLock:
    """``with FolderLock(lock_file, what, stage):`` or ``acquire()`` / ``release()``.

    ``what`` names the thing owned in messages (``run models/r``), ``stage`` the owner's stage;
    ``shared``: a reader's lock (any number at once, none while an owner holds it).
    """

    def __init__(self, path: str | Path, what: str, stage: str, make_parent: bool = True, wait: float = 0.0,
                 shared: bool = False) -> None:
        self.path, self.what, self.stage, self.make_parent = Path(path), what, stage, make_parent
        self.wait = wait  # seconds to wait for a holder to finish before refusing (for short read-modify-writes)
        self.shared = shared
        self._fd: int | None = None
        self.took_over: dict | None = None  # the record a dead holder left, when this lock took it over

    def _cannot(self, doing: str, exc: OSError) -> LockError:
        return LockError(f"{self.path}: cannot {doing} the lock file of {self.what} ({_reason(exc)}); a stage "
                         "runs only under its lock: remove the file if no process of this pipeline is using it, "
                         "or use another folder")

    def _open(self) -> int | None:
        """The lock file, opened without following a link and checked to be a plain file of its own."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, FILE_MODE)
        except OSError as exc:
            if exc.errno in (errno.ELOOP, errno.EMLINK) and self.path.is_symlink():
                raise LockError(f"{self.path}: the lock file of {self.what} is a symbolic link (to "
                                f"{os.readlink(self.path)[:200]}); a lock is never taken through a link, and "
                                f"nothing was written: remove the link and run again") from None
            if not (self.shared and exc.errno in _NOT_MINE):
                raise self._cannot("open", exc) from None
            # A reader of a folder it may not write: the lock file its owners made, read-only, or none.
            try:
                fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
            except FileNotFoundError:
                return None  # nobody it runs beside can rewrite the folder either (see the README)
            except OSError as again:
                raise self._cannot("open", again) from None
        info = os.fstat(fd)
        problem = ("is not a regular file" if not stat.S_ISREG(info.st_mode) else
                   f"has {info.st_nlink} names (hard links)" if info.st_nlink != 1 else "")
        if problem:
            os.close(fd)
            raise LockError(f"{self.path}: the lock file of {self.what} {problem}; it is not locked or written: "
                            "remove it and run again")
        return fd

    def acquire(self) -> FolderLock:
        if self.make_parent:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise self._cannot("create the folder of", exc) from None
        elif not self.path.parent.is_dir():
            return self  # nothing to own: the stage reports the missing folder in its own words
        deadline = time.monotonic() + self.wait
        while True:
            fd = self._open()
            if fd is None:
                return self
            try:
                fcntl.lockf(fd, (fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in _HELD:  # another process holds it
                    refusal = self._refusal(_read_record(fd), _blocker(fd))
                    os.close(fd)
                    if time.monotonic() < deadline:
                        time.sleep(0.05)
                        continue
                    raise refusal from None
                if exc.errno not in _UNSUPPORTED:
                    os.close(fd)
                    raise self._cannot("lock", exc) from None
                record = _read_record(fd)  # no record locks here: a live recorded process on this host holds it
                pid = record.get("pid")
                if record.get("host") == socket.gethostname() and isinstance(pid, int) and 0 < pid != os.getpid() \
                        and _pid_alive(pid):
                    os.close(fd)
                    raise self._refusal(record, None) from None
            # The previous holder removes the file as it releases: a lock on a removed file guards nothing.
            try:
                same = os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        self._fd = fd
        if self.shared:
            return self  # readers leave the owners' record alone
        previous = _read_record(fd)
        if previous:
            self.took_over = previous
            print(f"{self.what}: taking over the lock left by {_holder_text(previous)}: {_takeover_reason(previous)}; "
                  f"{self.path} now names this one", file=sys.stderr, flush=True)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "stage": self.stage,
                  "started": dt.datetime.now().isoformat(timespec="seconds")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        except OSError as exc:  # a full disk: not even the record fits; let go, say where and how much is free
            self.release()
            raise write_error(self.path, exc) from exc
        return self

    def _refusal(self, record: dict, blocker: tuple[bool, int] | None) -> LockError:
        if blocker is not None and blocker[0]:
            holder = f"pid {blocker[1]} on {socket.gethostname()}, a train reading it (its patches must not change)"
        elif record and (blocker is None or record.get("pid") == blocker[1]):
            holder = _holder_text(record)
        elif blocker is not None:
            holder = f"pid {blocker[1]} on {socket.gethostname()}"
        else:
            holder = "another process"
        return LockError(f"{self.what}: in use by {holder}; wait for it to finish or stop it (lock file {self.path})")

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            if not self.shared:  # while still held: nobody can take the old file meanwhile
                try:
                    if os.stat(self.path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                        self.path.unlink()
                except FileNotFoundError:
                    pass
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


def data_lock(root: str | Path, stage: str, shared: bool = False) -> FolderLock:
    """The lock of a dataset folder (extra.csv, extra/, splits.csv, patches/): ``<data>/.lock``; ``shared``:
    a train's, reading the folder while the stages that rewrite it wait."""
    return FolderLock(Path(root) / ".lock", f"data folder {root}", stage, make_parent=False, shared=shared)

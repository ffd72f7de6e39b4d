"""Writing files and folders so that nothing half-written is ever seen, and nothing earlier is lost.

- ``atomic_write(path)``: write a temporary file beside ``path``, rename it into place only if the
  block succeeded. The file gets the mode a plain ``open()`` would give it (0666 minus the umask),
  not ``mkstemp``'s 0600.
- ``staged_dir(path)``: build a whole folder beside ``path`` and swap it in at the end, so a reader
  (``submit``) only ever sees one finished set of files; a failed or killed run leaves the old
  folder as it was.
- Temporary names carry the writer's process id and a tag of its host: ``clean_stale(folder)``
  removes the ones of this host whose process is gone (a SIGKILL leaves them), never a live
  writer's, nor another machine's (whose pids cannot be checked from here: ranks of a torchrun over
  several machines write into one shared folder). Every writer cleans a folder the first time it
  writes there (``atomic_write``), so no stage's leftovers outlive the next write.
- One error path for writes: whatever a library raises while writing (``OSError``, torch's
  ``RuntimeError`` "unexpected pos", safetensors' own error) becomes a ``WriteError``: one line with
  the file, the free space of its disk, and "No space left on device" when that is what happened.
  The temporary file is removed and the previous file stays as it was.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import socket
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import Interrupted, UserError

FULL_BELOW = 2**20  # bytes: a write that failed with less than this left on its disk failed for want of space


class WriteError(UserError):
    """A file could not be written (disk full, or the writing library failed); nothing was replaced."""


def weights_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why ``path`` cannot be read as a weights file (one line naming it), or None; no torch needed, so the
    CLI says it before a stage loads anything."""
    path = Path(path)
    if path.is_dir():
        return f"{path}: is a folder, not a weights file"
    if not path.is_file():
        return (f"{path}: not a regular file (a device, a pipe or a socket), so not a weights file"
                if path.exists() else f"{path}: checkpoint not found")
    return None


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it back at once
    os.umask(mask)
    return mask


# Read once at import, while the process has a single thread: os.umask is process-wide.
FILE_MODE = 0o666 & ~_read_umask()
DIR_MODE = 0o777 & ~_read_umask()
HOST_TAG = f"{zlib.crc32(socket.gethostname().encode()):08x}"  # in temporary names: which machine wrote them
# .<name>.<pid>.<host tag>-<random>.tmp|partial (names without a host tag, from older versions, count as this host's)
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.(?:(?P<host>[0-9a-f]{8})-)?[^.]+\.(tmp|partial)$")


def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}.{HOST_TAG}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def free_text(folder: str | Path) -> str:
    """'12.3 GiB free on <folder>': what is left on the disk holding ``folder`` (its nearest existing parent)."""
    where = Path(folder)
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = float(shutil.disk_usage(where).free)
    except OSError:
        return f"free space of {where} unknown"
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            break
        free /= 1024
    amount = f"{free:.0f} bytes" if unit == "bytes" else f"{free:.1f} {unit}"
    return f"{amount} free on {where}"


def disk_full(exc: BaseException, folder: Path) -> bool:
    """Did a write fail for want of space? The error says so (errno, or a library's text), or the disk is
    (nearly) full now, while the failed temporary file still holds what it got."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    if "No space left" in text or "os error 28" in text or "code: 28," in text:
        return True
    try:
        return shutil.disk_usage(folder).free < FULL_BELOW
    except OSError:
        return False


def write_error(path: str | Path, exc: BaseException, folder: str | Path | None = None) -> WriteError:
    """One line for a failed write of ``path``: the disk full (and how much is free), or the library's error."""
    path = Path(path)
    folder = Path(folder) if folder is not None else path.parent
    if disk_full(exc, folder):
        return WriteError(f"{path}: No space left on device ({free_text(folder)}); nothing was replaced. Free some "
                          "space, or point paths.* / --data / --output elsewhere")
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    what = f"{type(exc).__name__}: {first}" if first else type(exc).__name__
    return WriteError(f"{path}: cannot write it ({what}); {free_text(folder)}; nothing was replaced")


def _own_error(exc: BaseException, tmp: Path) -> bool:
    """True for errors the write block raises on purpose (a check that failed), or about another file (a
    source that could not be read): those pass through as they are."""
    if isinstance(exc, (UserError, Interrupted)):
        return True
    if isinstance(exc, OSError) and exc.filename is not None and Path(exc.filename) != tmp:
        return exc.errno not in (errno.ENOSPC, errno.EDQUOT)
    return False


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Readers never see a half-written file, and a crash leaves at most a hidden temp file
    (removed here on any exception, by ``clean_stale`` after a kill) instead of a truncated
    PNG, zip or checkpoint. A failed write is a ``WriteError`` (see the module's docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_once(path.parent)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    except OSError as exc:
        if disk_full(exc, path.parent):
            raise write_error(path, exc) from exc
        raise
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    except Exception as exc:
        failure = exc if _own_error(exc, tmp_path) else write_error(path, exc)  # (free space before the unlink)
        tmp_path.unlink(missing_ok=True)
        if failure is exc:
            raise
        raise failure from exc
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def append_text(path: str | Path, text: str) -> None:
    """Append ``text`` to ``path`` (a log); a failure is a ``WriteError`` naming it and the free space."""
    path = Path(path)
    try:
        with path.open("a") as f:
            f.write(text)
    except OSError as exc:
        raise write_error(path, exc) from exc


_cleaned: set[tuple[int, Path]] = set()


def clean_once(folder: str | Path) -> None:
    """``clean_stale(folder)`` the first time this process writes into ``folder``."""
    key = (os.getpid(), Path(folder))
    if key not in _cleaned:
        _cleaned.add(key)
        clean_stale(folder)


def clean_stale(folder: str | Path) -> list[Path]:
    """Remove our temporary files and staging folders in ``folder`` whose writer process (on this host) is gone."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if not match or match["host"] not in (None, HOST_TAG) or _pid_alive(int(match["pid"])):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


@contextlib.contextmanager
def staged_dir(path: str | Path, owned: str) -> Iterator[Path]:
    """Yield a fresh hidden folder beside ``path``; on success it replaces ``path`` as a whole.

    ``owned`` names a file that every folder this code writes contains (e.g. ``timing.json``): an
    existing ``path`` is replaced only if it is empty or holds that file, so a user's folder given
    by mistake is refused before any work (``check_replaceable``), never deleted.
    """
    path = Path(path)
    check_replaceable(path, owned)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent)
    stage = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), suffix=".partial", dir=path.parent))
    os.chmod(stage, DIR_MODE)
    try:
        yield stage
        swap_in(stage, path)
    except BaseException as exc:
        shutil.rmtree(stage, ignore_errors=True)
        _name_the_target(exc, stage, path)
        raise


def _name_the_target(exc: BaseException, stage: Path, path: Path) -> None:
    """An error about a file in the hidden staging folder names the file where it was going instead:
    ``out/.pred.123.x.partial/a.png`` means ``out/pred/a.png`` to a user (the staged file is gone)."""
    hidden, shown = str(stage), str(path)
    if isinstance(exc, OSError):
        for attr in ("filename", "filename2"):
            value = getattr(exc, attr)
            if isinstance(value, str) and hidden in value:
                setattr(exc, attr, value.replace(hidden, shown))
    elif isinstance(exc, UserError) and exc.args and isinstance(exc.args[0], str):
        exc.args = (exc.args[0].replace(hidden, shown), *exc.args[1:])


def check_replaceable(path: Path, owned: str) -> None:
    """Refuse to replace a folder that this project did not write (``owned`` marks ours)."""
    for parent in path.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{parent}: is a file where a folder is needed (for {path})")
            break
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise UserError(f"{path}: exists and is not a folder; choose another output folder")
    if path.is_dir() and any(path.iterdir()) and not (path / owned).is_file():
        raise UserError(f"{path}: exists, is not empty and was not written by this pipeline (no {owned}); "
                        "choose a new or empty output folder")


def swap_in(stage: Path, path: Path) -> None:
    """Replace ``path`` by ``stage``: the old folder is renamed aside, the new one renamed in, the old
    one removed. A crash between the renames leaves the old folder under a hidden name that
    ``clean_stale`` removes; readers never see a mixture."""
    old = None
    if path.exists():
        old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path.name), suffix=".partial", dir=path.parent))
        old.rmdir()
        os.replace(path, old)
    os.replace(stage, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

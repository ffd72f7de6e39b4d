"""Writing files and folders so that nothing half-written is ever seen, and nothing earlier is lost.

- ``atomic_write(path)``: write a temporary file beside ``path``, rename it into place only if the
  block succeeded. The file gets the mode a plain ``open()`` would give it (0666 minus the umask),
  not ``mkstemp``'s 0600.
- ``staged_dir(path)``: build a whole folder beside ``path`` and swap it in at the end, so a reader
  (``submit``) only ever sees one finished set of files; a failed or killed run leaves the old
  folder as it was.
- Temporary names carry the writer's process id: ``clean_stale(folder)`` removes the ones whose
  process is gone (a SIGKILL leaves them), never a live writer's.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pipeline.core.errors import UserError


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: put it back at once
    os.umask(mask)
    return mask


# Read once at import, while the process has a single thread: os.umask is process-wide.
FILE_MODE = 0o666 & ~_read_umask()
DIR_MODE = 0o777 & ~_read_umask()
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<pid>\d+)\.[^.]+\.(tmp|partial)$")


def _temp_prefix(name: str) -> str:
    return f".{name}.{os.getpid()}."


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


@contextlib.contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    Readers never see a half-written file, and a crash leaves at most a hidden temp file
    (removed here on any exception, by ``clean_stale`` after a kill) instead of a truncated
    PNG, zip or checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path.name), suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, FILE_MODE)
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


def clean_stale(folder: str | Path) -> list[Path]:
    """Remove our temporary files and staging folders in ``folder`` whose writer process is gone."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        match = _TEMP.match(entry.name)
        if not match or _pid_alive(int(match["pid"])):
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
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise


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

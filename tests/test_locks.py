"""Locks that are locks: a lock file that cannot be opened refuses the stage, a planted symbolic link is
never followed, a takeover names the real reason, and a train and a patchify of one data folder never
run at once. Real processes and real files throughout (tests run as root, whom permission bits do not
stop: an immutable file, or a subprocess whose os.open is denied, stands for another user's lock)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import ENV, ROOT, _start, _wait_for
from test_safety import _dataset, _one_line, _train, _tree, trainable  # noqa: F401 (fixture)

from pipeline.cli import main as cli


def _immutable(path: Path) -> bool:
    """chattr +i on ``path`` (root with CAP_LINUX_IMMUTABLE on ext4 / xfs / btrfs); False where it cannot."""
    try:
        done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


# A train in its own process whose os.open is refused for the lock file: what an unprivileged user gets
# for another user's 0644 lock file (root passes permission bits, so the denial is injected).
_DENIED = """
import errno, os, sys
from pipeline.cli import main
real = os.open
def denied(path, *args, **kwargs):
    if os.fspath(path).endswith('.r.lock'):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
    return real(path, *args, **kwargs)
os.open = denied
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("how", ["another user's", "immutable"])
def test_a_lock_file_that_cannot_be_opened_refuses_the_train(trainable: Path, tmp_path: Path,  # noqa: F811
                                                             how: str) -> None:
    models = tmp_path / "models"
    models.mkdir()
    lock = models / ".r.lock"
    lock.write_text("")
    if how == "immutable" and not _immutable(lock):
        pytest.skip("chattr +i is not available here; the injected permission error covers the same path")
    argv = ["train", "--data", str(trainable), "run=r", f"paths.models={models}", "model.name=edsr-nano",
            "data.folds=3", "train.batch_size=4", "train.workers=0", "train.max_steps=4", "train.precision=fp32"]
    try:
        cmd = [sys.executable, "-c", _DENIED, *argv] if how == "another user's" else \
            [sys.executable, "-m", "pipeline", *argv]
        done = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    finally:
        subprocess.run(["chattr", "-i", str(lock)], capture_output=True)
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    reason = "Permission denied" if how == "another user's" else "Operation not permitted"
    assert f"{lock}: cannot open the lock file of run {models / 'r'} ({reason}" in errors[0]
    assert sorted(p.name for p in models.iterdir()) == [".r.lock"]  # no run folder: nothing trained


def test_other_lock_files_that_are_no_plain_file_are_one_line(tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data")
    (root / ".lock").mkdir()  # a folder in its place
    assert cli(["prepare", "--data", str(root), "data.workers=1", "data.folds=3"]) == 2
    assert f"{root / '.lock'}: cannot open the lock file of data folder {root} (Is a directory" in _one_line(capsys)
    (root / ".lock").rmdir()
    os.mkfifo(root / ".lock")  # a FIFO: opened without blocking, refused before it is locked or written
    assert cli(["prepare", "--data", str(root), "data.workers=1", "data.folds=3"]) == 2
    assert f"{root / '.lock'}: the lock file of data folder {root} is not a regular file" in _one_line(capsys)
    os.unlink(root / ".lock")
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.link(victim, root / ".lock")  # a hard link to someone's file: never truncated
    assert cli(["prepare", "--data", str(root), "data.workers=1", "data.folds=3"]) == 2
    assert "has 2 names (hard links)" in _one_line(capsys)
    assert victim.read_text() == "precious" and not (root / "splits.csv").exists()


def test_a_symlinked_lock_file_is_never_followed(trainable: Path, tmp_path: Path,  # noqa: F811
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    # The run lock, in a train of its own process.
    models = tmp_path / "models"
    models.mkdir()
    (models / ".r.lock").symlink_to(victim)
    done = subprocess.run([sys.executable, "-m", "pipeline", "train", "--data", str(trainable), "run=r",
                           f"paths.models={models}", "model.name=edsr-nano", "data.folds=3", "train.batch_size=4",
                           "train.workers=0", "train.max_steps=2", "train.precision=fp32"],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    assert f"{models / '.r.lock'}: the lock file of run {models / 'r'} is a symbolic link (to {victim})" \
        in done.stderr.strip().splitlines()[-1]
    assert not (models / "r").exists()
    # The data folder's lock (prepare).
    root = _dataset(tmp_path / "data")
    (root / ".lock").symlink_to(victim)
    assert cli(["prepare", "--data", str(root), "data.workers=1", "data.folds=3"]) == 2
    assert f"{root / '.lock'}: the lock file of data folder {root} is a symbolic link" in _one_line(capsys)
    (root / ".lock").unlink()
    assert cli(["prepare", "--data", str(root), "data.workers=1", "data.folds=3"]) == 0
    # The leaderboard's lock (infer infer.split=val).
    submit = tmp_path / "submit"
    submit.mkdir()
    (submit / ".leaderboard.csv.lock").symlink_to(victim)
    assert cli(["infer", "--data", str(root), "model.name=bicubic", "infer.split=val", "data.folds=3",
                f"paths.submit={submit}"]) == 2
    assert "leaderboard.csv.lock: the lock file of" in _one_line(capsys)
    assert victim.read_text() == "precious"  # never truncated, never given a lock record
    assert (submit / ".leaderboard.csv.lock").is_symlink() and not (submit / "leaderboard.csv").exists()


def test_a_takeover_from_a_live_pid_says_it_is_alive(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.core.locks import data_lock

    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # A record naming a live process that holds no lock (its pid reused, or the file copied in).
        (tmp_path / ".lock").write_text(f'{{"pid": {live.pid}, "host": "{socket.gethostname()}", '
                                        '"stage": "patchify", "started": "2024-01-01T00:00:00"}')
        with data_lock(tmp_path, "prepare"):
            pass
    finally:
        live.kill()
        live.wait()
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"taking over the lock left by pid {live.pid}" in err[0]
    assert f"pid {live.pid} is alive but holds the lock no more" in err[0] and "gone" not in err[0]


def test_a_train_and_a_patchify_of_one_data_folder_never_run_at_once(trainable: Path, tmp_path: Path,  # noqa: F811
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "data"
    shutil.copytree(trainable, root)
    models = tmp_path / "models"
    patchify = ["patchify", "--data", str(root), "patchify.size=16", "patchify.workers=1"]  # would recut them all
    train = _start(["train", "--data", str(root), "run=r", f"paths.models={models}", "model.name=edsr-nano",
                    "data.folds=3", "train.batch_size=4", "train.workers=0", "train.max_steps=100000",
                    "train.val_every=100000", "train.precision=fp32"], tmp_path / "train.log")
    try:
        # config.yaml is written once every check passed, with both locks held
        _wait_for(lambda: (models / "r" / "config.yaml").is_file(), train, tmp_path / "train.log", "the start")
        train.send_signal(signal.SIGSTOP)
        before = _tree(root)
        assert cli(patchify) == 2
        line = _one_line(capsys)
        assert f"data folder {root}: in use by pid {train.pid} on {socket.gethostname()}, a train reading it" in line
        assert _tree(root) == before
        # Another train of the same data is a reader too: it runs beside the first.
        assert _train(root, tmp_path / "models2", "train.max_steps=2", "train.precision=fp32") == 0
    finally:
        train.send_signal(signal.SIGKILL)
        train.wait()
    # The other way round: a patchify holds the folder (stopped while it does), a train is refused.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pipeline.core.locks import data_lock\n"
         "with data_lock(sys.argv[1], 'patchify'):\n    print('held', flush=True)\n    sys.stdin.readline()",
         str(root)], cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert _train(root, tmp_path / "models3", "train.max_steps=2") == 2
        line = _one_line(capsys)
        assert f"data folder {root}: in use by pid {holder.pid} on {socket.gethostname()} (patchify" in line
        assert not (tmp_path / "models3" / "r").exists()
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    assert cli(patchify) == 0  # nobody holds it now
    assert not (root / ".lock").exists()

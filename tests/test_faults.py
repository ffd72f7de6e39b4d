"""Nothing lost when two things run at once, a disk fills, or a file is hostile (issue 18).

Each case, through the CLI: one line naming the problem, a non-zero exit, and every earlier file
intact byte for byte. The two-process cases run real processes (the first one stopped with SIGSTOP
while it holds its folder, so the second's refusal provably changes nothing); the full disk is a
small tmpfs where the test may mount one, and a simulated library error everywhere.
"""

from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_safety import _dataset, _one_line, _save_nano, _smooth, _train, _tree, trainable  # noqa: F401 (fixture)

from pipeline.cli import main as cli
from pipeline.core.images import write_png
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.table import build_model, model_kwargs

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}


def _start(argv: list[str], log: Path) -> subprocess.Popen:
    """``python -m pipeline *argv`` in the background, output in ``log``."""
    with log.open("wb") as out:
        return subprocess.Popen([sys.executable, "-m", "pipeline", *argv], cwd=ROOT, env=ENV, stdout=out,
                                stderr=subprocess.STDOUT)


def _wait_for(condition, proc: subprocess.Popen, log: Path, what: str, seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert proc.poll() is None, f"exited ({proc.returncode}) before {what}: {log.read_text()[-2000:]}"
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.002)


def _recorded(lock: Path) -> bool:
    """True once a lock file holds its owner's record (written as soon as the lock is held)."""
    try:
        return lock.stat().st_size > 0
    except FileNotFoundError:
        return False


def _photos(folder: Path, n: int, side: int, seed: int = 0) -> Path:
    for i in range(n):
        write_png(folder / f"p{i:02d}.png", _smooth(side, side, seed + i))
    return folder


# -- 1. one process owns a run folder: a second train is refused, a dead holder's lock taken over ------------


def test_a_second_train_is_refused_while_the_first_holds_the_run(trainable: Path, tmp_path: Path,  # noqa: F811
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    first = _start(["train", "--data", str(trainable), "run=r", f"paths.models={models}", "model.name=edsr-nano",
                    "data.folds=3", "train.batch_size=4", "train.workers=0", "train.val_every=2",
                    "train.save_every=2", "train.log_every=2", "train.max_steps=100000"], tmp_path / "first.log")
    try:
        _wait_for(lambda: (models / "r" / "best.pth").is_file() and (models / "r" / "last.pth").is_file(), first,
                  tmp_path / "first.log", "a first save")
        first.send_signal(signal.SIGSTOP)  # frozen while it holds the run: nothing below may change a byte
        before = _tree(models)
        assert _train(trainable, models, "train.learning_rate=0") == 2
        line = _one_line(capsys)
        assert f"run {models / 'r'}: in use by pid {first.pid} on {socket.gethostname()} (train, started" in line
        assert _tree(models) == before
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    # Killed: the kernel released its lock; its file still names it, and the next start says it takes over.
    assert (models / ".r.lock").is_file()
    assert _train(trainable, models, "train.resume=never") == 0
    assert f"taking over the lock left by pid {first.pid} on {socket.gethostname()}" in capsys.readouterr().err
    assert not (models / ".r.lock").exists()  # released as it ended


def test_a_damaged_or_hostile_lock_file_is_taken_over_in_one_line(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from pipeline.core.locks import data_lock

    lock = tmp_path / ".lock"
    lock.write_text('{"pid": "abc", "host": "x')  # cut short: names nobody, taken silently
    with data_lock(tmp_path, "prepare"):
        assert '"stage": "prepare"' in lock.read_text()
    assert capsys.readouterr().err == "" and not lock.exists()
    lock.write_text('{"pid": 999999999, "host": "x\\ny", "stage": "patchify"}')  # a dead holder, a hostile host
    with data_lock(tmp_path, "prepare"):
        pass
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "taking over the lock left by pid 999999999 on x y (patchify, started ?)" in err[0]


def test_best_pth_is_never_replaced_by_a_worse_one_whoever_wrote_it(tmp_path: Path) -> None:
    from pipeline.training.run_folder import BestCheckpoint

    path = tmp_path / "best.pth"
    best = BestCheckpoint(path, "psnr")  # this start found no best.pth

    def weights() -> dict:
        return {"params": {"w": torch.zeros(2)}, "arch": "edsr-nano"}

    assert best.offer({"psnr": 20.0}, 4, weights, write=True)
    save_checkpoint(path, {**weights(), "psnr": 30.0, "best_by": "psnr", "step": 8})  # another writer's, better
    better = path.read_bytes()
    assert best.offer({"psnr": 25.0}, 12, weights, write=True)  # this run's own new best ...
    assert path.read_bytes() == better  # ... never replaces better weights on disk
    assert best.offer({"psnr": 31.0}, 16, weights, write=True)
    assert torch.load(path, weights_only=True)["psnr"] == 31.0


# -- 2. two add-data runs at once: the second waits its turn, no set is lost ------------------------------------


def test_two_add_data_runs_at_once_lose_no_set(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data")
    set_a, set_b = _photos(tmp_path / "setA", 24, 256), _photos(tmp_path / "setB", 2, 32, seed=50)
    first = _start(["add-data", "--data", str(root), "--from", str(set_a), "add_data.workers=1",
                    "add_data.jpeg=90", "add_data.noise=2"], tmp_path / "first.log")
    try:
        # the record is written once the lock is held (the file itself appears a moment before)
        _wait_for(lambda: _recorded(root / ".lock"), first, tmp_path / "first.log", "the data lock")
        first.send_signal(signal.SIGSTOP)
        before = _tree(root)
        args = ["add-data", "--data", str(root), "--from", str(set_b), "add_data.workers=1"]
        assert cli(args) == 2
        assert f"data folder {root}: in use by pid {first.pid} on {socket.gethostname()} (add-data" in _one_line(capsys)
        assert _tree(root) == before
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, (tmp_path / "first.log").read_text()[-2000:]
    assert cli(args) == 0  # its turn now
    extra = (root / "extra.csv").read_text()
    assert "extra/setA" in extra and "extra/setB" in extra
    assert cli(["prepare", "--data", str(root), "data.workers=1", "data.folds=3"]) == 0
    assert "extra pairs (training only)     26" in capsys.readouterr().out


def test_two_infers_finishing_together_both_keep_their_leaderboard_row(tmp_path: Path) -> None:
    from pipeline.infer import append_leaderboard

    board = tmp_path / "submit" / "leaderboard.csv"
    append_leaderboard(board, {"run": "earlier", "psnr": 20.0})
    # Another infer in the middle of its append: it holds the file's lock between its read and its write.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom pathlib import Path\nfrom pipeline.core.locks import file_lock\n"
         "board = Path(sys.argv[1])\nwith file_lock(board, 'infer', wait=0):\n    rows = board.read_text()\n"
         "    print('read', flush=True)\n    sys.stdin.readline()\n    board.write_text(rows + ',other,,,,,,,\\n')",
         str(board)], cwd=ROOT, env=ENV, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "read"
        mine = threading.Thread(target=append_leaderboard, args=(board, {"run": "mine", "psnr": 30.0}))
        mine.start()
        time.sleep(0.5)
        assert mine.is_alive() and ",mine," not in board.read_text()  # waiting for its turn, not writing over
        holder.stdin.write("go\n")
        holder.stdin.flush()
        mine.join(timeout=60)
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    runs = pd.read_csv(board)["run"].tolist()
    assert runs == ["earlier", "other", "mine"]  # no row lost: the second writer read the first one's file


# -- 3. a full disk during a save or an export: one line with the file and the free space ------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs (root in a container may mount one); skipped with the reason where it cannot be mounted."""
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.strip() or done.returncode}); the simulated "
                    "library error test covers the same path")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk: Path) -> None:
    """Fill ``disk`` to the last byte."""
    with (disk / "filler").open("wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


@pytest.mark.parametrize("fmt", ["safetensors", "onnx"])
def test_a_full_disk_during_an_export_is_one_line(small_disk: Path, fmt: str,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    models = small_disk / "models"
    _save_nano(models / "r" / "best.pth")
    args = ["export", "run=r", f"paths.models={models}", f"export.format={fmt}"]
    assert cli(args) == 0  # a good export first
    before = _tree(models)
    _fill(small_disk)
    assert cli(args) == 2
    line = _one_line(capsys)
    assert f"{models / 'r' / 'best'}.{fmt}: No space left on device (" in line and f"free on {models / 'r'}" in line
    assert _tree(models) == before  # the earlier export and checkpoint, byte for byte; no temporary file


def test_a_full_disk_during_a_checkpoint_save_keeps_the_old_checkpoint(small_disk: Path) -> None:
    from pipeline.core.files import WriteError

    path = small_disk / "best.pth"
    _save_nano(path)
    old = path.read_bytes()
    _fill(small_disk)
    with pytest.raises(WriteError, match="best.pth: No space left on device .0 bytes free on"):
        save_checkpoint(path, {"params": build_model("edsr-nano").state_dict(), "pad": torch.zeros(2**18)})
    assert path.read_bytes() == old and sorted(p.name for p in small_disk.iterdir()) == ["best.pth", "filler"]


def test_a_full_disk_at_a_train_start_is_one_line(small_disk: Path, trainable: Path,  # noqa: F811
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    models = small_disk / "models"
    assert _train(trainable, models) == 0
    before = _tree(models)
    _fill(small_disk)
    assert _train(trainable, models, "train.max_steps=8") == 2  # not even the run's lock record fits
    line = _one_line(capsys)
    assert f"{models / '.r.lock'}: No space left on device (0 bytes free on {models})" in line
    assert _tree(models) == before and not (models / ".r.lock").exists()


def test_a_library_write_error_is_one_line_naming_the_file_and_free_space(
        trainable: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],  # noqa: F811
        monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    assert _train(trainable, models) == 0
    weights = {k: v for k, v in _tree(models / "r").items() if k.endswith(".pth")}

    def torch_save_on_a_full_disk(obj: object, f: object) -> None:  # what torch.save raises at ENOSPC
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 4160 vs 4096")

    class Usage:
        total, used, free = 2**30, 2**30, 0

    monkeypatch.setattr("pipeline.models.checkpoint.torch.save", torch_save_on_a_full_disk)
    monkeypatch.setattr("pipeline.core.files.shutil.disk_usage", lambda path: Usage)
    assert _train(trainable, models, "train.max_steps=8") == 2
    line = _one_line(capsys)
    assert f"{models / 'r'}/" in line and ".pth: No space left on device (0 bytes free on" in line
    assert {k: v for k, v in _tree(models / "r").items() if k.endswith(".pth")} == weights
    assert not [p for p in (models / "r").rglob(".*.tmp")]


# -- 4. a failed safetensors export keeps the previous good one ----------------------------------------------


def test_a_failed_safetensors_export_keeps_the_previous_one(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    _save_nano(models / "r" / "best.pth")
    args = ["export", "run=r", f"paths.models={models}", "export.format=safetensors"]
    assert cli(args) == 0
    before = _tree(models)
    monkeypatch.setattr("pipeline.export.load_checkpoint", lambda *a, **k: {"arch": "edsr-nano", "params": {}})
    assert cli(args) == 2
    assert "best.safetensors: the written file does not read back as the model's weights; not kept (the previous " \
           "export is unchanged)" in _one_line(capsys)
    assert _tree(models) == before


# -- 5. memory bombs in small files --------------------------------------------------------------------------------


def _deflated_pth(path: Path, values: int) -> Path:
    """A torch.save archive whose tensor member is deflate-compressed (what torch.save never writes)."""
    plain = path.with_suffix(".plain")
    torch.save({"params": {"w": torch.zeros(values)}}, plain)
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(path, "w") as dst:
        for info in src.infolist():
            method = zipfile.ZIP_DEFLATED if "/data/" in info.filename else zipfile.ZIP_STORED
            dst.writestr(info.filename, src.read(info), compress_type=method)
    plain.unlink()
    return path


def test_a_compressed_pth_member_is_refused_before_loading(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    bomb = _deflated_pth(tmp_path / "bomb.pth", 2**20)  # 4 MiB of zeros in a few KB
    assert bomb.stat().st_size < 64 * 1024

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("torch.load ran on a refused file")

    monkeypatch.setattr("pipeline.models.checkpoint.torch.load", never)
    write_png(tmp_path / "lr" / "a.png", _smooth(8, 8, 0))
    assert cli(["infer", "--weights", str(bomb), "--input", str(tmp_path / "lr"), "--output", str(tmp_path / "o")]) == 2
    line = _one_line(capsys)
    assert f"{bomb}: member '" in line and "/data/0' is compressed (" in line
    assert "that inflate to 4194304); torch.save never compresses: refused before loading" in line
    assert not (tmp_path / "o").exists()


def test_a_tensor_larger_than_its_data_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    one = torch.zeros(1)
    huge = torch.empty(0).set_(one.untyped_storage(), 0, (10**6, 10**6), (0, 0))  # 10^12 "values" in 4 bytes
    torch.save({"params": {"conv_first.weight": huge}}, tmp_path / "view.pth")
    assert (tmp_path / "view.pth").stat().st_size < 4096
    assert cli(["export", "--weights", str(tmp_path / "view.pth"), f"paths.models={tmp_path / 'm'}"]) == 2
    assert "view.pth: a tensor of shape (1000000, 1000000) is a view of only 4 stored bytes" in _one_line(capsys)


@pytest.mark.parametrize("kind", ["sparse_coo", "nested"])
def test_a_tensor_without_one_storage_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                  kind: str) -> None:
    if kind == "nested":
        tensor = torch.nested.nested_tensor([torch.zeros(2), torch.zeros(3)])
    else:
        tensor = torch.eye(3).to_sparse()
    torch.save({"params": {"conv_first.weight": tensor}}, tmp_path / "w.pth")
    assert cli(["export", "--weights", str(tmp_path / "w.pth"), f"paths.models={tmp_path / 'm'}"]) == 2
    assert f"w.pth: holds a {kind} tensor; weights files hold dense tensors" in _one_line(capsys)


def _alias_bomb(flow: bool) -> str:
    """Nine levels of nine aliases: 9^9 values once expanded, under 400 bytes."""
    levels = "abcdefghi"
    rows = [f"&{cur} [{','.join('*' + prev for _ in range(9))}]" for prev, cur in zip(levels, levels[1:])]
    if flow:
        return "[&a [lol,lol,lol,lol,lol,lol,lol,lol,lol]," + ",".join(rows) + "]"
    return "train:\n  learning_rate:\n    - &a [lol,lol,lol,lol,lol,lol,lol,lol,lol]\n" + "".join(
        f"    - {row}\n" for row in rows)


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_yaml_alias_bomb_is_one_line(tmp_path: Path, where: str) -> None:
    bomb = _alias_bomb(flow=where == "override")
    assert len(bomb) < 400
    (tmp_path / "bomb.yaml").write_text(bomb)
    args = ["--config", str(tmp_path / "bomb.yaml")] if where == "file" else [f"train.learning_rate={bomb}"]
    # a subprocess with a timeout: before the bound, formatting the expanded value never returned
    done = subprocess.run([sys.executable, "-m", "pipeline", "train", *args], cwd=tmp_path, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "its aliases expand to more than 10000 values (an alias bomb?)" in lines[0]


def test_an_image_file_is_size_checked_before_it_is_read(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lr = tmp_path / "lr"
    write_png(lr / "a.png", _smooth(8, 8, 0))
    os.truncate(lr / "a.png", 40 * 2**20)  # a valid header, then a 40 MB hole (sparse: no disk used)
    assert cli(["infer", "model.name=bicubic", "--input", str(lr), "--output", str(tmp_path / "o"),
                "data.max_pixels=1000"]) == 2
    assert (f"a.png: file is {40 * 2**20} bytes, more than any image within data.max_pixels=1000 needs "
            f"({8080 + 16 * 2**20}); refused before reading it") in _one_line(capsys)


# -- 6. worker counts are bounded ------------------------------------------------------------------------------


@pytest.mark.parametrize("stage,setting", [("prepare", "data.workers"), ("patchify", "patchify.workers"),
                                           ("add-data", "add_data.workers"), ("train", "train.workers")])
def test_worker_counts_are_capped(tmp_path: Path, capsys: pytest.CaptureFixture[str], stage: str,
                                  setting: str) -> None:
    from pipeline.core.workers import max_workers

    root = _dataset(tmp_path / "data")
    before = _tree(tmp_path)
    assert cli([stage, "--data", str(root), f"{setting}=100000"]) == 2
    assert f"{setting}=100000 is more than {max_workers()} (4 x the" in _one_line(capsys)
    assert cli([stage, "--data", str(root), f"{setting}={max_workers() + 1}"]) == 2
    assert _tree(tmp_path) == before


# -- 7. pool workers die with their stage ------------------------------------------------------------------------


def _children(pid: int) -> list[int]:
    try:
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc to find the workers")
@pytest.mark.parametrize("stage", ["add-data", "patchify"])
def test_pool_workers_die_with_a_killed_stage(tmp_path: Path, stage: str) -> None:
    root = _dataset(tmp_path / "data", n=24, lr=64)
    if stage == "add-data":
        argv = ["add-data", "--data", str(root), "--from", str(_photos(tmp_path / "set", 24, 256)),
                "add_data.workers=2", "add_data.jpeg=90"]
    else:
        assert cli(["prepare", "--data", str(root), "data.workers=1", "data.folds=3"]) == 0
        argv = ["patchify", "--data", str(root), "patchify.size=32", "patchify.workers=2"]
    proc = _start(argv, tmp_path / "stage.log")
    try:
        _wait_for(lambda: len(_children(proc.pid)) >= 2, proc, tmp_path / "stage.log", "two pool workers")
        workers = _children(proc.pid)
    finally:
        proc.send_signal(signal.SIGKILL)  # no clean-up runs in the stage itself
        proc.wait()
    deadline = time.monotonic() + 60
    while any(_running(w) for w in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    alive = [w for w in workers if _running(w)]
    for w in alive:  # (only when the test fails: leave no process behind)
        os.kill(w, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived their killed {stage}"


# -- 8. leftovers and tracebacks ------------------------------------------------------------------------------------


def test_a_killed_exports_temporary_files_are_removed_by_the_next_write(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    models = tmp_path / "models"
    _save_nano(models / "r" / "best.pth")
    monkeypatch.setattr("pipeline.core.files._cleaned", set())  # export runs as a process of its own
    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    stale = models / "r" / f".best.onnx.{dead}.k2x9.tmp"  # what a SIGKILLed export leaves
    stale.write_bytes(b"\0" * 4096)
    assert cli(["export", "run=r", f"paths.models={models}", "export.format=safetensors"]) == 0
    assert not stale.exists()


def test_temporary_files_of_another_machine_are_left_alone(tmp_path: Path) -> None:
    from pipeline.core.files import HOST_TAG, atomic_write, clean_stale

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)
    other_host = "0" * 8 if HOST_TAG != "0" * 8 else "1" * 8
    theirs = tmp_path / f".b.png.{dead}.{other_host}-x1y2.tmp"  # a rank on another machine, same shared folder
    ours = tmp_path / f".c.png.{dead}.{HOST_TAG}-x1y2.tmp"  # a killed process of this machine
    for path in (theirs, ours):
        path.write_bytes(b"half")
    assert clean_stale(tmp_path) == [ours]
    assert theirs.exists()
    with atomic_write(tmp_path / "d.png") as tmp:
        assert tmp.name.startswith(f".d.png.{os.getpid()}.{HOST_TAG}-")  # what the check above reads
        tmp.write_bytes(b"png")


def _tamper_step(state: dict) -> None:
    state["step"] = "abc"


def _tamper_rng(state: dict) -> None:
    state["rng"]["numpy"] = ["MT19937", "not a key array"]


@pytest.mark.parametrize("tamper,message", [(_tamper_step, "malformed training state (step 'abc' is not a step"),
                                            (_tamper_rng, "malformed training state (")])
def test_a_malformed_last_pth_is_one_line(trainable: Path, tmp_path: Path,  # noqa: F811
                                          capsys: pytest.CaptureFixture[str], tamper, message: str) -> None:
    models = tmp_path / "models"
    assert _train(trainable, models) == 0
    state = torch.load(models / "r" / "last.pth", weights_only=True)
    tamper(state)
    save_checkpoint(models / "r" / "last.pth", state)
    before = _tree(models)
    assert _train(trainable, models, "train.max_steps=8") == 2
    assert f"{models / 'r' / 'last.pth'}: {message}" in _one_line(capsys)
    assert _tree(models) == before


# -- 9. messages that name the real culprit ---------------------------------------------------------------------------


class _Payload:
    """Pickles as a call of os.system: what a malicious weights file holds."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_malicious_pickle_is_refused_without_unsafe_advice(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    marker = tmp_path / "pwned"
    torch.save({"params": _Payload(marker)}, tmp_path / "evil.pth")
    write_png(tmp_path / "lr" / "a.png", _smooth(8, 8, 0))
    assert cli(["infer", "--weights", str(tmp_path / "evil.pth"), "--input", str(tmp_path / "lr"), "--output",
                str(tmp_path / "o")]) == 2
    line = _one_line(capsys)
    assert "evil.pth: refused: it holds pickled objects that safe loading does not allow (" in line
    assert "system" in line and "nothing in it was run" in line
    assert "weights_only" not in line and "will likely succeed" not in line
    assert not marker.exists()


class _Foreign:
    """A class of someone else's code: safe loading refuses to import it."""


def test_refused_objects_and_damaged_files_are_told_apart(tmp_path: Path) -> None:
    from pipeline.models.checkpoint import CheckpointError, load_checkpoint

    torch.save({"params": _Foreign()}, tmp_path / "object.pth")
    with pytest.raises(CheckpointError, match="refused: it holds pickled objects .* .Unsupported global: GLOBAL "
                                              "test_faults._Foreign was not an allowed global by default.; nothing"):
        load_checkpoint(tmp_path / "object.pth")
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(tmp_path / "object.pth")
    assert "safe_globals" not in str(info.value)  # never the advice to allowlist what was refused
    (tmp_path / "junk.pth").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pth: cannot load checkpoint .not a PyTorch weights file, or a "
                                              "damaged one: Unsupported operand 110.$"):
        load_checkpoint(tmp_path / "junk.pth")


def _save_nan_nano(path: Path) -> Path:
    weights = build_model("edsr-nano").state_dict()
    weights["conv_first.weight"] = torch.full_like(weights["conv_first.weight"], float("nan"))
    save_checkpoint(path, {"params": weights, "arch": "edsr-nano", "kwargs": model_kwargs("edsr-nano"), "step": 1})
    return path


def test_nan_weights_are_named_as_such(trainable: Path, tmp_path: Path,  # noqa: F811
                                       capsys: pytest.CaptureFixture[str]) -> None:
    nan = _save_nan_nano(tmp_path / "nan.pth")
    bare = tmp_path / "bare.pth"
    torch.save(torch.load(nan, weights_only=True)["params"], bare)  # a published-style bare state dict
    count = torch.load(bare, weights_only=True)["conv_first.weight"].numel()
    models = tmp_path / "models"
    assert _train(trainable, models, f"model.pretrained={bare}") == 2
    assert f"{bare}: weights 'conv_first.weight' hold {count} NaN or infinite value(s)" in _one_line(capsys)
    assert not (models / "r").exists()
    write_png(tmp_path / "lr" / "a.png", _smooth(8, 8, 0))
    assert cli(["infer", "--weights", str(nan), "--input", str(tmp_path / "lr"), "--output", str(tmp_path / "o")]) == 2
    assert f"{nan}: weights 'conv_first.weight' hold {count} NaN" in _one_line(capsys)


def test_a_folder_given_as_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_png(tmp_path / "lr" / "a.png", _smooth(8, 8, 0))
    (tmp_path / "weights").mkdir()
    assert cli(["infer", "--weights", str(tmp_path / "weights"), "--input", str(tmp_path / "lr"), "--output",
                str(tmp_path / "o")]) == 2
    assert f"{tmp_path / 'weights'}: is a folder, not a weights file" in _one_line(capsys)


def test_perceptual_weights_load_like_any_weights_file(trainable: Path, tmp_path: Path,  # noqa: F811
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    bomb = _deflated_pth(tmp_path / "vgg19-dcbb9e9d.pth", 2**20)
    models = tmp_path / "models"
    assert _train(trainable, models, "loss.perceptual=1", f"loss.vgg_weights={bomb}") == 2
    assert f"{bomb}: member '" in _one_line(capsys)  # refused before torch.load, as every weights file
    assert _train(trainable, models, "loss.perceptual=1", f"loss.vgg_weights={tmp_path}") == 2
    assert f"{tmp_path}: is a folder, not a weights file" in _one_line(capsys)
    assert not (models / "r").exists()


def test_a_folder_given_as_a_volume_checkpoint(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _volumes(tmp_path / "vols", (8, 8, 8))
    assert cli(["mri-infer", "--input", str(root), "--output", str(tmp_path / "o"),
                f"mri_infer.checkpoint={tmp_path}"]) == 2
    assert f"mri_infer.checkpoint={tmp_path}: is a folder, not a checkpoint file" in _one_line(capsys)
    assert not (tmp_path / "o").exists()


def test_a_staged_file_is_named_where_it_was_going(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.core.images import ImageError

    def broken_encoder(img: np.ndarray, path: str | Path = "<memory>") -> bytes:
        raise ImageError(f"{path}: PNG encoding failed")

    write_png(tmp_path / "lr" / "a.png", _smooth(8, 8, 0))
    monkeypatch.setattr("pipeline.core.images.encode_png", broken_encoder)
    assert cli(["infer", "model.name=bicubic", "--input", str(tmp_path / "lr"), "--output", str(tmp_path / "o")]) == 2
    line = _one_line(capsys)
    assert f"{tmp_path / 'o' / 'a.png'}: PNG encoding failed" in line and ".partial" not in line


def _volumes(root: Path, shape: tuple[int, int, int]) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for subject in ("s1", "s2", "s3"):
        np.save(root / f"{subject}_T1.npy", rng.integers(0, 1000, shape).astype(np.uint16))
    return root


def test_a_volume_error_names_its_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _volumes(tmp_path / "vols", (8, 8, 2))
    assert cli(["mri-prepare", f"mri.dir={root}", "mri.folds=3", "mri.degradation=thick", "mri.thick_factor=4"]) == 2
    assert f"{root / 's1_T1.npy'}: 2 slice(s) along axis 2 cannot make one thick slice of 4" in _one_line(capsys)


@pytest.mark.parametrize("path,message", [("../outside.npy", "path '../outside.npy' leaves the dataset folder"),
                                          ("/etc/passwd", "path '/etc/passwd' must be relative to")])
def test_mri_splits_paths_cannot_leave_the_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str], path: str,
                                                  message: str) -> None:
    root = _volumes(tmp_path / "vols", (8, 8, 8))
    common = [f"mri.dir={root}", "mri.folds=3"]
    assert cli(["mri-prepare", *common]) == 0
    splits = root / "mri_splits.csv"
    lines = splits.read_text().splitlines()
    lines[1] = lines[1].replace("s1_T1.npy", path)
    splits.write_text("\n".join(lines) + "\n")
    before = _tree(tmp_path)
    assert cli(["mri-infer", *common, "mri_infer.model=trilinear", "mri_infer.split=all"]) == 2
    assert f"mri_splits.csv: {message}" in _one_line(capsys)
    assert _tree(tmp_path) == before

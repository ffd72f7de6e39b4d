"""Hostile and unlucky inputs, through the CLI: each gives one line naming the problem and a non-zero
exit, writes nothing outside its folders, and loses nothing that was there before."""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import main as cli
from pipeline.core.compat import imresize
from pipeline.core.files import FILE_MODE, WriteError, atomic_write, clean_stale
from pipeline.core.images import encode_png, read_uint8, to_uint8, write_png
from pipeline.models.checkpoint import save_checkpoint
from pipeline.models.table import build_model, model_kwargs

ROOT = Path(__file__).resolve().parents[1]


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    small = np.random.default_rng(seed).random((h // 4 + 2, w // 4 + 2, 3))
    return to_uint8(imresize(small, 4)[:h, :w].clip(0, 1))


def _dataset(root: Path, n: int = 6, test: int = 3, lr: int = 8) -> Path:
    """train.csv (with sources), test.csv, train/{lr,hr}, test/lr: n training pairs, ``test`` test images."""
    rows = []
    for i in range(n):
        hr = _smooth(4 * lr, 4 * lr, i)
        write_png(root / "train" / "hr" / f"{i:04d}.png", hr)
        write_png(root / "train" / "lr" / f"{i:04d}.png", to_uint8(imresize(hr / 255.0, 0.25)))
        rows.append((f"{i:04d}", f"train/lr/{i:04d}.png", f"train/hr/{i:04d}.png", f"src{i // 2}"))
    columns = ["img_id", "lr_img_path", "hr_img_path", "source"]
    pd.DataFrame(rows, columns=columns).to_csv(root / "train.csv", index=False)
    tests = []
    for k in range(test):
        write_png(root / "test" / "lr" / f"{20000 + k}.png", _smooth(lr, lr, 100 + k))
        tests.append((str(20000 + k), f"test/lr/{20000 + k}.png"))
    pd.DataFrame(tests, columns=["img_id", "lr_img_path"]).to_csv(root / "test.csv", index=False)
    return root


def _tree(folder: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file below ``folder`` (to prove nothing changed or appeared)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The error line: exactly one, the last thing printed (progress bars share stderr before it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error: " in line]
    assert len(errors) == 1 and lines[-1].startswith("error: "), lines
    return lines[-1]


def _save_nano(path: Path, seed: int = 0) -> None:
    torch.manual_seed(seed)
    weights = build_model("edsr-nano").state_dict()
    save_checkpoint(path, {"params": weights, "params_ema": weights, "arch": "edsr-nano",
                           "kwargs": model_kwargs("edsr-nano"), "step": 1})


# -- 1. path traversal through ids and paths ----------------------------------------------------


@pytest.mark.parametrize("column,value,message", [
    ("img_id", "../../../x", "img_id '../../../x' is not a safe name"),
    ("img_id", "/tmp/abs", "img_id '/tmp/abs' is not a safe name"),
    ("img_id", ".hidden", "img_id '.hidden' is not a safe name"),
    ("lr_img_path", "../../outside.png", "path '../../outside.png' leaves the dataset folder"),
    ("hr_img_path", "/etc/passwd", "path '/etc/passwd' must be relative to"),
])
def test_train_csv_cannot_reach_outside(tmp_path: Path, capsys: pytest.CaptureFixture[str], column: str, value: str,
                                        message: str) -> None:
    root = _dataset(tmp_path / "sandbox" / "data")
    table = pd.read_csv(root / "train.csv", dtype=str)
    table.loc[2, column] = value
    table.to_csv(root / "train.csv", index=False)
    before = _tree(tmp_path)
    assert cli(["prepare", "--data", str(root), "data.workers=1"]) == 2
    assert message in _one_line(capsys)
    assert _tree(tmp_path) == before  # nothing written anywhere


def test_test_ids_and_run_names_cannot_escape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "sandbox" / "data")
    (root / "test.csv").write_text("img_id,lr_img_path\n../../../evil,test/lr/20000.png\n")
    before = _tree(tmp_path)
    # infer and submit read test.csv without prepare: the same checks apply
    assert cli(["infer", "--data", str(root), "model.name=bicubic", f"paths.submit={tmp_path / 'sandbox' / 's'}"]) == 2
    assert "test.csv: img_id '../../../evil' is not a safe name" in _one_line(capsys)
    assert cli(["submit", "--data", str(root), f"paths.submit={tmp_path / 'sandbox' / 's'}"]) == 2
    assert "not a safe name" in _one_line(capsys)
    assert cli(["infer", "--data", str(root), "model.name=bicubic", "run=../../up"]) == 2
    assert "run='../../up' is not a safe folder name" in _one_line(capsys)
    assert _tree(tmp_path) == before


def test_edited_splits_and_manifest_are_checked_too(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data")
    assert cli(["prepare", "--data", str(root), "data.workers=1", "data.folds=3"]) == 0
    splits = pd.read_csv(root / "splits.csv", dtype=str)
    splits.loc[0, "img_id"] = "../x"
    splits.to_csv(root / "splits.csv", index=False)
    assert cli(["patchify", "--data", str(root), "patchify.size=16", "patchify.workers=1"]) == 2
    assert "splits.csv: img_id '../x' is not a safe name" in _one_line(capsys)
    assert not (tmp_path / "x_0000_0000.png").exists() and not (root / "patches" / "manifest.csv").exists()


# -- 2. one finished prediction set: killed or failed infer keeps the old one --------------------


def test_failed_infer_keeps_the_previous_predictions(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data")
    submit = tmp_path / "submit"
    args = ["infer", "--data", str(root), "model.name=bicubic", f"paths.submit={submit}", "run=r"]
    assert cli(args) == 0
    pred = submit / "r" / "pred"
    before = _tree(pred)
    (root / "test" / "lr" / "20001.png").write_bytes(b"\x89PNG broken")  # the 2nd of 3 images fails
    assert cli(args) == 2
    assert "20001.png: cannot decode image" in _one_line(capsys)
    assert _tree(pred) == before  # untouched: no mixture of new and old files
    assert [p.name for p in (submit / "r").iterdir()] == ["pred"]  # no staging folder left behind


def test_sigkilled_infer_keeps_the_previous_predictions(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", test=12, lr=24)
    models, submit = tmp_path / "models", tmp_path / "submit"
    _save_nano(models / "r" / "best.pth")
    args = ["infer", "--data", str(root), "run=r", f"paths.models={models}", f"paths.submit={submit}",
            "infer.tile=8", "infer.stride=4", "infer.precision=fp32"]
    assert cli([*args, "infer.tta=1"]) == 0
    pred = submit / "r" / "pred"
    before = _tree(pred)
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", *args, "infer.tta=8"], cwd=ROOT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    staged: list[Path] = []
    while not staged and proc.poll() is None and time.monotonic() < deadline:
        staged = [p for p in (submit / "r").glob(".pred.*.partial") if any(p.glob("*.png"))]
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert staged and proc.returncode == -signal.SIGKILL  # killed half way, with new files staged
    assert _tree(pred) == before  # the earlier set is whole and unmixed
    assert cli(["submit", "--data", str(root), f"paths.submit={submit}", "run=r"]) == 0
    assert cli([*args, "infer.tta=1"]) == 0  # the next run removes the dead run's staging folder
    assert sorted(p.name for p in (submit / "r").iterdir()) == ["pred", "submission.zip"]


def test_submit_packs_only_a_finished_prediction_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data")
    submit = tmp_path / "submit"
    assert cli(["infer", "--data", str(root), "model.name=bicubic", f"paths.submit={submit}", "run=r"]) == 0
    assert cli(["submit", "--data", str(root), f"paths.submit={submit}", "run=r"]) == 0
    zip_path = submit / "r" / "submission.zip"
    (submit / "r" / "pred" / "timing.json").unlink()  # e.g. a folder copied in by hand
    assert cli(["submit", "--data", str(root), f"paths.submit={submit}", "run=r"]) == 2
    err = _one_line(capsys)
    assert "no timing.json, so not a finished `infer` output" in err and "renamed submission.zip.stale" in err
    assert not zip_path.exists() and (submit / "r" / "submission.zip.stale").is_file()  # kept, not uploadable


def test_infer_refuses_an_output_folder_it_did_not_write(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lr_dir, out = tmp_path / "lr", tmp_path / "mine"
    write_png(lr_dir / "a.png", _smooth(8, 8, 0))
    (out / "notes").mkdir(parents=True)
    (out / "notes" / "thesis.tex").write_text("precious")
    assert cli(["infer", "model.name=bicubic", "--input", str(lr_dir), "--output", str(out)]) == 2
    assert "mine: exists, is not empty and was not written by this pipeline" in _one_line(capsys)
    assert (out / "notes" / "thesis.tex").read_text() == "precious"
    assert cli(["infer", "model.name=bicubic", "--input", str(lr_dir), "--output", str(tmp_path / "new")]) == 0
    assert cli(["infer", "model.name=bicubic", "--input", str(lr_dir), "--output", str(tmp_path / "new")]) == 0


# -- 3. trained weights are never deleted implicitly ----------------------------------------------


@pytest.fixture(scope="module")
def trainable(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = _dataset(tmp_path_factory.mktemp("trainable") / "data", n=6, lr=16)
    assert cli(["prepare", "--data", str(root), "data.workers=1", "data.folds=3"]) == 0
    assert cli(["patchify", "--data", str(root), "patchify.size=32", "patchify.workers=1"]) == 0
    return root


def _train(root: Path, models: Path, *extra: str) -> int:
    return cli(["train", "--data", str(root), "run=r", f"paths.models={models}", "model.name=edsr-nano",
                "data.folds=3", "train.batch_size=4", "train.workers=0", "train.val_every=4", "train.save_every=4",
                "train.log_every=2", "train.max_steps=4", "train.learning_rate=5e-3", *extra])


def test_resume_never_moves_the_old_run_aside(trainable: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    models = tmp_path / "models"
    assert _train(trainable, models) == 0
    before = _tree(models / "r")
    assert _train(trainable, models, "train.resume=never") == 0
    moved = [p for p in models.iterdir() if p.name.startswith("r.old-")]
    assert len(moved) == 1 and _tree(moved[0]) == before  # every file of the earlier run, unchanged
    assert f"was moved to {moved[0]}" in capsys.readouterr().out
    assert (models / "r" / "best.pth").is_file()


def test_a_restart_never_replaces_a_better_best(trainable: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    models = tmp_path / "models"
    assert _train(trainable, models) == 0
    best = (models / "r" / "best.pth").read_bytes()
    config = (models / "r" / "config.yaml").read_text()
    (models / "r" / "last.pth").unlink()  # killed after its validation, before its first last.pth
    # restarted with settings that cannot learn (rate 0): its validations are worse than best.pth's
    assert _train(trainable, models, "train.learning_rate=0", "train.scheduler=constant") == 0
    assert (models / "r" / "best.pth").read_bytes() == best
    # a failed start (the run is another architecture's) leaves config.yaml as it was
    (models / "r" / "config.yaml").write_text(config)
    assert _train(trainable, models, "model.name=rrdb-nano") == 2
    assert "a edsr-nano run, but this start builds rrdb-nano" in _one_line(capsys)
    assert (models / "r" / "config.yaml").read_text() == config


# -- 4. fold leakage --------------------------------------------------------------------------------


def test_blank_source_is_an_error_naming_the_row(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data")
    table = pd.read_csv(root / "train.csv", dtype=str)
    table.loc[3, "source"] = ""
    table.to_csv(root / "train.csv", index=False)
    assert cli(["prepare", "--data", str(root), "data.workers=1", "data.folds=3"]) == 2
    assert "train.csv: line 5 (img_id '0003') has a blank source" in _one_line(capsys)
    assert not (root / "splits.csv").exists()


# -- 5. bounded memory --------------------------------------------------------------------------------


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height RGB (valid CRCs), with a tiny IDAT: a forged size."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_forged_and_huge_images_are_refused_before_decoding(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    lr_dir = tmp_path / "lr"
    lr_dir.mkdir()
    (lr_dir / "forged.png").write_bytes(_png_header(100000, 100000))
    assert cli(["infer", "model.name=bicubic", "--input", str(lr_dir), "--output", str(tmp_path / "o")]) == 2
    assert "forged.png: image is 100000x100000 = 10000000000 pixels, more than data.max_pixels" in _one_line(capsys)
    (lr_dir / "forged.png").unlink()
    write_png(lr_dir / "big.png", _smooth(40, 40, 0))  # a genuine image over a lowered cap
    assert cli(["infer", "model.name=bicubic", "--input", str(lr_dir), "--output", str(tmp_path / "o"),
                "data.max_pixels=1000"]) == 2
    assert "big.png: image is 40x40 = 1600 pixels, more than data.max_pixels=1000" in _one_line(capsys)
    assert not (tmp_path / "o").exists()


def _zip_bomb(path: Path, gib: float) -> Path:
    """A zip whose one member inflates to ``gib`` GiB of zeros (a few MB on disk)."""
    block = bytes(2**20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        with zf.open("20000.png", "w", force_zip64=True) as member:
            for _ in range(int(gib * 1024)):
                member.write(block)
    return path


def test_zip_bomb_is_refused_with_bounded_memory(tmp_path: Path) -> None:
    bomb = _zip_bomb(tmp_path / "bomb.zip", 1.0)
    assert bomb.stat().st_size < 8 * 2**20
    code = ("import resource, sys\nfrom pipeline.cli import main\nbase = resource.getrusage(resource.RUSAGE_SELF)"
            ".ru_maxrss\nrc = main(['submit', '--check', sys.argv[1]])\n"
            "print('EXTRA_MIB', (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)\nsys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code, str(bomb)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert "declares 1073741824 bytes uncompressed" in out.stderr and "refused before decompressing" in out.stderr
    extra = float(out.stdout.split("EXTRA_MIB")[1])
    assert extra < 300, f"{extra:.0f} MiB"


def _corrupt_crc(path: Path) -> None:
    """Flip one byte of the stored (uncompressed) member data: the CRC no longer matches."""
    data = bytearray(path.read_bytes())
    offset = data.index(b"IDAT") + 8
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _set_flag_and_method(path: Path, flag_bits: int | None = None, method: int | None = None) -> None:
    """Patch every local and central header of a zip (encrypted bit / compression method)."""
    data = bytearray(path.read_bytes())
    for sig, flag_at, method_at in ((b"PK\x03\x04", 6, 8), (b"PK\x01\x02", 8, 10)):
        start = 0
        while (i := data.find(sig, start)) >= 0:
            if flag_bits is not None:
                data[i + flag_at:i + flag_at + 2] = struct.pack("<H", flag_bits)
            if method is not None:
                data[i + method_at:i + method_at + 2] = struct.pack("<H", method)
            start = i + 4
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("breaker,message", [
    (_corrupt_crc, "20000.png: corrupt member (Bad CRC-32"),
    (lambda p: _set_flag_and_method(p, flag_bits=1), "'20000.png' is encrypted"),
    (lambda p: _set_flag_and_method(p, method=99), "'20000.png' uses compression method 99"),
])
def test_zip_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], breaker, message: str) -> None:
    path = tmp_path / "s.zip"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        zf.writestr("20000.png", encode_png(_smooth(16, 16, 0)))
    breaker(path)
    assert cli(["submit", "--check", str(path)]) == 2
    assert message in _one_line(capsys)


@pytest.mark.parametrize("setting,message", [
    ("data.scale=0", "data.scale=0 must be >= 1"),
    ("train.crop=-3", "train.crop=-3 must be >= 0"),
    ("train.learning_rate=-1e-3", "train.learning_rate=-0.001 must be >= 0"),
    ("train.workers=-1", "train.workers=-1 must be >= 0"),
    ("infer.pad=100000", "infer.pad=100000 must be <= 512"),
    ("data.max_pixels=0", "data.max_pixels=0 must be >= 1"),
    # numbers no run can use (a traceback before they were bounded)
    ("train.learning_rate=1e300", "train.learning_rate=1e+300 is not a finite float32 number"),
    ("train.max_minutes=.inf", "train.max_minutes=inf is not a finite float32 number"),
    ("seed=99999999999999999999", "seed=99999999999999999999 must be <= 4294967295"),
    ("seed=-1", "seed=-1 must be >= 0"),
    ("run=off", "run: expected str, got False (YAML reads a bare yes / no / on / off"),  # a name YAML makes a bool
])
def test_bad_numbers_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str,
                                  message: str) -> None:
    assert cli(["train", "--data", str(tmp_path), setting]) == 2
    assert message in _one_line(capsys)


# -- 6. patches follow their images; a folder we did not make is not ours to delete ---------------------


def test_patchify_recuts_a_corrected_image(trainable: Path, tmp_path: Path, capsys) -> None:
    root = tmp_path / "data"
    import shutil

    shutil.copytree(trainable, root)
    args = ["patchify", "--data", str(root), "patchify.size=32", "patchify.workers=1"]
    assert cli(args) == 0
    assert "6 already done" in capsys.readouterr().out
    fixed = np.full((64, 64, 3), 200, np.uint8)  # the same size, other pixels
    write_png(root / "train" / "hr" / "0002.png", fixed)
    write_png(root / "train" / "lr" / "0002.png", to_uint8(imresize(fixed / 255.0, 0.25)))
    assert cli(args) == 0
    assert "5 already done" in capsys.readouterr().out
    assert (read_uint8(root / "patches" / "hr" / "0002_0000_0000.png") == 200).all()


def test_patchify_refuses_a_patches_folder_it_did_not_make(trainable: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    import shutil

    root = tmp_path / "data"
    shutil.copytree(trainable, root, ignore=shutil.ignore_patterns("patches"))
    (root / "patches").mkdir()
    (root / "patches" / "my_own_crops.txt").write_text("keep me")
    assert cli(["patchify", "--data", str(root), "patchify.size=32", "patchify.workers=1"]) == 2
    assert "patches: exists but was not made by patchify" in _one_line(capsys)
    assert (root / "patches" / "my_own_crops.txt").read_text() == "keep me"


def test_an_error_in_a_loader_worker_is_one_line(trainable: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    # torch re-raises a worker's error with the worker's traceback in the message: the CLI shows the
    # original error alone.
    root = tmp_path / "data"
    shutil.copytree(trainable, root)
    patches = sorted(p for p in root.rglob("*.png") if "patches" in p.parts and "lr" in p.parts)
    assert len(patches) > 2
    for path in patches[1:]:  # the first is read in the main process (the patch size), the rest in the worker
        path.write_bytes(b"not a png")
    assert _train(root, tmp_path / "models", "train.workers=1") == 2
    line = _one_line(capsys)
    assert "Traceback" not in line and "worker" not in line
    assert line.startswith("error: ") and "/patches/" in line and ".png" in line


# -- 7. OS errors are one line too ------------------------------------------------------------------------


def test_os_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    lr_dir = tmp_path / "lr"
    write_png(lr_dir / "a.png", _smooth(8, 8, 0))
    (tmp_path / "file").write_text("a file where a folder should be")
    assert cli(["infer", "model.name=bicubic", "--input", str(lr_dir), "--output", str(tmp_path / "file" / "o")]) == 2
    assert "file: is a file where a folder is needed" in _one_line(capsys)

    def disk_full(path: Path, img: np.ndarray) -> Path:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("pipeline.core.images.write_png", disk_full)
    assert cli(["infer", "model.name=bicubic", "--input", str(lr_dir), "--output", str(tmp_path / "o")]) == 2
    err = _one_line(capsys)
    assert "a.png: No space left on device (free some space" in err
    assert not (tmp_path / "o").exists() and not list(tmp_path.glob(".o.*"))


# -- 8. smaller ones ----------------------------------------------------------------------------------------


def test_files_follow_the_umask_and_stale_temps_are_cleaned(tmp_path: Path) -> None:
    path = write_png(tmp_path / "a.png", np.zeros((2, 2, 3), np.uint8))
    assert stat.S_IMODE(path.stat().st_mode) == FILE_MODE == 0o666 & ~_umask()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".b.png.{int(dead.stdout)}.x1y2.tmp"  # what a SIGKILL leaves
    stale.write_bytes(b"half")
    live = tmp_path / f".c.png.{os.getpid()}.z3.tmp"  # a live writer's: left alone
    live.write_bytes(b"busy")
    assert clean_stale(tmp_path) == [stale]
    assert live.exists() and not stale.exists()
    with pytest.raises(WriteError, match="d.png: cannot write it .RuntimeError: crash mid-write"), \
            atomic_write(tmp_path / "d.png") as tmp:
        tmp.write_bytes(b"partial")
        raise RuntimeError("crash mid-write")  # what a library raises: one line naming the file
    assert sorted(p.name for p in tmp_path.iterdir()) == [live.name, "a.png"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_two_files_with_one_stem_are_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _dataset(tmp_path / "data")
    (root / "train.csv").unlink()
    write_png(root / "train" / "lr" / "0001.jpg", _smooth(8, 8, 0))
    assert cli(["prepare", "--data", str(root), "data.workers=1", "data.folds=3"]) == 2
    assert "two train LR files with the stem '0001': 0001.jpg, 0001.png" in _one_line(capsys)


def test_settings_before_and_after_flags(tmp_path: Path) -> None:
    lr_dir = tmp_path / "lr"
    write_png(lr_dir / "a.png", _smooth(8, 8, 0))
    assert cli(["infer", "model.name=bicubic", "--input", str(lr_dir), "infer.tta=1", "--output",
                str(tmp_path / "o"), "run=x"]) == 0
    assert (tmp_path / "o" / "a.png").is_file()


# -- several processes: sharded inference writes what one process writes ------------------------------------------


def test_torchrun_infer_writes_exactly_what_one_process_writes(tmp_path: Path) -> None:
    root = _dataset(tmp_path / "data", test=5, lr=12)
    models = tmp_path / "models"
    _save_nano(models / "r" / "best.pth")
    common = ["--data", str(root), "run=r", f"paths.models={models}", "infer.tile=8", "infer.stride=4",
              "infer.tta=2", "infer.precision=fp32"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with (tmp_path / "ddp.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "pipeline", "infer", *common, f"paths.submit={tmp_path / 'two'}"],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    assert cli(["infer", *common, f"paths.submit={tmp_path / 'one'}"]) == 0
    assert proc.wait(timeout=300) == 0, (tmp_path / "ddp.log").read_text()[-3000:]
    one, two = tmp_path / "one" / "r" / "pred", tmp_path / "two" / "r" / "pred"
    pngs = {k: v for k, v in _tree(one).items() if k.endswith(".png")}
    assert len(pngs) == 5 and pngs == {k: v for k, v in _tree(two).items() if k.endswith(".png")}
    assert sorted(_tree(one)) == sorted(_tree(two))  # the same files, side files included
    import json

    timing = json.loads((two / "timing.json").read_text())
    assert timing["images"] == 5 and timing["ranks"] == 2

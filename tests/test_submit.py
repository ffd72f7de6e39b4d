"""submit: a valid zip/CSV is written and passes --check; every broken submission is refused."""

from __future__ import annotations

import base64
import io
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main as cli
from pipeline.core.images import encode_png, read_uint8, write_png
from pipeline.submit import SubmissionError, check_submission, expected_outputs, write_submission

IDS = ["20000", "20001", "20002"]
LR_SIZES = {"20000": (12, 16), "20001": (10, 10), "20002": (16, 9)}  # (height, width), one not square


def _rgb(h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _png(img: np.ndarray) -> bytes:
    """PNG bytes of any array as OpenCV writes it (gray, BGR, BGRA, 16-bit)."""
    ok, buf = cv2.imencode(".png", img)
    assert ok
    return buf.tobytes()


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path]:
    """A contest-layout dataset (test.csv, test/lr, sample_submission.zip) and a run's pred folder."""
    data = tmp_path / "data"
    rows = []
    sample = io.BytesIO()
    with zipfile.ZipFile(sample, "w") as zf:
        for i in IDS:
            h, w = LR_SIZES[i]
            write_png(data / "test" / "lr" / f"{i}.png", _rgb(h, w))
            rows.append((i, f"test/lr/{i}.png"))
            zf.writestr(f"{i}.png", encode_png(np.zeros((h * 4, w * 4, 3), np.uint8)))
    pd.DataFrame(rows, columns=["img_id", "lr_img_path"]).to_csv(data / "test.csv", index=False)
    (data / "sample_submission.zip").write_bytes(sample.getvalue())
    submit = tmp_path / "submit"
    pred = submit / "r" / "pred"
    for k, i in enumerate(IDS):
        h, w = LR_SIZES[i]
        write_png(pred / f"{i}.png", _rgb(h * 4, w * 4, seed=k + 1))
    (pred / "timing.json").write_text("{}")  # infer's side files are not predictions
    return data, submit


def _submit(data: Path, submit: Path, *extra: str) -> int:
    return cli(["submit", "--data", str(data), "run=r", f"paths.submit={submit}", *extra])


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".submission") or "submission" in p.name)


def test_writes_flat_zip_that_checks(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                     monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    data, submit = setup
    assert _submit(data, submit) == 0
    path = submit / "r" / "submission.zip"
    with zipfile.ZipFile(path) as zf:
        assert sorted(zf.namelist()) == [f"{i}.png" for i in IDS]
        assert zf.read("20002.png") == (submit / "r" / "pred" / "20002.png").read_bytes()  # not re-encoded
    assert sorted(check_submission(path, expected_outputs(data, 4))) == IDS
    assert cli(["submit", "--check", str(path), "--data", str(data)]) == 0
    assert "ids and sizes match the test set of" in capsys.readouterr().out
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")  # no data/demo here: structure only
    assert cli(["submit", "--check", str(path)]) == 0
    assert "structure only" in capsys.readouterr().out
    (tmp_path / "cwd" / "data").mkdir()
    (tmp_path / "cwd" / "data" / "demo").symlink_to(data)  # the default data.dir: used when it has a test set
    assert cli(["submit", "--check", str(path)]) == 0
    assert "ids and sizes match the test set of data/demo" in capsys.readouterr().out
    (data / "test" / "lr" / "20001.png").unlink()
    (data / "test.csv").write_text("img_id,lr_img_path\n20000,test/lr/20000.png\n20002,test/lr/20002.png\n")
    (data / "sample_submission.zip").unlink()
    assert cli(["submit", "--check", str(path)]) == 2
    assert "not test ids: 20001.png (checked against the test set of data/demo" in capsys.readouterr().err


def test_csv_format_round_trips(setup: tuple[Path, Path]) -> None:
    data, submit = setup
    assert _submit(data, submit, "submit.format=csv") == 0
    path = submit / "r" / "submission.csv"
    table = pd.read_csv(path, dtype=str)
    assert list(table.columns) == ["img_id", "png_base64"] and list(table["img_id"]) == IDS
    png = base64.b64decode(table.loc[1, "png_base64"])
    assert png == (submit / "r" / "pred" / "20001.png").read_bytes()
    assert cli(["submit", "--check", str(path), "--data", str(data)]) == 0
    table.loc[0, "png_base64"] = "not base64!"
    table.to_csv(path, index=False)
    with pytest.raises(SubmissionError, match="line 2 .*20000.*not valid base64"):
        check_submission(path)


@pytest.mark.parametrize("problem,message", [
    ("missing", "2 image(s) but the test set has 3; missing: 20001.png"),
    ("extra", "4 image(s) but the test set has 3; not test ids: 29999.png"),
    ("size", "20000.png: image is 63x48, expected 64x48"),
    ("gray", "20001.png: PNG is grayscale, expected 3-channel RGB"),
    ("rgba", "20002.png: PNG is RGBA, expected 3-channel RGB"),
    ("16bit", "20000.png: PNG has 16-bit channels, expected 8-bit"),
    ("jpeg", "20000.jpg: predictions must be .png"),
])
def test_bad_predictions_are_refused_and_leave_no_zip(setup: tuple[Path, Path], capsys: pytest.CaptureFixture[str],
                                                      problem: str, message: str) -> None:
    data, submit = setup
    pred = submit / "r" / "pred"
    if problem == "missing":
        (pred / "20001.png").unlink()
    elif problem == "extra":
        write_png(pred / "29999.png", _rgb(8, 8))
    elif problem == "size":
        write_png(pred / "20000.png", _rgb(48, 63))
    elif problem == "gray":
        (pred / "20001.png").write_bytes(_png(_rgb(40, 40)[:, :, 0]))
    elif problem == "rgba":
        (pred / "20002.png").write_bytes(_png(np.dstack([_rgb(64, 36), np.full((64, 36), 255, np.uint8)])))
    elif problem == "16bit":
        (pred / "20000.png").write_bytes(_png(_rgb(48, 64).astype(np.uint16) * 257))
    else:
        cv2.imwrite(str(pred / "20000.jpg"), _rgb(48, 64))
    assert _submit(data, submit) == 2
    assert message in capsys.readouterr().err
    assert _leftovers(submit / "r") == []


def _zip(path: Path, files: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, payload in files.items():
            zf.writestr(name, payload)
    return path


def _good_files() -> dict[str, bytes]:
    return {f"{i}.png": encode_png(_rgb(LR_SIZES[i][0] * 4, LR_SIZES[i][1] * 4)) for i in IDS}


@pytest.mark.parametrize("mutate,message", [
    (lambda f: {f"pred/{k}": v for k, v in f.items()}, "'pred/20000.png' is inside a folder"),
    (lambda f: {**f, "__MACOSX/": b""}, "inside a folder"),
    (lambda f: {k: v for k, v in f.items() if k != "20002.png"}, "missing: 20002.png"),
    (lambda f: {**f, "20001.png": _png(_rgb(40, 40)[:, :, 0])}, "20001.png: PNG is grayscale"),
    (lambda f: {**f, "20001.png": encode_png(_rgb(40, 44))}, "20001.png: image is 44x40, expected 40x40"),
    (lambda f: {**f, "notes.txt": b"hi"}, "'notes.txt' is not a .png file"),
    (lambda f: {**f, "20000.png": b"\x89PNG\r\n\x1a\n" + b"\0" * 40}, "20000.png: PNG has no IHDR"),
    (lambda f: {**f, "20000.png": f["20000.png"][:60]}, "20000.png: PNG data does not decode"),
])
def test_check_refuses_broken_zips(setup: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                   mutate, message: str) -> None:
    data, _submit_dir = setup
    path = _zip(tmp_path / "bad.zip", mutate(_good_files()))
    assert cli(["submit", "--check", str(path), "--data", str(data)]) == 2
    assert message in capsys.readouterr().err


def test_structure_only_check_still_refuses_format(tmp_path: Path) -> None:
    files = _good_files()
    files["20000.png"] = _png(np.dstack([_rgb(48, 64), np.zeros((48, 64), np.uint8)]))
    with pytest.raises(SubmissionError, match="RGBA"):
        check_submission(_zip(tmp_path / "a.zip", files))
    with pytest.raises(SubmissionError, match="missing.zip: file not found"):
        check_submission(tmp_path / "missing.zip")
    (tmp_path / "c.zip").write_bytes(b"PK not really")
    with pytest.raises(SubmissionError, match="not a valid zip"):
        check_submission(tmp_path / "c.zip")


def test_failed_recheck_leaves_nothing(setup: tuple[Path, Path], tmp_path: Path) -> None:
    """The archive is checked before the rename: a mismatch leaves no zip and no temp file."""
    data, submit = setup
    expected = expected_outputs(data, 4)
    files = {i: submit / "r" / "pred" / f"{i}.png" for i in IDS}
    wrong = {**expected, "20000": (1, 1)}
    out = tmp_path / "out" / "submission.zip"
    with pytest.raises(SubmissionError, match="20000.png: image is 64x48, expected 1x1"):
        write_submission(files, out, wrong)
    assert list(out.parent.iterdir()) == []


def test_sample_submission_ids_win(setup: tuple[Path, Path]) -> None:
    data, _submit_dir = setup
    with zipfile.ZipFile(data / "sample_submission.zip", "w") as zf:
        zf.writestr("20000.png", b"")
        zf.writestr("20002.png", b"")
    assert list(expected_outputs(data, 4)) == ["20000", "20002"]
    assert expected_outputs(data, 4)["20002"] == (64, 36)
    with zipfile.ZipFile(data / "sample_submission.zip", "w") as zf:
        zf.writestr("30000.png", b"")
    with pytest.raises(SubmissionError, match="'30000' has no test LR image"):
        expected_outputs(data, 4)


def test_read_back_is_identical(setup: tuple[Path, Path], tmp_path: Path) -> None:
    data, submit = setup
    assert _submit(data, submit) == 0
    with zipfile.ZipFile(submit / "r" / "submission.zip") as zf:
        zf.extractall(tmp_path / "x")
    for i in IDS:
        assert np.array_equal(read_uint8(tmp_path / "x" / f"{i}.png"), read_uint8(submit / "r" / "pred" / f"{i}.png"))

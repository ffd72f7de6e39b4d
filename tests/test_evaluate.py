"""evaluate: basicsr's metrics per protocol, folder matching, the CLI's last line, bicubic vs papers."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data

from pipeline.cli import main as cli
from pipeline.core.compat import calculate_psnr, calculate_ssim, imresize
from pipeline.core.images import read_uint8, to_uint8, write_png
from pipeline.core.metrics import paired_gain
from pipeline.evaluate import evaluate_folders, score_pair


def _photo_pairs(n: int = 3, size: int = 96) -> list[tuple[np.ndarray, np.ndarray]]:
    """(sr, hr) uint8 RGB pairs: crops of bundled photos and a noisy, blurred copy of each."""
    rng = np.random.default_rng(0)
    pairs = []
    for photo in (skimage.data.astronaut(), skimage.data.coffee(), skimage.data.chelsea())[:n]:
        hr = np.ascontiguousarray(photo[100:100 + size, 120:120 + size + 8])
        blurred = cv2.GaussianBlur(hr, (5, 5), 1.0).astype(np.float64)
        sr = np.clip(np.round(blurred + rng.normal(0, 4, hr.shape)), 0, 255).astype(np.uint8)
        pairs.append((sr, hr))
    return pairs


def _write_folders(tmp_path: Path, pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[Path, Path]:
    sr_dir, hr_dir = tmp_path / "sr", tmp_path / "hr"
    for i, (sr, hr) in enumerate(pairs):
        write_png(sr_dir / f"img{i}.png", sr)
        write_png(hr_dir / f"img{i}.png", hr)
    return sr_dir, hr_dir


def test_competition_equals_basicsr_on_rgb() -> None:
    for sr, hr in _photo_pairs():
        s = score_pair(sr, hr, "competition")
        assert s["psnr"] == pytest.approx(calculate_psnr(sr, hr, crop_border=0), abs=1e-9)
        assert s["ssim"] == pytest.approx(calculate_ssim(sr, hr, crop_border=0), abs=1e-9)
        mse = np.mean((sr.astype(np.float64) - hr) ** 2)
        assert s["psnr"] == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)
        assert s["nrmse"] == pytest.approx(math.sqrt(mse) / 255, rel=1e-9)


def test_paper_equals_basicsr_on_y_channel(tmp_path: Path) -> None:
    """basicsr's own path: cv2.imread (BGR) files, then test_y_channel + crop_border=scale."""
    for i, (sr, hr) in enumerate(_photo_pairs()):
        write_png(tmp_path / "sr.png", sr)
        write_png(tmp_path / "hr.png", hr)
        sr_bgr, hr_bgr = cv2.imread(str(tmp_path / "sr.png")), cv2.imread(str(tmp_path / "hr.png"))
        s = score_pair(sr, hr, "paper", scale=4)
        ref_psnr = calculate_psnr(sr_bgr, hr_bgr, crop_border=4, test_y_channel=True)
        ref_ssim = calculate_ssim(sr_bgr, hr_bgr, crop_border=4, test_y_channel=True)
        assert s["psnr"] == pytest.approx(ref_psnr, abs=1e-9), i
        assert s["ssim"] == pytest.approx(ref_ssim, abs=1e-9), i
        # and it is not the RGB number: the protocol really changes what is scored
        assert abs(s["psnr"] - score_pair(sr, hr, "competition")["psnr"]) > 0.01


def test_identical_images() -> None:
    _sr, hr = _photo_pairs(1)[0]
    s = score_pair(hr, hr)
    assert math.isinf(s["psnr"]) and s["nrmse"] == 0.0 and s["ssim"] == pytest.approx(1.0)


def test_cli_table_csv_and_last_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    pairs = _photo_pairs()
    sr_dir, hr_dir = _write_folders(tmp_path, pairs)
    csv = tmp_path / "out" / "scores.csv"
    assert cli(["evaluate", "--sr", str(sr_dir), "--hr", str(hr_dir), "--csv", str(csv)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    table = pd.read_csv(csv)
    assert list(table.columns) == ["name", "psnr", "ssim", "nrmse", "sharpness", "lpips"]
    assert list(table["name"]) == ["img0", "img1", "img2"]
    psnrs = [calculate_psnr(sr, hr, crop_border=0) for sr, hr in pairs]
    ssims = [calculate_ssim(sr, hr, crop_border=0) for sr, hr in pairs]
    np.testing.assert_allclose(table["psnr"], psnrs, atol=1e-5)
    assert lines[-1] == f"PSNR {np.mean(psnrs):.4f} SSIM {np.mean(ssims):.4f}"
    assert cli(["evaluate", "--sr", str(sr_dir), "--hr", str(hr_dir), "--protocol", "paper"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == "PSNR {:.4f} SSIM {:.4f}".format(
        *evaluate_folders(sr_dir, hr_dir, "paper").mean(numeric_only=True)[["psnr", "ssim"]])
    assert last != lines[-1]


def test_vs_prints_the_paired_gain(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--vs B: the gain of --sr over B is the mean per-image PSNR difference, with its interval, before the
    PSNR line; a B folder that does not match the ground truth is a one-line error and no CSV is written."""
    pairs = _photo_pairs()
    sr_dir, hr_dir = _write_folders(tmp_path, pairs)
    worse = tmp_path / "worse"
    rng = np.random.default_rng(1)
    for i, (sr, _hr) in enumerate(pairs):
        write_png(worse / f"img{i}.png", np.clip(sr + rng.normal(0, 6, sr.shape), 0, 255).round().astype(np.uint8))
    assert cli(["evaluate", "--sr", str(sr_dir), "--hr", str(hr_dir), "--vs", str(worse)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("PSNR ")
    gain = [line for line in lines if line.startswith("gain of ")]
    assert len(gain) == 1 and f"over {worse}:" in gain[0] and "paired bootstrap over 3 image(s)" in gain[0]
    a = [calculate_psnr(sr, hr, crop_border=0) for sr, hr in pairs]
    b = [calculate_psnr(read_uint8(worse / f"img{i}.png"), hr, crop_border=0) for i, (_sr, hr) in enumerate(pairs)]
    mean, lo, hi = paired_gain(a, b)
    assert f"{mean:+.4f} dB (95% CI {lo:+.4f} .. {hi:+.4f})" in gain[0] and 0 < lo <= mean <= hi
    (worse / "img1.png").unlink()
    csv = tmp_path / "scores.csv"
    assert cli(["evaluate", "--sr", str(sr_dir), "--hr", str(hr_dir), "--vs", str(worse), "--csv", str(csv)]) == 2
    assert "no prediction for img1.png" in capsys.readouterr().err and not csv.exists()


@pytest.mark.parametrize("problem,message", [
    ("missing", "no prediction for img1.png"),
    ("extra", "img9.png: no ground truth"),
    ("size", "img2.png: prediction is 104x95"),
])
def test_mismatched_folders_are_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], problem: str,
                                       message: str) -> None:
    pairs = _photo_pairs()
    sr_dir, hr_dir = _write_folders(tmp_path, pairs)
    if problem == "missing":
        (sr_dir / "img1.png").unlink()
    elif problem == "extra":
        write_png(sr_dir / "img9.png", pairs[0][0])
    else:
        write_png(sr_dir / "img2.png", pairs[2][0][:-1])
    assert cli(["evaluate", "--sr", str(sr_dir), "--hr", str(hr_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_bicubic_paper_protocol_matches_basicsr_pipeline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Our `infer model.name=bicubic` + `evaluate --protocol paper` == basicsr's imresize + calculate_psnr.

    basicsr's benchmark recipe: HR cropped to a multiple of the scale, LR = imresize(HR, 1/4)
    rounded to uint8, SR = imresize(LR, 4) rounded to uint8, PSNR/SSIM on Y with a 4-px border
    cropped. (Set5/Set14 cannot be downloaded here, so the photos are scikit-image's.)
    """
    hr_dir, lr_dir, sr_dir = tmp_path / "hr", tmp_path / "lr", tmp_path / "sr"
    ref_psnr, ref_ssim = [], []
    for name, photo in (("astronaut", skimage.data.astronaut()), ("coffee", skimage.data.coffee()),
                        ("chelsea", skimage.data.chelsea())):
        hr = np.ascontiguousarray(photo[:148, :200])  # multiple of 4
        lr = to_uint8(imresize(hr.astype(np.float64) / 255.0, 1 / 4))
        write_png(hr_dir / f"{name}.png", hr)
        write_png(lr_dir / f"{name}.png", lr)
        # basicsr's side, independently in BGR as its scripts read with cv2
        lr_bgr, hr_bgr = cv2.imread(str(lr_dir / f"{name}.png")), cv2.imread(str(hr_dir / f"{name}.png"))
        sr_bgr = np.clip(np.round(imresize(lr_bgr.astype(np.float64) / 255.0, 4) * 255), 0, 255).astype(np.uint8)
        ref_psnr.append(calculate_psnr(sr_bgr, hr_bgr, crop_border=4, test_y_channel=True))
        ref_ssim.append(calculate_ssim(sr_bgr, hr_bgr, crop_border=4, test_y_channel=True))
    assert cli(["infer", "model.name=bicubic", "--input", str(lr_dir), "--output", str(sr_dir)]) == 0
    csv = tmp_path / "paper.csv"
    assert cli(["evaluate", "--sr", str(sr_dir), "--hr", str(hr_dir), "--protocol", "paper", "--csv", str(csv)]) == 0
    table = pd.read_csv(csv).set_index("name").loc[["astronaut", "coffee", "chelsea"]]
    # Our bicubic runs in float32, basicsr's in float64: a pixel can round the other way.
    np.testing.assert_allclose(table["psnr"], ref_psnr, atol=2e-3)
    np.testing.assert_allclose(table["ssim"], ref_ssim, atol=2e-4)
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("PSNR ") and float(last.split()[1]) == pytest.approx(np.mean(ref_psnr), abs=2e-3)

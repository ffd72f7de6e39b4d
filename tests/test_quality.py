"""evaluate's extra columns: the Laplacian sharpness ratio and LPIPS with a backbone read from a local file."""

from __future__ import annotations

import math
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
import torchvision

from pipeline.cli import main as cli
from pipeline.core.errors import UserError
from pipeline.core.images import write_png
from pipeline.models.perceptual import ImageQuality, laplacian_energy, load_lpips, lpips_distance, sharpness


def test_laplacian_energy_of_a_single_bright_pixel() -> None:
    """Grey 255 on 0: luma 235 on 16 (BT.601 studio range), a step of 219. On the 3x3 interior the
    Laplacian is -4*219 at the centre, 219 at its four neighbours and 0 at the corners."""
    img = np.zeros((5, 5, 3), np.uint8)
    img[2, 2] = 255
    assert laplacian_energy(img) == pytest.approx((16 + 4) * 219**2 / 9, rel=1e-5)
    assert laplacian_energy(np.full((6, 7, 3), 90, np.uint8)) == 0.0


def test_sharpness_orders_blur_and_noise() -> None:
    hr = np.ascontiguousarray(skimage.data.astronaut()[100:228, 100:228])
    light, heavy = cv2.GaussianBlur(hr, (0, 0), 0.8), cv2.GaussianBlur(hr, (0, 0), 2.0)
    noisy = np.clip(hr + np.random.default_rng(0).normal(0, 10, hr.shape), 0, 255).astype(np.uint8)
    assert sharpness(hr, hr) == 1.0
    assert sharpness(heavy, hr) < sharpness(light, hr) < 1.0 < sharpness(noisy, hr)
    flat = np.full_like(hr, 128)
    assert sharpness(flat, flat) == 1.0 and math.isinf(sharpness(hr, flat))


@pytest.fixture(scope="module")
def alexnet_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-initialised torchvision AlexNet saved as torchvision saves the real one."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("lpips") / "alexnet-random.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


def test_lpips_with_a_backbone_file(alexnet_file: Path) -> None:
    model = load_lpips("alex", alexnet_file)
    state = torch.load(alexnet_file, weights_only=True)
    # lpips's slices keep torchvision's indices as module names: the weights are the file's, not a random init
    torch.testing.assert_close(getattr(model.net.slice1, "0").weight, state["features.0.weight"])
    torch.testing.assert_close(getattr(model.net.slice5, "10").bias, state["features.10.bias"])
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (48, 40, 3), dtype=np.uint8)
    b = cv2.GaussianBlur(a, (5, 5), 1.5)
    assert lpips_distance(model, a, a) == 0.0
    d = lpips_distance(model, a, b)
    assert math.isfinite(d) and d > 0
    columns = ImageQuality(str(alexnet_file), "alex", torch.device("cpu"))(b, a)
    assert columns["lpips"] == pytest.approx(d, rel=1e-5) and columns["sharpness"] == pytest.approx(sharpness(b, a))


def test_lpips_column_says_what_is_missing(tmp_path: Path, alexnet_file: Path) -> None:
    img = np.zeros((8, 8, 3), np.uint8)
    assert ImageQuality()(img, img)["lpips"] == "missing: set evaluate.lpips_weights (alexnet-owt-7be5be79.pth)"
    with pytest.raises(UserError, match="lpips_weights=.*nope.pth: file not found; LPIPS \\(alex\\) needs"):
        ImageQuality(str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="not torchvision's vgg weights \\(vgg16-397923af.pth\\)"):
        load_lpips("vgg", alexnet_file)


def test_evaluate_cli_writes_the_columns(tmp_path: Path, alexnet_file: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    sr_dir, hr_dir = tmp_path / "sr", tmp_path / "hr"
    for i, photo in enumerate((skimage.data.coffee(), skimage.data.chelsea())):
        hr = np.ascontiguousarray(photo[50:114, 60:140])
        write_png(hr_dir / f"im{i}.png", hr)
        write_png(sr_dir / f"im{i}.png", cv2.GaussianBlur(hr, (0, 0), 1.0))
    without, with_lpips = tmp_path / "a.csv", tmp_path / "b.csv"
    assert cli(["evaluate", "--sr", str(sr_dir), "--hr", str(hr_dir), "--csv", str(without)]) == 0
    assert cli(["evaluate", "--sr", str(sr_dir), "--hr", str(hr_dir), "--csv", str(with_lpips),
                f"evaluate.lpips_weights={alexnet_file}"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("PSNR ")  # the last line stays the summary
    a, b = pd.read_csv(without), pd.read_csv(with_lpips)
    assert (a["lpips"] == "missing: set evaluate.lpips_weights (alexnet-owt-7be5be79.pth)").all()
    assert b["lpips"].dtype.kind == "f" and (b["lpips"] > 0).all()
    assert ((a["sharpness"] > 0) & (a["sharpness"] < 1)).all()  # blurred predictions are smoother than HR
    np.testing.assert_allclose(a["sharpness"], b["sharpness"])

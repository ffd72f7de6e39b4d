"""add-data: extra pairs made like the contest's LR, training only (never validated), deterministic degradations."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.add_data import degrade
from pipeline.cli import main as cli
from pipeline.core.compat import imresize
from pipeline.core.config import AddDataConfig
from pipeline.core.images import read_uint8, to_uint8, write_png
from pipeline.core.layout import EXTRA_FOLD, DataLayout


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    small = np.random.default_rng(seed).random((h // 4 + 2, w // 4 + 2, 3))
    return to_uint8(imresize(small, 4)[:h, :w].clip(0, 1))


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    """A 6-pair contest dataset (LR 16, folder layout) and a folder of 3 HR photos of odd sizes."""
    root = tmp_path / "data"
    for i in range(6):
        hr = _smooth(64, 64, i)
        write_png(root / "train" / "hr" / f"{i:04d}.png", hr)
        write_png(root / "train" / "lr" / f"{i:04d}.png", to_uint8(imresize(hr / 255.0, 0.25)))
    photos = tmp_path / "photos"
    for k, (h, w) in enumerate([(70, 53), (64, 96), (81, 81)]):
        write_png(photos / f"p{k}.png", _smooth(h, w, 50 + k))
    return root, photos


def test_pairs_are_bicubic_of_cropped_photos_and_train_only(dataset: tuple[Path, Path], capsys) -> None:
    root, photos = dataset
    assert cli(["add-data", "--data", str(root), "--from", str(photos), "add_data.workers=1"]) == 0
    extra = pd.read_csv(root / "extra.csv", dtype=str)
    assert list(extra["img_id"]) == ["photos_p0", "photos_p1", "photos_p2"]
    assert set(extra["source"]) == {"extra/photos"}
    hr = read_uint8(root / extra["hr_path"][0])
    lr = read_uint8(root / extra["lr_path"][0])
    assert hr.shape == (68, 52, 3)  # 70x53 cropped to multiples of 4
    assert np.array_equal(hr, read_uint8(photos / "p0.png")[:68, :52])
    assert np.array_equal(lr, to_uint8(imresize(hr / 255.0, 0.25)))  # exactly the contest's recipe

    assert cli(["prepare", "--data", str(root), "data.workers=1", "data.folds=3"]) == 0
    assert "extra pairs (training only)" in capsys.readouterr().out
    splits = DataLayout(root).splits()
    assert (splits.loc[splits["img_id"].str.startswith("photos_"), "fold"] == EXTRA_FOLD).all()
    assert cli(["patchify", "--data", str(root), "patchify.size=32", "patchify.workers=1"]) == 0
    data = DataLayout(root)
    for fold in range(3):
        assert not any(p.name.startswith("photos_") for p in data.validation_pairs(fold))
        assert any(p.name.startswith("photos_") for p in data.patches.training_pairs(fold))


def test_degradations_are_deterministic_and_change_the_lr(dataset: tuple[Path, Path]) -> None:
    _root, photos = dataset
    hr = read_uint8(photos / "p1.png")
    clean = degrade(hr, 4, AddDataConfig(), 0)
    rough = AddDataConfig(blur=1.5, noise=5, jpeg=60)
    once, again = degrade(hr, 4, rough, 7), degrade(hr, 4, rough, 7)
    assert np.array_equal(once, again)  # same photo seed, same bytes
    assert not np.array_equal(once, degrade(hr, 4, rough, 8))  # the noise follows the seed
    assert once.shape == clean.shape == (16, 24, 3)
    assert np.abs(once.astype(int) - clean).mean() > 1.0
    blurred = degrade(hr, 4, AddDataConfig(blur=2.0), 0).astype(float)
    # blur before the downscale removes high frequencies: less energy in neighbour differences
    assert np.abs(np.diff(blurred, axis=1)).mean() < np.abs(np.diff(clean.astype(float), axis=1)).mean()


def test_rerun_replaces_the_set_and_bad_input_is_one_line(dataset: tuple[Path, Path], capsys) -> None:
    root, photos = dataset
    args = ["add-data", "--data", str(root), "--from", str(photos), "add_data.workers=1"]
    assert cli([*args, "add_data.noise=3"]) == 0
    assert cli([*args, "add_data.name=second"]) == 0
    (photos / "p2.png").unlink()
    assert cli(args) == 0  # the set "photos" again, now with 2 photos
    extra = pd.read_csv(root / "extra.csv", dtype=str)
    assert sorted(extra["img_id"]) == ["photos_p0", "photos_p1", "second_p0", "second_p1", "second_p2"]
    assert sorted(p.name for p in (root / "extra" / "photos" / "lr").iterdir()) == ["photos_p0.png", "photos_p1.png"]
    capsys.readouterr()
    for extra_args, message in ((["add_data.name=../up"], "add_data.name: set name '../up' is not a safe name"),
                                (["add_data.jpeg=101"], "add_data.jpeg=101 must be <= 100")):
        assert cli([*args, *extra_args]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error: ") and message in err, err
    write_png(root / "train" / "hr" / "x_0.png", _smooth(64, 64, 9))
    write_png(root / "train" / "lr" / "x_0.png", _smooth(16, 16, 9))
    write_png(photos / "0.png", _smooth(64, 64, 9))
    assert cli([*args, "add_data.name=x"]) == 2
    assert re.search(r"id 'x_0' is already a training image", capsys.readouterr().err)
    assert not (root / "extra" / "x").exists()

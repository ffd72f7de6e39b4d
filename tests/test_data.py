"""demo-data, prepare and patchify: determinism, folds by source, alignment, and every bad input."""

from __future__ import annotations

import re
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main as cli
from pipeline.core.compat import imresize
from pipeline.core.images import read_uint8, to_uint8, write_png
from pipeline.demo_data import tree_digest
from pipeline.patchify import grid

# ---- demo dataset ---------------------------------------------------------------------------


def test_demo_dataset_layout(demo_root: Path):
    train = pd.read_csv(demo_root / "train.csv", dtype=str)
    test = pd.read_csv(demo_root / "test.csv", dtype=str)
    assert list(train.columns) == ["img_id", "lr_img_path", "hr_img_path", "source"]
    assert len(train) >= 10 and len(test) >= 3
    assert not set(train["source"]) & {"astronaut", "motorcycle"}  # test photos never train
    lr = read_uint8(demo_root / train["lr_img_path"][0])
    hr = read_uint8(demo_root / train["hr_img_path"][0])
    assert lr.shape == (128, 128, 3) and hr.shape == (512, 512, 3)
    # LR is MATLAB bicubic x1/4 of HR, rounded once
    assert np.array_equal(lr, to_uint8(imresize(hr / 255.0, 0.25)))
    for img_id in test["img_id"]:
        assert read_uint8(demo_root / "test_hr" / f"{img_id}.png").shape == (512, 512, 3)
    with zipfile.ZipFile(demo_root / "sample_submission.zip") as zf:
        assert sorted(zf.namelist()) == sorted(f"{i}.png" for i in test["img_id"])


def test_demo_dataset_is_byte_identical_for_a_seed(demo_root: Path, tmp_path: Path):
    assert cli(["demo-data", "--out", str(tmp_path / "again")]) == 0
    assert tree_digest(tmp_path / "again") == tree_digest(demo_root)
    assert cli(["demo-data", "--out", str(tmp_path / "other"), "demo.seed=1"]) == 0
    assert tree_digest(tmp_path / "other") != tree_digest(demo_root)


# ---- prepare ----------------------------------------------------------------------------------


def test_folds_split_by_source(patched_demo: Path):
    splits = pd.read_csv(patched_demo / "splits.csv", dtype={"img_id": str})
    assert splits.groupby("source")["fold"].nunique().max() == 1  # no source in two folds
    assert sorted(splits["fold"].unique()) == [0, 1, 2, 3, 4]
    assert (patched_demo / "prepare.yaml").is_file()


def test_folds_are_seeded(patched_demo: Path, tmp_path: Path):
    from pipeline.core.layout import DataLayout
    from pipeline.prepare import assign_folds

    train = DataLayout(patched_demo).train_table()
    assert assign_folds(train, 5, 0).tolist() == assign_folds(train, 5, 0).tolist()
    assert any(assign_folds(train, 5, s).tolist() != assign_folds(train, 5, 0).tolist() for s in range(1, 6))


# ---- patchify ---------------------------------------------------------------------------------


def test_patches_are_aligned(patched_demo: Path):
    """Each HR patch downscaled with the same bicubic gives its LR patch, within rounding, away from
    the border where the antialiased kernel (16 HR px wide) reached across the patch edge."""
    out = patched_demo / "patches"
    manifest = pd.read_csv(out / "manifest.csv", dtype={"img_id": str, "patch_id": str})
    assert len(manifest) == 16 * len(pd.read_csv(patched_demo / "splits.csv"))  # 16 per 128x128 LR image
    for row in manifest.sample(12, random_state=0).itertuples():
        lr = read_uint8(out / row.lr_path).astype(int)
        hr = read_uint8(out / row.hr_path)
        assert lr.shape == (32, 32, 3) and hr.shape == (128, 128, 3)
        down = to_uint8(imresize(hr / 255.0, 0.25)).astype(int)
        assert np.abs(down[2:-2, 2:-2] - lr[2:-2, 2:-2]).max() <= 1
        # and the patch sits where the manifest says in the source LR image
        src = read_uint8(patched_demo / "train" / "lr" / f"{row.img_id}.png")
        assert np.array_equal(src[row.y : row.y + 32, row.x : row.x + 32], lr)


def test_patchify_is_idempotent_and_rebuilds_on_change(patched_demo: Path, tmp_path: Path, capsys):
    root = tmp_path / "d"
    shutil.copytree(patched_demo, root)
    assert cli(["patchify", "--data", str(root), "patchify.size=128", "patchify.workers=1"]) == 0
    assert "10 already done" in capsys.readouterr().out
    assert cli(["patchify", "--data", str(root), "patchify.size=96", "patchify.stride=64", "patchify.workers=1"]) == 0
    manifest = pd.read_csv(root / "patches" / "manifest.csv")
    assert len(manifest) == 10 * 8 * 8  # LR 24 / stride 16 on 128: 0..96 plus a flush 104
    assert sorted(manifest["y"].unique()) == [0, 16, 32, 48, 64, 80, 96, 104]


def test_grid_edges():
    assert grid(128, 32, 32, "shift") == [0, 32, 64, 96]
    assert grid(100, 32, 32, "shift") == [0, 32, 64, 68]
    assert grid(100, 32, 32, "drop") == [0, 32, 64]
    assert grid(16, 32, 32, "shift") == []


# ---- bad input: one-line error naming the problem, exit 2, nothing written ----------------


def _tiny_dataset(root: Path, n: int = 5, csv: bool = True) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        write_png(root / "train" / "lr" / f"{i:04d}.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
        write_png(root / "train" / "hr" / f"{i:04d}.png", rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    write_png(root / "test" / "lr" / "20000.png", rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
    if csv:
        ids = [f"{i:04d}" for i in range(n)]
        train = pd.DataFrame({"img_id": ids, "lr_img_path": [f"train/lr/{i}.png" for i in ids],
                              "hr_img_path": [f"train/hr/{i}.png" for i in ids]})
        train.to_csv(root / "train.csv", index=False)
        pd.DataFrame({"img_id": ["20000"], "lr_img_path": ["test/lr/20000.png"]}).to_csv(root / "test.csv", index=False)
    return root


def _break_missing_csv_path(root):
    (root / "train" / "hr" / "0002.png").unlink()


def _break_undecodable(root):
    (root / "train" / "hr" / "0003.png").write_bytes(b"\x89PNG garbage")


def _break_not_4x(root):
    write_png(root / "train" / "hr" / "0001.png", np.zeros((32, 28, 3), np.uint8))


def _break_duplicate_ids(root):
    df = pd.read_csv(root / "train.csv", dtype=str)
    df.loc[1, "img_id"] = df.loc[0, "img_id"]
    df.to_csv(root / "train.csv", index=False)


def _break_empty(root):
    pd.DataFrame(columns=["img_id", "lr_img_path", "hr_img_path"]).to_csv(root / "train.csv", index=False)


def _break_sample_submission(root):
    with zipfile.ZipFile(root / "sample_submission.zip", "w") as zf:
        zf.writestr("20001.png", b"x")


def _break_counts(root):
    (root / "train.csv").unlink()
    (root / "test.csv").unlink()
    (root / "train" / "hr" / "0004.png").unlink()


@pytest.mark.parametrize("breaker, message", [
    (_break_missing_csv_path, r"hr/0002\.png: listed in .*CSV but the file does not exist"),
    (_break_undecodable, r"hr/0003\.png: cannot decode image"),
    (_break_not_4x, r"hr/0001\.png: HR is 28x32 but LR .* expected exactly 4x \(32x32\)"),
    (_break_duplicate_ids, r"train\.csv: duplicate img_id '0000'"),
    (_break_empty, r"train\.csv: the train set is empty"),
    (_break_sample_submission, r"sample_submission\.zip: test id\(s\) absent from the sample submission: 20000"),
    (_break_counts, r"train: LR and HR counts differ \(5 vs 4\); LR only: \['0004'\]"),
])
def test_prepare_refuses_bad_input(tmp_path: Path, capsys, breaker, message):
    root = _tiny_dataset(tmp_path / "d")
    breaker(root)
    assert cli(["prepare", "--data", str(root), "data.workers=1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert not (root / "splits.csv").exists() and not (root / "prepare.yaml").exists()


def test_prepare_accepts_folder_layout_and_missing_dir(tmp_path: Path, capsys):
    root = _tiny_dataset(tmp_path / "d", csv=False)
    assert cli(["prepare", "--data", str(root), "data.workers=1"]) == 0
    assert len(pd.read_csv(root / "splits.csv")) == 5
    assert cli(["prepare", "--data", str(tmp_path / "nope")]) == 2
    assert "nope: data folder not found" in capsys.readouterr().err


def test_patchify_refuses_bad_geometry(tmp_path: Path, capsys):
    root = _tiny_dataset(tmp_path / "d")
    assert cli(["patchify", "--data", str(root)]) == 2
    assert "splits.csv: not found; run `python -m pipeline prepare" in capsys.readouterr().err
    assert cli(["prepare", "--data", str(root), "data.workers=1"]) == 0
    assert cli(["patchify", "--data", str(root), "patchify.size=30"]) == 2
    assert "patchify.size=30 must be a positive multiple of the scale (4)" in capsys.readouterr().err
    assert cli(["patchify", "--data", str(root), "patchify.size=64", "patchify.workers=1"]) == 2
    assert "smaller than the patch" in capsys.readouterr().err
    assert not (root / "patches" / "manifest.csv").exists()

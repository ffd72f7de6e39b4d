"""Shared fixtures: the demo dataset, built once per session and prepared + patchified; a tiny generated
dataset for the trainer's tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import main as cli
from pipeline.core.compat import imresize
from pipeline.core.images import to_uint8, write_png


@pytest.fixture(autouse=True)
def _outside_the_working_tree(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test runs in an empty folder of its own: the relative defaults (data/demo, models/, submit/)
    never read or write the checkout, whatever `python -m pipeline demo` left there."""
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))


@pytest.fixture(scope="session")
def demo_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """data/demo as `demo-data` builds it (read-only for tests: copy before changing)."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    assert cli(["demo-data", "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="session")
def patched_demo(demo_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of the demo dataset after `prepare` and `patchify patchify.size=128` (LR 32 / HR 128)."""
    root = tmp_path_factory.mktemp("patched") / "demo"
    shutil.copytree(demo_root, root)
    assert cli(["prepare", "--data", str(root)]) == 0
    assert cli(["patchify", "--data", str(root), "patchify.size=128", "patchify.workers=1"]) == 0
    return root


@pytest.fixture
def one_thread() -> Iterator[None]:
    """torch on one thread for the test: models of a few thousand weights run fastest so, and on a busy
    machine OpenMP threads wait on each other (subprocesses get the same through OMP_NUM_THREADS)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def fast_cpu(monkeypatch: pytest.MonkeyPatch, one_thread: None) -> None:
    """PyTorch's own conv kernels and one thread, for many small networks in a row."""
    # oneDNN compiles a kernel per new conv shape: ~10 s for RRDB's 350 convolutions on their first
    # call, against 0.4 s with PyTorch's own kernels. The models' arithmetic is what is tested here.
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 images (HR 32x32, LR 8x8 by MATLAB bicubic) in the contest layout with splits.csv, and
    4 patches (LR 4x4 / HR 16x16) per image in patches/manifest.csv; fold 0 (2 images) validates."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    rng = np.random.default_rng(0)
    splits, manifest = [], []
    for i in range(6):
        coarse = rng.random((6, 6, 3)).astype(np.float32)
        hr = to_uint8(np.clip(cv2.resize(coarse, (32, 32), interpolation=cv2.INTER_CUBIC), 0, 1))
        lr = to_uint8(imresize(hr.astype(np.float64) / 255, 1 / 4))  # (32,32,3) -> (8,8,3)
        img_id, fold = f"{i:04d}", 0 if i < 2 else 1 + i % 2
        write_png(root / "train/hr" / f"{img_id}.png", hr)
        write_png(root / "train/lr" / f"{img_id}.png", lr)
        splits.append((img_id, f"src{i}", fold, f"train/lr/{img_id}.png", f"train/hr/{img_id}.png"))
        for y in (0, 4):
            for x in (0, 4):
                pid = f"{img_id}_{y:04d}_{x:04d}"
                write_png(root / "patches/lr" / f"{pid}.png", lr[y : y + 4, x : x + 4])
                write_png(root / "patches/hr" / f"{pid}.png", hr[4 * y : 4 * y + 16, 4 * x : 4 * x + 16])
                manifest.append((pid, img_id, fold, y, x, f"lr/{pid}.png", f"hr/{pid}.png"))
    pd.DataFrame(splits, columns=["img_id", "source", "fold", "lr_path", "hr_path"]).to_csv(
        root / "splits.csv", index=False)
    pd.DataFrame(manifest, columns=["patch_id", "img_id", "fold", "y", "x", "lr_path", "hr_path"]).to_csv(
        root / "patches/manifest.csv", index=False)
    return root

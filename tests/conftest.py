"""Shared fixtures: the demo dataset, built once per session and prepared + patchified."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from pipeline.cli import main as cli


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

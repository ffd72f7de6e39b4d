"""export: ONNX files that ONNX Runtime runs at other sizes and batches within 1e-3 of PyTorch, one-line
refusals (naming why) for the architectures that cannot export, and safetensors weights that every
weights path reads back as the same model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors import safe_open

from pipeline.cli import main as cli
from pipeline.core.errors import UserError
from pipeline.core.images import read_uint8, write_png
from pipeline.export import MAX_DIFF, check_image, export_onnx
from pipeline.models.checkpoint import load_weights_file, save_checkpoint
from pipeline.models.table import build_model, card_of, model_kwargs

# What the TorchScript exporter cannot express, per architecture (the reason each error must name).
NOT_EXPORTABLE = {"dat-nano": "does not run on a 40x52 input", "atd-nano": "operator Sort",
                  "safmn-nano": "adaptive pooling", "srcnn": "bicubic resize matrices",
                  "bicubic": "bicubic resize matrices"}
EXPORTABLE = ["edsr-nano", "rrdb-nano", "swinir-nano", "hat-nano", "drct-nano", "rcan-nano", "span-nano",
              "omnisr-nano", "esrgan-nano"]


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _run(models: Path, name: str, arch: str, seed: int = 0) -> Path:
    """models/<name>/best.pth: an `arch` checkpoint with distinct raw and EMA weights."""
    torch.manual_seed(seed)
    raw = build_model(arch).state_dict()
    ema = build_model(arch).state_dict()
    return save_checkpoint(models / name / "best.pth", {"params": raw, "params_ema": ema, "arch": arch,
                                                        "kwargs": model_kwargs(arch), "step": 7})


@pytest.mark.parametrize("name", EXPORTABLE + sorted(NOT_EXPORTABLE))
def test_onnx_matches_pytorch_or_says_why_not(name: str, tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_model(name).eval()
    out = tmp_path / f"{name}.onnx"
    if name in NOT_EXPORTABLE:
        with pytest.raises(UserError, match=NOT_EXPORTABLE[name]) as error:
            export_onnx(model, out, 17, check_image())
        assert "\n" not in str(error.value) and name in str(error.value)
        assert not out.exists() and not list(tmp_path.iterdir())  # no file, no temporary left behind
        return
    assert export_onnx(model, out, 17, check_image()) <= MAX_DIFF
    # Dynamic axes: a batch of 2 at a size neither the trace nor the check used.
    lr = torch.rand(2, 3, 21, 34)
    session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    (sr,) = session.run(["sr"], {"lr": lr.numpy()})
    with torch.no_grad():
        expected = model(lr).numpy()
    assert sr.shape == (2, 3, 84, 136)
    assert np.abs(sr - expected).max() <= MAX_DIFF


def test_export_stage_onnx_and_safetensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    _run(models, "r", "hat-nano")
    capsys.readouterr()
    assert cli(["export", "run=r", f"paths.models={models}"]) == 0
    printed = capsys.readouterr().out
    assert "best.onnx" in printed and "max abs diff" in printed
    diff = float(printed.rsplit("max abs diff", 1)[1].split()[0])
    assert diff <= MAX_DIFF
    assert (models / "r" / "best.onnx").is_file() and (models / "r" / "export.yaml").is_file()

    assert cli(["export", "run=r", f"paths.models={models}", "export.format=safetensors"]) == 0
    weights = models / "r" / "best.safetensors"
    with safe_open(str(weights), framework="pt") as f:
        meta = f.metadata()
    assert meta["arch"] == "hat-nano" and meta["producer"] == "sr-pipeline" and "window_size" in meta["kwargs"]
    # Every weights path reads it back as the run's EMA model: infer --weights gives the run's output.
    lr_dir = tmp_path / "lr"
    write_png(lr_dir / "a.png", (np.random.default_rng(0).random((17, 23, 3)) * 255).astype(np.uint8))
    exact = ["infer.tile=0", "infer.tta=1", "infer.precision=fp32"]
    assert cli(["infer", "--input", str(lr_dir), "--output", str(tmp_path / "run"), "run=r",
                f"paths.models={models}", *exact]) == 0
    assert cli(["infer", "--weights", str(weights), "--input", str(lr_dir), "--output", str(tmp_path / "st"),
                *exact]) == 0
    assert np.array_equal(read_uint8(tmp_path / "run" / "a.png"), read_uint8(tmp_path / "st" / "a.png"))
    assert card_of(load_weights_file(weights, "edsr-nano")).arch == "hat-nano"


def test_export_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    _run(models, "s", "safmn-nano")
    capsys.readouterr()
    assert cli(["export", "run=s", f"paths.models={models}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "safmn-nano" in err and "adaptive pooling" in err
    assert not (models / "s" / "best.onnx").exists()
    assert cli(["export", "run=nothing", f"paths.models={models}"]) == 2
    assert "best.pth: checkpoint not found" in capsys.readouterr().err
    # A published weights file exports too, named after the file.
    torch.save(build_model("span-nano").state_dict(), tmp_path / "span_x4.pth")
    assert cli(["export", "--weights", str(tmp_path / "span_x4.pth"), "run=pub", f"paths.models={models}"]) == 0
    assert (models / "pub" / "span_x4.onnx").is_file()

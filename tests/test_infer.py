"""infer end to end: bicubic on a folder, a saved nano checkpoint on a test set and the validation
fold (leaderboard), multi-checkpoint averages, the fp32 rerun after NaN, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.cli import main as cli
from pipeline.core.compat import imresize
from pipeline.core.errors import UserError
from pipeline.core.images import read_float, read_uint8, to_uint8, write_png
from pipeline.core.layout import LEADERBOARD_COLUMNS
from pipeline.core.metrics import score_pair
from pipeline.core.runtime import pick_device
from pipeline.evaluate import evaluate_pairs
from pipeline.infer import append_leaderboard
from pipeline.inference.predict import Settings, predict_images
from pipeline.models.checkpoint import model_from_checkpoint, save_checkpoint
from pipeline.models.table import build_model, model_kwargs

TILES = ["infer.tile=8", "infer.stride=4", "infer.margin=1", "infer.precision=fp32"]
DEVICE = pick_device()  # where the CLI runs; the references below are computed on the same device


def _assert_same_png(got: np.ndarray, sr: np.ndarray) -> None:
    """The CLI's PNG against a reference prediction ``sr``: identical on the CPU. On CUDA the same
    fp32 model may round differently per kernel choice (cuDNN, TF32 convolutions), which moves a
    value across a rounding boundary now and then: at most one grey level, on at most 1% of values."""
    ref = to_uint8(sr)
    assert got.shape == ref.shape
    if DEVICE.type == "cpu":
        assert np.array_equal(got, ref)
    else:
        diff = np.abs(got.astype(int) - ref)
        assert diff.max() <= 1 and (diff > 0).mean() <= 0.01


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    """A smooth random image (upscaled noise), closer to a photo than white noise."""
    small = np.random.default_rng(seed).random((h // 4 + 2, w // 4 + 2, 3))
    return to_uint8(imresize(small, 4)[:h, :w].clip(0, 1))


def _save_nano(path: Path, seed: int) -> None:
    """An edsr-nano checkpoint whose EMA weights differ from its raw weights."""
    torch.manual_seed(seed)
    raw = build_model("edsr-nano").state_dict()
    torch.manual_seed(seed + 100)
    ema = build_model("edsr-nano").state_dict()
    save_checkpoint(path, {"params": raw, "params_ema": ema, "arch": "edsr-nano",
                           "kwargs": model_kwargs("edsr-nano"), "step": seed})


def _dataset(root: Path) -> dict[str, tuple[int, int]]:
    """test.csv + test/lr (3 LR images) and splits.csv with 2 validation pairs; returns test LR sizes."""
    sizes = {"20000": (12, 16), "20001": (16, 16), "20002": (13, 10)}
    rows = []
    for k, (i, (h, w)) in enumerate(sizes.items()):
        write_png(root / "test" / "lr" / f"{i}.png", _rgb(h, w, k))
        rows.append((i, f"test/lr/{i}.png"))
    pd.DataFrame(rows, columns=["img_id", "lr_img_path"]).to_csv(root / "test.csv", index=False)
    splits = []
    for k, i in enumerate(["0000", "0001", "0002"]):
        hr = _rgb(48, 40, 10 + k)
        write_png(root / "train" / "hr" / f"{i}.png", hr)
        write_png(root / "train" / "lr" / f"{i}.png", to_uint8(imresize(hr / 255.0, 1 / 4)))
        splits.append((i, i, 0 if k < 2 else 1, f"train/lr/{i}.png", f"train/hr/{i}.png"))
    pd.DataFrame(splits, columns=["img_id", "source", "fold", "lr_path", "hr_path"]).to_csv(
        root / "splits.csv", index=False)
    return sizes


@pytest.fixture
def env(tmp_path: Path) -> tuple[Path, Path, Path, dict[str, tuple[int, int]]]:
    data, models, submit = tmp_path / "data", tmp_path / "models", tmp_path / "submit"
    sizes = _dataset(data)
    _save_nano(models / "r" / "best.pth", 1)
    return data, models, submit, sizes


def _infer(data: Path, models: Path, submit: Path, *extra: str) -> int:
    return cli(["infer", "--data", str(data), "run=r", f"paths.models={models}", f"paths.submit={submit}", *extra])


def test_bicubic_on_a_folder(tmp_path: Path) -> None:
    lr_dir, out = tmp_path / "lr", tmp_path / "sr"
    lrs = {"a": _rgb(13, 21, 0), "b": _rgb(16, 16, 1)}
    for name, img in lrs.items():
        write_png(lr_dir / f"{name}.png", img)
    assert cli(["infer", "model.name=bicubic", "--input", str(lr_dir), "--output", str(out)]) == 0
    for name, lr in lrs.items():
        sr = read_uint8(out / f"{name}.png")
        ref = to_uint8(imresize(lr / 255.0, 4))  # basicsr's MATLAB bicubic in float64
        assert sr.shape == (lr.shape[0] * 4, lr.shape[1] * 4, 3)
        assert np.abs(sr.astype(int) - ref).max() <= 1 and (sr != ref).mean() < 1e-3
    timing = json.loads((out / "timing.json").read_text())
    assert timing["images"] == 2 and timing["precision"] == "fp32" and timing["device"] == str(DEVICE)
    assert timing["settings"]["tile"] == 0 and timing["settings"]["tta"] == 1  # bicubic: exact, whole image
    assert {"seconds_per_image", "tiles_per_second", "peak_memory_mib", "fp32_fallbacks"} <= set(timing)
    assert "model:" in (out / "config.yaml").read_text()


def test_checkpoint_on_test_set_then_submit(env: tuple) -> None:
    data, models, submit, sizes = env
    assert _infer(data, models, submit, *TILES, "infer.tta=2") == 0
    pred = submit / "r" / "pred"
    ema, _ = model_from_checkpoint(models / "r" / "best.pth", ema=True)
    settings = Settings(tta=2, tile=8, stride=4, margin=1, precision="fp32")
    ids = list(sizes)
    expected, _ = predict_images([ema], [read_float(data / "test" / "lr" / f"{i}.png") for i in ids], settings,
                                 DEVICE)
    for i, sr in zip(ids, expected):
        got = read_uint8(pred / f"{i}.png")
        assert got.shape == (sizes[i][0] * 4, sizes[i][1] * 4, 3)
        _assert_same_png(got, sr)
    timing = json.loads((pred / "timing.json").read_text())
    assert timing["images"] == 3 and timing["tile_forwards"] > 3 * 2  # several tiles x 2 ways each
    assert _infer(data, models, submit, *TILES, "infer.tta=2", "infer.ema=false",
                  "--output", str(submit / "raw")) == 0
    assert not np.array_equal(read_uint8(submit / "raw" / "20000.png"), read_uint8(pred / "20000.png"))
    assert cli(["submit", "--data", str(data), "run=r", f"paths.submit={submit}"]) == 0
    assert (submit / "r" / "submission.zip").is_file()


def test_one_window_writes_the_same_pngs_and_windows_are_timed(env: tuple) -> None:
    """infer.windows=[8/4] is infer.tile=8 infer.stride=4 to the byte; two windows report their cost each."""
    data, models, submit, sizes = env
    outs = {name: submit / name for name in ("plain", "one", "two")}
    assert _infer(data, models, submit, *TILES, "infer.tta=2", "--output", str(outs["plain"])) == 0
    assert _infer(data, models, submit, *TILES, "infer.tta=2", "infer.windows=[8/4]", "--output", str(outs["one"])) == 0
    assert _infer(data, models, submit, *TILES, "infer.tta=2", "infer.windows=[8/4, 0]", "infer.window_weights=[3, 1]",
                  "--output", str(outs["two"])) == 0
    for i in sizes:
        assert (outs["one"] / f"{i}.png").read_bytes() == (outs["plain"] / f"{i}.png").read_bytes()
    plain, one, two = (json.loads((out / "timing.json").read_text()) for out in outs.values())
    assert "windows" not in plain and one["windows"][0]["tile_forwards"] == plain["tile_forwards"]
    assert [(w["window"], w["weight"], w["tiles"]) for w in two["windows"]] == [("8/4", 3.0, ["8/4"]),
                                                                               ("0", 1.0, ["whole"])]
    assert two["windows"][1]["tile_forwards"] == 3 * 2  # 3 images x 1 whole tile x 2 ways
    assert all(w["seconds_total"] > 0 for w in two["windows"])
    assert two["settings"]["windows"] == ["8/4", "0"]
    ema, _ = model_from_checkpoint(models / "r" / "best.pth", ema=True)
    lr = read_float(data / "test" / "lr" / "20000.png")
    (tiled,), _ = predict_images([ema], [lr], Settings(tta=2, tile=8, stride=4, margin=1, precision="fp32"), DEVICE)
    (whole,), _ = predict_images([ema], [lr], Settings(tta=2, tile=0, margin=1, precision="fp32"), DEVICE)
    _assert_same_png(read_uint8(outs["two"] / "20000.png"), (3 * tiled + whole) / 4)


def test_validation_fold_scores_and_leaderboard(env: tuple, capsys: pytest.CaptureFixture[str]) -> None:
    data, models, submit, _sizes = env
    for tta in ("1", "8"):
        assert _infer(data, models, submit, *TILES, "infer.split=val", f"infer.tta={tta}") == 0
    assert sorted(p.name for p in (submit / "r" / "val_pred").glob("*.png")) == ["0000.png", "0001.png"]
    board = pd.read_csv(submit / "leaderboard.csv")
    assert len(board) == 2 and list(board["run"]) == ["r", "r"]
    assert list(board["settings"].str.split().str[0]) == ["tta1", "tta8"]
    assert {"model", "psnr", "ssim", "sec_per_image", "timestamp"} <= set(board.columns)
    pairs = [(i, submit / "r" / "val_pred" / f"{i}.png", data / "train" / "hr" / f"{i}.png") for i in ("0000", "0001")]
    assert board["psnr"].iloc[-1] == pytest.approx(evaluate_pairs(pairs)["psnr"].mean(), abs=1e-4)
    assert "validation fold 0: PSNR" in capsys.readouterr().out
    # each row: the gain over bicubic on the same images with its interval, and its per-image scores
    assert list(board.columns) == list(LEADERBOARD_COLUMNS)
    assert (board["gain_lo"] <= board["gain_db"]).all() and (board["gain_db"] <= board["gain_hi"]).all()
    assert board["scores"].nunique() == 2
    per_image = pd.read_csv(submit / board["scores"].iloc[-1], dtype={"img_id": str})
    assert list(per_image["img_id"]) == ["0000", "0001"]
    np.testing.assert_allclose(per_image["psnr"], evaluate_pairs(pairs)["psnr"], atol=1e-5)
    bicubic = [score_pair(to_uint8(imresize(read_float(data / "train" / "lr" / f"{i}.png"), 4)),
                          read_uint8(data / "train" / "hr" / f"{i}.png"))["psnr"] for i in ("0000", "0001")]
    np.testing.assert_allclose(per_image["bicubic_psnr"], bicubic, atol=0.02)  # float32 vs basicsr's float64
    assert board["gain_db"].iloc[-1] == pytest.approx((per_image["psnr"] - per_image["bicubic_psnr"]).mean(),
                                                      abs=1e-4)
    # bicubic ran once: its scores are cached beside the rows and reused while the images are unchanged
    cache = list((submit / "leaderboard").glob("bicubic-*.csv"))
    assert len(cache) == 1
    cache[0].write_text("img_id,psnr\n0000,1.0\n0001,3.0\n")
    assert _infer(data, models, submit, *TILES, "infer.split=val", "infer.tta=1") == 0
    last = pd.read_csv(submit / pd.read_csv(submit / "leaderboard.csv")["scores"].iloc[-1])
    assert list(last["bicubic_psnr"]) == [1.0, 3.0]


def test_old_leaderboard_gains_the_new_columns(tmp_path: Path) -> None:
    path = tmp_path / "leaderboard.csv"
    pd.DataFrame([{"timestamp": "t0", "run": "old", "psnr": 20.0, "note": "kept"}]).to_csv(path, index=False)
    append_leaderboard(path, {"timestamp": "t1", "run": "new", "psnr": 21.0, "gain_db": 0.5})
    board = pd.read_csv(path)
    assert list(board.columns) == [*LEADERBOARD_COLUMNS, "note"]
    assert list(board["run"]) == ["old", "new"] and board["gain_db"].isna().tolist() == [True, False]


def test_last_k_checkpoints_and_extra_runs_are_averaged(env: tuple) -> None:
    data, models, submit, _sizes = env
    for step in (10, 20, 30):
        _save_nano(models / "r" / "history" / f"step_{step:08d}.pth", step)
    _save_nano(models / "other" / "best.pth", 7)
    lr = read_float(data / "test" / "lr" / "20001.png")
    settings = Settings(tta=1, tile=8, stride=4, margin=1, precision="fp32")

    def load(path: Path) -> nn.Module:
        return model_from_checkpoint(path, ema=True)[0]

    cases = {
        "last": (["infer.last_k=2"], [models / "r" / "history" / f"step_{s:08d}.pth" for s in (20, 30)]),
        "runs": (["infer.runs=[other]"], [models / "r" / "best.pth", models / "other" / "best.pth"]),
    }
    for name, (flags, paths) in cases.items():
        out = submit / name
        assert _infer(data, models, submit, *TILES, "infer.tta=1", *flags, "--output", str(out)) == 0
        (ref,), _ = predict_images([load(p) for p in paths], [lr], settings, DEVICE)
        _assert_same_png(read_uint8(out / "20001.png"), ref)
        (single,), _ = predict_images([load(paths[-1])], [lr], settings, DEVICE)
        assert not np.array_equal(to_uint8(single), to_uint8(ref))


class NanUnderAutocast(nn.Module):
    """Nearest x4 in fp32, NaN whenever autocast is on: a model that overflows in low precision."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.interpolate(x, scale_factor=4, mode="nearest") * self.gain
        return y * float("nan") if torch.is_autocast_enabled(x.device.type) else y


def test_nan_reruns_the_image_in_fp32() -> None:
    lrs = [np.random.default_rng(0).random((10, 12, 3), dtype=np.float32) for _ in range(2)]
    settings = Settings(tta=2, tile=8, stride=4, precision="bf16")
    out, timing = predict_images([NanUnderAutocast()], lrs, settings, torch.device("cpu"), names=["x", "y"])
    assert timing.precision == "bf16" and timing.fp32_fallbacks == ["x", "y"]
    for lr, sr in zip(lrs, out):
        assert np.isfinite(sr).all()
        np.testing.assert_allclose(sr, np.repeat(np.repeat(lr, 4, 0), 4, 1), atol=1e-6)


def test_nan_in_fp32_is_an_error() -> None:
    class AlwaysNan(NanUnderAutocast):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(x) * float("nan")

    lr = np.zeros((8, 8, 3), np.float32)
    with pytest.raises(UserError, match="img7: the model produced NaN/Inf even in fp32"):
        predict_images([AlwaysNan()], [lr], Settings(precision="bf16"), torch.device("cpu"), names=["img7"])


@pytest.mark.parametrize("flags,message", [
    (["infer.stride=200"], "infer.stride=200 must be in 1..infer.tile"),
    (["infer.margin=40"], "infer.margin=40 leaves pixels uncovered"),
    (["infer.last_k=5"], "infer.last_k=5 but"),
    (["run=nothing"], "nothing/best.pth: checkpoint not found"),
    (["--input", "somewhere"], "--input needs --output"),
    (["infer.windows=[8/4, 64]"], "infer.windows: '64' must be 'TILE/STRIDE'"),
    (["infer.windows=[8/4, 0]", "infer.window_weights=[1]"], "infer.window_weights has 1 weight(s) for 2"),
    (["infer.tile=big"], "infer.tile: 'big' is not int or 'auto'"),
])
def test_errors_are_one_line(env: tuple, capsys: pytest.CaptureFixture[str], flags: list[str], message: str) -> None:
    data, models, submit, _sizes = env
    assert _infer(data, models, submit, *flags) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1

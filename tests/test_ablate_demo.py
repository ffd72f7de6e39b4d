"""ablate's grid and outputs, and the one-command demo end to end (nano model, seconds of training)."""

from __future__ import annotations

import dataclasses
import shutil
import zipfile
from pathlib import Path

import pandas as pd
import pytest
import torch
from procs import ROOT

from pipeline.ablate import COLUMNS, parse_tile, settings_grid
from pipeline.cli import main as cli
from pipeline.core.config import load_config
from pipeline.core.errors import UserError
from pipeline.models.table import build_model


def test_parse_tile():
    assert parse_tile("128/64") == (128, 64)
    assert parse_tile("0") == (0, 0)
    for bad in ("128", "64/128", "a/b", "0/0"):
        with pytest.raises(UserError, match="ablate.tiles"):
            parse_tile(bad)


def test_grid_runs_each_distinct_setting_once():
    cfg = load_config(None, ["ablate.tta=[1, 8]", "ablate.tiles=[0, 32/16]", "ablate.tile_blends=[mean, hann]",
                             "ablate.precisions=[fp32]", "infer.tile=32", "infer.stride=16", "infer.precision=fp32"])
    grid = settings_grid(cfg, [build_model("edsr-nano")], torch.device("cpu"))
    # whole image: blend is irrelevant -> 1 per tta; tiled: 2 blends per tta; the default is among them
    assert len(grid) == 2 * 1 + 2 * 2
    assert grid[0].tta == 8 and grid[0].tile == 32 and grid[0].tile_blend == "hann"
    assert len({(s.tta, s.tile, s.tile_blend) for s in grid}) == len(grid)


def test_precisions_that_resolve_to_one_dtype_run_once() -> None:
    # A model safe only in fp32 runs bf16 as fp32 (models.autocast_cap): the grid must not run it twice
    # under two labels.
    cfg = load_config(None, ["ablate.tta=[8]", "ablate.tiles=[32/16]", "ablate.tile_blends=[hann]",
                             "ablate.precisions=[fp32, bf16]", "infer.tile=32", "infer.stride=16",
                             "infer.precision=fp32"])
    plain, fp32_only = build_model("edsr-nano"), build_model("edsr-nano")
    fp32_only.card = dataclasses.replace(fp32_only.card, precisions=("fp32",))
    assert [s.precision for s in settings_grid(cfg, [plain], torch.device("cpu"))] == ["fp32", "bf16"]
    assert [s.precision for s in settings_grid(cfg, [fp32_only], torch.device("cpu"))] == ["fp32"]


def test_ablate_writes_csv_and_plot(patched_demo: Path, tmp_path: Path):
    root = tmp_path / "d"
    shutil.copytree(patched_demo, root)
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(root), f"paths.models={tmp_path / 'm'}",
            f"paths.submit={tmp_path / 's'}", "run=nano"]
    assert cli(["train", *args, "model.name=edsr-nano", "train.max_steps=3", "train.val_every=3",
                "train.batch_size=4", "train.workers=0"]) == 0
    assert cli(["ablate", *args, "ablate.tta=[1, 2]", "ablate.tiles=[0, 32/16]", "ablate.tile_blends=[mean]",
                "ablate.precisions=[fp32]", "infer.precision=fp32", "ablate.windows=[0+32/16]"]) == 0
    table = pd.read_csv(tmp_path / "s" / "nano" / "ablation.csv")
    assert list(table.columns) == COLUMNS
    assert table["default"].sum() == 1 and table.loc[table["default"], "gain_db"].iloc[0] == 0
    default = table.loc[table["default"]].iloc[0]
    assert default["gain_lo"] == 0 and default["gain_hi"] == 0  # the reference against itself
    assert (table["gain_lo"] <= table["gain_db"] + 1e-9).all() and (table["gain_db"] <= table["gain_hi"] + 1e-9).all()
    assert (table["gain_hi"] - table["gain_lo"] > 0).sum() >= len(table) - 1  # 2 images: a real interval each
    assert len(table) == 1 + 2 * 3  # the default (tta8 32/16) + {1,2} x {whole, 32/16, windows 0+32/16}
    sets = table[table["windows"] != "-"]
    assert list(sets["windows"]) == ["0+32/16"] * 2 and sorted(sets["tta"]) == [1, 2]
    for tta in (1, 2):  # MSE is convex: the mean of two windows is no worse than the worse (up to 8-bit rounding)
        rows = table[table["tta"] == tta]
        assert len(rows) == 3 and rows[rows["windows"] == "0+32/16"]["psnr"].iloc[0] >= rows["psnr"].min() - 0.05
    assert table["psnr"].between(5, 60).all()
    assert (tmp_path / "s" / "nano" / "ablation.png").stat().st_size > 10_000


def test_demo_end_to_end(tmp_path: Path, capsys):
    rc = cli(["demo", f"demo.out={tmp_path / 'demo'}", f"paths.models={tmp_path / 'm'}",
              f"paths.submit={tmp_path / 's'}", "model.name=edsr-nano", "demo.train_minutes=0.02",
              "train.val_every=5", "train.workers=0", "infer.tta=2",
              "ablate.tta=[1]", "ablate.tiles=[0]", "ablate.tile_blends=[mean]"])
    out = capsys.readouterr().out
    assert rc == 0
    sub = tmp_path / "s" / "demo"
    with zipfile.ZipFile(sub / "submission.zip") as zf:
        assert sorted(zf.namelist()) == ["20000.png", "20001.png", "20002.png"]
    assert "== scores on the 3 held-out test images" in out
    scores = out.split("== scores")[1].split("== ablation")[0]
    assert "bicubic" in scores and "edsr-nano + 2-way ensemble" in scores
    for name in ("report.png", "ablation.png", "ablation.csv"):
        assert (sub / name).is_file(), name
    assert (tmp_path / "m" / "demo" / "curves.png").is_file()
    board = pd.read_csv(tmp_path / "s" / "leaderboard.csv")
    assert len(board) == 1 and board["run"].iloc[0] == "demo"

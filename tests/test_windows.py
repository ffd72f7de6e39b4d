"""The multi-window self-ensemble (infer.windows, infer.window_weights) and the automatic tile (tile=auto):
one window is today's path bit for bit, weights and the median merge as computed by hand, auto picks the
whole image when it fits and otherwise a tile of the model's window, and ablate runs window sets."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from procs import ROOT
from torch import nn

import pipeline.inference.windows as windows
from pipeline.ablate import parse_window_set, settings_grid
from pipeline.cli import main as cli
from pipeline.core.compat import imresize
from pipeline.core.config import load_config
from pipeline.core.errors import UserError
from pipeline.core.images import to_uint8, write_png
from pipeline.inference.memory import images_per_call, probe_tile_memory
from pipeline.inference.predict import Settings, check_settings, predict_images
from pipeline.inference.windows import auto_tile, merge_windows, model_unit, parse_window
from pipeline.models.archs import Padded
from pipeline.models.checkpoint import load_weights_file
from pipeline.models.table import build_model

CPU = torch.device("cpu")
GIB = 2**30
CRAFT = ROOT.parent / "shared" / "weights" / "craft_x4_ntire2024_team34.pth"  # the shared folder beside the checkout


def _photo(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A smooth random (h,w,3) image in [0,1]."""
    small = np.random.default_rng(seed).random((h // 4 + 2, w // 4 + 2, 3))
    return imresize(small, 4)[:h, :w].clip(0, 1).astype(np.float32)


def _with(settings: Settings, **changes: object) -> Settings:
    return dataclasses.replace(settings, **changes)


@pytest.fixture(scope="module")
def nano() -> nn.Module:
    torch.manual_seed(0)
    return build_model("edsr-nano")


BASE = Settings(tta=2, tile=8, stride=4, precision="fp32")
LRS = [_photo(20, 24, 0), _photo(13, 10, 1)]


@pytest.mark.parametrize("changes", [{}, {"tile": 0}, {"merge": "median", "tta": 8, "tile_blend": "mean"},
                                     {"pad": 2, "margin": 1, "stride": 6}])
def test_one_window_is_the_tile_setting_bit_for_bit(nano: nn.Module, changes: dict) -> None:
    plain = _with(BASE, **changes)
    spec = "0" if plain.tile == 0 else f"{plain.tile}/{plain.stride}"
    ref, ref_timing = predict_images([nano], LRS, plain)
    got, timing = predict_images([nano], LRS, _with(plain, windows=(spec,)))
    for a, b in zip(ref, got):
        np.testing.assert_array_equal(a, b)
    assert "windows" not in ref_timing.summary()  # today's timing.json keeps its keys
    (record,) = timing.summary()["windows"]
    assert record["window"] == spec and record["tile_forwards"] == timing.tiles == ref_timing.tiles


def test_weights_one_and_zero_give_the_first_window(nano: nn.Module) -> None:
    (first,), _ = predict_images([nano], LRS[:1], BASE)
    (both,), timing = predict_images([nano], LRS[:1], _with(BASE, windows=("8/4", "0"), window_weights=(1.0, 0.0)))
    np.testing.assert_array_equal(both, first)
    assert [w["tiles"] for w in timing.summary()["windows"]] == [["8/4"], ["whole"]]  # both ran


def test_weighted_mean_and_median_of_windows_match_the_single_windows(nano: nn.Module) -> None:
    specs = ("8/4", "0", "12/6")
    singles = [predict_images([nano], LRS, _with(BASE, windows=(s,)))[0] for s in specs]
    assert np.abs(singles[0][0] - singles[1][0]).max() > 1e-4  # the windows do differ
    weighted, timing = predict_images([nano], LRS, _with(BASE, windows=specs, window_weights=(1.0, 2.0, 5.0)))
    median, _ = predict_images([nano], LRS, _with(BASE, windows=specs, merge="median"))
    for i in range(len(LRS)):
        by_hand = (singles[0][i] + 2 * singles[1][i] + 5 * singles[2][i]) / 8
        np.testing.assert_allclose(weighted[i], by_hand, atol=1e-6, rtol=0)
    # The per-pixel median over the windows, of the windows' own (median-merged) ensembles.
    med_singles = [predict_images([nano], LRS, _with(BASE, windows=(s,), merge="median"))[0] for s in specs]
    for i in range(len(LRS)):
        np.testing.assert_array_equal(median[i], np.median(np.stack([s[i] for s in med_singles]), axis=0))
    records = timing.summary()["windows"]
    assert [r["weight"] for r in records] == [1.0, 2.0, 5.0]
    assert sum(r["tile_forwards"] for r in records) == timing.tiles and records[1]["tile_forwards"] == 2 * 2
    assert timing.summary()["tile_forwards"] == timing.tiles


def test_merge_windows_keeps_one_image_untouched() -> None:
    x = torch.randn(3, 4, 4)
    assert merge_windows(iter([x]), (1.0,), "mean") is x
    assert merge_windows(iter([x]), (1.0,), "median") is x
    y = torch.randn(3, 4, 4)
    torch.testing.assert_close(merge_windows(iter([x, y]), (3.0, 1.0), "mean"), (3 * x + y) / 4)


@pytest.mark.parametrize("changes,message", [
    ({"windows": ("8/4", "0"), "window_weights": (1.0, 2.0), "merge": "median"},
     "infer.window_weights need infer.merge=mean"),
    ({"window_weights": (1.0,)}, "infer.window_weights needs infer.windows"),
    ({"windows": ("8/4", "0"), "window_weights": (1.0,)}, "infer.window_weights has 1 weight(s) for 2 infer.windows"),
    ({"windows": ("8/4", "0"), "window_weights": (1.0, -1.0)}, "infer.window_weights must be >= 0"),
    ({"windows": ("8/4", "0"), "window_weights": (0.0, 0.0)}, "with a positive sum"),
    ({"windows": ("8",)}, "infer.windows: '8' must be 'TILE/STRIDE'"),
    ({"windows": ("8/4", "4/8")}, "infer.windows: '4/8' must be"),
    ({"windows": ("8/6",), "margin": 2}, "infer.margin=2 leaves pixels uncovered in window 8/6"),
    ({"tile": "big"}, "infer.tile=big: a side in LR pixels, 0 (whole image) or auto"),
])
def test_bad_window_settings_are_one_line_errors(changes: dict, message: str) -> None:
    with pytest.raises(UserError) as err:
        check_settings(_with(BASE, **changes))
    assert message in str(err.value) and len(str(err.value).splitlines()) == 1


def test_infer_refuses_a_weighted_median_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_png(tmp_path / "lr" / "a.png", to_uint8(LRS[0]))
    rc = cli(["infer", "model.name=edsr-nano", "--input", str(tmp_path / "lr"), "--output", str(tmp_path / "sr"),
              "infer.windows=[8/4, 0]", "infer.window_weights=[1, 2]", "infer.merge=median"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "infer.window_weights need infer.merge=mean" in err
    assert not (tmp_path / "sr").exists()


def test_window_specs_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_window("64/32", "x") == windows.Window("64/32", 64, 32)
    assert parse_window("0", "x").whole and parse_window("auto", "x").tile == "auto"
    cfg = load_config(None, ["infer.tile=auto", "infer.windows=[0, 64/32, auto]", "infer.window_weights=[1, 2, 0]"])
    assert cfg.infer.tile == "auto" and cfg.infer.windows == ("0", "64/32", "auto")
    assert cfg.infer.window_weights == (1.0, 2.0, 0.0)
    assert Settings.from_config(cfg.infer).label().split()[1] == "windows0+64/32+auto@1,2,0"
    with pytest.raises(SystemExit):
        cli(["infer", "--help"])
    out = capsys.readouterr().out
    for key in ("infer.windows", "infer.window_weights", "auto = the whole image"):
        assert key in out, key


def test_model_unit_is_the_window_and_size_multiple() -> None:
    assert model_unit([build_model("edsr-nano")]) == (8, 0)  # a CNN takes any side: TILE_ALIGN
    assert model_unit([Padded(nn.Identity(), minimum=16, multiple_of=1, window=12)]) == (24, 16)
    assert model_unit([build_model("drct-nano"), build_model("edsr-nano")]) == (16, 0)  # DRCT: multiple of 16


def fake_probe(bytes_per_pixel: int, free: int, ways: int = 8) -> Callable[..., tuple[int, int]]:
    """Stands for the memory measurement: a call's peak is ``bytes_per_pixel`` per LR pixel of its images
    (the probe tile x the ``ways`` one call carries), and the device has ``free`` bytes."""
    def probe(fn: object, channels: int, shape: tuple[int, ...], device: torch.device) -> tuple[int, int]:
        area = shape[0] * shape[1]
        return bytes_per_pixel * area * min(ways, images_per_call(area, device)), free
    return probe


def test_auto_picks_the_whole_image_when_it_fits_on_the_cpu(nano: nn.Module) -> None:
    # CRAFT-like in bf16: ~3 KiB per LR pixel of a call; 20 GiB of RAM available, half of it the budget.
    probe = fake_probe(3 * 2**10, 20 * GIB)
    demo = auto_tile(nano, (128, 128), 8, CPU, 8, probe=probe)
    assert demo.cut == (0, 0) and "whole image: 128x128 LR x 8 way(s), 2 per call" in demo.why
    # a contest image x 8 ways runs whole, one way per call (~0.75 GiB), where 8 in one call took ~6 GB
    contest = auto_tile(nano, (512, 512), 8, CPU, 8, probe=probe)
    assert contest.cut == (0, 0) and "1 per call needs ~0.8 GiB (RAM available: 20.0 GiB" in contest.why
    # 1 GiB available: a 512 MiB budget holds 174762 pixels of a call: 416^2, a multiple of 8
    small = auto_tile(nano, (512, 512), 8, CPU, 8, probe=fake_probe(3 * 2**10, GIB))
    assert small.cut == (416, 208) and "would need ~0.8 GiB" in small.why
    # the real measurement, on the demo's size: whole wherever a few hundred MiB are free
    (whole,), _ = predict_images([nano], LRS[:1], _with(BASE, tile=0))
    (auto,), timing = predict_images([nano], LRS[:1], _with(BASE, tile="auto"))
    np.testing.assert_array_equal(auto, whole)
    assert timing.summary()["windows"][0]["tiles"] == ["whole"]
    assert timing.summary()["windows"][0]["auto"][0].startswith("whole image: ")


def test_the_real_probe_measures_the_cpu_forward(nano: nn.Module) -> None:
    peak, free = probe_tile_memory(lambda x: nano(x.expand(8, -1, -1, -1).contiguous()), 3, (64, 64), CPU)
    assert peak > 8 * 64 * 64 * 48 * 4  # at least the 8 outputs of 256^2 x 3 fp32
    assert free > 0


def test_auto_on_a_small_budget_takes_tiles_of_the_window(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    model = build_model("drct-nano")  # window 4, but DRCT wants sides that are multiples of 16
    lr = _photo(40, 56)
    settings = Settings(tta=1, tile="auto", precision="fp32", tile_blend="hann")
    (whole,), _ = predict_images([model], [lr], settings)
    monkeypatch.setattr(windows, "probe_tile_memory", fake_probe(2**10, 2 * 36 * 36 * 2**10, ways=1))  # 36^2 px fit
    (tiled,), timing = predict_images([model], [lr], settings)
    assert timing.summary()["windows"][0]["tiles"] == ["32/16"]  # isqrt(36^2) = 36 -> 32, a multiple of 16
    assert np.abs(tiled - whole).max() > 0  # it did cut the image
    tiny = auto_tile(model, (40, 56), 1, CPU, *model_unit([model]), probe=fake_probe(2**10, 8 * 2**10, ways=1))
    assert tiny.cut == (16, 8)  # never below one unit


def test_auto_on_cuda_weighs_the_probed_memory() -> None:
    """8 KiB per LR pixel of a call (1 GiB for a 128^2 tile x 8 ways); the budget is the 8 GiB cap."""
    cuda, seen = torch.device("cuda"), []

    def probe(fn: object, channels: int, shape: tuple[int, ...], device: torch.device) -> tuple[int, int]:
        seen.append(shape)
        return fake_probe(8 * 2**10, 80 * GIB)(fn, channels, shape, device)

    assert auto_tile(nn.Identity(), (256, 256), 8, cuda, 16, probe=probe).cut == (0, 0)  # 8 ways in one call: 4 GiB
    assert auto_tile(nn.Identity(), (512, 512), 8, cuda, 16, probe=probe).cut == (0, 0)  # 2 ways per call: 4 GiB
    assert auto_tile(nn.Identity(), (1536, 1536), 8, cuda, 16, probe=probe).cut == (1024, 512)  # 18 GiB whole
    assert auto_tile(nn.Identity(), (60, 500), 8, cuda, 16, probe=probe).cut == (0, 0)
    assert seen == [(128, 128), (128, 128), (128, 128), (48, 48)]  # the probe tile: 128, or the image's side


def test_ablate_grid_runs_each_window_set() -> None:
    assert parse_window_set("0+64/32+auto") == ("0", "64/32", "auto")
    with pytest.raises(UserError, match="ablate.windows entry '0\\+64'"):
        parse_window_set("0+64")
    cfg = load_config(None, ["ablate.tta=[8]", "ablate.tiles=[0, 32/16]", "ablate.tile_blends=[mean, hann]",
                             "ablate.precisions=[fp32]", "ablate.windows=[0+32/16, 32/16]",
                             "infer.tile=32", "infer.stride=16", "infer.precision=fp32"])
    grid = settings_grid(cfg, [build_model("edsr-nano")], CPU)
    # default (32/16 hann), whole (one blend), 32/16 mean; the set 0+32/16 x 2 blends; the set "32/16" is the
    # tile 32/16: the same thing, run once
    assert [s.window_text() or "-" for s in grid] == ["-", "-", "-", "0+32/16", "0+32/16"]
    assert [s.tile_blend for s in grid[3:]] == ["mean", "hann"]
    assert load_config(None, []).ablate.windows == ()  # the default grid is today's


@pytest.mark.skipif(not CRAFT.is_file(), reason=f"the published CRAFT weights are not at {CRAFT}")
def test_auto_on_a_published_windowed_network(monkeypatch: pytest.MonkeyPatch, fast_cpu: None) -> None:
    """CRAFT x4 (window attention; spandrel: sides a multiple of 16): auto tiles it accepts as they are,
    whose output is the whole image's up to the tile borders."""
    model = load_weights_file(CRAFT, "edsr-tiny", True)  # detected whatever model.name says
    assert model_unit([model]) == (16, 16)
    lr = _photo(32, 48)
    settings = Settings(tta=1, tile="auto", precision="fp32")
    (whole,), _ = predict_images([model], [lr], settings)
    # a budget of 32 x 32 pixels: 32 x 48 no longer fits
    monkeypatch.setattr(windows, "probe_tile_memory", fake_probe(2**10, 2 * 32 * 32 * 2**10, ways=1))
    (tiled,), timing = predict_images([model], [lr], settings)
    assert timing.summary()["windows"][0]["tiles"] == ["32/16"]
    mse = float(((to_uint8(tiled).astype(float) - to_uint8(whole)) ** 2).mean())
    assert 0 < mse and 10 * np.log10(255**2 / mse) > 40  # close, and yet tiled

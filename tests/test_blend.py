"""Fitted blends: planted weights recovered, statistics equal the pixels, cross-fitting, member specs,
blend.yaml, and the stage end to end (two nano runs on the demo data -> blend.yaml -> infer -> submit)."""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import skimage.data
import torch
import yaml
from procs import ROOT

from pipeline.cli import main as cli
from pipeline.core.config import load_config
from pipeline.core.errors import UserError
from pipeline.core.images import read_float, read_uint8, to_uint8
from pipeline.core.metrics import score_psnr
from pipeline.inference.blend import (
    FoldStats,
    Member,
    cross_fitted_psnr,
    fit_greedy,
    fit_lstsq,
    halves,
    iter_blend,
    iter_members,
    member_config,
    parse_member,
    parse_members,
    read_blend,
    residual_gram,
)
from pipeline.inference.predict import Settings, Timing, predict_images
from pipeline.models.checkpoint import model_from_checkpoint, save_checkpoint
from pipeline.models.table import build_model, model_kwargs


def _planted(n_images: int = 6, weights: tuple[float, ...] = (0.7, 0.3), seed: int = 0) -> FoldStats:
    """Members = HR + independent noise; the HR is then replaced by the rounded ``weights`` mixture of the
    members, so that mixture is the best blend (up to the HR's rounding). HR values stay inside 30..225:
    no clamping, which would bend the mixture."""
    rng = np.random.default_rng(seed)
    stats = FoldStats([f"m{j}" for j in range(len(weights))])
    for i in range(n_images):
        base = rng.integers(30, 226, (40, 48, 3)) / 255.0
        srs = [(base + rng.normal(0, 0.03, base.shape)).astype(np.float32) for _ in weights]
        hr = to_uint8(sum(w * s.astype(np.float64) for w, s in zip(weights, srs)))
        stats.add(f"img{i}", srs, hr)
    return stats


def test_planted_mixture_is_recovered() -> None:
    stats = _planted().arrays()
    w = fit_lstsq(stats)
    assert np.all(w >= 0) and w.sum() == pytest.approx(1, abs=1e-12)
    np.testing.assert_allclose(w, [0.7, 0.3], atol=1e-3)
    g = fit_greedy(stats, 100)
    assert np.all(g >= 0) and g.sum() == pytest.approx(1, abs=1e-12)
    np.testing.assert_allclose(g, [0.7, 0.3], atol=0.02)
    # the fit is the blend's optimum: either weight moved by 0.05 scores lower
    best = stats.psnr(w).mean()
    assert best > stats.psnr(np.array([0.75, 0.25])).mean() and best > stats.psnr(np.array([0.65, 0.35])).mean()
    assert best > stats.member_psnr.mean(axis=0).max() + 1  # and far above either member alone


def test_a_useless_member_gets_no_weight() -> None:
    rng = np.random.default_rng(4)
    stats = FoldStats(["a", "b", "noise"])
    for i in range(4):
        base = rng.integers(30, 226, (32, 32, 3)) / 255.0
        a, b = (base + rng.normal(0, 0.03, base.shape) for _ in range(2))
        hr = to_uint8(0.98 * a + 0.02 * b)  # NTIRE 2026's 0.98 / 0.02
        noise = rng.random(base.shape)
        stats.add(f"i{i}", [x.astype(np.float32) for x in (a, b, noise)], hr)
    w = fit_lstsq(stats.arrays())
    np.testing.assert_allclose(w, [0.98, 0.02, 0.0], atol=2e-3)
    assert w[2] == 0.0  # exactly: the member is left out, infer does not run it


def test_statistics_equal_the_pixels() -> None:
    """The residual Gram (computed in bands of rows) gives every blend's float MSE; the estimated contest
    PSNR of a fitted blend is close to the exact one of its rounded image; one member and the equal mean
    are exact."""
    photos = [skimage.data.astronaut()[:256, 128:384], skimage.data.coffee()[100:356, 200:456]]
    rng = np.random.default_rng(0)
    stats, images = FoldStats(["sharp", "blurred", "noisy"]), []
    for k, hr in enumerate(photos):
        x = hr.astype(np.float64) / 255
        srs = [x + rng.normal(0, 0.02, x.shape),  # out of [0, 1] at the extremes: the blend clamps it
               cv2.GaussianBlur(x, (5, 5), 1.2), x + rng.normal(0, 0.05, x.shape)]
        srs = [s.astype(np.float32) for s in srs]
        stats.add(f"p{k}", srs, hr)
        images.append(([np.clip(s, 0, 1) for s in srs], hr))
        e = np.stack([(255 * s.astype(np.float64) - hr).reshape(-1) for s in srs], axis=1)  # (H*W*3, 3)
        np.testing.assert_allclose(residual_gram(srs, hr, rows=7), e.T @ e, rtol=1e-12)
    arrays = stats.arrays()
    w = fit_lstsq(arrays)
    assert np.count_nonzero(w) >= 2  # a genuine blend, not one member
    exact = [score_psnr(to_uint8(sum(wj * s for wj, s in zip(w, srs))), hr) for srs, hr in images]
    np.testing.assert_allclose(arrays.psnr(w), exact, atol=3e-3)
    for j in range(3):
        np.testing.assert_array_equal(arrays.psnr(np.eye(3)[j]), [score_psnr(to_uint8(srs[j]), hr)
                                                                   for srs, hr in images])
    np.testing.assert_array_equal(arrays.psnr(np.full(3, 1 / 3)), arrays.mean_psnr)


def test_cross_fitting_scores_each_half_with_the_other_halfs_weights() -> None:
    stats = _planted(n_images=7, weights=(0.6, 0.4), seed=3).arrays()
    a, b = halves(7, seed=5)
    assert len(a) == 3 and len(b) == 4 and not set(a) & set(b)
    cross, (w_a, w_b), half = cross_fitted_psnr(stats, "lstsq", 10, seed=5)
    np.testing.assert_allclose(w_a, fit_lstsq(stats.subset(a)))
    np.testing.assert_allclose(cross[b], stats.psnr(w_a)[b])
    np.testing.assert_allclose(cross[a], stats.psnr(w_b)[a])
    assert list(half[a]) == [0] * 3 and list(half[b]) == [1] * 4
    assert not np.array_equal(halves(7, seed=6)[0], a)  # the seed draws the split
    with pytest.raises(UserError, match="at least 2 validation images"):
        cross_fitted_psnr(stats.subset(np.array([0])), "lstsq", 10, seed=0)


def test_member_specs() -> None:
    assert parse_member("rrdb1") == Member("rrdb1", run="rrdb1")
    assert parse_member("b:last_k=3") == Member("b:last_k=3", run="b", last_k=3)
    assert parse_member("b:checkpoint=last:ema=false") == Member("b:checkpoint=last:ema=false", run="b",
                                                                 checkpoint="last", ema=False)
    assert parse_member("weights=models/x:y.pth") == Member("weights=models/x:y.pth", weights="models/x:y.pth")
    for bad, message in [("b:last_k=0", "last_k must be"), ("b:k=3", "unknown option"), ("b:last_k", "unknown option"),
                         ("b:checkpoint=mid", "best or last"), ("b:ema=no", "true or false"), ("../x", "safe folder"),
                         ("weights=", "needs a file"), (":last_k=2", "expected RUN")]:
        with pytest.raises(UserError, match=message):
            parse_member(bad)
    with pytest.raises(UserError, match="at least 2 members"):
        parse_members(["a"])
    with pytest.raises(UserError, match="'a' appears twice"):
        parse_members(["a", "b", "a"])
    cfg = load_config(None, ["run=main", "infer.runs=[x]", "model.pretrained=p.pth", "infer.last_k=5"])
    m = member_config(cfg, parse_member("b:last_k=3:checkpoint=last"))
    assert (m.run, m.infer.last_k, m.infer.checkpoint, m.infer.runs, m.model.pretrained) == ("b", 3, "last", (), "")
    w = member_config(cfg, parse_member("weights=f.pth"))
    assert (w.model.weights, w.infer.last_k, w.infer.runs) == ("f.pth", 0, ())
    with pytest.raises(UserError, match="drop model.name=bicubic"):
        member_config(load_config(None, ["model.name=bicubic"]), parse_member("a"))


def test_read_blend_refuses_broken_files(tmp_path: Path) -> None:
    path = tmp_path / "blend.yaml"
    with pytest.raises(UserError, match="not found; fit the blend first"):
        read_blend(path, "x")
    for text, message in [("members: [a, b]\nweights: [0.5]\n", "2 member"),
                          ("members: [a, b]\nweights: [0.7, 0.4]\n", "sum to 1"),
                          ("members: [a, b]\nweights: [1.2, -0.2]\n", ">= 0"),
                          ("members: [a, b]\nweights: [a, b]\n", "numbers"),
                          ("members: a\n", "expected lists"), ("[: x", "not valid YAML")]:
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            read_blend(path, "x")
    path.write_text("members: [a, 'b:last_k=2']\nweights: [0.25, 0.75]\nsettings: {tta: 2}\n")
    spec = read_blend(path, "x")
    assert spec.members == ("a", "b:last_k=2") and spec.weights == (0.25, 0.75) and spec.settings == {"tta": 2}


def test_members_run_in_step_and_blend_by_weight() -> None:
    torch.manual_seed(0)
    a, b = build_model("edsr-nano"), build_model("edsr-nano")
    rng = np.random.default_rng(0)
    lrs = [rng.random((10, 12, 3), dtype=np.float32) for _ in range(3)]
    settings = Settings(tta=2, tile=8, stride=4, precision="fp32")
    cpu = torch.device("cpu")
    (ra, _), (rb, _) = predict_images([a], lrs, settings, cpu), predict_images([b], lrs, settings, cpu)
    timings = [Timing("cpu", ""), Timing("cpu", "")]
    got = list(iter_members([[a], [b]], zip("xyz", lrs), settings, cpu, timings))
    assert [name for name, _ in got] == ["x", "y", "z"]
    for (_name, (sa, sb)), ea, eb in zip(got, ra, rb):
        np.testing.assert_array_equal(sa, ea)
        np.testing.assert_array_equal(sb, eb)
    timing = Timing("cpu", "")
    blended = list(iter_blend([[a], [b]], [0.25, 0.75], zip("xyz", lrs), settings, cpu, timing))
    for (_name, sr), ea, eb in zip(blended, ra, rb):
        np.testing.assert_allclose(sr, 0.25 * ea + 0.75 * eb, atol=1e-6)
    assert timing.images == 3 and timing.tiles == sum(t.tiles for t in timings) and timing.precision == "fp32"


def test_blend_stage_end_to_end(patched_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "d"
    shutil.copytree(patched_demo, root)
    models, submit = tmp_path / "m", tmp_path / "s"
    args = ["--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(root), f"paths.models={models}",
            f"paths.submit={submit}"]
    fast = ["infer.tta=2", "infer.precision=fp32"]
    for run, seed in (("a", 0), ("b", 1)):
        assert cli(["train", *args, f"run={run}", f"seed={seed}", "model.name=edsr-nano", "train.max_steps=4",
                    "train.val_every=2", "train.save_every=2", "train.batch_size=4", "train.workers=0"]) == 0
    capsys.readouterr()
    assert cli(["blend", *args, "blend.name=ab", "blend.members=[a,b:last_k=2]", *fast]) == 0
    out = capsys.readouterr().out
    assert "blend ab on validation fold 0" in out and "cross-fitted" in out and "95% CI" in out
    content = yaml.safe_load((submit / "ab" / "blend.yaml").read_text())
    assert content["members"] == ["a", "b:last_k=2"] and content["method"] == "lstsq"
    w = np.array(content["weights"])
    assert np.all(w >= 0) and w.sum() == pytest.approx(1)
    assert content["weights"] == content["fits"]["lstsq"]["weights"] and len(content["fits"]["greedy"]["weights"]) == 2
    v = content["validation"]
    assert v["images"] == 2 and set(v["psnr"]["members"]) == {"a", "b:last_k=2"}
    for key in ("equal_mean", "blend_in_sample", "blend_cross_fitted"):
        assert 5 < v["psnr"][key] < 60
    gain = v["gain_cross_fitted"]["over_best_member"]
    assert gain["lo"] <= gain["mean"] <= gain["hi"]
    assert content["settings"]["tta"] == 2
    per_image = pd.read_csv(submit / "ab" / "blend_scores.csv", dtype={"img_id": str})
    assert list(per_image["img_id"]) == ["0006", "0007"]
    assert per_image["a"].mean() == pytest.approx(v["psnr"]["members"]["a"], abs=1e-4)

    # infer applies it to the test set, submit packs it, the validation fold gets a leaderboard row
    assert cli(["infer", *args, "blend.name=ab", *fast]) == 0
    lr = read_float(root / "test" / "lr" / "20000.png")
    settings = Settings(tta=2, tile=32, stride=16, precision="fp32")
    member_srs = []
    for path in ([models / "a" / "best.pth"], sorted((models / "b" / "history").glob("*.pth"))[-2:]):
        (sr,), _ = predict_images([model_from_checkpoint(p)[0] for p in path], [lr], settings)
        member_srs.append(sr)
    expected = to_uint8(sum(wj * s for wj, s in zip(w, member_srs)))
    got = read_uint8(submit / "ab" / "pred" / "20000.png")
    assert np.abs(got.astype(int) - expected).max() <= 1 and (got != expected).mean() < 1e-3
    assert cli(["submit", *args, "blend.name=ab"]) == 0
    with zipfile.ZipFile(submit / "ab" / "submission.zip") as zf:
        assert sorted(zf.namelist()) == ["20000.png", "20001.png", "20002.png"]
    assert cli(["infer", *args, "blend.name=ab", "infer.split=val", *fast]) == 0
    board = pd.read_csv(submit / "leaderboard.csv")
    assert list(board["run"]) == ["ab"] and board["model"].iloc[0].startswith("blend ab:")
    # the blend stage's in-sample figure (exact when the weights pick one member) is what infer measures
    assert board["psnr"].iloc[0] == pytest.approx(v["psnr"]["blend_in_sample"], abs=2e-3)


def test_blend_stage_errors(patched_demo: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["--data", str(patched_demo), f"paths.models={tmp_path / 'm'}", f"paths.submit={tmp_path / 's'}"]
    save_checkpoint(tmp_path / "m" / "a" / "best.pth", {"params": build_model("edsr-nano").state_dict(),
                                                        "arch": "edsr-nano", "kwargs": model_kwargs("edsr-nano")})
    cases = [([], "blend needs blend.name"), (["blend.name=x", "blend.members=[a]"], "at least 2 members"),
             (["blend.name=a", "blend.members=[a,b]"], "is a training run's name"),
             (["blend.name=x", "blend.members=[a,nope]"], "nope/best.pth: checkpoint not found")]
    for extra, message in cases:
        assert cli(["blend", *args, *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
    assert cli(["infer", *args, "blend.name=zz"]) == 2
    assert "zz/blend.yaml: not found; fit the blend first" in capsys.readouterr().err
    assert not (tmp_path / "s" / "x").exists() and not (tmp_path / "s" / "zz" / "pred").exists()

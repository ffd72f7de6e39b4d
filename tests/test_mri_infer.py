"""Volume inference and the volume stages: checkpoints, super_resolve (tiled, thick slices, slice models),
mri-prepare, mri-infer, mri-evaluate and demo-mri-data on the bundled scans."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.cli import main as cli
from pipeline.core.config import MriConfig
from pipeline.models.checkpoint import CheckpointError, save_checkpoint
from pipeline.mri.degrade import finer_affine, kspace_truncate, thick_affine, thick_slices
from pipeline.mri.demo_data import HELD_OUT, demo_overrides
from pipeline.mri.models import build_volume_model, checkpoint_state, volume_model_from_checkpoint
from pipeline.mri.predict import VolumeSettings, grid_factors, interpolate, spec_of, super_resolve, write_sr
from pipeline.mri.volumes import Volume, intensity_stats, read_volume

pytestmark = pytest.mark.usefixtures("fast_cpu")
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def demo_mri(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """data/demo-mri as demo-mri-data builds it, and the overrides that run stages on it."""
    out = tmp_path_factory.mktemp("vols") / "demo-mri"
    assert cli(["demo-mri-data", "--out", str(out)]) == 0
    return out, demo_overrides(out, json.loads((out / "demo.json").read_text()))


def _volume(data: np.ndarray, affine: np.ndarray | None = None, dtype: type = np.int16) -> Volume:
    return Volume(data.astype(np.float32), np.eye(4) if affine is None else affine, np.dtype(dtype), Path("v.nii.gz"))


def _brain() -> np.ndarray:
    """A smooth blob on a dark background, integer-valued like a scan."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (24, 20, 16)), indexing="ij")
    r = np.sqrt(x**2 + (1.2 * y) ** 2 + (1.5 * z) ** 2)
    return np.round(1000 * np.clip(1.1 - r, 0, None) * (1 + 0.3 * np.sin(6 * x) * np.cos(5 * y)))


def test_finer_affine_inverts_thick_affine() -> None:
    a = np.array([[0.9, 0.1, 0.0, -30.0], [0.0, 1.1, 0.2, 12.0], [0.05, 0.0, 2.0, 4.0], [0, 0, 0, 1.0]])
    for axis in range(3):
        factors = [1, 1, 1]
        factors[axis] = 4
        np.testing.assert_allclose(finer_affine(thick_affine(a, 4, axis), factors), a, atol=1e-12)
    # Voxel centres: fine voxel 0 and 3 of a x4 axis sit symmetrically around coarse voxel 0's centre.
    fine = finer_affine(a, (4, 1, 1))
    centre = a @ np.array([0, 0, 0, 1.0])
    np.testing.assert_allclose((fine @ [0, 0, 0, 1.0] + fine @ [3, 0, 0, 1.0]) / 2, centre, atol=1e-12)


def test_volume_checkpoint_round_trip_and_refusals(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_volume_model("mdcsrn-tiny", growth=3)
    ema = {k: v + 0.01 if v.is_floating_point() else v for k, v in model.state_dict().items()}
    path = save_checkpoint(tmp_path / "best.pth", checkpoint_state("mdcsrn-tiny", model, {"growth": 3}, ema, step=7))
    loaded, name, meta = volume_model_from_checkpoint(path, ema=False)
    x = torch.rand(1, 1, 6, 7, 8)
    assert name == "mdcsrn-tiny" and meta["step"] == 7 and meta["kwargs"]["growth"] == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))
        ema_model = volume_model_from_checkpoint(path, ema=True)[0]
        assert not torch.allclose(ema_model(x), loaded(x))  # EMA weights preferred when asked
    state = torch.load(path, weights_only=True)
    for change, message in (({"kwargs": {"growth": 3, "depth": 9}}, "no argument"),
                            ({"arch": "edsr-tiny"}, "not a volume model"),
                            ({"kwargs": {"growth": 5}}, "do not fit")):
        bad = save_checkpoint(tmp_path / "bad.pth", {**state, **change})
        with pytest.raises(CheckpointError, match=rf"bad\.pth: .*{message}"):
            volume_model_from_checkpoint(bad)


def test_super_resolve_tiled_equals_whole_and_writes_like_the_input(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = build_volume_model("mdcsrn-tiny").eval()
    hr = _brain()
    affine = np.diag([1.5, 1.2, 2.0, 1.0])
    lr = _volume(kspace_truncate(hr), affine)
    spec = spec_of("mdcsrn-tiny")
    r = model.receptive_radius
    whole = super_resolve(model, spec, lr, VolumeSettings(tile=0), device=CPU)
    tiled = super_resolve(model, spec, lr, VolumeSettings(tile=14, stride=14 - 2 * r, margin=r, batch=2), device=CPU)
    assert tiled.tiles > 1 and whole.tiles == 1
    np.testing.assert_allclose(tiled.data, whole.data, atol=1e-3)  # real-world units, range ~1000
    np.testing.assert_allclose(whole.affine, affine)  # same grid for k-space LR
    src = tmp_path / "lr.nii.gz"
    nib.save(nib.Nifti1Image(np.round(lr.data).astype(np.int16), affine), src)
    vol = read_volume(src)
    out = write_sr(tmp_path / "sr.nii.gz", super_resolve(model, spec, vol, device=CPU), vol)
    img = nib.load(out)
    assert img.get_data_dtype() == np.int16 and img.shape == hr.shape
    np.testing.assert_allclose(img.affine, affine)


def test_thick_slices_go_to_the_hr_grid_first() -> None:
    torch.manual_seed(0)
    model = build_volume_model("mdcsrn-tiny").eval()
    torch.nn.init.zeros_(model.reconstruct.weight)  # an identity: the output is the interpolated LR
    torch.nn.init.zeros_(model.reconstruct.bias)
    hr_affine = np.diag([1.0, 1.0, 1.5, 1.0])
    thick = _volume(thick_slices(_brain(), 4, 2), thick_affine(hr_affine, 4, 2))
    mri = MriConfig(degradation="thick", thick_factor=4, thick_axis=2)
    sr = super_resolve(model, spec_of("mdcsrn-tiny"), thick, VolumeSettings(tile=0, interp="linear"),
                       grid_factors(mri), CPU)
    base = interpolate(thick, grid_factors(mri), "trilinear")
    assert sr.data.shape == (24, 20, 16)
    np.testing.assert_allclose(sr.affine, hr_affine, atol=1e-12)  # the HR grid's affine
    np.testing.assert_allclose(sr.data, base.data, atol=1e-2)
    np.testing.assert_allclose(base.affine, hr_affine, atol=1e-12)


def test_a_slice_model_runs_slice_by_slice_and_upscales_in_plane() -> None:
    torch.manual_seed(0)
    model = build_volume_model("srrescycgan-tiny").eval()
    lr = _volume(_brain()[:, :, :5], np.diag([2.0, 2.0, 3.0, 1.0]))
    spec = spec_of("srrescycgan-tiny")
    for axis in (2, 0):
        sr = super_resolve(model, spec, lr, VolumeSettings(tile=12, stride=8, slice_axis=axis), device=CPU)
        shape = [4 * n for n in lr.data.shape]
        shape[axis] = lr.data.shape[axis]
        assert sr.data.shape == tuple(shape)
        zooms = np.array([2.0, 2.0, 3.0]) / np.where(np.arange(3) == axis, 1, 4)  # voxels 4x finer in-plane
        np.testing.assert_allclose(np.diag(sr.affine)[:3], zooms)
    whole = super_resolve(model, spec, lr, VolumeSettings(tile=0, slice_axis=2), device=CPU)
    with torch.no_grad():  # slice 3 through the 2-D network on its own, in the same normalisation
        stats = intensity_stats(lr.data)
        one = model(torch.from_numpy(stats.normalise(lr.data)[:, :, 3])[None, None])[0, 0].numpy()
    np.testing.assert_allclose(whole.data[:, :, 3], stats.denormalise(one), atol=1e-2)


def test_stages_on_the_demo_volumes(demo_mri: tuple[Path, list[str]], tmp_path: Path) -> None:
    root, overrides = demo_mri
    record = json.loads((root / "demo.json").read_text())
    splits = pd.read_csv(root / "mri_splits.csv")
    assert set(splits["subject"]) == {"dwib0", "brain", "epi", "t1"}
    assert splits.groupby("subject")["fold"].nunique().max() == 1  # epi's two volumes share a fold
    assert splits.loc[splits["subject"] == HELD_OUT, "fold"].item() == record["val_fold"]
    assert record["patch"] == 16 and (record["slice_hr"], record["slice_lr"]) == (32, 8)
    # A tiny checkpoint: the stage rebuilds it from arch + kwargs and tiles the held-out volume.
    torch.manual_seed(0)
    save_checkpoint(tmp_path / "models" / "tiny" / "best.pth",
                    checkpoint_state("mdcsrn-tiny", build_volume_model("mdcsrn-tiny"), step=1))
    assert cli(["mri-infer", *overrides, "run=tiny", f"paths.models={tmp_path / 'models'}", "mri_infer.tile=24",
                "mri_infer.stride=14", "mri_infer.margin=5"]) == 0
    assert cli(["mri-infer", *overrides, "mri_infer.model=tricubic"]) == 0
    sr_dir = root / "sr" / "tiny"
    assert sorted(p.name for p in sr_dir.iterdir()) == ["brain_0.nii.gz", "config.yaml", "timing.json"]
    hr, sr = nib.load(root / "brain_0.nii.gz"), nib.load(sr_dir / "brain_0.nii.gz")
    assert sr.get_data_dtype() == hr.get_data_dtype() and sr.shape == hr.shape
    np.testing.assert_allclose(sr.affine, hr.affine)
    assert json.loads((sr_dir / "timing.json").read_text())["tile_forwards"] > 1
    assert cli(["mri-evaluate", *overrides, "run=tiny"]) == 0
    table = pd.read_csv(root / "scores" / "tiny.csv")
    assert list(table["method"]) == ["tiny", "trilinear", "tricubic"] * 2
    assert list(table["item"]) == ["brain_0"] * 3 + ["mean"] * 3
    assert table["psnr"].between(10, 60).all() and table["ssim"].between(0, 1).all()
    assert cli(["mri-evaluate", *overrides, "--sr", str(root / "sr" / "tricubic")]) == 0
    base = pd.read_csv(root / "scores" / "tricubic.csv")
    assert list(base["method"]) == ["tricubic", "trilinear", "tricubic", "trilinear"]  # itself once
    np.testing.assert_allclose(base.loc[0, "psnr"], table.loc[2, "psnr"], atol=1e-9)  # written == in memory


def test_mri_prepare_thick_slices_and_the_trilinear_baseline(tmp_path: Path) -> None:
    root = tmp_path / "vols"
    root.mkdir()
    for k, subject in enumerate(("s1", "s2", "s3")):
        np.save(root / f"{subject}_T1.npy", np.roll(_brain(), 2 * k, axis=0).astype(np.uint16))
    common = [f"mri.dir={root}", "mri.folds=3", "mri.degradation=thick", "mri.thick_factor=4", "mri.thick_axis=1"]
    assert cli(["mri-prepare", *common]) == 0
    lr = np.load(root / "lr" / "s1_T1.npy")
    assert lr.dtype == np.uint16 and lr.shape == (24, 5, 16)
    assert cli(["mri-infer", *common, "mri_infer.model=trilinear", "mri_infer.split=all"]) == 0
    sr = np.load(root / "sr" / "trilinear" / "s2_T1.npy")
    assert sr.dtype == np.uint16 and sr.shape == (24, 20, 16)
    # The recorded degradation wins over the stage's own config: thick is read back from lr/.
    assert cli(["mri-evaluate", f"mri.dir={root}", "mri.folds=3", "--sr", str(root / "sr" / "trilinear"),
                "mri_evaluate.baselines=[nearest]"]) == 0
    table = pd.read_csv(root / "scores" / "trilinear.csv")
    means = table[table["item"] == "mean"].set_index("method")["psnr"]
    assert means["trilinear"] > means["nearest"]


def test_stage_errors_are_one_line(demo_mri: tuple[Path, list[str]], tmp_path: Path,
                                   capsys: pytest.CaptureFixture) -> None:
    root, overrides = demo_mri
    cases = [
        (["mri-infer", *overrides, "run=nothing", f"paths.models={tmp_path}"], "checkpoint not found"),
        (["mri-infer", *overrides, "mri_infer.model=mdcsrn-tiny"], "needs mri_infer.pretrained"),
        (["mri-infer", *overrides, "mri_infer.model=srgan"], "unknown volume model"),
        (["mri-infer", "--input", str(root / "lr")], "--input needs --output"),
        (["mri-infer", *overrides, "mri_infer.model=tricubic", "mri_infer.tile=16", "mri_infer.stride=8",
          "mri_infer.margin=5"], None),  # a baseline ignores tiles
        (["mri-evaluate", f"mri.dir={tmp_path}"], "run `mri-infer run=default` first"),
        (["mri-evaluate", f"mri.dir={tmp_path}", "--sr", str(tmp_path)], "no volumes found"),
    ]
    for argv, message in cases:
        code = cli(argv)
        err = capsys.readouterr().err
        if message is None:
            assert code == 0
            continue
        assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep")
    assert cli(["mri-infer", *overrides, "mri_infer.model=tricubic", "--output", str(foreign)]) == 2
    assert (foreign / "notes.txt").read_text() == "keep"  # a folder the stage did not write is refused


def test_demo_folder_is_reused_and_rebuilt_only_when_the_recipe_changes(demo_mri: tuple[Path, list[str]],
                                                                         tmp_path: Path) -> None:
    root, _ = demo_mri
    copy = tmp_path / "demo-mri"
    shutil.copytree(root, copy)
    stamp = (copy / "brain_0.nii.gz").stat().st_mtime_ns
    assert cli(["demo-mri-data", "--out", str(copy)]) == 0
    assert (copy / "brain_0.nii.gz").stat().st_mtime_ns == stamp  # same seed and recipe: kept
    assert cli(["demo-mri-data", "--out", str(copy), "seed=1"]) == 0
    assert json.loads((copy / "demo.json").read_text())["seed"] == 1
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    assert cli(["demo-mri-data", "--out", str(tmp_path / "other")]) == 2

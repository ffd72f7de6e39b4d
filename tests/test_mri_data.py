"""Training data and losses for the volume and slice models: 3-D foreground patches, validation, unpaired
k-space slices, SRResCycGAN's loss composition and schedule, and the orthogonal-slices figure."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.cli import main as cli
from pipeline.core.config import MriConfig, MriCycleTrainConfig
from pipeline.mri.cycle import CycleMix, discriminator_loss, generator_loss
from pipeline.mri.data import PatchDataset, VolumePair, load_pairs, score_volumes, validation_items
from pipeline.mri.figures import orthogonal_slices
from pipeline.mri.lrset import read_record
from pipeline.mri.models import build_volume_model
from pipeline.mri.predict import VolumeSettings, spec_of
from pipeline.mri.slices import UnpairedSlices, kspace_downsample, slice_crops, unpaired_slices
from pipeline.mri.volumes import Volume
from pipeline.training.losses import total_variation

pytestmark = pytest.mark.usefixtures("fast_cpu")


def _blob(shape: tuple[int, int, int] = (24, 20, 16), shift: int = 0) -> np.ndarray:
    grids = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape), indexing="ij")
    r = np.sqrt(sum(g**2 for g in grids))
    return np.roll(np.round(800 * np.clip(1.0 - r, 0, None) + 20 * grids[0]).astype(np.float32), shift, axis=0)


def _pair(shape: tuple[int, int, int] = (20, 20, 20)) -> VolumePair:
    hr = np.random.default_rng(0).random(shape, dtype=np.float32)
    mask = np.zeros(shape, dtype=bool)
    mask[: shape[0] // 2] = True  # the first half of axis 0 is anatomy
    return VolumePair("a", 2 * hr, hr, mask)  # lr = 2 x hr: every transform must keep the relation


def test_patches_are_foreground_only_and_augmented_identically() -> None:
    pair = _pair()
    ds = PatchDataset([pair], size=8, stride=4, min_foreground=0.5)
    corners = [c for _, c in ds.index]
    assert corners and all(c[0] <= 6 for c in corners)  # patches mostly inside the first half only
    assert len(corners) < len(PatchDataset([pair], 8, 4, min_foreground=0.0).index)
    for i in range(len(ds)):
        lr, hr = ds.sample(i, 3)
        assert lr.shape == hr.shape == (1, 8, 8, 8)
        torch.testing.assert_close(lr, 2 * hr)
    first = [ds.sample(i, 3)[1] for i in range(len(ds))]
    assert all(torch.equal(a, ds.sample(i, 3)[1]) for i, a in enumerate(first))  # seeded by the sample seed
    plain = PatchDataset([pair], 8, 4, min_foreground=0.5, augment=False)
    assert any(not torch.equal(a, plain.sample(i, 3)[1]) for i, a in enumerate(first))  # something was flipped
    assert any(not torch.equal(a, ds.sample(i, 4)[1]) for i, a in enumerate(first))


def test_thin_volumes_are_mirrored_to_the_patch_size() -> None:
    pair = _pair((20, 20, 5))
    ds = PatchDataset([pair], size=8, stride=8, min_foreground=0.1, augment=False)
    assert all(ds.sample(i, 0)[1].shape == (1, 8, 8, 8) for i in range(len(ds)))
    hr = ds.sample(0, 0)[1][0].numpy()
    np.testing.assert_array_equal(hr[:, :, 5:], hr[:, :, 4:1:-1])  # symmetric: 4, 3, 2 after 0..4


def test_thick_lr_gets_a_drawn_interpolation_per_sample() -> None:
    mri = MriConfig(degradation="thick", thick_factor=4, thick_axis=2)
    hr = np.random.default_rng(1).random((8, 8, 16), dtype=np.float32)
    lr = hr.reshape(8, 8, 4, 4).mean(axis=3)
    ds = PatchDataset([VolumePair("a", lr, hr, np.ones(hr.shape, bool))], 8, 8, mri, augment=False)
    grids = {ds.sample(1, s)[0].numpy().tobytes() for s in range(12)}
    assert ds.sample(1, 0)[0].shape == (1, 8, 8, 8)
    assert len(grids) == 3  # nearest, linear and cubic all drawn over 12 seeds


def test_pairs_and_validation_of_a_prepared_folder(tmp_path: Path) -> None:
    root = tmp_path / "vols"
    root.mkdir()
    for k, subject in enumerate(("s1", "s2", "s3")):
        np.save(root / f"{subject}_T1.npy", _blob(shift=2 * k).astype(np.int16))
    assert cli(["mri-prepare", f"mri.dir={root}", "mri.folds=3"]) == 0
    mri = read_record(root)
    pairs = load_pairs(root, mri, exclude_fold=0)
    assert len(pairs) == 2 and all(p.lr.shape == p.hr.shape == (24, 20, 16) for p in pairs)
    # Both sides normalised with the LR's statistics: the LR's 0.5 / 99.5 percentiles map to 0 / 1.
    assert abs(np.percentile(pairs[0].lr, 0.5)) < 1e-5 and abs(np.percentile(pairs[0].lr, 99.5) - 1) < 1e-5
    assert np.abs(pairs[0].hr - pairs[0].lr).mean() < 0.1
    items = validation_items(root, mri, 0)
    assert len(items) == 1 and items[0].mask.any()
    torch.manual_seed(0)
    model = build_volume_model("mdcsrn-tiny")
    torch.nn.init.zeros_(model.reconstruct.weight)  # an identity: the SR is the LR
    torch.nn.init.zeros_(model.reconstruct.bias)
    scores = score_volumes(model, spec_of("mdcsrn-tiny"), items, mri, VolumeSettings(tile=0), torch.device("cpu"))
    assert cli(["mri-infer", f"mri.dir={root}", "mri.folds=3", "mri_infer.model=trilinear"]) == 0
    assert cli(["mri-evaluate", f"mri.dir={root}", "mri.folds=3", "--sr", str(root / "sr" / "trilinear"),
                "mri_evaluate.baselines=[]"]) == 0
    written = pd.read_csv(root / "scores" / "trilinear.csv")
    np.testing.assert_allclose(scores["psnr"].iloc[0], written["psnr"].iloc[0], atol=0.05)  # LR == SR, rounding


def test_kspace_downsampling_keeps_level_and_band_limited_content() -> None:
    y, x = np.meshgrid(np.arange(32), np.arange(24), indexing="ij")
    constant = np.full((32, 24), 3.5)
    np.testing.assert_allclose(kspace_downsample(constant, 4), np.full((8, 6), 3.5), atol=1e-5)
    smooth = 2 + np.cos(2 * np.pi * 2 * y / 32) * np.sin(2 * np.pi * 1 * x / 24)  # frequencies inside the kept band
    np.testing.assert_allclose(kspace_downsample(smooth, 4), smooth[::4, ::4], atol=1e-5)
    sharp = 2 + np.cos(2 * np.pi * 10 * y / 32)  # frequency 10 > 8 / 2: removed
    np.testing.assert_allclose(kspace_downsample(sharp, 4), np.full((8, 6), 2.0), atol=1e-5)


def test_slice_crops_and_unpaired_sides() -> None:
    vol = Volume(_blob((40, 36, 6)), np.eye(4), np.dtype(np.int16), Path("a.nii.gz"))
    crops = slice_crops(vol, axis=2, size=16, min_foreground=0.25)
    assert crops.dtype == np.float32 and crops.shape[1:] == (16, 16) and 0 < len(crops) <= 6 * 9
    small = slice_crops(Volume(_blob((10, 12, 4)), np.eye(4), np.dtype(np.int16), Path("b.nii.gz")), 2, 16, 0.0)
    assert small.shape == (4, 16, 16) and np.all(small[:, 10:, :] == 0)  # zero-padded past the anatomy
    vols = [(s, Volume(_blob((32, 32, 8), shift=k), np.eye(4), np.dtype(np.int16), Path(f"{s}.npy")))
            for k, s in enumerate(("a", "b", "c", "d"))]
    ds = unpaired_slices(vols, size=16, scale=4, axis=2)
    lr, hr = ds.sample(0, 5)
    assert lr.shape == (1, 4, 4) and hr.shape == (1, 16, 16)
    assert len(ds) == max(len(ds.lr), len(ds.hr))
    with pytest.raises(Exception, match="two subjects"):
        unpaired_slices(vols[:1], 16)
    with pytest.raises(Exception, match="both sides"):
        UnpairedSlices(np.zeros((0, 4, 4), np.float32), np.zeros((2, 16, 16), np.float32))


@pytest.fixture
def mri_cycle_train() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_volume_model("srrescycgan-tiny")


def _toy(batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(batch, 1, 8, 8, generator=g), torch.rand(batch, 1, 32, 32, generator=g)


def test_generator_loss_is_the_write_ups_weighted_sum(mri_cycle_train: torch.nn.Module) -> None:
    # the write-up's schedule (CycleObjective.learning_rate; applied in test_mri_train's SRResCycGAN run)
    assert MriCycleTrainConfig().learning_rate == 1e-4 and MriCycleTrainConfig().halve_every == 10000
    lr, hr = _toy()
    assert CycleMix() == CycleMix(1.0, 1.0, 1.0, 5.0, 10.0)  # perceptual, adversarial, tv, l1, cycle

    def toy_perceptual(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (F.avg_pool2d(pred, 2) - F.avg_pool2d(target, 2)).square().mean()

    terms = generator_loss(mri_cycle_train, lr, hr, CycleMix(), "vanilla", toy_perceptual)
    with torch.no_grad():  # every term by hand from the four networks
        sr, fake = mri_cycle_train.g_hr(lr), mri_cycle_train.g_lr(hr)
        cycle = (mri_cycle_train.g_lr(sr) - lr).abs().mean() + (mri_cycle_train.g_hr(fake) - hr).abs().mean()
        l1 = (F.avg_pool2d(sr, 4) - lr).abs().mean() + (fake - F.avg_pool2d(hr, 4)).abs().mean()
        perceptual = toy_perceptual(mri_cycle_train.g_hr(fake), hr)
        adversarial = (F.binary_cross_entropy_with_logits(mri_cycle_train.d_hr(sr), torch.ones(2, 1))
                       + F.binary_cross_entropy_with_logits(mri_cycle_train.d_lr(fake), torch.ones(2, 1)))
        total = perceptual + adversarial + total_variation(sr) + 5 * l1 + 10 * cycle
    for key, want in (("cycle", cycle), ("l1", l1), ("perceptual", perceptual), ("adversarial", adversarial),
                      ("tv", total_variation(sr))):
        torch.testing.assert_close(terms[f"loss/{key}"].detach(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(terms["loss/total"].detach(), total, rtol=1e-5, atol=1e-6)
    paired = generator_loss(mri_cycle_train, lr, hr, CycleMix(perceptual=0, adversarial=0, tv=0, cycle=0), paired=True)
    assert set(paired) == {"loss/total", "loss/l1", "sr", "fake_lr"}
    torch.testing.assert_close(paired["loss/total"].detach(), 5 * (sr - hr).abs().mean(), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="perceptual"):
        generator_loss(mri_cycle_train, lr, hr)  # a positive perceptual weight needs the function


def test_generator_and_discriminator_steps_train_their_own_networks(mri_cycle_train: torch.nn.Module) -> None:
    lr, hr = _toy()
    weights = CycleMix(perceptual=0)
    terms = generator_loss(mri_cycle_train, lr, hr, weights, "relativistic")
    terms["loss/total"].backward()
    assert all(p.grad is not None for p in mri_cycle_train.generators())
    mri_cycle_train.zero_grad(set_to_none=True)
    d = discriminator_loss(mri_cycle_train, lr, hr, terms["sr"], terms["fake_lr"], "wgan-gp")
    d["loss/d_total"].backward()
    assert all(p.grad is None for p in mri_cycle_train.generators())  # fakes are detached for the critics
    assert all(p.grad is not None for p in mri_cycle_train.discriminators())
    torch.testing.assert_close(d["loss/d_total"], d["loss/d_hr"] + d["loss/d_lr"])


def test_orthogonal_slices_figure(tmp_path: Path) -> None:
    hr = _blob((24, 20, 16))
    thick = hr.reshape(24, 20, 4, 4).mean(axis=3)  # on a coarser grid: shown by nearest on HR's
    path = orthogonal_slices(tmp_path / "fig.png", {"LR": thick, "SR": hr * 0.9, "HR": hr}, zooms=(1, 1, 2),
                             title="blob")
    img = np.asarray(Image.open(path))
    assert img.shape[0] > img.shape[1] * 0.8 and img.shape[2] in (3, 4)
    assert img[..., :3].std() > 10  # not a blank canvas

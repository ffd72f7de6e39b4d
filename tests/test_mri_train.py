"""mri-train on the demo volumes (16^3 patches, mdcsrn-tiny): L1 steps write a checkpoint mri-infer reads,
3-D WGAN-GP steps resume exactly after SIGKILL, the 3-D gradient penalty by hand, (index, seed) samples."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from procs import assert_ok, kill_after_first_save
from test_train import load, log_entries

from pipeline.cli import main as cli
from pipeline.core.config import load_config
from pipeline.core.errors import UserError
from pipeline.mri.data import PatchDataset, VolumePair
from pipeline.mri.demo_data import demo_overrides
from pipeline.mri.models import build_volume_model
from pipeline.training.losses import gradient_penalty

pytestmark = pytest.mark.usefixtures("one_thread")  # in-process runs match OMP_NUM_THREADS=1 subprocesses


@pytest.fixture(scope="module")
def volumes(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    """The demo volume folder and the overrides that run stages on it."""
    out = tmp_path_factory.mktemp("vols") / "demo-mri"
    assert cli(["demo-mri-data", "--out", str(out)]) == 0
    return out, demo_overrides(out, json.loads((out / "demo.json").read_text()))


def train_args(volumes: tuple[Path, list[str]], models: Path, run: str, *extra: str) -> list[str]:
    """Whole 16^3 patches on a 16-voxel grid, batch 2, L1 only; validation on the held-out brain at the end."""
    return ["mri-train", *volumes[1], f"run={run}", f"paths.models={models}", "mri_train.model=mdcsrn-tiny",
            "mri_train.patch=16", "mri_train.stride=16", "train.batch_size=2", "train.workers=0",
            "train.loss_l1=1", "train.loss_mse=0", "train.learning_rate=1e-3", "train.val_every=1000",
            "train.log_every=5", "train.save_every=5", "train.val_share=0", "train.precision=fp32", *extra]


@pytest.fixture(scope="module")
def l1_run(volumes: tuple[Path, list[str]], tmp_path_factory: pytest.TempPathFactory) -> Path:
    models = tmp_path_factory.mktemp("models")
    assert cli(train_args(volumes, models, "l1", "train.max_steps=6", "train.val_every=3")) == 0
    return models


def test_l1_steps_write_a_checkpoint_mri_infer_reads(volumes: tuple[Path, list[str]], l1_run: Path) -> None:
    root, overrides = volumes
    run = l1_run / "l1"
    last, best = load(run / "last.pth"), load(run / "best.pth")
    assert last["step"] == 6 and last["arch"] == best["arch"] == "mdcsrn-tiny"
    assert best["kwargs"] == {"growth": 4, "blocks": 2, "units": 2} and "params_ema" in best
    assert set(last["params"]) == set(build_volume_model("mdcsrn-tiny").state_dict())
    vals = [e for e in log_entries(run) if e["kind"] == "val"]
    assert [e["step"] for e in vals] == [3, 6]
    # validation = masked volume PSNR of the held-out brain, against the (same-grid, k-space) LR itself
    assert all(10 < e["val/psnr"] < 60 and 0 < e["val/ssim"] <= 1 for e in vals)
    assert vals[0]["val/tricubic_psnr"] == vals[1]["val/tricubic_psnr"]
    train = [e for e in log_entries(run) if e["kind"] == "train"]
    assert all(e["loss/total"] == e["loss/l1"] for e in train)  # L1 only
    assert cli(["mri-infer", *overrides, "run=l1", f"paths.models={l1_run}"]) == 0
    sr, hr = nib.load(root / "sr" / "l1" / "brain_0.nii.gz"), nib.load(root / "brain_0.nii.gz")
    assert sr.shape == hr.shape and sr.get_data_dtype() == hr.get_data_dtype()
    assert cli(["mri-evaluate", *overrides, "run=l1"]) == 0
    # mri-evaluate scores the written file; the run validated the same model (EMA) in memory before rounding
    scores = np.loadtxt(root / "scores" / "l1.csv", delimiter=",", skiprows=1, usecols=2, max_rows=1)
    assert abs(float(scores) - best["psnr"]) < 0.05


def test_mri_train_refuses_what_volumes_cannot_use(volumes: tuple[Path, list[str]], l1_run: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    start = f"model.pretrained={l1_run / 'l1' / 'best.pth'}"
    refusals = [(("gan.discriminator=unet-sn",), "unknown volume model"),
                (("gan.discriminator=mdcsrn-tiny",), "not a 3-D critic"),
                (("mri_train.model=srrescycgan-tiny",), "same-grid 3-D"),
                (("loss.perceptual=1",), "loss.perceptual=0"),
                ((start, "mri_train.model=mdcsrn"), "mri_train.model=mdcsrn-tiny")]
    for extra, words in refusals:
        assert cli(train_args(volumes, l1_run, "refused", "train.max_steps=1", *extra)) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith("error:") and words in err, err


def test_samples_are_a_function_of_index_and_seed() -> None:
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, 20),) * 3, indexing="ij")
    hr = np.clip(1.2 - np.sqrt(x**2 + y**2 + z**2), 0, None).astype(np.float32) + 0.01 * x.astype(np.float32)
    pair = VolumePair("a", hr * 0.9, hr, hr > 0.1)
    patches = PatchDataset([pair], 8, 4)
    first = patches.sample(3, 1234)
    again = patches.sample(3, 1234)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert first[0].shape == first[1].shape == (1, 8, 8, 8)
    others = [patches.sample(3, s)[1] for s in range(8)]
    assert len({o.numpy().tobytes() for o in others}) > 2  # the seed draws flips / rotations
    lr, hr_crop = first
    assert torch.allclose(lr, hr_crop * 0.9)  # LR and HR get the same transform
    with pytest.raises(UserError, match="mri.interp=.*lanczos.*choose from nearest, linear, cubic"):
        PatchDataset([pair], 8, 4, load_config(None, ["mri.interp=[cubic, lanczos]"]).mri)


def test_gradient_penalty_of_a_3d_critic_by_hand() -> None:
    """C(x) = sum(w * x^2) / 2 per sample: grad = w * x_hat, x_hat = eps real + (1 - eps) fake."""
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(3, 1, 4, 5, 6, generator=g), torch.rand(3, 1, 4, 5, 6, generator=g)
    w = torch.rand(1, 1, 4, 5, 6, generator=g) * 2
    eps = torch.tensor([0.0, 0.25, 1.0])

    def critic(x: torch.Tensor) -> torch.Tensor:
        return (w * x * x).flatten(1).sum(1, keepdim=True) / 2  # (B,1,D,H,W) -> (B,1)

    expected = 0.0
    for b in range(3):
        x_hat = eps[b] * real[b] + (1 - eps[b]) * fake[b]
        norm = float(((w[0] * x_hat) ** 2).sum().sqrt())
        expected += (norm - 1) ** 2 / 3
    assert gradient_penalty(critic, real, fake, eps).item() == pytest.approx(expected, rel=1e-5)


def sigkill_and_resume(args: Callable[[str], list[str]], tmp_path: Path, steps: int) -> tuple[dict, dict]:
    """(last.pth of a run SIGKILLed after its first save and resumed, last.pth of an uninterrupted run)."""
    killed = tmp_path / "killed"
    code = kill_after_first_save([*args("killed"), "train.workers=1"], killed / "last.pth", tmp_path / "killed.log",
                                 lambda: assert_ok(cli(args("reference"))))
    assert code == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert 5 <= load(killed / "last.pth")["step"] < steps
    assert cli(args("killed")) == 0
    resumed, reference = load(killed / "last.pth"), load(tmp_path / "reference" / "last.pth")
    assert resumed["step"] == reference["step"] == steps
    for key in ("params", "params_ema"):
        for name, value in reference[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name}"
    for index, moments in reference["d_optimizer"]["state"].items():
        assert torch.equal(resumed["d_optimizer"]["state"][index]["exp_avg"], moments["exp_avg"])
    steps_logged = [(e["kind"], e["step"]) for e in log_entries(killed)]
    assert len(steps_logged) == len(set(steps_logged))
    return resumed, reference


def test_wgan_gp_sigkill_then_resume_equals_uninterrupted(volumes: tuple[Path, list[str]], l1_run: Path,
                                                          tmp_path: Path) -> None:
    extra = ("train.max_steps=30", "train.deterministic=true", "train.ema_decay=0.9",
             f"model.pretrained={l1_run / 'l1' / 'best.pth'}", "gan.discriminator=critic3d-tiny",
             "gan.loss=wgan-gp", "gan.critic_steps=2", "gan.weight=1e-2")
    resumed, reference = sigkill_and_resume(lambda run: train_args(volumes, tmp_path, run, *extra), tmp_path, 30)
    assert reference["objective"] == "gan" and reference["discriminator"]["arch"] == "critic3d-tiny"
    for name, value in reference["discriminator"]["params"].items():
        assert torch.equal(resumed["discriminator"]["params"][name], value), f"discriminator.{name}"
    d_steps = {int(s["step"]) for s in reference["d_optimizer"]["state"].values()}
    assert d_steps == {60}  # 2 critic updates per generator update
    gp = [e["loss/d_gp"] for e in log_entries(tmp_path / "reference") if e["kind"] == "train"]
    assert all(v > 0 for v in gp)


def cycle_args(volumes: tuple[Path, list[str]], models: Path, run: str, *extra: str) -> list[str]:
    """SRResCycGAN-tiny on the demo's 32 / 8 px slices, batch 2, no perceptual term (no VGG19 file in tests)."""
    return ["mri-cycle-train", *volumes[1], f"run={run}", f"paths.models={models}",
            "mri_cycle_train.model=srrescycgan-tiny", "mri_cycle_train.hr_size=32", "mri_cycle_train.perceptual=0",
            "train.batch_size=2", "train.workers=0",
            "train.val_every=1000", "train.log_every=5", "train.save_every=5", "train.val_share=0",
            "train.precision=fp32", *extra]


def test_srrescycgan_sigkill_then_resume_equals_uninterrupted_and_mri_infer_reads_it(
        volumes: tuple[Path, list[str]], tmp_path: Path) -> None:
    extra = ("train.max_steps=24", "train.deterministic=true", "train.ema_decay=0.9", "mri_cycle_train.halve_every=10",
             "mri_cycle_train.adversarial_loss=wgan-gp")
    resumed, reference = sigkill_and_resume(lambda run: cycle_args(volumes, tmp_path, run, *extra), tmp_path, 24)
    assert reference["objective"] == "cycle" and reference["arch"] == "srrescycgan-tiny"
    # the whole SRResCycGAN is saved (both generators, both discriminators), and each of them trained
    start = build_volume_model("srrescycgan-tiny").state_dict()
    for part in ("g_hr.", "g_lr.", "d_hr.", "d_lr."):
        assert any(k.startswith(part) and not torch.equal(v, start[k]) for k, v in reference["params"].items()), part
    train = [e for e in log_entries(tmp_path / "reference") if e["kind"] == "train"]
    # Adam at 1e-4 halved every mri_cycle_train.halve_every (10) steps; a log at step s shows the rate of update s - 1
    assert [(e["step"], e["learning_rate"]) for e in train] == [(5, 1e-4), (10, 1e-4), (15, 5e-5), (20, 5e-5)]
    assert all(e["loss/d_hr"] + e["loss/d_lr"] == pytest.approx(e["loss/d_total"]) for e in train)
    assert all(e["loss/cycle"] > 0 and e["loss/tv"] > 0 for e in train)
    # mri-infer rebuilds it from the checkpoint and runs g_hr slice by slice: 4x in-plane, slices kept
    lr_dir, out = tmp_path / "lr", tmp_path / "sr"
    lr_dir.mkdir()
    np.save(lr_dir / "vol.npy", np.random.default_rng(0).random((10, 12, 3)).astype(np.float32) * 100)
    assert cli(["mri-infer", "run=reference", f"paths.models={tmp_path}", "--input", str(lr_dir), "--output",
                str(out), "mri_infer.tile=0"]) == 0
    assert np.load(out / "vol.npy").shape == (40, 48, 3)


def test_demo_mri_runs_every_stage_on_the_smallest_settings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out, models = tmp_path / "demo-mri", tmp_path / "models"
    assert cli(["demo-mri", f"demo_mri.out={out}", f"paths.models={models}", "demo_mri.pretrain_steps=6",
                "demo_mri.gan_steps=3", "train.val_every=3", "train.precision=fp32"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[-1].startswith("demo-mri: ours PSNR") and "vs tricubic" in lines[-1]
    assert load(models / "demo-mri" / "last.pth")["objective"] == "gan"
    assert load(models / "demo-mri" / "best.pth")["best_by"] == "psnr"
    assert load(models / "demo-mri-l1" / "last.pth")["step"] == 6
    table = np.genfromtxt(out / "scores" / "demo-mri.csv", delimiter=",", names=True, dtype=None, encoding=None)
    assert list(table["method"]) == ["demo-mri", "trilinear", "tricubic"] * 2
    report = (out / "report" / "demo-mri" / "report.md").read_text()
    assert "| tricubic | mean |" in report and "slices.png" in report
    assert (out / "report" / "demo-mri" / "slices.png").stat().st_size > 10_000
    assert (out / "sr" / "demo-mri" / "brain_0.nii.gz").is_file()  # baselines are rows of mri-evaluate, not files

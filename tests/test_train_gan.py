"""The GAN mode of the train stage on the generated 8x8-LR dataset of test_train.py (and the demo's
128-px patches where a VGG discriminator needs them): fine-tuning a PSNR run writes G and D, every
adversarial loss trains, SIGKILL + resume == uninterrupted (G, D, EMA), torchrun == one process,
NaN and collapse stop with one line and keep last.pth, perceptual loss from a local VGG19 file,
best.pth by LPIPS."""

from __future__ import annotations

import math
import signal
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from procs import assert_ok, kill_after_first_save, torchrun_and_alone
from test_train import load, log_entries, train_args
from torchvision.models import alexnet
from torchvision.models.vgg import cfgs, make_layers

from pipeline.cli import main as cli
from pipeline.core.config import Config, load_config
from pipeline.core.distributed import Dist
from pipeline.core.errors import UserError
from pipeline.models.checkpoint import model_from_checkpoint
from pipeline.models.discriminators import build_discriminator
from pipeline.training.losses import GeneratorLoss
from pipeline.training.objectives import D_KEYS, distributed_critic

GAN = ("gan.discriminator=unet-sn-nano",)

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: in-process runs match OMP_NUM_THREADS=1 ones


@pytest.fixture(scope="module")
def psnr_run(data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """best.pth of a 10-step PSNR run: where GAN runs start from."""
    models = tmp_path_factory.mktemp("psnr")
    assert cli(train_args(data, models, "psnr", "train.max_steps=10")) == 0
    return models / "psnr" / "best.pth"


def gan_args(data: Path, models: Path, run: str, start: Path, *extra: str) -> list[str]:  # noqa: F811
    return train_args(data, models, run, f"model.pretrained={start}", *GAN, *extra)


def error_lines(capsys: pytest.CaptureFixture) -> list[str]:
    """The CLI's error lines on stderr (the progress bar writes there too): the last line, and any other."""
    lines = capsys.readouterr().err.strip().splitlines()
    return [line for line in lines if line.startswith("error")] if lines and lines[-1].startswith("error") else lines


def train_values(run_dir: Path, key: str) -> list[float]:
    return [e[key] for e in log_entries(run_dir) if e["kind"] == "train"]


def test_gan_fine_tune_writes_generator_and_discriminator(data: Path, psnr_run: Path, tmp_path: Path) -> None:  # noqa: F811
    assert cli(gan_args(data, tmp_path, "gan", psnr_run, "train.max_steps=10", "train.keep_last=2")) == 0
    run = tmp_path / "gan"
    last, best = load(run / "last.pth"), load(run / "best.pth")
    assert last["objective"] == best["objective"] == "gan" and last["step"] == 10
    for state in (last, best, *(load(p) for p in sorted((run / "history").iterdir()))):
        disc = state["discriminator"]
        assert disc["arch"] == "unet-sn-nano" and disc["kwargs"]["num_feat"] == 4
        assert set(build_discriminator("unet-sn-nano").state_dict()) == set(disc["params"])
    assert {"d_optimizer", "d_scheduler", "d_scaler", "optimizer", "params", "params_ema"} <= set(last)
    assert sorted(p.name for p in (run / "history").iterdir()) == ["step_00000005.pth", "step_00000010.pth"]
    # best.pth is the last validation (no LPIPS weights given), a generator infer loads like any other
    assert best["best_by"] == "last" and best["step"] == 10 and best["psnr"] == log_entries(run)[-1]["val/psnr"]
    model, meta = model_from_checkpoint(run / "best.pth")
    assert meta["arch"] == "edsr-nano" and model(torch.rand(1, 3, 5, 6)).shape == (1, 3, 20, 24)
    for key in ("loss/total", "loss/l1", "loss/adversarial", *D_KEYS):
        assert all(math.isfinite(v) for v in train_values(run, key)), key
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set(EventAccumulator(str(run / "tb")).Reload().Tags()["scalars"])
    assert {"loss/total", "loss/adversarial", "loss/d_total", "loss/d_real", "loss/d_fake", "val/psnr"} <= tags
    assert (run / "curves.png").stat().st_size > 10_000

    # With the generator's learning rate at 0 it stays exactly the PSNR run's EMA weights; D still learns.
    assert cli(gan_args(data, tmp_path, "frozen", psnr_run, "train.max_steps=3", "train.learning_rate=0",
                        "train.scheduler=constant")) == 0
    frozen, start = load(tmp_path / "frozen" / "last.pth"), load(psnr_run)
    assert all(torch.equal(frozen["params"][k], v) for k, v in start["params_ema"].items())
    torch.manual_seed(0)  # the discriminator's first weights depend on the seed alone
    initial = build_discriminator("unet-sn-nano").state_dict()
    assert any(not torch.equal(frozen["discriminator"]["params"][k], v) for k, v in initial.items())


@pytest.mark.parametrize("loss,critic_steps", [("vanilla", 1), ("relativistic", 1), ("wgan-gp", 2)])
def test_each_adversarial_loss_trains(data: Path, psnr_run: Path, tmp_path: Path, loss: str,  # noqa: F811
                                      critic_steps: int) -> None:
    assert cli(gan_args(data, tmp_path, loss, psnr_run, "train.max_steps=5", f"gan.loss={loss}",
                        f"gan.critic_steps={critic_steps}")) == 0
    last = load(tmp_path / loss / "last.pth")
    # Adam counts its updates: critic_steps discriminator updates per generator update.
    assert {int(s["step"]) for s in last["d_optimizer"]["state"].values()} == {5 * critic_steps}
    assert {int(s["step"]) for s in last["optimizer"]["state"].values()} == {5}
    gp = train_values(tmp_path / loss, "loss/d_gp")[-1]
    assert (gp > 0) if loss == "wgan-gp" else (gp == 0)
    assert math.isfinite(train_values(tmp_path / loss, "loss/adversarial")[-1])


def test_sigkill_then_resume_gives_the_uninterrupted_generator_discriminator_and_ema(
        data: Path, psnr_run: Path, tmp_path: Path) -> None:  # noqa: F811
    extra = ("train.max_steps=40", "train.deterministic=true", "train.ema_decay=0.9", "gan.loss=wgan-gp",
             "gan.critic_steps=2")
    killed = tmp_path / "killed"
    code = kill_after_first_save([*gan_args(data, tmp_path, "killed", psnr_run, *extra), "train.workers=2"],
                                 killed / "last.pth", tmp_path / "killed.log",
                                 lambda: assert_ok(cli(gan_args(data, tmp_path, "reference", psnr_run, *extra))))
    assert code == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert 5 <= load(killed / "last.pth")["step"] < 40
    assert cli(gan_args(data, tmp_path, "killed", psnr_run, *extra)) == 0

    resumed, reference = load(killed / "last.pth"), load(tmp_path / "reference" / "last.pth")
    assert resumed["step"] == reference["step"] == 40
    for key in ("params", "params_ema"):
        for name, value in reference[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name}"
    for name, value in reference["discriminator"]["params"].items():
        assert torch.equal(resumed["discriminator"]["params"][name], value), f"discriminator.{name}"
    for index, moments in reference["d_optimizer"]["state"].items():
        assert torch.equal(resumed["d_optimizer"]["state"][index]["exp_avg"], moments["exp_avg"])
    steps = [(e["kind"], e["step"]) for e in log_entries(killed)]
    assert len(steps) == len(set(steps))


def test_torchrun_two_processes_match_one(data: Path, psnr_run: Path, tmp_path: Path) -> None:  # noqa: F811
    # The critic's losses and the penalty are means over samples (no batch norm in unet-sn), and the
    # penalty's interpolation is drawn for the global batch: 2 ranks x 2 samples do what 1 process does with 4.
    extra = ("train.max_steps=4", "train.deterministic=true", "train.val_every=2", "gan.loss=wgan-gp",
             "gan.critic_steps=2")
    torchrun_and_alone(lambda run: gan_args(data, tmp_path, run, psnr_run, *extra), tmp_path)
    assert "(DDP, gloo)" in (tmp_path / "ddp.log").read_text()
    ddp, single = load(tmp_path / "ddp" / "last.pth"), load(tmp_path / "single" / "last.pth")
    assert ddp["step"] == single["step"] == 4
    start = load(psnr_run)["params_ema"]
    assert any(not torch.equal(single["params"][k], v) for k, v in start.items())  # training moved G
    for key in ("params", "params_ema"):
        for name, value in single[key].items():
            torch.testing.assert_close(ddp[key][name], value, rtol=1e-4, atol=1e-6)
    for name, value in single["discriminator"]["params"].items():
        torch.testing.assert_close(ddp["discriminator"]["params"][name], value, rtol=1e-4, atol=1e-6)
    for key in ("loss/d_total", "loss/d_gp", "loss/adversarial"):
        assert train_values(tmp_path / "ddp", key) == pytest.approx(train_values(tmp_path / "single", key), rel=1e-4)


def test_batch_norm_discriminator_under_several_cpu_processes_is_refused() -> None:
    cpu = torch.device("cpu")
    with pytest.raises(UserError, match="vgg128-nano has batch norm.*vgg128-ln or unet-sn"):
        distributed_critic(build_discriminator("vgg128-nano"), Dist(0, 2, cpu, True), "vgg128-nano")
    one = build_discriminator("vgg128-nano")
    assert distributed_critic(one, Dist(0, 1, cpu, True), "vgg128-nano") is one  # one rank: nothing to mix
    unet = build_discriminator("unet-sn-nano")
    assert distributed_critic(unet, Dist(0, 2, cpu, True), "unet-sn-nano") is unet


def test_nan_stops_with_one_line_and_keeps_the_last_good_checkpoint(
        data: Path, psnr_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # noqa: F811
        capsys: pytest.CaptureFixture) -> None:
    original, calls = GeneratorLoss.forward, []

    def poisoned(self: GeneratorLoss, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        losses = original(self, *args, **kwargs)
        calls.append(1)
        if len(calls) >= 7:  # from the 7th step on: a NaN loss, so NaN gradients and weights
            losses["loss/total"] = losses["loss/total"] * math.nan
        return losses

    monkeypatch.setattr(GeneratorLoss, "forward", poisoned)
    # Caught at the log point of step 10 (last.pth from step 5) ...
    assert cli(gan_args(data, tmp_path, "nan", psnr_run, "train.max_steps=40")) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: loss/total is nan at step 10"), err
    assert "last.pth holds the last good state (step 5)" in err[0] and "gan.learning_rate" in err[0]
    # ... or by the save of step 8, before it could overwrite last.pth (step 4) with broken weights.
    calls.clear()
    assert cli(gan_args(data, tmp_path, "nan-save", psnr_run, "train.max_steps=40", "train.save_every=4")) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and "NaN or infinite by step 8" in err[0] and "(step 4)" in err[0], err
    for run, step in (("nan", 5), ("nan-save", 4)):
        last = load(tmp_path / run / "last.pth")
        assert last["step"] == step
        assert all(torch.isfinite(v).all() for v in last["params"].values())


def test_discriminator_collapse_stops_with_one_line(patched_demo: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    """Forced: the generator frozen (learning rate 0), a VGG discriminator with batch norm soon tells
    its images from HR with near certainty; the thresholds are lowered to fire within 30 steps."""
    args = train_args(patched_demo, tmp_path, "collapse", "train.max_steps=60", "train.learning_rate=0",
                      "train.scheduler=constant", "train.deterministic=true", "train.log_every=2",
                      "train.save_every=2", "train.val_every=1000", "gan.discriminator=vgg128-nano",
                      "gan.loss=vanilla", "gan.learning_rate=1e-2", "gan.collapse_points=3",
                      "gan.collapse_d_loss=0.01", "gan.collapse_g_loss=5")
    assert cli(args) == 2
    err = error_lines(capsys)
    assert len(err) == 1 and err[0].startswith("error: discriminator collapse at step "), err
    stop = int(err[0].split("step ")[1].split(":")[0])
    d, g = train_values(tmp_path / "collapse", "loss/d_total"), train_values(tmp_path / "collapse", "loss/adversarial")
    steps = [e["step"] for e in log_entries(tmp_path / "collapse") if e["kind"] == "train"]
    assert steps[-1] == stop < 60 and all(x <= 0.01 for x in d[-3:]) and all(x >= 5 for x in g[-3:])
    # Saves waited while the collapse was suspected: last.pth is from before its first sign.
    assert load(tmp_path / "collapse" / "last.pth")["step"] == stop - 3 * 2
    assert f"last.pth: step {stop - 6}" in err[0]


def _features_file(path: Path, config: str) -> Path:
    """A random-initialised torchvision VGG19 ``features`` state dict, named as in torchvision's file."""
    torch.manual_seed(0)
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs[config]).state_dict().items()}, path)
    return path


def test_perceptual_and_tv_terms_train_with_a_local_vgg19_file(data: Path, psnr_run: Path,  # noqa: F811
                                                               tmp_path: Path) -> None:
    vgg = _features_file(tmp_path / "vgg19-random.pth", "E")
    assert cli(gan_args(data, tmp_path, "esrgan", psnr_run, "train.max_steps=3", "train.log_every=3",
                        "loss.perceptual=1", f"loss.vgg_weights={vgg}", "loss.tv=0.1", "train.loss_mse=0")) == 0
    entry = [e for e in log_entries(tmp_path / "esrgan") if e["kind"] == "train"][-1]
    assert entry["loss/perceptual"] > 0 and entry["loss/tv"] > 0 and entry["loss/mse"] > 0  # mse logged, weight 0
    total = 2 * entry["loss/l1"] + entry["loss/perceptual"] + 0.1 * entry["loss/tv"] + 5e-3 * entry["loss/adversarial"]
    assert entry["loss/total"] == pytest.approx(total, rel=1e-5)


def test_best_pth_by_lpips_when_its_weights_are_given(data: Path, psnr_run: Path, tmp_path: Path) -> None:  # noqa: F811
    torch.manual_seed(0)
    backbone = tmp_path / "alexnet-random.pth"
    torch.save({k: v for k, v in alexnet(weights=None).state_dict().items() if k.startswith("features.")}, backbone)
    assert cli(gan_args(data, tmp_path, "lpips", psnr_run, "train.max_steps=20", "train.val_every=2",
                        f"evaluate.lpips_weights={backbone}", "gan.learning_rate=1e-2")) == 0
    val = [e for e in log_entries(tmp_path / "lpips") if e["kind"] == "val"]
    best = load(tmp_path / "lpips" / "best.pth")
    chosen = min(val, key=lambda e: (e["val/lpips"], e["step"]))
    assert best["best_by"] == "lpips" and best["step"] == chosen["step"] and best["lpips"] == chosen["val/lpips"]
    assert len({e["val/lpips"] for e in val}) > 1 and all(e["val/bicubic_lpips"] > 0 for e in val)


def test_gan_settings_that_cannot_work_are_one_line_errors(data: Path, psnr_run: Path, tmp_path: Path,  # noqa: F811
                                                            capsys: pytest.CaptureFixture) -> None:
    for extra, message in ((["gan.weight=0"], "gan.weight=0"),
                           (["train.compile=default"], "train.compile=default compiles PSNR runs only"),
                           (["gan.best=lpips"], "gan.best=lpips needs evaluate.lpips_weights"),
                           (["gan.discriminator=vgg128"], "takes 128x128 HR crops but training gives 16x16"),
                           (["gan.pretrained=nowhere/net_d.pth"], "nowhere/net_d.pth: checkpoint not found")):
        assert cli(gan_args(data, tmp_path, "bad", psnr_run, "train.max_steps=2", *extra)) == 2
        err = error_lines(capsys)
        assert len(err) == 1 and message in err[0], (extra, err)
    assert not (tmp_path / "bad").exists()
    # A PSNR run's folder does not turn into a GAN run: the fine-tune is a new run.
    assert cli(gan_args(data, tmp_path, "psnr-again", psnr_run, "train.max_steps=1", "gan.discriminator=")) == 0
    assert cli(gan_args(data, tmp_path, "psnr-again", psnr_run, "train.max_steps=2")) == 2
    assert "the state of a psnr run, but this is a gan run" in capsys.readouterr().err


def test_train_help_lists_the_loss_and_gan_sections(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli(["train", "--help"])
    out = capsys.readouterr().out
    for key in ("loss.perceptual", "loss.vgg_weights", "gan.discriminator", "gan.critic_steps", "gan.best",
                "gan.collapse_points", "discriminators (gan.discriminator): unet-sn"):
        assert key in out, key


class _Volumes(torch.utils.data.Dataset):
    """(index, seed) -> a (1,8,8,8) LR / HR volume pair: HR random, LR = HR plus seeded noise (same grid)."""

    def __init__(self, hr: torch.Tensor) -> None:
        self.hr = hr

    def __len__(self) -> int:
        return len(self.hr)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        index, seed = key
        noise = torch.randn(self.hr[index].shape, generator=torch.Generator().manual_seed(seed))
        return self.hr[index] + 0.1 * noise, self.hr[index]


@dataclass
class _VolumeValidation:
    """Mean PSNR (peak 1) over held-out volumes; the baseline is the LR volume itself."""

    lr: torch.Tensor
    hr: torch.Tensor
    baseline_name: str = "input"

    @property
    def size(self) -> int:
        return len(self.hr)

    def __call__(self, model: torch.nn.Module, dtype: torch.dtype | None) -> dict[str, float]:
        with torch.no_grad():
            mse = (model(self.lr) - self.hr).pow(2).flatten(1).mean(1)
        return {"psnr": float((-10 * torch.log10(mse)).mean())}

    def baseline(self) -> dict[str, float]:
        return self(torch.nn.Identity(), None)


def test_a_volume_task_plugs_into_the_same_trainer_and_gan_objective(tmp_path: Path) -> None:
    """The interface a 3-D task uses: its generator and critic from pipeline.mri.models' table,
    (B,1,D,H,W) batches in EpochBatches order, its own validation; the Trainer and the GAN objective
    (WGAN-GP with a 3-D critic) are the image task's."""
    from pipeline.mri.models import build_volume_model, volume_model_kwargs
    from pipeline.training.loader import EpochBatches, RunBatches
    from pipeline.training.run import run
    from pipeline.training.task import TrainTask

    def volume_task(cfg: Config, d: Dist) -> TrainTask:
        hr = torch.rand(10, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
        batches = EpochBatches(8, cfg.train.batch_size, cfg.seed, d.rank, d.world)
        loader = torch.utils.data.DataLoader(_Volumes(hr[:8]), batch_sampler=RunBatches(batches),
                                             generator=torch.Generator())
        val_lr = hr[8:] + 0.1 * torch.randn(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(2))
        return TrainTask(generator=build_volume_model("mdcsrn-tiny"), arch="mdcsrn-tiny",
                         kwargs=volume_model_kwargs("mdcsrn-tiny"), loader=loader, batches=batches,
                         to_device=lambda x: x.to(d.device), validation=_VolumeValidation(val_lr, hr[8:]),
                         discriminator=lambda name, loss: (build_volume_model(name), volume_model_kwargs(name)),
                         sample_pixels=8**3, description="8 volumes of 8^3 voxels")

    overrides = ["run=volume", f"paths.models={tmp_path}", "model.name=mdcsrn-tiny", "train.batch_size=2",
                 "train.max_steps=6", "train.val_every=3", "train.log_every=3", "train.save_every=3",
                 "train.val_share=0", "train.loss_l1=1", "train.loss_mse=0", "train.channels_last=false",
                 "gan.discriminator=critic3d-tiny", "gan.loss=wgan-gp", "gan.critic_steps=2"]
    run(load_config(None, overrides), volume_task)
    last = load(tmp_path / "volume" / "last.pth")
    assert last["arch"] == "mdcsrn-tiny" and last["discriminator"]["arch"] == "critic3d-tiny" and last["step"] == 6
    assert {int(s["step"]) for s in last["d_optimizer"]["state"].values()} == {12}
    assert all(v > 0 for v in train_values(tmp_path / "volume", "loss/d_gp"))
    val = [e for e in log_entries(tmp_path / "volume") if e["kind"] == "val"]
    assert [e["step"] for e in val] == [3, 6] and all(math.isfinite(e["val/input_psnr"]) for e in val)

"""The trainer's winning levers: train.phases (L1 then an L2 phase, exact resume in phase 2), a fine-tune
whose start competes for best.pth (also from a real published network), schedule-free AdamW and the
batch augmentations (MixUp, CutBlur), each resuming exactly after SIGKILL; a finite blow-up stops the run."""

from __future__ import annotations

import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from procs import ROOT, assert_ok, kill_after_first_save
from test_train import load, log_entries, train_args

from pipeline.cli import main as cli
from pipeline.core.config import load_config
from pipeline.core.errors import UserError
from pipeline.training.augment import BatchAugment
from pipeline.training.loop import Trainer
from pipeline.training.losses import GeneratorLoss, build_generator_loss
from pipeline.training.objectives import PixelObjective
from pipeline.training.phases import plan

CRAFT = ROOT.parent / "shared" / "weights" / "craft_x4_ntire2024_team34.pth"
PHASES = ("train.phases=[{name: l1, steps: 10, loss_l1: 1, loss_mse: 0, crop: 2}, "
          "{name: l2, steps: 20, loss_l1: 0, loss_mse: 1, crop: 0, learning_rate: 1e-3, batch_size: 8}]")

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def _sigkill_and_resume(data: Path, tmp_path: Path, steps: int, *extra: str) -> tuple[dict, dict]:
    """(last.pth of a run SIGKILLed after its first save and then resumed, last.pth of an uninterrupted run)."""
    killed = tmp_path / "killed"
    args = (*extra, "train.deterministic=true", "train.ema_decay=0.9")
    code = kill_after_first_save([*train_args(data, tmp_path, "killed", *args), "train.workers=1"],
                                 killed / "last.pth", tmp_path / "killed.log",
                                 lambda: assert_ok(cli(train_args(data, tmp_path, "reference", *args))))
    assert code == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    at_kill = load(killed / "last.pth")
    assert at_kill["step"] < steps
    assert cli(train_args(data, tmp_path, "killed", *args)) == 0
    resumed, reference = load(killed / "last.pth"), load(tmp_path / "reference" / "last.pth")
    assert resumed["step"] == reference["step"] == steps
    for key in ("params", "params_ema"):
        for name, value in reference[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name}"
    logged = [(e["kind"], e["step"]) for e in log_entries(killed)]
    assert len(logged) == len(set(logged))  # no step twice after the resume
    return at_kill, reference


# -- train.phases ---------------------------------------------------------------------------------------


def test_phases_are_planned_from_train_settings() -> None:
    cfg = load_config(None, [PHASES, "train.learning_rate=5e-3", "train.crop=3"])
    first, second = plan(cfg)
    assert (first.name, first.steps, second.name, second.steps) == ("l1", 10, "l2", 20)
    assert (first.cfg.train.loss_l1, first.cfg.train.loss_mse, first.cfg.train.crop) == (1.0, 0.0, 2)
    assert first.cfg.train.learning_rate == 5e-3  # unset in the phase: the run's
    assert (second.cfg.train.learning_rate, second.cfg.train.crop, second.cfg.train.batch_size) == (1e-3, 0, 8)
    assert second.cfg.train.phases == cfg.train.phases  # a phase's config still says how the run was made
    assert len(plan(load_config(None, []))) == 1
    with pytest.raises(UserError, match=r"train.phases\[0\] \(phase1\) needs steps or minutes"):
        plan(load_config(None, ["train.phases=[{loss_l1: 1}, {steps: 3}]"]))


def test_phases_resume_exactly_after_sigkill_in_the_second_phase(data: Path, tmp_path: Path) -> None:
    # The first save is at step 15 (train.save_every), 5 steps into phase l2: the kill lands in phase 2.
    at_kill, reference = _sigkill_and_resume(data, tmp_path, 30, PHASES, "train.save_every=15")
    assert at_kill["progress"]["phase"] == {"index": 1, "start_step": 10, "start_seconds": pytest.approx(
        at_kill["progress"]["phase"]["start_seconds"])} and at_kill["step"] >= 15
    entries = log_entries(tmp_path / "killed")
    assert all(e["phase"] == ("l1" if e["step"] <= 10 else "l2") for e in entries if e["kind"] != "phase")
    assert [(e["step"], e["phase"]) for e in entries if e["kind"] == "phase"] == [(0, "l1"), (10, "l2")]
    train = {e["step"]: e for e in entries if e["kind"] == "train"}
    assert train[10]["loss/total"] == pytest.approx(train[10]["loss/l1"])  # L1 phase: 1 x L1 + 0 x MSE
    assert train[20]["loss/total"] == pytest.approx(train[20]["loss/mse"])  # L2 phase: the MSE alone
    assert train[20]["learning_rate"] <= 1e-3  # the phase's own peak and schedule
    assert (tmp_path / "killed" / "curves.png").stat().st_size > 0


def test_a_phase_for_an_objective_that_runs_one_is_refused(data: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    args = train_args(data, tmp_path, "phases-gan", PHASES, "gan.discriminator=unet-sn-nano", "train.max_steps=2")
    assert cli(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "train.phases: the gan objective of this task runs one phase" in err[0]


# -- a fine-tune never ends worse than its start ---------------------------------------------------------


def test_a_fine_tune_keeps_its_start_when_training_ruins_it(data: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    assert cli(train_args(data, tmp_path, "base", "train.max_steps=40", "train.val_every=40")) == 0
    base = load(tmp_path / "base" / "best.pth")
    capsys.readouterr()
    # A learning rate of 1: the first steps wreck the weights; best.pth must stay the start's.
    assert cli(train_args(data, tmp_path, "ft", f"model.pretrained={tmp_path / 'base' / 'best.pth'}",
                          "train.learning_rate=1.0", "train.max_steps=6", "train.val_every=3")) == 0
    out = capsys.readouterr().out
    start = [e for e in log_entries(tmp_path / "ft") if e["kind"] == "val" and e["step"] == 0]
    assert len(start) == 1 and start[0]["val/psnr"] == pytest.approx(base["psnr"], abs=1e-6)  # the loaded weights
    best = load(tmp_path / "ft" / "best.pth")
    assert best["step"] == 0 and best["psnr"] >= max(e["val/psnr"] for e in log_entries(tmp_path / "ft")
                                                     if e["kind"] == "val")
    assert f"start {start[0]['val/psnr']:.3f} dB -> best {best['psnr']:.3f} dB" in out


@pytest.mark.skipif(not CRAFT.is_file(), reason=f"the published CRAFT weights are not at {CRAFT}")
def test_a_published_network_fine_tuned_far_too_fast_keeps_its_start(patched_demo: Path, tmp_path: Path) -> None:
    models = tmp_path / "m"
    assert cli(["train", "--data", str(patched_demo), f"paths.models={models}", "run=craft",
                f"model.pretrained={CRAFT}", "train.learning_rate=1e-2", "train.max_steps=2", "train.val_every=2",
                "train.batch_size=2", "train.crop=16", "train.workers=0", "train.precision=fp32"]) == 0
    vals = [e for e in log_entries(models / "craft") if e["kind"] == "val"]
    assert [e["step"] for e in vals] == [0, 2]
    start = vals[0]["val/psnr"]
    assert start > vals[0]["val/bicubic_psnr"]  # the published network beats bicubic before any step
    assert load(models / "craft" / "best.pth")["psnr"] >= start


# -- blow-ups -------------------------------------------------------------------------------------------


def test_a_finite_blowup_stops_the_run_and_keeps_the_weights_from_before(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    original, calls = GeneratorLoss.forward, []

    def blown(self: GeneratorLoss, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        losses = original(self, *args, **kwargs)
        calls.append(1)
        # From step 11 on the loss is 1000x (finite: no NaN check sees it; Adam's steps keep their size).
        return {key: value * 1000 for key, value in losses.items()} if len(calls) > 10 else losses

    monkeypatch.setattr(GeneratorLoss, "forward", blown)
    assert cli(train_args(data, tmp_path, "blown", "train.max_steps=40")) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and err[0].startswith("error: training blew up at step 15: loss/total "), err
    assert "train.blowup=10" in err[0] and "for 5 log point(s)" in err[0] and "last.pth: step 10" in err[0], err
    last, best = load(tmp_path / "blown" / "last.pth"), load(tmp_path / "blown" / "best.pth")
    assert last["step"] == 10 and best["step"] <= 10  # saved before the blow-up, not after it
    calls.clear()
    assert cli(train_args(data, tmp_path, "unchecked", "train.max_steps=20", "train.blowup=0")) == 0  # 0 = off
    assert load(tmp_path / "unchecked" / "last.pth")["step"] == 20


def test_a_spike_that_comes_back_is_survived_and_saves_wait_while_it_lasts(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Steps 11-20 at 1000x the loss (two log points above train.blowup), then the real loss again: the run
    goes on to its step limit and says so; the save at step 15 waited, the one at step 20 too (still in the spike)."""
    original, calls = GeneratorLoss.forward, []

    def spiked(self: GeneratorLoss, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        losses = original(self, *args, **kwargs)
        calls.append(1)
        return {key: value * 1000 for key, value in losses.items()} if 10 < len(calls) <= 20 else losses

    monkeypatch.setattr(GeneratorLoss, "forward", spiked)
    saved: list[int] = []
    save = Trainer.save
    monkeypatch.setattr(Trainer, "save", lambda self, **kw: (saved.append(self.step), save(self, **kw))[1])
    assert cli(train_args(data, tmp_path, "spiked", "train.max_steps=40", "train.blowup_points=3")) == 0
    out = capsys.readouterr().out
    assert "step 15: a loss spike (" in out and "came back below 10x within 2 log point(s)" in out, out
    assert load(tmp_path / "spiked" / "last.pth")["step"] == 40
    assert 15 not in saved and 20 not in saved and {10, 25, 30} <= set(saved)


def test_a_phase_of_another_loss_mix_measures_blowups_afresh() -> None:
    l1 = load_config(None, ["train.loss_l1=1", "train.loss_mse=0"])
    l2 = load_config(None, ["train.loss_l1=0", "train.loss_mse=1"])
    cpu = torch.device("cpu")
    objective = PixelObjective(build_generator_loss(l1), None, 10.0)  # (no schedule: only its checks run)
    assert objective.diverged({"loss/total": 0.05}, 5) is None
    assert objective.diverged({"loss/total": 0.4}, 10) is None  # 8x the lowest: within train.blowup
    objective.enter_phase(l1, cpu)  # the same mix: the lowest stays
    assert "blew up at step 15: loss/total stayed above 10x the lowest so far (0.05) for 1 log point(s) (now 0.6, 12x" \
        in (objective.diverged({"loss/total": 0.6}, 15) or "")
    objective.enter_phase(l2, cpu)  # MSE: another scale
    assert objective.diverged({"loss/total": 0.004}, 20) is None
    objective.enter_phase(l1, cpu)
    assert objective.diverged({"loss/total": 0.06}, 25) is None  # 15x the L2 phase's lowest, but L1 again
    off = PixelObjective(build_generator_loss(l1), None, 0.0)
    assert off.diverged({"loss/total": 0.01}, 5) is None and off.diverged({"loss/total": 100.0}, 10) is None


# -- schedule-free AdamW and batch augmentations ---------------------------------------------------------


def test_schedule_free_with_mixup_and_cutblur_resumes_exactly(data: Path, tmp_path: Path) -> None:
    at_kill, reference = _sigkill_and_resume(
        data, tmp_path, 30, "train.max_steps=30", "train.optimizer=adamw-schedulefree", "train.warmup_steps=5",
        "train.batch_aug=[mixup, cutblur]", "train.batch_aug_prob=1.0")
    assert {"z", "exp_avg_sq"} <= set(next(iter(reference["optimizer"]["state"].values())))  # schedule-free state
    assert not reference["optimizer"]["param_groups"][0]["train_mode"]  # saved as evaluated: the averaged weights
    assert reference["scheduler"] == {}  # no schedule to fit to a budget


def test_mixup_keeps_pairs_consistent_and_is_a_function_of_the_step() -> None:
    gen = torch.Generator().manual_seed(0)
    hr = torch.rand(4, 3, 16, 16, generator=gen)
    lr = F.avg_pool2d(hr, 4)  # a linear downscale, as bicubic is
    mix = BatchAugment(("mixup",), 1.0, seed=3)
    lr_a, hr_a = mix(lr, hr, step=7)
    torch.testing.assert_close(lr_a, F.avg_pool2d(hr_a, 4))  # the mixed LR is the LR of the mixed HR
    assert not torch.equal(hr_a, hr)
    lr_b, hr_b = mix(lr, hr, step=7)
    assert torch.equal(lr_a, lr_b) and torch.equal(hr_a, hr_b)  # (seed, step) decide, nothing else
    assert BatchAugment(("mixup",), 0.0, seed=3)(lr, hr, 7)[0] is lr  # probability 0: untouched


def test_cutblur_puts_hr_detail_in_one_box_of_the_input() -> None:
    gen = torch.Generator().manual_seed(1)
    hr = torch.rand(2, 3, 40, 40, generator=gen)
    lr = torch.rand(2, 3, 10, 10, generator=gen)
    sharp = F.avg_pool2d(hr, 4)  # HR detail on the LR grid
    for step in range(6):
        out, target = BatchAugment(("cutblur",), 1.0, seed=0)(lr, hr, step)
        assert torch.equal(target, hr)  # the target stays HR
        from_hr = np.isclose(out.numpy(), sharp.numpy()).all(axis=(0, 1))  # (10,10): pixels taken from the HR
        from_lr = np.isclose(out.numpy(), lr.numpy()).all(axis=(0, 1))
        assert (from_hr | from_lr).all()
        inside = from_hr if from_hr.sum() <= from_lr.sum() else from_lr  # the box is the smaller part here
        rows, cols = np.nonzero(inside)
        assert inside[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()  # one rectangle
        assert math.sqrt(inside.sum() / 100) == pytest.approx(0.7, abs=0.05)  # ~70% of each side

"""Settings checked as a whole before any work, and messages that name the real culprit: every value of a
list setting, bounds on every count, every phase of train.phases against the data before the first step,
resumes across optimizer changes and without a fine-tune's pretrained file, and the errors a run can end
with. Each case runs the stage through the CLI: one line, a non-zero exit, nothing half-written."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from spandrel.architectures.SPAN import SPAN
from test_safety import _dataset, _one_line, _save_nano, _smooth, _train, _tree, trainable  # noqa: F401 (fixture)

from pipeline.cli import main as cli
from pipeline.core.errors import UserError
from pipeline.core.images import read_uint8, write_png
from pipeline.models.table import build_model

FP32 = "train.precision=fp32"


def _log(models: Path) -> list[dict]:
    return [json.loads(line) for line in (models / "r" / "log.jsonl").read_text().splitlines()]


# -- window weights: normalised before they meet an image; non-finite values refused by name ------------------


def test_tiny_and_huge_window_weights_give_the_equal_weights_image(tmp_path: Path) -> None:
    lr_dir = tmp_path / "lr"
    write_png(lr_dir / "a.png", _smooth(12, 16, 0))
    weights = tmp_path / "nano.pth"
    _save_nano(weights)

    def infer(name: str, *extra: str) -> np.ndarray:
        assert cli(["infer", f"model.weights={weights}", "--input", str(lr_dir), "--output", str(tmp_path / name),
                    "infer.windows=[8/4, 0]", "infer.tta=1", "infer.precision=fp32", *extra]) == 0
        return read_uint8(tmp_path / name / "a.png")

    equal = infer("equal")
    assert 60 < equal.mean() < 200
    # 1e-45 x a pixel underflows in float32; 3e38 + 3e38 overflows it: both are equal weights.
    assert np.array_equal(infer("tiny", "infer.window_weights=[1e-45, 1e-45]"), equal)
    assert np.array_equal(infer("huge", "infer.window_weights=[3e38, 3e38]"), equal)


@pytest.mark.parametrize("setting,message", [
    ("infer.window_weights=[.inf, 1]", "infer.window_weights[0]=inf is not a finite float32 number"),
    ("infer.window_weights=[1, 1e300]", "infer.window_weights[1]=1e+300 is not a finite float32 number"),
    ("infer.window_weights=[1, .nan]", "infer.window_weights[1]: nan is not a number"),
    ("infer.window_weights=[1, -2]", "infer.window_weights[1]=-2.0 must be >= 0"),
    ("mri.kspace_keep=[.nan, 1, 1]", "mri.kspace_keep[0]: nan is not a number"),
])
def test_every_value_of_a_list_setting_is_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str,
                                                  message: str) -> None:
    lr_dir = tmp_path / "lr"
    write_png(lr_dir / "a.png", _smooth(8, 8, 0))
    assert cli(["infer", "model.name=bicubic", "--input", str(lr_dir), "--output", str(tmp_path / "o"),
                "infer.windows=[8/4, 0]", setting]) == 2
    assert message in _one_line(capsys)
    assert not (tmp_path / "o").exists()


# -- counts a user can type have caps ---------------------------------------------------------------------------


@pytest.mark.parametrize("setting,message", [
    ("blend.greedy_rounds=1000000000", "blend.greedy_rounds=1000000000 must be <= 10000"),
    ("gan.critic_steps=100000", "gan.critic_steps=100000 must be <= 100"),
    ("train.prefetch=100000", "train.prefetch=100000 must be <= 64"),
    ("train.log_every=1000000000", "train.log_every=1000000000 must be <= 10000"),
    ("train.profile_steps=1000000", "train.profile_steps=1000000 must be <= 1000"),
    ("demo.seed=-1", "demo.seed=-1 must be >= 0"),
    ("train.learning_rate=3e38", "train.learning_rate=3e+38 must be <= 10"),  # (Adam's step size overflowed)
    ("train.max_steps=100000000000000000000", "train.max_steps=100000000000000000000 does not fit a 64-bit integer"),
])
def test_counts_have_caps(tmp_path: Path, capsys: pytest.CaptureFixture[str], setting: str, message: str) -> None:
    assert cli(["blend", "--data", str(tmp_path), setting]) == 2
    assert message in _one_line(capsys)
    with pytest.raises(SystemExit):
        cli(["blend", "--help"])
    assert "at most 10000: weights in steps of 1e-4" in capsys.readouterr().out  # the cap says why in the help


# -- train: crops, phases and blowup checked before the first step ---------------------------------------------


@pytest.mark.parametrize("settings,message", [
    (["train.crop=1"], "train.crop=1: too small to train edsr-nano on: its samples need >= 2 LR pixels"),
    (["train.crop=2", "model.name=swinir-nano"], "train.crop=2: too small to train swinir-nano on: its samples need "
                                                 ">= 4 LR pixels per side (smaller ones would be mostly its padding)"),
    (["train.phases=[{steps: 2}, {steps: 2, crop: 1}]"], "train.phases[1] (phase2): train.crop=1: too small"),
])
def test_a_crop_too_small_for_the_model_is_one_line(trainable: Path, tmp_path: Path,  # noqa: F811
                                                    capsys: pytest.CaptureFixture[str], settings: list[str],
                                                    message: str) -> None:
    assert _train(trainable, tmp_path / "models", FP32, *settings) == 2
    assert message in _one_line(capsys)
    assert not (tmp_path / "models" / "r").exists()


@pytest.mark.parametrize("phase,message", [
    ("{steps: 2, crop: 64}", "train.phases[1] (phase2): train.crop=64 is larger than the LR patches (8 px"),
    ("{steps: 2, batch_size: 100}", "train.phases[1] (phase2): only 16 training patches for train.batch_size=100"),
    ('{steps: 2, name: "l2\\nsecond line"}', "train.phases[1].name='l2\\nsecond line': a phase name is one line"),
])
def test_every_phase_is_checked_before_the_first_step(trainable: Path, tmp_path: Path,  # noqa: F811
                                                      capsys: pytest.CaptureFixture[str], phase: str,
                                                      message: str) -> None:
    assert _train(trainable, tmp_path / "models", FP32, f"train.phases=[{{steps: 2}}, {phase}]") == 2
    assert message in _one_line(capsys)
    assert not (tmp_path / "models" / "r").exists()  # refused before phase 1 trained: nothing to lose


@pytest.mark.parametrize("blowup", ["0.5", "1e-30", "1"])
def test_a_blowup_factor_below_one_is_refused(trainable: Path, tmp_path: Path,  # noqa: F811
                                              capsys: pytest.CaptureFixture[str], blowup: str) -> None:
    assert _train(trainable, tmp_path / "models", FP32, f"train.blowup={blowup}") == 2
    assert "would stop a healthy run at its first loss above the lowest so far" in _one_line(capsys)
    assert not (tmp_path / "models" / "r").exists()


def test_blowup_zero_stays_off(trainable: Path, tmp_path: Path) -> None:  # noqa: F811
    assert _train(trainable, tmp_path / "models", FP32, "train.blowup=0") == 0


# -- resumes -------------------------------------------------------------------------------------------------------


def test_a_resume_with_another_optimizer_is_one_line(trainable: Path, tmp_path: Path,  # noqa: F811
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    for first, second in (("adam", "adamw-schedulefree"), ("adamw-schedulefree", "adamw")):
        models = tmp_path / first
        assert _train(trainable, models, FP32, f"train.optimizer={first}") == 0
        before = _tree(models)
        capsys.readouterr()
        assert _train(trainable, models, FP32, f"train.optimizer={second}", "train.max_steps=8") == 2
        line = _one_line(capsys)
        assert f"saved by train.optimizer={first}, but this start uses train.optimizer={second}" in line
        assert f"model.pretrained={models / 'r' / 'last.pth'}" in line  # how to start afresh from its weights
        assert _tree(models) == before


def test_a_detected_fine_tune_resumes_after_its_pretrained_file_is_gone(trainable: Path, tmp_path: Path,  # noqa: F811
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    published = tmp_path / "span_x4.pth"  # a SPAN of a size no table preset has: built as spandrel:SPAN
    torch.save({"params": SPAN(num_in_ch=3, num_out_ch=3, feature_channels=6, upscale=4).state_dict()}, published)
    models = tmp_path / "models"
    assert _train(trainable, models, FP32, f"model.pretrained={published}") == 0
    published.unlink()  # moved or deleted after the first session
    capsys.readouterr()
    # Without model.pretrained: the line says how to resume.
    assert _train(trainable, models, FP32, "train.max_steps=8") == 2
    assert (f"a spandrel:SPAN run started from model.pretrained={published}, but this start builds edsr-nano: "
            f"resume it with model.pretrained={published}") in _one_line(capsys)
    # With it: last.pth holds the architecture and the weights, so the run resumes.
    assert _train(trainable, models, FP32, "train.max_steps=8", f"model.pretrained={published}") == 0
    out = capsys.readouterr().out
    assert f"model.pretrained={published} is gone: spandrel:SPAN rebuilt from {models / 'r' / 'last.pth'}" in out
    assert f"resuming {models / 'r' / 'last.pth'} at step 4" in out
    assert torch.load(models / "r" / "last.pth", weights_only=True)["step"] == 8


def test_a_resume_at_a_phase_boundary_writes_each_row_once(trainable: Path, tmp_path: Path,  # noqa: F811
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.training import phases

    models = tmp_path / "models"
    args = ["train.phases=[{steps: 4}, {steps: 4}]", "train.max_steps=0", "train.val_every=1000", FP32]
    enter = phases.PhaseTracker.enter

    def killed(*_args: object, **_kwargs: object) -> str:
        raise KeyboardInterrupt  # killed after phase 1's last validation, before phase 2 began
    monkeypatch.setattr(phases.PhaseTracker, "enter", killed)
    assert _train(trainable, models, *args) == 130
    assert [(e["step"], e["kind"]) for e in _log(models) if e["kind"] != "train"] == [(0, "phase"), (4, "val")]
    monkeypatch.setattr(phases.PhaseTracker, "enter", enter)
    assert _train(trainable, models, *args) == 0  # resumes last.pth (step 4, saved before that validation)
    rows = [(e["step"], e["kind"]) for e in _log(models) if e["kind"] != "train"]
    assert rows == [(0, "phase"), (4, "val"), (4, "phase"), (8, "val")]


def test_a_phase_at_learning_rate_zero_trains_at_zero(trainable: Path, tmp_path: Path) -> None:  # noqa: F811
    models = tmp_path / "models"
    assert _train(trainable, models, FP32, "train.max_steps=0",
                  "train.phases=[{steps: 4}, {name: still, steps: 4, learning_rate: 0}]") == 0
    rates = [e["learning_rate"] for e in _log(models) if e["kind"] == "train" and e.get("phase") == "still"]
    assert rates == [0.0, 0.0]  # not train.min_learning_rate


# -- what a diverged run blames ------------------------------------------------------------------------------------


def test_weights_that_give_nan_are_blamed_not_the_learning_rate(trainable: Path, tmp_path: Path,  # noqa: F811
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    weights = build_model("edsr-nano").state_dict()
    first = weights["conv_first.weight"]
    first.copy_(torch.where(torch.arange(first.numel()).reshape(first.shape) % 2 == 0, 3e38, -3e38))  # finite
    pretrained = tmp_path / "overflowing.pth"
    torch.save({"params": weights}, pretrained)
    assert _train(trainable, tmp_path / "models", FP32, f"model.pretrained={pretrained}") == 2
    line = _one_line(capsys)
    assert f"NaN/Inf from the weights in model.pretrained={pretrained}" in line
    assert "not from the learning rate" in line and "lower the learning rate" not in line


def test_nan_inside_a_phase_names_the_phase_rate_and_best_pth(trainable: Path, tmp_path: Path,  # noqa: F811
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.training.objectives import PixelObjective

    step = PixelObjective.step

    def nan_in_hot(self: PixelObjective, tr, lr: torch.Tensor, hr: torch.Tensor) -> dict[str, torch.Tensor]:
        losses = step(self, tr, lr, hr)  # the update ran; its loss is reported as NaN in phase "hot"
        return {k: v * math.nan for k, v in losses.items()} if tr.phases.current.name == "hot" else losses
    monkeypatch.setattr(PixelObjective, "step", nan_in_hot)
    models = tmp_path / "models"
    assert _train(trainable, models, FP32, "train.max_steps=0", "train.save_every=1000", "train.val_every=1000",
                  "train.phases=[{steps: 4}, {name: hot, steps: 8, learning_rate: 1e-3}]") == 2
    line = _one_line(capsys)
    assert "loss/total is nan at step 6 (phase 2 (hot), train.phases[1].learning_rate=0.001, precision fp32" in line
    assert f"{models / 'r' / 'best.pth'} the best validated weights" in line and "nothing was saved" not in line


# -- messages of other stages --------------------------------------------------------------------------------------


def test_evaluate_vs_names_one_image_and_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    hr = _smooth(32, 32, 0)
    write_png(tmp_path / "hr" / "a.png", hr)
    write_png(tmp_path / "sr" / "a.png", np.clip(hr.astype(int) + 3, 0, 255).astype(np.uint8))
    write_png(tmp_path / "vs" / "a.png", np.clip(hr.astype(int) + 9, 0, 255).astype(np.uint8))
    args = ["evaluate", "--sr", str(tmp_path / "sr"), "--hr", str(tmp_path / "hr")]
    assert cli([*args, "--vs", str(tmp_path / "vs")]) == 0
    gain = [line for line in capsys.readouterr().out.splitlines() if line.startswith("gain of ")]
    assert len(gain) == 1 and "one image gives no interval" in gain[0] and "95% CI" not in gain[0]
    assert cli([*args, "--vs", str(tmp_path / "vs" / "a.png")]) == 2
    assert f"{tmp_path / 'vs' / 'a.png'}: is a file, not a folder of images" in _one_line(capsys)


def test_a_pretrained_file_that_is_a_device_says_so(trainable: Path, tmp_path: Path,  # noqa: F811
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    assert _train(trainable, tmp_path / "models", "model.pretrained=/dev/null") == 2
    assert "/dev/null: not a regular file (a device, a pipe or a socket)" in _one_line(capsys)


def test_blend_weights_must_be_numbers_not_booleans(tmp_path: Path) -> None:
    from pipeline.inference.blend import read_blend

    path = tmp_path / "blend.yaml"
    path.write_text("members: [a, b]\nweights: [true, false]\n")
    with pytest.raises(UserError, match=r"blend.yaml: weights must be numbers \(got \[True, False\]\)"):
        read_blend(path, "x")
    path.write_text("members: [a, b]\nweights: [0.25, 0.75]\n")
    assert read_blend(path, "x").weights == (0.25, 0.75)
    assert math.isclose(sum(read_blend(path, "x").weights), 1)

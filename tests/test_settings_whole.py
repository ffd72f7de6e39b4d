"""Settings checked as a whole before any work, and messages that name the real culprit: every value of a
list setting, bounds on every count, every phase of train.phases against the data before the first step,
resumes across optimizer changes and without a fine-tune's pretrained file, and the errors a run can end
with. Each case runs the stage through the CLI: one line, a non-zero exit, nothing half-written."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from test_safety import _dataset, _one_line, _save_nano, _smooth, _train, _tree, trainable  # noqa: F401 (fixture)

from pipeline.cli import main as cli
from pipeline.core.images import read_uint8, write_png

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



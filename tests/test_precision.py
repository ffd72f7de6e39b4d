"""The precision policy: what `auto` trains in, per device and kind of run, whatever this CPU is.

Every expectation here is taken with ``SR_BF16`` set, so the outcome never depends on the machine's
bf16 instructions (the suite itself runs with SR_BF16=force and SR_BF16=forbid in CI's checks).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.core.errors import UserError
from pipeline.core.runtime import BF16_ENV, BF16_STABLE, RunKind, cpu_bf16, train_precision

CPU, CUDA = torch.device("cpu"), torch.device("cuda", 0)
BIG = 16 * 128**2  # LR pixels of a step the GPU rule takes as large


@pytest.fixture
def forced(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BF16_ENV, "force")


def test_the_environment_forces_or_forbids_native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(BF16_ENV, "forbid")
    assert cpu_bf16() == "emulated"
    assert train_precision(CPU, "auto", RunKind(), BIG).dtype is None
    monkeypatch.setenv(BF16_ENV, "force")
    assert cpu_bf16() in ("amx", "avx512_bf16")
    monkeypatch.setenv(BF16_ENV, "sometimes")
    with pytest.raises(UserError, match="SR_BF16='sometimes'"):
        cpu_bf16()


def test_auto_trains_in_bf16_only_where_measured_stable(forced: None) -> None:
    image = train_precision(CPU, "auto", RunKind("image", "psnr"), BIG)
    where = f"cpu-{cpu_bf16()}"
    assert image.dtype is torch.bfloat16 and BF16_STABLE[(where, "image psnr")] in image.why
    # 3-D convolutions: fp32 on every CPU (a oneDNN bf16 kernel returned NaN on AVX-512 BF16, unmeasured on AMX)
    for kind in (RunKind("volume", "psnr"), RunKind("volume", "gan", "wgan-gp")):
        assert train_precision(CPU, "auto", kind, BIG).dtype is None
    # kinds nobody measured in bf16: fp32, and the reason says so
    gan = train_precision(CPU, "auto", RunKind("image", "gan", "wgan-gp"), BIG)
    assert gan.dtype is None and "image gan wgan-gp" in gan.why
    assert train_precision(CPU, "auto", RunKind("image", "cycle"), BIG).dtype is None


def test_explicit_settings_and_determinism_override_the_policy(forced: None) -> None:
    volume = RunKind("volume", "gan", "wgan-gp")
    assert train_precision(CPU, "bf16", volume, 1).dtype is torch.bfloat16  # the user's explicit choice
    assert train_precision(CPU, "fp32", RunKind(), BIG).dtype is None
    deterministic = train_precision(CPU, "auto", RunKind(), BIG, deterministic=True)
    assert deterministic.dtype is None and "deterministic" in deterministic.why


def test_cuda_follows_the_step_size_and_the_measured_kinds() -> None:
    if not torch.cuda.is_available():
        # the rule itself, without a GPU: only the dtype lookup needs the device
        small = train_precision(CUDA, "auto", RunKind(), 16 * 64**2)
        assert small.dtype is None and "launch-bound" in small.why
        gan = train_precision(CUDA, "auto", RunKind("image", "gan", "vanilla"), BIG)
        assert gan.dtype is None and "not measured" in gan.why
        return
    assert train_precision(CUDA, "auto", RunKind(), BIG).dtype in (torch.bfloat16, torch.float16)


@pytest.mark.parametrize("setting, expected", [("forbid", "fp32 (auto: this CPU has no native bf16"),
                                               ("force", "bf16 (auto: image psnr runs measured stable in bf16")])
def test_the_first_line_of_a_run_says_which_precision_and_why(
        data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        setting: str, expected: str) -> None:
    from pipeline.cli import main as cli

    monkeypatch.setenv(BF16_ENV, setting)
    assert cli(["train", "--data", str(data), "run=p", f"paths.models={tmp_path}", "model.name=edsr-nano",
                "train.batch_size=4", "train.workers=0", "train.max_steps=2", "train.val_every=2"]) == 0
    first = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("train "))
    assert expected in first

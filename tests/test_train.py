"""The train stage on a generated dataset of 8x8 LR images: augmentation alignment, data order, loss,
checkpoints and pretrained weights, SIGKILL + resume == uninterrupted, torchrun == one process."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from procs import assert_ok, kill_after_first_save, torchrun_and_alone

from pipeline import train
from pipeline.cli import main as cli
from pipeline.core.compat import imresize
from pipeline.core.config import load_config
from pipeline.core.distributed import Dist
from pipeline.core.errors import UserError
from pipeline.core.images import to_uint8
from pipeline.core.runtime import seed_everything
from pipeline.models.checkpoint import model_from_checkpoint
from pipeline.models.table import build_model
from pipeline.train import build_trainable
from pipeline.training.loader import EpochBatches
from pipeline.training.patch_data import PairAugment
from pipeline.training.updates import build_optimizer

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_KEYS = {"params", "params_ema", "arch", "kwargs", "step", "epoch", "best_psnr", "optimizer", "scheduler",
                   "scaler", "rng", "config"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def train_args(data: Path, models: Path, run: str, *extra: str) -> list[str]:
    """16 training patches, batch 4: 4 steps per epoch; validation on 2 whole images every 5 steps
    (validation's time share does not stretch the cadence: train.val_share=0)."""
    return ["train", "--data", str(data), f"run={run}", f"paths.models={models}", "model.name=edsr-nano",
            "train.batch_size=4", "train.workers=0", "train.val_every=5", "train.log_every=5",
            "train.save_every=5", "train.learning_rate=5e-3", "train.val_share=0", *extra]


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def log_entries(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


# -- augmentation and data order ----------------------------------------------------------------------


def index_pair(h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """LR whose pixels are all different (channels: row, column, serial) and the HR with each LR pixel
    repeated over its 4x4 block: aligned iff every HR block is constant and equals its LR pixel."""
    yy, xx = np.mgrid[0:h, 0:w]
    lr = np.stack([yy, xx, yy * w + xx], axis=2).astype(np.uint8)
    return lr, np.repeat(np.repeat(lr, 4, axis=0), 4, axis=1)


def assert_aligned(lr: np.ndarray, hr: np.ndarray) -> None:
    assert hr.shape == (4 * lr.shape[0], 4 * lr.shape[1], 3)
    blocks = hr.reshape(lr.shape[0], 4, lr.shape[1], 4, 3)  # (4h,4w,3) -> (h,4,w,4,3)
    assert (blocks == lr[:, None, :, None, :]).all()


def test_augmentation_keeps_lr_and_hr_aligned_for_all_8_transforms() -> None:
    lr, hr = index_pair(5, 7)  # non-square: a transposing transform changes the shape
    augment = PairAugment(crop=0, scale=4, dihedral=True)
    outputs = {}
    for seed in range(200):
        lr_aug, hr_aug = augment(lr, hr, seed)
        assert_aligned(lr_aug, hr_aug)
        outputs[lr_aug.tobytes() + bytes(lr_aug.shape)] = lr_aug
        np.testing.assert_array_equal(augment(lr, hr, seed)[0], lr_aug)  # a function of the seed alone
    assert len(outputs) == 8  # all of the dihedral group, and nothing else


def test_augmented_hr_still_downscales_to_its_lr(data: Path) -> None:
    from pipeline.core.images import read_uint8

    lr, hr = read_uint8(data / "train/lr/0003.png"), read_uint8(data / "train/hr/0003.png")
    augment = PairAugment(crop=0, scale=4, dihedral=True)
    for seed in range(16):
        lr_aug, hr_aug = augment(lr, hr, seed)
        down = to_uint8(imresize(hr_aug.astype(np.float64) / 255, 1 / 4))  # MATLAB bicubic is symmetric
        assert np.abs(down.astype(int) - lr_aug.astype(int)).max() <= 1


def test_random_crop_is_aligned_at_4x() -> None:
    lr, hr = index_pair(6, 6)
    augment = PairAugment(crop=3, scale=4, dihedral=False)
    corners = set()
    for seed in range(50):
        lr_c, hr_c = augment(lr, hr, seed)
        assert lr_c.shape == (3, 3, 3)
        assert_aligned(lr_c, hr_c)
        corners.add((int(lr_c[0, 0, 0]), int(lr_c[0, 0, 1])))
    assert len(corners) > 4  # the crop moves
    with pytest.raises(UserError, match="train.crop"):
        PairAugment(crop=7, scale=4, dihedral=False)(lr, hr, 0)


def test_data_order_is_a_function_of_seed_and_epoch_sharded_like_one_process() -> None:
    one = EpochBatches(n=10, batch_size=4, seed=3)
    assert one.steps_per_epoch == 2 and EpochBatches(10, 4, 3).order(5)[0].tolist() == one.order(5)[0].tolist()
    assert one.order(0)[0].tolist() != one.order(1)[0].tolist()
    one.set_position(epoch=1, start=0)
    whole = list(one)
    one.set_position(epoch=1, start=1)
    assert list(one) == whole[1:]  # a resume mid-epoch continues at the exact sample
    ranks = [EpochBatches(10, 4, 3, rank=r, world=2) for r in range(2)]
    for r in ranks:
        r.set_position(1, 0)
    shards = [list(r) for r in ranks]
    assert [a + b for a, b in zip(*shards)] == whole
    with pytest.raises(UserError, match="batch_size"):
        EpochBatches(10, 3, 0, world=2)


# -- training runs ------------------------------------------------------------------------------------


def test_loss_falls_and_run_folder_is_complete(data: Path, tmp_path: Path) -> None:
    assert cli(train_args(data, tmp_path, "fall", "train.max_steps=40", "train.keep_last=2")) == 0
    run = tmp_path / "fall"
    train = [e for e in log_entries(run) if e["kind"] == "train"]
    assert [e["step"] for e in train] == list(range(5, 45, 5))
    assert train[-1]["loss/total"] < 0.75 * train[0]["loss/total"]
    val = [e for e in log_entries(run) if e["kind"] == "val"]
    assert val[-1]["step"] == 40 and val[-1]["val/psnr"] > val[0]["val/psnr"]
    for name in ("config.yaml", "last.pth", "best.pth", "curves.png"):
        assert (run / name).is_file(), name
    assert sorted(p.name for p in (run / "history").iterdir()) == ["step_00000035.pth", "step_00000040.pth"]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(run / "tb")).Reload().Tags()["scalars"]
    assert {"loss/total", "loss/l1", "loss/mse", "val/psnr", "learning_rate"} <= set(tags)
    last = load(run / "last.pth")
    assert CHECKPOINT_KEYS <= set(last) and last["step"] == 40 and last["arch"] == "edsr-nano"


def test_checkpoint_round_trip_and_basicsr_weights(data: Path, tmp_path: Path) -> None:
    assert cli(train_args(data, tmp_path, "rt", "train.max_steps=5")) == 0
    lr = torch.rand(1, 3, 6, 9)
    model, meta = model_from_checkpoint(tmp_path / "rt" / "best.pth")
    assert meta["arch"] == "edsr-nano" and meta["step"] == 5
    fresh = build_model("edsr-nano").eval()
    fresh.load_state_dict(load(tmp_path / "rt" / "best.pth")["params_ema"])
    with torch.no_grad():
        assert torch.equal(model(lr), fresh(lr))

    # Weights from another basicsr tool: params_ema, else params, else a bare dict; `module.` stripped.
    torch.manual_seed(1)
    source = build_model("edsr-nano").eval()
    weights = source.state_dict()
    files = {"ema.pth": {"params_ema": weights, "params": {k: v * 0 for k, v in weights.items()}},
             "ddp.pth": {"params": {f"module.{k}": v for k, v in weights.items()}}, "bare.pth": weights}
    with torch.no_grad():
        expected = source(lr)
        for name, content in files.items():
            torch.save(content, tmp_path / name)
            cfg = load_config(None, ["model.name=edsr-nano", f"model.pretrained={tmp_path / name}"])
            assert torch.equal(build_trainable(cfg).eval()(lr), expected), name
    torch.save({"params": build_model("edsr-tiny").state_dict()}, tmp_path / "other.pth")
    with pytest.raises(UserError, match="other.pth"):
        build_trainable(load_config(None, ["model.name=edsr-nano", f"model.pretrained={tmp_path / 'other.pth'}"]))
    # ...and fine-tuning from it runs through the CLI.
    assert cli(train_args(data, tmp_path, "ft", "train.max_steps=1", f"model.pretrained={tmp_path / 'ema.pth'}")) == 0


def test_bad_settings_are_user_errors(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for extra, message in ((["model.name=bicubic"], "no parameters"),
                           (["train.resume=force"], "last.pth"),
                           (["train.batch_size=32"], "batch_size"),
                           (["train.crop=5"], "train.crop"),
                           (["train.val_every=0"], "val_every"),
                           (["data.val_fold=7"], "val_fold=7")):
        with pytest.raises(UserError, match=message):  # when the settings load, or when the stage starts
            train.main(load_config(None, [f"data.dir={data}", *train_args(data, tmp_path, "bad", "train.max_steps=2",
                                                                          *extra)[3:]]))
    assert not (tmp_path / "bad" / "last.pth").exists()
    assert cli(["train", "--data", str(tmp_path / "nowhere"), f"paths.models={tmp_path}", "train.max_steps=1"]) == 2
    assert "nowhere/patches/manifest.csv" in capsys.readouterr().err


def test_time_budget_validates_and_saves(data: Path, tmp_path: Path) -> None:
    assert cli(train_args(data, tmp_path, "clock", "train.max_minutes=0.02", "train.val_every=100000")) == 0
    last = load(tmp_path / "clock" / "last.pth")
    val = [e for e in log_entries(tmp_path / "clock") if e["kind"] == "val"]
    assert last["step"] > 0 and val[-1]["step"] == last["step"]  # validated at the end


def test_early_stopping_and_bf16(data: Path, tmp_path: Path) -> None:
    # A learning rate of 0 cannot improve on the first validation: patience 2 stops at the third.
    assert cli(train_args(data, tmp_path, "flat", "train.max_steps=1000", "train.learning_rate=0",
                          "train.scheduler=constant", "train.patience=2")) == 0
    assert load(tmp_path / "flat" / "last.pth")["step"] == 15
    assert cli(train_args(data, tmp_path, "bf16", "train.max_steps=5", "train.precision=bf16")) == 0
    assert math.isfinite(load(tmp_path / "bf16" / "last.pth")["best_psnr"])


def test_sigterm_saves_and_exits_non_zero(data: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "term"

    def send_sigterm() -> None:
        while not (run / "last.pth").exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_sigterm, daemon=True).start()
    code = cli(train_args(data, tmp_path, "term", "train.max_steps=100000", "train.scheduler=constant"))
    assert code == 128 + signal.SIGTERM  # a scheduler must not mistake a killed job for a finished one
    assert 5 <= load(run / "last.pth")["step"] < 100000
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("stopped by SIGTERM at step") and "the same command resumes" in err


def test_sigkill_then_resume_gives_the_uninterrupted_weights(data: Path, tmp_path: Path) -> None:
    extra = ("train.max_steps=120", "train.deterministic=true", "train.ema_decay=0.9")
    killed = tmp_path / "killed"
    # The run to kill uses 2 loader workers, the others none: the data order must not care.
    code = kill_after_first_save([*train_args(data, tmp_path, "killed", *extra), "train.workers=2"],
                                 killed / "last.pth", tmp_path / "killed.log",
                                 lambda: assert_ok(cli(train_args(data, tmp_path, "reference", *extra))))
    assert code == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    assert 5 <= load(killed / "last.pth")["step"] < 120  # killed mid-run, after a save
    assert cli(train_args(data, tmp_path, "killed", *extra)) == 0  # resume=auto picks up last.pth

    resumed, reference = load(killed / "last.pth"), load(tmp_path / "reference" / "last.pth")
    assert resumed["step"] == reference["step"] == 120
    for key in ("params", "params_ema"):
        for name, value in reference[key].items():
            assert torch.equal(resumed[key][name], value), f"{key}.{name}"
    assert resumed["best_psnr"] == reference["best_psnr"]
    steps = [(e["kind"], e["step"]) for e in log_entries(killed)]
    assert len(steps) == len(set(steps))  # the log holds no step twice after the resume


def test_torchrun_two_processes_match_one(data: Path, tmp_path: Path) -> None:
    # Both runs on the CPU (gloo), also on a GPU machine: two ranks need two GPUs, and a CUDA run
    # would be compared with a CPU one. NCCL has its own test below.
    extra = ("train.max_steps=4", "train.deterministic=true", "train.val_every=2")
    torchrun_and_alone(lambda run: train_args(data, tmp_path, run, *extra), tmp_path)
    ddp, single = load(tmp_path / "ddp" / "last.pth"), load(tmp_path / "single" / "last.pth")
    assert ddp["step"] == single["step"] == 4
    seed_everything(0)  # the initial weights of both runs
    start = build_model("edsr-nano").state_dict()
    for name, value in single["params"].items():
        torch.testing.assert_close(ddp["params"][name], value, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ddp["params_ema"][name], single["params_ema"][name], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(single["params"][k], v) for k, v in start.items())  # training moved them
    assert ddp["best_psnr"] == pytest.approx(single["best_psnr"], abs=1e-3)


# -- the GPU path, checked on the CPU (and on a GPU where one is present) ----------------------------


def test_update_kernel_precision_and_compile_rules() -> None:
    from pipeline.core.runtime import AUTO_COMPILE_MIN_SECONDS, compile_mode, cpu_has_fast_bf16, optimizer_flags
    from pipeline.core.runtime import train_autocast_dtype as dtype_for

    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert optimizer_flags(cuda) == {"fused": True, "foreach": False}
    optimizer = build_optimizer(load_config(None, []).train, build_model("edsr-nano"), cpu)
    assert optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
    # auto on CUDA: fp32 (TF32) for launch-bound steps; explicit settings are honoured at any size.
    assert dtype_for(cuda, "auto", 16 * 64**2) is None and dtype_for(cuda, "bf16", 16) is torch.bfloat16
    assert dtype_for(cpu, "auto", 16 * 128**2) is (torch.bfloat16 if cpu_has_fast_bf16() else None)
    assert compile_mode("auto", cpu, math.inf) == "off"
    assert compile_mode("auto", cuda, AUTO_COMPILE_MIN_SECONDS - 1) == "off"
    assert compile_mode("auto", cuda, AUTO_COMPILE_MIN_SECONDS) == compile_mode("auto", cuda, math.inf) == \
        "reduce-overhead"
    assert compile_mode("default", cpu, 0.0) == "default"
    from pipeline.training.validation import spaced_interval

    # 1 s validations against 10 ms steps, at most 10%: every 900 steps; fast ones keep val_every.
    assert spaced_interval(1.0, 0.01, 5, 0.1) == 900 and spaced_interval(1.0, 0.01, 5, 0.0) == 5
    assert spaced_interval(0.001, 0.01, 5, 0.1) == 5


def test_compiled_step_trains_like_eager_and_saves_plain_keys(data: Path, tmp_path: Path) -> None:
    extra = ("train.max_steps=10", "train.deterministic=true", "train.grad_clip=1.0")
    assert cli(train_args(data, tmp_path, "eager", *extra, "train.compile=off")) == 0
    assert cli(train_args(data, tmp_path, "compiled", *extra, "train.compile=default")) == 0
    eager, compiled = log_entries(tmp_path / "eager"), log_entries(tmp_path / "compiled")
    warmup = [e for e in compiled if e["kind"] == "compile"]
    assert len(warmup) == 1 and warmup[0]["step"] == 3
    assert math.isfinite(warmup[0]["compile/warmup_seconds"])  # recorded (its size is bench/'s business)
    assert not any(e["kind"] == "compile" for e in eager)
    losses = [[e["loss/total"] for e in log if e["kind"] == "train"] for log in (eager, compiled)]
    assert len(losses[0]) == 2 and losses[0] != losses[0][:1] * 2  # two log points, the loss moved
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-4)
    a, b = load(tmp_path / "eager" / "last.pth"), load(tmp_path / "compiled" / "last.pth")
    for key in ("params", "params_ema"):
        assert list(b[key]) == list(a[key])  # plain keys: no `_orig_mod.` from the compiled wrapper
        for name, value in a[key].items():
            torch.testing.assert_close(b[key][name], value, rtol=1e-4, atol=1e-5)


def test_one_loader_iterator_serves_every_epoch_in_order(data: Path) -> None:
    cfg = load_config(None, [f"data.dir={data}", "train.batch_size=4", "train.workers=2", "train.prefetch=2"])
    loader, batches, side = train._loader(cfg, Dist(0, 1, torch.device("cpu")), build_model("edsr-nano"))
    assert side == 4 and batches.steps_per_epoch == 4
    batches.set_position(0, 3)  # a resume at step 3: the last step of epoch 0, then epochs 1 and 2
    iterator = iter(loader)
    workers = [w.pid for w in iterator._workers]  # the processes behind this iterator (private attribute)
    got = [next(iterator) for _ in range(9)]
    assert [w.pid for w in iterator._workers] == workers and all(w.is_alive() for w in iterator._workers)
    processes = list(iterator._workers)
    del iterator  # what the loop does when it stops: the workers end now
    for p in processes:
        p.join(timeout=30)
        assert not p.is_alive()
    dataset = loader.dataset
    for n, (lr, hr) in enumerate(got):
        epoch, step = divmod(3 + n, 4)
        perm, seeds = batches.order(epoch)
        expected = [dataset[(int(perm[i]), int(seeds[i]))] for i in range(4 * step, 4 * step + 4)]
        assert torch.equal(lr, torch.stack([x for x, _ in expected]))
        assert torch.equal(hr, torch.stack([y for _, y in expected]))


def test_slow_validation_is_spaced_out_unless_deterministic(data: Path, tmp_path: Path) -> None:
    # Validating after every step would take most of the time (2 images against a step of 4 patches):
    # with a 1% share the next validation moves past the run's end; deterministic runs keep the cadence.
    extra = ("train.max_steps=12", "train.val_every=1", "train.val_share=0.01", "train.log_every=4",
             "train.save_every=100")
    for run, deterministic in (("spaced", "false"), ("fixed", "true")):
        assert cli(train_args(data, tmp_path, run, *extra, f"train.deterministic={deterministic}")) == 0
    steps = {run: [e["step"] for e in log_entries(tmp_path / run) if e["kind"] == "val"] for run in ("spaced", "fixed")}
    assert steps["fixed"] == list(range(1, 13))
    assert steps["spaced"][0] == 1 and steps["spaced"][-1] == 12 and len(steps["spaced"]) < 6
    assert all(math.isfinite(e["val/seconds"]) for e in log_entries(tmp_path / "spaced") if e["kind"] == "val")


def test_profile_steps_writes_trace_ops_and_sections(data: Path, tmp_path: Path) -> None:
    assert cli(train_args(data, tmp_path, "prof", "train.max_steps=12", "train.profile_steps=3",
                          "train.grad_clip=1.0")) == 0
    out = tmp_path / "prof" / "profile"
    trace = json.loads((out / "trace.json").read_text())
    names = {e.get("name") for e in trace["traceEvents"]}
    assert {"train/data", "train/forward", "train/backward", "train/optimizer", "train/ema"} <= names
    phases = (out / "sections.txt").read_text()
    assert phases.startswith("3 profiled steps")
    for phase in ("data", "to_device", "forward", "loss", "backward", "clip", "optimizer", "ema", "after_step"):
        assert f"\n{phase} " in phases, phase
    assert "convolution" in (out / "ops.txt").read_text()


def test_albumentations_does_not_call_home() -> None:
    # Every URL opened is recorded (and fails, as offline). Importing the pipeline's data module
    # (albumentations' first importer) must open none; albumentations' own update check, called
    # afterwards, shows that the hook would have seen one.
    script = """
import urllib.request, warnings
calls = []
def fake_open(self, url, *args, **kwargs):
    calls.append(url)
    raise OSError("offline")
urllib.request.OpenerDirector.open = fake_open
import pipeline.training.patch_data
at_import = len(calls)
from albumentations.check_version import check_for_updates
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    check_for_updates()
print(at_import, len(calls))
"""
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env={**env, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["0", "1"], out.stdout + out.stderr


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@CUDA
def test_bf16_and_compiled_training_steps_on_cuda(data: Path, tmp_path: Path) -> None:
    assert cli(train_args(data, tmp_path, "bf16", "train.max_steps=8", "train.precision=bf16")) == 0
    assert math.isfinite(load(tmp_path / "bf16" / "last.pth")["best_psnr"])
    assert cli(train_args(data, tmp_path, "graphs", "train.max_steps=8", "train.compile=reduce-overhead",
                          "train.grad_clip=1.0")) == 0
    state = load(tmp_path / "graphs" / "last.pth")
    assert state["step"] == 8 and not any(k.startswith("_orig_mod") for k in state["params"])
    assert all(torch.isfinite(v).all() for v in state["params"].values())


@CUDA
def test_ddp_over_nccl_with_one_process(data: Path, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    extra = ("train.max_steps=4", "train.deterministic=true", "train.val_every=2")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
                          "-m", "pipeline", *train_args(data, tmp_path, "nccl", *extra)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "(DDP, nccl)" in out.stdout + out.stderr
    assert cli(train_args(data, tmp_path, "plain", *extra)) == 0
    ddp, plain = load(tmp_path / "nccl" / "last.pth"), load(tmp_path / "plain" / "last.pth")
    assert ddp["step"] == plain["step"] == 4
    for name, value in plain["params"].items():
        torch.testing.assert_close(ddp["params"][name], value, rtol=1e-4, atol=1e-6)


def test_val_crop_scores_the_centre_of_each_held_out_image(data: Path, tmp_path: Path) -> None:
    """train.val_crop=4: validation (and its bicubic baseline) on the centre 4x4 LR crop of each 8x8 image and
    the 16x16 HR under it, as computed here by hand; whole images give another figure."""
    from pipeline.core.layout import DataLayout
    from pipeline.core.metrics import contest_psnr
    from pipeline.models.table import Bicubic
    from pipeline.training.patch_data import read_pair

    assert cli(train_args(data, tmp_path, "crop", "train.max_steps=5", "train.val_crop=4")) == 0
    val = [e for e in log_entries(tmp_path / "crop") if e["kind"] == "val"][-1]
    by_hand = []
    for pair in DataLayout(data).validation_pairs(0):
        lr, hr = read_pair(pair, 4)
        x = torch.from_numpy(lr[2:6, 2:6].copy()).permute(2, 0, 1)[None].float() / 255  # the centre 4x4 of 8x8
        by_hand.append(contest_psnr(Bicubic()(x)[0], torch.from_numpy(hr[8:24, 8:24].copy()).permute(2, 0, 1)))
    assert val["val/bicubic_psnr"] == pytest.approx(float(np.mean(by_hand)), abs=1e-9)
    assert cli(train_args(data, tmp_path, "whole", "train.max_steps=5")) == 0
    whole = [e for e in log_entries(tmp_path / "whole") if e["kind"] == "val"][-1]
    assert whole["val/bicubic_psnr"] != pytest.approx(val["val/bicubic_psnr"], abs=1e-6)

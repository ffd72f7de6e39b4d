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

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from pipeline import train
from pipeline.checkpoint import model_from_checkpoint
from pipeline.cli import main as cli
from pipeline.compat import imresize
from pipeline.config import load_config
from pipeline.dataset import EpochBatches, PairAugment
from pipeline.errors import UserError
from pipeline.images import to_uint8, write_png
from pipeline.models import build_model
from pipeline.runtime import seed_everything
from pipeline.train import build_trainable

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT_KEYS = {"params", "params_ema", "arch", "kwargs", "step", "epoch", "best_psnr", "optimizer", "scheduler",
                   "scaler", "rng", "config"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """6 images (HR 32x32, LR 8x8 by MATLAB bicubic) in the contest layout with splits.csv, and
    4 patches (LR 4x4 / HR 16x16) per image in patches/manifest.csv; fold 0 (2 images) validates."""
    root = tmp_path_factory.mktemp("tiny") / "data"
    rng = np.random.default_rng(0)
    splits, manifest = [], []
    for i in range(6):
        coarse = rng.random((6, 6, 3)).astype(np.float32)
        hr = to_uint8(np.clip(cv2.resize(coarse, (32, 32), interpolation=cv2.INTER_CUBIC), 0, 1))
        lr = to_uint8(imresize(hr.astype(np.float64) / 255, 1 / 4))  # (32,32,3) -> (8,8,3)
        img_id, fold = f"{i:04d}", 0 if i < 2 else 1 + i % 2
        write_png(root / "train/hr" / f"{img_id}.png", hr)
        write_png(root / "train/lr" / f"{img_id}.png", lr)
        splits.append((img_id, f"src{i}", fold, f"train/lr/{img_id}.png", f"train/hr/{img_id}.png"))
        for y in (0, 4):
            for x in (0, 4):
                pid = f"{img_id}_{y:04d}_{x:04d}"
                write_png(root / "patches/lr" / f"{pid}.png", lr[y : y + 4, x : x + 4])
                write_png(root / "patches/hr" / f"{pid}.png", hr[4 * y : 4 * y + 16, 4 * x : 4 * x + 16])
                manifest.append((pid, img_id, fold, y, x, f"lr/{pid}.png", f"hr/{pid}.png"))
    pd.DataFrame(splits, columns=["img_id", "source", "fold", "lr_path", "hr_path"]).to_csv(
        root / "splits.csv", index=False)
    pd.DataFrame(manifest, columns=["patch_id", "img_id", "fold", "y", "x", "lr_path", "hr_path"]).to_csv(
        root / "patches/manifest.csv", index=False)
    return root


def train_args(data: Path, models: Path, run: str, *extra: str) -> list[str]:
    """16 training patches, batch 4: 4 steps per epoch; validation on 2 whole images."""
    return ["train", "--data", str(data), f"run={run}", f"paths.models={models}", "model.name=edsr-nano",
            "train.batch_size=4", "train.workers=0", "train.val_every=5", "train.log_every=5",
            "train.save_every=5", "train.learning_rate=5e-3", *extra]


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
    from pipeline.images import read_uint8

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
        cfg = load_config(None, [f"data.dir={data}", *train_args(data, tmp_path, "bad", "train.max_steps=2",
                                                                 *extra)[3:]])
        with pytest.raises(UserError, match=message):
            train.main(cfg)
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


def test_sigterm_saves_and_exits(data: Path, tmp_path: Path) -> None:
    run = tmp_path / "term"

    def send_sigterm() -> None:
        while not (run / "last.pth").exists():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_sigterm, daemon=True).start()
    assert cli(train_args(data, tmp_path, "term", "train.max_steps=100000", "train.scheduler=constant")) == 0
    assert 5 <= load(run / "last.pth")["step"] < 100000


def test_sigkill_then_resume_gives_the_uninterrupted_weights(data: Path, tmp_path: Path) -> None:
    extra = ("train.max_steps=120", "train.deterministic=true", "train.ema_decay=0.9")
    killed = tmp_path / "killed"
    # The run to kill uses 2 loader workers, the others none: the data order must not care.
    with (tmp_path / "killed.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pipeline", *train_args(data, tmp_path, "killed", *extra),
                                 "train.workers=2"], cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"},
                                stdout=log, stderr=subprocess.STDOUT)

    def kill_after_first_save() -> None:
        deadline = time.monotonic() + 300
        while not (killed / "last.pth").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()

    killer = threading.Thread(target=kill_after_first_save)
    killer.start()  # the reference run below overlaps the subprocess's start-up
    assert cli(train_args(data, tmp_path, "reference", *extra)) == 0
    killer.join()
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
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
    extra = ("train.max_steps=4", "train.deterministic=true", "train.val_every=2")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with (tmp_path / "ddp.log").open("wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                                 "-m", "pipeline", *train_args(data, tmp_path, "ddp", *extra)],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    assert cli(train_args(data, tmp_path, "single", *extra)) == 0  # meanwhile, the same in one process
    assert proc.wait(timeout=300) == 0, (tmp_path / "ddp.log").read_text()[-3000:]
    ddp, single = load(tmp_path / "ddp" / "last.pth"), load(tmp_path / "single" / "last.pth")
    assert ddp["step"] == single["step"] == 4
    seed_everything(0)  # the initial weights of both runs
    start = build_model("edsr-nano").state_dict()
    for name, value in single["params"].items():
        torch.testing.assert_close(ddp["params"][name], value, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ddp["params_ema"][name], single["params_ema"][name], rtol=1e-4, atol=1e-6)
    assert any(not torch.equal(single["params"][k], v) for k, v in start.items())  # training moved them
    assert ddp["best_psnr"] == pytest.approx(single["best_psnr"], abs=1e-3)

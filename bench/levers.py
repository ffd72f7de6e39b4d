"""What each lever is worth, on held-out photos: bicubic, a published network zero-shot (x1, x8),
fine-tuned with configs/finetune.yaml, + an L2 phase at equal minutes, + a multi-window ensemble,
+ a fitted blend of the run's checkpoints; and from scratch, schedule-free vs AdamW and CutBlur vs
none at equal minutes. Every row: held-out PSNR, its gain over the row it builds on, and that gain's
paired bootstrap 95% interval over the held-out crops.

    python -m bench.levers --out /tmp/levers --minutes 5            # the whole table (about an hour, CPU)
    python -m bench.levers --out /tmp/levers --minutes 5 --scratch-steps 3800 --only equal   # + equal steps
    python -m bench.levers --out /tmp/levers --data-only            # just the dataset

The dataset (``--out``/data, contest layout): every colour or grey photo that scikit-image and
matplotlib ship, split by photo (source) before anything is cut: the held-out photos become
``test/lr`` + ``test_hr`` (HR crops of 256 px, LR 64), the others training pairs whose own
validation fold (by source, ``prepare``) picks best.pth and fits the blend. Crops of one photo are
correlated, so the intervals over crops are somewhat narrower than intervals over photos would be.
Run it on a quiet machine: the training rows are time budgets.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from bench.common import machine
from pipeline.cli import main as cli
from pipeline.core.config import load_config
from pipeline.core.metrics import paired_gain
from pipeline.demo_data import Source, build
from pipeline.evaluate import psnr_of_folder
from pipeline.training.phases import settings_of

HR = 256  # HR crop side (LR 64)
ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = ROOT.parent / "shared" / "weights" / "craft_x4_ntire2024_team34.pth"
FINETUNE = ROOT / "configs" / "finetune.yaml"
RESULTS = Path(__file__).parent / "results"
SOURCES = (
    # training photos: natural ones and textures / microscopy (all that ships); the validation fold
    # (best.pth, the blend's fit) is the fold of the coffee photo (VAL_SOURCE), by source
    Source("rocket.jpg", "skimage", (2, 3), "train"),
    Source("coffee.png", "skimage", (1, 3), "train"),
    Source("chelsea.png", "skimage", (1, 2), "train"),
    Source("retina.jpg", "skimage", (3, 3), "train"),
    Source("hubble_deep_field.jpg", "skimage", (2, 2), "train"),
    Source("ihc.png", "skimage", (2, 2), "train"),
    Source("cell.png", "skimage", (1, 2), "train"),
    Source("grass.png", "skimage", (2, 2), "train"),
    Source("gravel.png", "skimage", (2, 2), "train"),
    Source("coins.png", "skimage", (1, 1), "train"),
    Source("clock_motion.png", "skimage", (1, 2), "train"),
    # held-out photos: never trained on, never validated on
    Source("astronaut.png", "skimage", (3, 3), "test"),
    Source("grace_hopper.jpg", "matplotlib", (3, 2), "test"),
    Source("motorcycle_left.png", "skimage", (1, 3), "test"),
    Source("motorcycle_right.png", "skimage", (1, 3), "test"),
    Source("camera.png", "skimage", (3, 3), "test"),
    Source("moon.png", "skimage", (2, 2), "test"),
    Source("brick.png", "skimage", (2, 2), "test"),
)
VAL_SOURCE = "coffee"


def val_fold(data: Path) -> int:
    """The validation fold: the one ``prepare`` gave VAL_SOURCE (natural photos validate best.pth)."""
    splits = pd.read_csv(data / "splits.csv")
    return int(splits.loc[splits["source"] == VAL_SOURCE, "fold"].iloc[0])


def build_data(root: Path) -> Path:
    """The lever dataset at ``root/data``, prepared and cut into 128 / 32 px patch pairs."""
    data = root / "data"
    if not (data / "patches" / "manifest.csv").is_file():
        shutil.rmtree(data, ignore_errors=True)
        build(data, seed=0, sources=SOURCES, size=HR)
        assert cli(["prepare", "--data", str(data)]) == 0
        assert cli(["patchify", "--data", str(data), "patchify.size=128", "patchify.workers=1"]) == 0
    return data


@dataclass
class Row:
    name: str
    command: str  # what a user types (paths shortened)
    minutes: float  # training minutes (0 for zero-shot rows)
    pred: Path  # held-out predictions
    base: str = ""  # the row its gain is measured against ('' = the previous row)
    run: str = ""  # the training run it makes (its steps go into the table)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--minutes", type=float, default=5.0, help="training minutes of each trained row")
    p.add_argument("--scratch-steps", type=int, default=0,
                   help="also the from-scratch rows at this many steps each (equal steps, beside equal minutes)")
    p.add_argument("--data-only", action="store_true")
    p.add_argument("--only", nargs="*", default=[], help="(re)run only the rows whose name starts with these words "
                   "(others are scored from their earlier predictions)")
    args = p.parse_args()
    data = build_data(args.out)
    tests = len(pd.read_csv(data / "test.csv"))
    train = pd.read_csv(data / "splits.csv")
    print(f"{machine(torch.device('cpu'))}\n{data}: {len(train)} training crops from {train['source'].nunique()} "
          f"photos, {tests} held-out crops (LR 64 -> HR 256)")
    if args.data_only:
        return
    _run_rows(args.out, data, args.minutes, set(args.only), args.scratch_steps)


def _infer(*args: str) -> None:
    assert cli(["infer", *args]) == 0, args


def _train(*args: str) -> None:
    assert cli(["train", *args, "train.resume=never"]) == 0, args  # a rerun starts over (the old run moved aside)


def rows(root: Path, data: Path, minutes: float, steps: int = 0) -> list[tuple[Row, Callable[[], None]]]:
    """Each row with what makes its held-out predictions (run in order: later rows use earlier runs)."""
    pred, models, submit = root / "pred", root / "models", root / "submit"
    test = ["--input", str(data / "test" / "lr")]
    common = [f"paths.models={models}", f"paths.submit={submit}", f"data.val_fold={val_fold(data)}"]
    ft = ["--config", str(FINETUNE), "--data", str(data), *common, f"model.pretrained={WEIGHTS}"]
    l1_only = "train.phases=[]"
    # The shipped recipe's phases, scaled to the row's minutes (the recipe's L1 / L2 proportions).
    phases = [p for p in load_config(FINETUNE, []).train.phases]
    share = [p.minutes / sum(q.minutes for q in phases) for p in phases]
    scaled = "train.phases=[" + ", ".join(
        "{" + ", ".join(f"{k}: {v}" for k, v in {**settings_of(p), "minutes": round(minutes * f, 3),
                                                   "name": p.name}.items() if v is not None) + "}"
        for p, f in zip(phases, share)) + "]"
    scratch_infer = ["--data", str(data), *common, "infer.tta=8", "infer.tile=0"]

    def scratch_rows(budget: str, limit: str, row_minutes: float, suffix: str, prefix: str = "") -> list:
        """edsr-tiny from scratch with the demo recipe: AdamW, schedule-free AdamW, AdamW + CutBlur."""
        scratch = ["--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(data), *common,
                   "model.name=edsr-tiny", limit, "train.optimizer=adamw"]
        adamw = f"{prefix}edsr-tiny from scratch, AdamW, {budget} (demo recipe)"
        variants = [(adamw, f"train --config configs/demo.yaml model.name=edsr-tiny train.optimizer=adamw {limit}; "
                     "infer x8", "sc-adamw", ()),
                    (f"{prefix}edsr-tiny from scratch, schedule-free AdamW, {budget}",
                     "... train.optimizer=adamw-schedulefree", "sc-sf", ("train.optimizer=adamw-schedulefree",)),
                    (f"{prefix}edsr-tiny from scratch, AdamW + CutBlur, {budget}",
                     "... train.batch_aug=[cutblur] train.batch_aug_prob=0.5", "sc-cutblur",
                     ("train.batch_aug=[cutblur]",))]
        out = []
        for name, command, run, extra in variants:
            run += suffix
            out.append((Row(name, command, row_minutes, pred / run, base="bicubic" if name == adamw else adamw,
                            run=run),
                        lambda run=run, extra=extra: (
                            _train(*scratch, f"run={run}", *extra),
                            _infer(*scratch_infer, f"run={run}", *test, "--output", str(pred / run)))))
        return out
    windows = "infer.windows=[0, 32/16, 48/16]"
    members = "blend.members=[ft-l2, ft-l2:checkpoint=last, ft-l2:last_k=3]"
    return [
        (Row("bicubic", "infer model.name=bicubic", 0, pred / "bicubic"),
         lambda: _infer("model.name=bicubic", *test, "--output", str(pred / "bicubic"))),
        (Row("CRAFT zero-shot x1", "infer --weights CRAFT infer.tta=1 infer.tile=0", 0, pred / "craft-x1"),
         lambda: _infer("--weights", str(WEIGHTS), "infer.tta=1", "infer.tile=0", *test, "--output",
                        str(pred / "craft-x1"))),
        (Row("CRAFT zero-shot x8", "infer --weights CRAFT infer.tta=8 infer.tile=0", 0, pred / "craft-x8"),
         lambda: _infer("--weights", str(WEIGHTS), "infer.tta=8", "infer.tile=0", *test, "--output",
                        str(pred / "craft-x8"))),
        (Row(f"CRAFT fine-tuned {minutes:g} min (finetune.yaml, L1 only)",
             f"train --config configs/finetune.yaml model.pretrained=CRAFT train.max_minutes={minutes:g} "
             f"{l1_only}; infer x8", minutes, pred / "ft", run="ft"),
         lambda: (_train(*ft, "run=ft", f"train.max_minutes={minutes}", l1_only),
                  _infer("--config", str(FINETUNE), *common, "run=ft", *test, "--output", str(pred / "ft")))),
        (Row(f"+ L2 phase (finetune.yaml as shipped, {minutes:g} min in all)",
             f"train --config configs/finetune.yaml model.pretrained=CRAFT ({scaled.removeprefix('train.')}); "
             "infer x8", minutes, pred / "ft-l2", run="ft-l2"),
         lambda: (_train(*ft, "run=ft-l2", scaled),
                  _infer("--config", str(FINETUNE), *common, "run=ft-l2", *test, "--output", str(pred / "ft-l2")))),
        (Row("+ multi-window (whole, 32/16, 48/16) x8", f"infer run=ft-l2 {windows}", 0, pred / "ft-l2-windows"),
         lambda: _infer("--config", str(FINETUNE), *common, "run=ft-l2", windows, *test, "--output",
                        str(pred / "ft-l2-windows"))),
        (Row("+ fitted blend of its best, last and last-3 checkpoints (lstsq)",
             f"blend blend.name=bl {members}; infer blend.name=bl", 0, submit / "bl" / "pred",
             base=f"+ L2 phase (finetune.yaml as shipped, {minutes:g} min in all)"),
         lambda: (assert_ok(cli(["blend", "--config", str(FINETUNE), "--data", str(data), *common,
                                 "blend.name=bl", members])),
                  assert_ok(cli(["infer", "--config", str(FINETUNE), "--data", str(data), *common,
                                 "blend.name=bl"])))),
        *scratch_rows(f"{minutes:g} min", f"train.max_minutes={minutes:g}", minutes, ""),
        *(scratch_rows(f"{steps} steps", f"train.max_steps={steps}", 0, f"-{steps}s", "equal steps: ")
          if steps else []),
    ]


def assert_ok(code: int) -> None:
    assert code == 0


def held_out_photos(hr: Path) -> pd.Series:
    """The photo (source) of each held-out crop, indexed like ``psnr_of_folder``'s scores: the crops
    are numbered 20000... in the order of SOURCES' held-out photos, grid by grid (pipeline.demo_data)."""
    names = [src.source for src in SOURCES if src.split == "test" for _ in range(src.grid[0] * src.grid[1])]
    crops = sorted(hr.glob("*.png"))
    assert len(crops) == len(names), (len(crops), len(names))
    return pd.Series(names, index=[p.stem for p in crops])


def _run_rows(root: Path, data: Path, minutes: float, only: set[str], steps: int = 0) -> None:
    hr = data / "test_hr"
    photos = held_out_photos(hr)
    # A row only re-scored keeps the seconds its predictions took when they were made.
    earlier = (pd.read_csv(RESULTS / "levers.csv").set_index("row")["seconds"].to_dict()
               if (RESULTS / "levers.csv").is_file() else {})
    scores: dict[str, pd.Series] = {}
    table = []
    previous = ""
    for row, make in rows(root, data, minutes, steps):
        chosen = not only or any(row.name.startswith(word) for word in only)
        if chosen or row.pred.exists():
            seconds = timed(make) if chosen else earlier.get(row.name, float("nan"))  # (else: made earlier)
            psnr = psnr_of_folder(row.pred, hr)
            scores[row.name] = psnr
            base = row.base or previous
            entry = {"row": row.name, "command": row.command, "minutes": row.minutes, "seconds": round(seconds, 1),
                     "psnr": round(float(psnr.mean()), 4)}
            if row.run:  # equal minutes: how many steps they were on this machine
                log = root / "models" / row.run / "log.jsonl"
                entry["steps"] = max(json.loads(line)["step"] for line in log.read_text().splitlines())
            if base in scores:
                other = scores[base].reindex(psnr.index)
                mean, lo, hi = paired_gain(psnr.to_numpy(), other.to_numpy())
                entry.update(base=base, gain_db=round(mean, 4), gain_lo=round(lo, 4), gain_hi=round(hi, 4))
                # Crops of one photo are correlated: the interval over photo means (fewer, independent) too.
                by_photo = psnr.groupby(photos).mean(), other.groupby(photos).mean()
                _, lo, hi = paired_gain(by_photo[0].to_numpy(), by_photo[1].to_numpy())
                entry.update(photo_lo=round(lo, 4), photo_hi=round(hi, 4))
            table.append(entry)
            print(entry, flush=True)
        previous = row.name
    out = pd.DataFrame(table)
    RESULTS.mkdir(exist_ok=True)
    out.to_csv(RESULTS / "levers.csv", index=False)
    print(f"\n{len(list(hr.glob('*.png')))} held-out crops; wrote {RESULTS / 'levers.csv'}\n")
    print(out.drop(columns=["command"]).to_string(index=False))


Step = Callable[[], None]


def timed(fn: Step) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()

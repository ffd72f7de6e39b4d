"""The shipped recipes on contest-shaped data: divergences and held-out gains over seeds and precisions.

For each recipe (a shipped config), seed and precision: a fresh ``train`` on the contest-like set
(``bench.contest_set``: 2048^2 mosaics of photos, line art and text; 512/128 patches) under an equal
budget of minutes or of steps, then ``infer`` of the held-out images (sources training never saw)
and their contest PSNR. A run that stops as diverged (NaN, or ``train.blowup``) is counted, never
hidden. Each row's gain is over its reference on the same images (bicubic for a run from scratch,
the published network's own output for a fine-tune) with two paired bootstrap 95% intervals: over
images, and over the held-out photos (images of one photo are correlated).

    python -m bench.contest_set --out data/contest-like --held-out-images 2
    python -m bench.recipe_table --data data/contest-like --out /tmp/rt --recipes demo --minutes 5 \\
        --seeds 0 1 2 3 4 --precisions bf16 fp32
    python -m bench.recipe_table --data data/contest-like --out /tmp/rt --recipes demo --steps 4000 ...

Rows append to ``bench/results/recipe_table.csv`` (one line per run; reruns of a row replace it).
Run it on a quiet machine: the minutes rows are time budgets.
"""

from __future__ import annotations

import argparse
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from bench.common import machine
from pipeline.cli import main as cli
from pipeline.core.metrics import paired_gain
from pipeline.evaluate import psnr_of_folder

ROOT = Path(__file__).resolve().parents[1]
CRAFT = ROOT.parent / "shared" / "weights" / "craft_x4_ntire2024_team34.pth"
RESULTS = Path(__file__).parent / "results" / "recipe_table.csv"


@dataclass(frozen=True)
class Recipe:
    config: str  # a shipped config, relative to the checkout
    train: tuple[str, ...] = ()  # what the recipe's comment says to add (the published network)
    patchify: tuple[str, ...] = ()  # the recipe's patches on contest data ("" = the config's own)
    reference: str = "bicubic"  # what a gain is over: bicubic, or the published network (same tta)


RECIPES = {
    # the quick recipe at the contest's 512/128 patches (its own patchify.size is the demo's 128)
    "demo": Recipe("configs/demo.yaml", patchify=("patchify.size=512",)),
    "finetune": Recipe("configs/finetune.yaml", (f"model.pretrained={CRAFT}",), ("patchify.size=512",), "published"),
    "gpu-quick": Recipe("configs/gpu-quick.yaml"),
}


def ok(code: int, what: str) -> None:
    if code != 0:
        raise SystemExit(f"{what} exited {code}")


def patched(data: Path, work: Path, recipe: Recipe) -> Path:
    """The contest set prepared and cut the recipe's way, in a folder of its own (files linked)."""
    key = "-".join(p.replace("patchify.", "").replace("=", "") for p in recipe.patchify) or Path(recipe.config).stem
    root = work / f"data-{key}"
    if not (root / "patches" / "manifest.csv").is_file():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        for entry in data.iterdir():
            if entry.name not in ("splits.csv", "patches"):
                (root / entry.name).symlink_to(entry.resolve())
        ok(cli(["prepare", "--data", str(root)]), "prepare")
        ok(cli(["patchify", "--data", str(root), "--config", str(ROOT / recipe.config), *recipe.patchify]), "patchify")
    return root


def log_summary(run_dir: Path) -> dict[str, object]:
    rows = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    train = [r for r in rows if r.get("kind") == "train"]
    val = [r["val/psnr"] for r in rows if r.get("kind") == "val" and "val/psnr" in r]
    return {"steps": max((r["step"] for r in rows), default=0), "best_val": max(val, default=float("nan")),
            "last_loss": train[-1]["loss/total"] if train else float("nan")}


def score(pred: Path, hr: Path, other: pd.Series, sources: pd.Series) -> dict[str, float]:
    psnr = psnr_of_folder(pred, hr)
    other = other.reindex(psnr.index)
    gain, lo, hi = paired_gain(psnr.to_numpy(), other.to_numpy())
    by_source = psnr.groupby(sources).mean(), other.groupby(sources).mean()
    _, slo, shi = paired_gain(by_source[0].to_numpy(), by_source[1].to_numpy())
    return {"psnr": round(float(psnr.mean()), 4), "gain": round(gain, 4), "lo": round(lo, 4), "hi": round(hi, 4),
            "source_lo": round(slo, 4), "source_hi": round(shi, 4)}


def reference(name: str, recipe: Recipe, data: Path, work: Path, tta: int) -> pd.Series:
    """Per-image PSNR of the recipe's reference on the held-out images (made once per tta)."""
    out = work / f"ref-{name}-x{tta}"
    if not out.is_dir():
        io = ["--input", str(data / "test" / "lr"), "--output", str(out)]
        if name == "bicubic":
            ok(cli(["infer", "model.name=bicubic", *io]), "infer")
        else:
            ok(cli(["infer", "--weights", str(CRAFT), *io, f"infer.tta={tta}", "infer.tile=auto"]), "infer")
    return psnr_of_folder(out, data / "test_hr")


def run_row(name: str, recipe: Recipe, seed: int, precision: str, budget: str, data: Path, work: Path,
            tta: int, extra: tuple[str, ...] = (), reuse: bool = False) -> dict[str, object]:
    root = patched(data, work, recipe)
    run = f"{name}-{precision}-s{seed}-{budget.replace('=', '').replace('train.', '')}"
    models = work / "models"
    if reuse and (models / run / "last.pth").is_file():
        code = 0  # scored again (another tta) without training again
    else:
        shutil.rmtree(models / run, ignore_errors=True)
        code = cli(["train", "--config", str(ROOT / recipe.config), "--data", str(root), f"run={run}",
                    f"paths.models={models}", f"seed={seed}", f"train.precision={precision}", budget,
                    "train.resume=never", *recipe.train, *extra])
    row: dict[str, object] = {"recipe": name, "seed": seed, "precision": precision, "budget": budget,
                              "diverged": code != 0, **log_summary(models / run)}
    if code != 0:
        return row
    pred = work / "pred" / run
    shutil.rmtree(pred, ignore_errors=True)
    ok(cli(["infer", "--config", str(ROOT / recipe.config), f"run={run}", f"paths.models={models}",
            "--input", str(data / "test" / "lr"), "--output", str(pred), f"infer.tta={tta}", "infer.tile=auto"]),
       "infer")
    sources = pd.read_csv(data / "test_sources.csv", dtype=str).set_index("img_id")["source"]
    ref = "bicubic" if recipe.reference == "bicubic" else "published"
    other = reference(ref, recipe, data, work, tta)
    row.update(reference=ref, tta=tta, **score(pred, data / "test_hr", other, sources))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="the contest-like set (bench.contest_set)")
    parser.add_argument("--out", type=Path, required=True, help="work folder (patches, runs, predictions)")
    parser.add_argument("--recipes", nargs="+", choices=sorted(RECIPES), default=["demo"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--precisions", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--minutes", type=float, default=0, help="equal minutes per run (train.max_minutes)")
    parser.add_argument("--steps", type=int, default=0, help="equal steps per run (train.max_steps)")
    parser.add_argument("--tta", type=int, default=1, help="ensemble ways of the held-out scoring")
    parser.add_argument("--set", nargs="*", default=[], help="more train settings for every run (key=value)")
    parser.add_argument("--reuse", action="store_true", help="score a run whose last.pth exists without training")
    parser.add_argument("--csv", type=Path, default=RESULTS, help="the table the rows go to")
    args = parser.parse_args()
    if bool(args.minutes) == bool(args.steps):
        raise SystemExit("give --minutes or --steps")
    budget = f"train.max_minutes={args.minutes:g}" if args.minutes else f"train.max_steps={args.steps}"
    print(machine(torch.device("cpu")), flush=True)
    for name in args.recipes:
        for seed in args.seeds:
            for precision in args.precisions:
                row = run_row(name, RECIPES[name], seed, precision, budget, args.data, args.out, args.tta,
                              tuple(args.set), args.reuse)
                print(row, flush=True)
                _save(row, args.csv)
    table = pd.read_csv(args.csv)
    print(table.to_string(index=False))


def _save(row: dict[str, object], csv: Path) -> None:
    key = ["recipe", "seed", "precision", "budget", "tta"]
    new = pd.DataFrame([row])
    if csv.is_file():
        old = pd.read_csv(csv)
        same = (old[key].astype(str) == new[key].astype(str).iloc[0]).all(axis=1) if set(key) <= set(old) else False
        new = pd.concat([old[~same], new], ignore_index=True)
    csv.parent.mkdir(exist_ok=True)
    new.to_csv(csv, index=False)


if __name__ == "__main__":
    main()

"""Training recipes at equal minutes: which settings gain the most over bicubic in a short budget?

Each recipe is ``NAME:CONFIG:key=value,key=value`` (CONFIG a YAML file or ``-`` for the defaults).
Per recipe, in its own copy of the dataset (the contest files linked, not copied): ``prepare``,
``patchify`` with the recipe's patch settings, then a fresh ``train`` of ``--minutes`` (the stage's
clock, validations included) with the same ``--model`` for all, so only the recipe differs. The
score is the train stage's own validation on the held-out fold (whole images, EMA weights, no
ensemble): the best validation PSNR and the last one, minus bicubic on the same images.

    python -m bench.recipes                                   # CPU: demo data, edsr-tiny, 3 min each
    python -m bench.recipes --device cuda --data data/photos --model edsr --minutes 6 \\
        --recipes "defaults:-:" "gpu-quick:configs/gpu-quick.yaml:"

The CPU default recipes are the demo's geometry (the contest's divided by 4): `defaults` with
patchify.size=128 (the defaults' 512 would leave one patch per demo image), `gpu-quick` as shipped,
and `demo` (configs/demo.yaml, the recipe tuned for minutes on a 2-core CPU).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import add_stage_options, read_run_log, save_rows, stage_device, table
from pipeline.cli import main as cli

CPU_RECIPES = ("defaults:-:patchify.size=128", "gpu-quick:configs/gpu-quick.yaml:", "demo:configs/demo.yaml:")
OWN_FILES = ("splits.csv", "patches")  # what prepare / patchify write into a dataset root


@dataclass(frozen=True)
class Recipe:
    name: str
    config: str | None
    overrides: tuple[str, ...]

    @classmethod
    def parse(cls, text: str) -> Recipe:
        try:
            name, config, overrides = text.split(":", 2)
        except ValueError:
            raise SystemExit(f"recipe {text!r}: expected NAME:CONFIG:key=value,... (CONFIG '-' = defaults)") from None
        return cls(name, None if config in ("", "-") else config, tuple(o for o in overrides.split(",") if o))

    def args(self) -> list[str]:
        return [*(["--config", self.config] if self.config else []), *self.overrides]


def linked_copy(source: Path, dest: Path) -> Path:
    """A dataset root whose contest files are links to ``source``'s; its own splits and patches."""
    dest.mkdir(parents=True)
    for entry in source.iterdir():
        if entry.name not in OWN_FILES:
            (dest / entry.name).symlink_to(entry.resolve())
    return dest


def run_recipe(recipe: Recipe, source: Path, work: Path, args: argparse.Namespace) -> dict:
    data = linked_copy(source, work / recipe.name / "data")
    models = work / recipe.name / "models"
    common = ["--data", str(data), *recipe.args()]
    start = time.perf_counter()
    for stage in ("prepare", "patchify"):
        if cli([stage, *common]) != 0:
            raise SystemExit(f"recipe {recipe.name}: {stage} failed")
    prepared = time.perf_counter() - start
    train = ["train", *common, f"paths.models={models}", "run=recipe", f"model.name={args.model}",
             f"train.max_minutes={args.minutes}", "train.max_steps=0", "train.resume=never", *args.overrides]
    if cli(train) != 0:
        raise SystemExit(f"recipe {recipe.name}: train failed")
    log = read_run_log(models, "recipe")
    val = [e for e in log if e["kind"] == "val"]
    rate = [e["samples_per_s"] for e in log if e["kind"] == "train"]
    patches = sum(1 for _ in (data / "patches" / "lr").iterdir())
    return {"recipe": recipe.name, "settings": " ".join(recipe.args()) or "defaults", "patches": patches,
            "prepare_s": prepared, "minutes": args.minutes, "steps": val[-1]["step"],
            "samples_per_s": sum(rate) / len(rate) if rate else float("nan"),
            "bicubic_db": val[-1]["val/bicubic_psnr"], "best_gain_db": val[-1]["val/best_psnr"] - val[-1][
                "val/bicubic_psnr"], "last_gain_db": val[-1]["val/psnr"] - val[-1]["val/bicubic_psnr"],
            "best_step": max(val, key=lambda e: e["val/psnr"])["step"], "validations": len(val)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_stage_options(p, "every recipe's train stage")
    p.add_argument("--data", type=Path, default=None, help="a dataset in the contest layout (default: demo data)")
    p.add_argument("--model", default="edsr-tiny", help="the model every recipe trains")
    p.add_argument("--minutes", type=float, default=3.0, help="training budget per recipe (train.max_minutes)")
    p.add_argument("--recipes", nargs="+", default=list(CPU_RECIPES), help="NAME:CONFIG:key=value,...")
    p.add_argument("--csv", type=Path, default=None, help="default bench/results/recipes_<device>.csv")
    args = p.parse_args()
    device = stage_device(args.device)
    recipes = [Recipe.parse(r) for r in args.recipes]
    rows = []
    with tempfile.TemporaryDirectory(prefix="recipes_") as tmp:
        source = args.data
        if source is None:
            source = Path(tmp) / "source"
            if cli(["demo-data", "--out", str(source)]) != 0:
                raise SystemExit("demo-data failed")
        for recipe in recipes:
            rows.append(run_recipe(recipe, source.resolve(), Path(tmp), args))
            print(f"  {recipe.name}: {rows[-1]['best_gain_db']:+.3f} dB best over bicubic", flush=True)
    path, info = save_rows(rows, device, "recipes", args.csv)
    print(f"\nwrote {path}\n{info}\n{args.model}, {args.minutes:g} min of training per recipe; gain = validation "
          "PSNR (held-out fold, whole images, EMA, no ensemble) - bicubic")
    print(table(rows, ["recipe", "settings", "patches", "steps", "samples_per_s", "bicubic_db", "best_gain_db",
                       "last_gain_db", "best_step", "validations"]))


if __name__ == "__main__":
    main()

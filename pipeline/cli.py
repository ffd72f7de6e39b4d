"""``python -m pipeline <stage> [--config FILE] [flags] [key=value ...]``.

The stage table below is the whole interface: each stage names its module (imported only when
the stage runs, so ``--help`` stays fast), the config sections its ``--help`` lists, and the path
flags it accepts. A flag is only a spelling of a config key (``--data DIR`` = ``data.dir=DIR``),
so the resolved config saved by each stage records the paths too.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import describe, load_config
from pipeline.errors import UserError

REPO = Path(__file__).resolve().parent.parent
DATA_FLAG = {"--data": ("data.dir", "dataset root in the contest layout")}


def _model_names() -> str:
    from pipeline.models import MODELS

    return "models: " + ", ".join(sorted(MODELS))


@dataclass(frozen=True)
class Stage:
    module: str
    summary: str
    sections: tuple[str, ...]
    flags: dict[str, tuple[str, str]] = field(default_factory=dict)
    extra_help: Callable[[], str] | None = None
    default_config: str | None = None  # YAML used when --config is not given (relative to the repo)


STAGES: dict[str, Stage] = {
    "demo": Stage(
        "pipeline.demo", "every stage on a dataset built from bundled photos, then a score table",
        ("demo", "train", "infer"), {}, default_config="configs/demo.yaml"),
    "demo-data": Stage(
        "pipeline.demo_data", "build data/demo (contest layout) from scikit-image's photos",
        ("demo",), {"--out": ("demo.out", "where to write the dataset")}),
    "prepare": Stage(
        "pipeline.prepare", "check every pair and write splits.csv (folds by source image)",
        ("data",), DATA_FLAG),
    "patchify": Stage(
        "pipeline.patches", "cut aligned LR/HR patch pairs and write patches/manifest.csv",
        ("data", "patch"), DATA_FLAG),
    "train": Stage(
        "pipeline.train", "train a model on the patches; checkpoints in models/<run>",
        ("data", "model", "train", "paths"), DATA_FLAG, _model_names),
    "infer": Stage(
        "pipeline.infer", "super-resolve the test set (or any folder) with tiles + self-ensemble",
        ("data", "model", "infer", "paths"),
        {**DATA_FLAG, "--input": ("infer.input", "folder of LR images"),
         "--output": ("infer.output", "folder for the SR PNGs"),
         "--weights": ("model.weights", "a published or exported weights file to run as is (detected)")},
        _model_names),
    "submit": Stage(
        "pipeline.submit", "write and validate submit/<run>/submission.zip (or --check a zip)",
        ("data", "submit", "paths"),
        {**DATA_FLAG, "--check": ("submit.check", "validate this zip instead of writing one")}),
    "evaluate": Stage(
        "pipeline.evaluate", "PSNR / SSIM / NRMSE of predictions against ground truth",
        ("evaluate", "data"),
        {"--sr": ("evaluate.sr", "folder of predictions"),
         "--hr": ("evaluate.hr", "folder of ground-truth images"),
         "--protocol": ("evaluate.protocol", "competition or paper"),
         "--csv": ("evaluate.csv", "per-image CSV to write")}),
    "ablate": Stage(
        "pipeline.ablate", "grid over inference settings on the validation fold -> CSV + plot",
        ("data", "model", "ablate", "infer", "paths"), DATA_FLAG),
    "export": Stage(
        "pipeline.export", "write models/<run>/<checkpoint>.onnx (checked with ONNX Runtime) or .safetensors",
        ("model", "export", "paths"),
        {"--weights": ("model.weights", "export this weights file instead of the run's checkpoint")}),
}


def _parser(name: str, stage: Stage) -> argparse.ArgumentParser:
    rows = [("run", "'default'", "run name"), ("seed", "0", "global seed")]
    for section in stage.sections:
        rows += describe(section)
    width = max(len(k) for k, _, _ in rows)
    settings = "\n".join(f"  {k:<{width}}  {h} [default {d}]" for k, d, h in rows)
    epilog = f"settings (override with key=value):\n{settings}"
    if stage.extra_help:
        epilog += f"\n\n{stage.extra_help()}"
    p = argparse.ArgumentParser(
        prog=f"python -m pipeline {name}", description=stage.summary, epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (then flags, then key=value)")
    for flag, (key, text) in stage.flags.items():
        p.add_argument(flag, metavar=key.split(".")[-1].upper(), help=f"{text} (= {key})")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. train.learning_rate=1e-4")
    return p


def _top_help() -> str:
    width = max(map(len, STAGES))
    lines = [f"  {n:<{width}}  {s.summary}" for n, s in STAGES.items()]
    return ("usage: python -m pipeline <stage> [--config FILE] [flags] [key=value ...]\n\n"
            "stages:\n" + "\n".join(lines) + "\n\n`python -m pipeline <stage> --help` for its settings.")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_top_help())
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in STAGES:
        print(f"error: unknown stage {name!r}; stages: {', '.join(STAGES)}", file=sys.stderr)
        return 2
    stage = STAGES[name]
    args = _parser(name, stage).parse_args(rest)
    flags = [f"{key}={getattr(args, flag.lstrip('-'))}" for flag, (key, _) in stage.flags.items()
             if getattr(args, flag.lstrip("-")) is not None]
    config_file = args.config
    if config_file is None and stage.default_config:
        config_file = str(REPO / stage.default_config)
    try:
        cfg = load_config(config_file, [*args.overrides, *flags])
        module = importlib.import_module(stage.module)
        module.main(cfg)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0

"""``python -m pipeline <stage> [--config FILE] [flags] [key=value ...]``.

The stage table below is the whole interface: each stage names its module (imported only when
the stage runs), the config sections its ``--help`` lists, and the path flags it accepts. A flag is
only a spelling of a config key (``--data DIR`` = ``data.dir=DIR``), so the resolved config saved by
each stage records the paths too.

``--help`` and every settings error answer before anything heavy loads: this module imports only
the standard library and the light core (``config``: yaml; ``errors``, ``files``, ``workers``), the
tables' ``--help`` lists come from name tuples (``pipeline.models.names``, ``pipeline.mri.names``),
and every stage that reads a dataset or a volume folder imports torch, OpenCV or pandas only in
the functions that compute, after its own checks of its settings and folders (``export`` loads its
weights with torch to check them). ``tests/test_cli.py`` checks this through ``sys.modules``.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import re
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.core.config import describe, load_config
from pipeline.core.errors import Interrupted, UserError
from pipeline.core.files import free_text, weights_file_problem
from pipeline.core.heap import keep_freed_memory
from pipeline.core.workers import check_worker_counts

REPO = Path(__file__).resolve().parent.parent
DATA_FLAG = {"--data": ("data.dir", "dataset root in the contest layout")}
VOLUMES_FLAG = {"--volumes": ("mri.dir", "folder of HR volumes (mri_splits.csv, lr/, sr/ inside)")}


def _model_names() -> str:
    from pipeline.models.names import MODEL_NAMES

    return ("models: " + ", ".join(sorted(MODEL_NAMES)) + "\nany other network from its authors' architecture "
            "file: model.arch=FILE.py:Class (with model.arch_kwargs, arch_range, arch_key, arch_multiple); a Python "
            "file runs only when model.arch names it")


def _volume_model_names() -> str:
    from pipeline.mri.names import BASELINES, VOLUME_MODEL_NAMES

    return f"volume models: {', '.join(sorted(VOLUME_MODEL_NAMES))}; baselines: {', '.join(BASELINES)}"


def _train_names() -> str:
    from pipeline.models.names import DISCRIMINATOR_NAMES

    return f"{_model_names()}\ndiscriminators (gan.discriminator): {', '.join(sorted(DISCRIMINATOR_NAMES))}"


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
    "add-data": Stage(
        "pipeline.add_data", "extra training pairs from a folder of HR photos (bicubic x1/4, optional degradations)",
        ("data", "add_data"), {**DATA_FLAG, "--from": ("add_data.source", "folder of HR photos")}),
    "prepare": Stage(
        "pipeline.prepare", "check every pair and write splits.csv (folds by source image)",
        ("data",), DATA_FLAG),
    "patchify": Stage(
        "pipeline.patchify", "cut aligned LR/HR patch pairs and write patches/manifest.csv",
        ("data", "patchify"), DATA_FLAG),
    "train": Stage(
        "pipeline.train", "train a model on the patches; checkpoints in models/<run>",
        ("data", "model", "train", "loss", "gan", "paths"), DATA_FLAG, _train_names),
    "infer": Stage(
        "pipeline.infer", "super-resolve the test set (or any folder) with tiles + self-ensemble, or apply a blend",
        ("data", "model", "infer", "blend", "paths"),
        {**DATA_FLAG, "--input": ("infer.input", "folder of LR images"),
         "--output": ("infer.output", "folder for the SR PNGs"),
         "--weights": ("model.weights", "a published or exported weights file to run as is (detected, or "
                                        "model.arch's network)")},
        _model_names),
    "submit": Stage(
        "pipeline.submit", "write and validate submit/<run or blend.name>/submission.zip (or --check a zip)",
        ("data", "submit", "blend", "paths"),
        {**DATA_FLAG, "--check": ("submit.check", "validate this zip instead of writing one")}),
    "evaluate": Stage(
        "pipeline.evaluate", "PSNR / SSIM / NRMSE of predictions against ground truth",
        ("evaluate", "data"),
        {"--sr": ("evaluate.sr", "folder of predictions"),
         "--hr": ("evaluate.hr", "folder of ground-truth images"),
         "--protocol": ("evaluate.protocol", "competition or paper"),
         "--csv": ("evaluate.csv", "per-image CSV to write"),
         "--vs": ("evaluate.vs", "a second folder of predictions: the paired gain of --sr over it, 95% interval")}),
    "mri-prepare": Stage(
        "pipeline.mri.prepare", "volumes: mri_splits.csv (folds by subject) and LR volumes by mri.degradation",
        ("mri",), VOLUMES_FLAG),
    "mri-train": Stage(
        "pipeline.mri.train", "volumes: train a 3-D model (mdcsrn; L1, or WGAN-GP with gan.*) on 3-D patches; "
        "models/<run>", ("mri", "mri_train", "model", "train", "loss", "gan", "mri_infer", "paths"), VOLUMES_FLAG,
        _volume_model_names),
    "mri-cycle-train": Stage(
        "pipeline.mri.cycle_train",
        "volumes: train SRResCycGAN (mri_cycle_train.*) on unpaired LR / HR slices; models/<run>",
        ("mri", "mri_cycle_train", "train", "loss", "mri_infer", "paths"), VOLUMES_FLAG, _volume_model_names),
    "mri-infer": Stage(
        "pipeline.mri.infer", "volumes: super-resolve LR volumes (a volume checkpoint, or trilinear/tricubic)",
        ("mri", "mri_infer", "paths"),
        {**VOLUMES_FLAG, "--input": ("mri_infer.input", "folder of LR volumes"),
         "--output": ("mri_infer.output", "folder for the SR volumes")}, _volume_model_names),
    "mri-evaluate": Stage(
        "pipeline.mri.evaluate", "volumes: masked PSNR / SSIM / NRMSE of SR volumes, baselines as rows",
        ("mri", "mri_evaluate"),
        {**VOLUMES_FLAG, "--sr": ("mri_evaluate.sr", "folder of SR volumes"),
         "--csv": ("mri_evaluate.csv", "table to write")}),
    "demo-mri": Stage(
        "pipeline.mri.demo", "volumes: every stage on the bundled MRI scans (L1 + WGAN-GP mri-train), a score "
        "table against trilinear / tricubic, a figure and a report", ("demo_mri", "mri_train", "train", "gan"), {},
        default_config="configs/demo-mri.yaml"),
    "demo-mri-data": Stage(
        "pipeline.mri.demo_data", "volumes: build data/demo-mri from the MRI scans bundled in dipy and nibabel",
        ("demo_mri", "mri"), {"--out": ("demo_mri.out", "where to write the volume folder")}),
    "ablate": Stage(
        "pipeline.ablate", "grid over inference settings on the validation fold -> CSV + plot",
        ("data", "model", "ablate", "infer", "paths"), DATA_FLAG),
    "blend": Stage(
        "pipeline.blend", "fit non-negative weights summing to 1 for several runs on the validation fold "
        "(lstsq, greedy; cross-fitted gains with 95% intervals) -> submit/<blend.name>/blend.yaml",
        ("data", "blend", "infer", "paths"), DATA_FLAG),
    "export": Stage(
        "pipeline.export", "write models/<run>/<checkpoint>.onnx (checked with ONNX Runtime) or .safetensors",
        ("model", "export", "paths"),
        {"--weights": ("model.weights", "export this weights file instead of the run's checkpoint (detected, or "
                                         "model.arch's network)")}, _model_names),
}


def _parser(name: str, stage: Stage) -> argparse.ArgumentParser:
    rows = [("run", "'default'", "run name"), ("seed", "0", "global seed (>= 0, <= 4294967295)")]
    for section in stage.sections:
        rows += describe(section)
    width = max(len(k) for k, _, _ in rows)
    settings = "\n".join(f"  {k:<{width}}  {h} [default {d}]" for k, d, h in rows)
    epilog = f"settings (override with key=value):\n{settings}"
    if stage.extra_help:
        epilog += f"\n\n{stage.extra_help()}"
    p = argparse.ArgumentParser(
        prog=f"python -m pipeline {name}", description=_block_text(stage.summary), epilog=_block_text(epilog),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", metavar="FILE", help="YAML file of settings (then flags, then key=value)")
    for flag, (key, text) in stage.flags.items():
        p.add_argument(flag, metavar=key.split(".")[-1].upper(), help=_help_text(f"{text} (= {key})"))
    p.add_argument("overrides", nargs="*", metavar="key=value", help="settings, e.g. train.learning_rate=1e-4")
    return p


def _help_text(text: str) -> str:
    """``text`` as an argument's help: argparse %-formats those (``%(default)s``), so every % is
    doubled and a help such as "95% interval" prints as written instead of raising."""
    return text.replace("%", "%%")


def _block_text(text: str) -> str:
    """``text`` as a description or epilog (the settings table): argparse %-formats those only when
    they hold ``%(prog)``, and then every % must be doubled as in ``_help_text``."""
    return _help_text(text) if "%(prog)" in text else text


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
    # Intermixed: settings may come before, between and after the flags.
    args = _parser(name, stage).parse_intermixed_args(rest)
    flags = [f"{key}={getattr(args, flag.lstrip('-'))}" for flag, (key, _) in stage.flags.items()
             if getattr(args, flag.lstrip("-")) is not None]
    config_file = args.config
    if config_file is None and stage.default_config:
        config_file = str(REPO / stage.default_config)
    try:
        cfg = load_config(config_file, [*args.overrides, *flags])
        from pipeline.core.images import set_max_pixels  # numpy and PIL: after the settings are known good

        set_max_pixels(cfg.data.max_pixels)
        check_worker_counts(cfg)
        if "--weights" in stage.flags and cfg.model.weights:  # a missing file in a second, not after torch loads
            problem = weights_file_problem(cfg.model.weights)
            if problem:
                raise UserError(problem)
        keep_freed_memory()  # the next forward reuses the last one's memory (pipeline/core/heap.py)
        module = importlib.import_module(stage.module)
        module.main(cfg)
    except UserError as exc:  # (a failed write too: pipeline.core.files.WriteError names the file and free space)
        return _fail(_from_worker(str(exc)))
    except OSError as exc:  # permission denied, disk full, a folder where a file should be ...
        return _fail(_from_worker(os_error_text(exc)))
    except (zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        return _fail(f"bad zip file: {exc}")
    except Interrupted as exc:
        print(exc, file=sys.stderr)
        return 128 + exc.signum
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def os_error_text(exc: OSError) -> str:
    """One line for an OS error: the file, what went wrong, and what to do for the common ones."""
    where = exc.filename if exc.filename is not None else ""
    if exc.filename2 is not None:
        where = f"{where} -> {exc.filename2}"
    what = exc.strerror or str(exc)
    hint = {errno.ENOSPC: " (free some space, or point paths.* / --data elsewhere)",
            errno.EACCES: " (check the folder's permissions)",
            errno.EROFS: " (the folder is read-only; write elsewhere)"}.get(exc.errno or -1, "")
    if exc.errno == errno.ENOSPC and exc.filename is not None:
        hint = f" (free some space, or point paths.* / --data elsewhere; {free_text(Path(str(exc.filename)).parent)})"
    return f"{where}: {what}{hint}" if where else f"{what}{hint}"


def _from_worker(message: str) -> str:
    """The original error of one re-raised by a data-loader worker: torch's message wraps it in the
    worker's traceback ("Caught X in DataLoader worker process N. Original Traceback ... X: text")."""
    if not (message.startswith("Caught ") and "Original Traceback" in message):
        return message
    last = message.strip().splitlines()[-1]
    return re.sub(r"^[\w.]+: ", "", last)  # "pipeline.core.errors.UserError: text" -> "text"


def _fail(message: str) -> int:
    text = " ".join(message.split())  # one line, whatever the message held
    print(f"error: {text}", file=sys.stderr)
    return 2

"""Typed configuration: one frozen dataclass per section, YAML defaults, dotted overrides.

A setting is addressed as ``section.field`` (``train.learning_rate=2e-4``) or, for the few
top-level settings, by its bare name (``run=baseline``). Unknown keys and values of the wrong
type are errors (``ConfigError``) that name the key. The resolved config is written next to a
stage's outputs with ``save_config`` so that every folder says how it was made.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.errors import UserError


class ConfigError(UserError):
    """A config file or override that does not match the schema."""


def opt(default: Any, help: str) -> Any:
    """A dataclass field with its help text (shown by ``--help``)."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults so configs stay immutable")
    return field(default=default, metadata={"help": help})


Precision = Literal["auto", "fp32", "bf16", "fp16"]


@dataclass(frozen=True)
class PathsConfig:
    models: str = opt("models", "folder holding one sub-folder per training run")
    submit: str = opt("submit", "folder holding predictions, submissions and ablations per run")


@dataclass(frozen=True)
class DataConfig:
    dir: str = opt("data/demo", "dataset root in the contest layout (--data)")
    folds: int = opt(5, "number of folds; images are assigned by source image")
    val_fold: int = opt(0, "fold held out for validation, ablation and the leaderboard")
    scale: int = opt(4, "upscaling factor: HR side = scale x LR side")
    workers: int = opt(2, "processes that decode images while checking the dataset")


@dataclass(frozen=True)
class PatchConfig:
    size: int = opt(512, "HR patch side in pixels (must divide by data.scale); the LR patch is size/scale")
    stride: int = opt(0, "HR stride between patches (must divide by data.scale); 0 = size (no overlap)")
    edge: Literal["shift", "drop"] = opt(
        "shift", "edges that do not divide: 'shift' adds a last patch flush with the edge, "
        "'drop' leaves the remainder out")
    workers: int = opt(2, "worker processes")


@dataclass(frozen=True)
class ModelConfig:
    name: str = opt("edsr-tiny", "architecture from the model table (see `train --help`)")
    pretrained: str = opt(
        "", "weights file to start from (.pth/.pt/.safetensors, any layout); a file that is not model.name "
        "is detected (architecture + hyper-parameters) and used instead, recorded in models/<run>/model.yaml")
    weights: str = opt(
        "", "weights file infer/export run as is (--weights), architecture detected; replaces the run's checkpoint")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = opt(16, "global batch size (split across processes under torchrun)")
    crop: int = opt(0, "random LR crop inside each patch; 0 = whole patch")
    augment: bool = opt(True, "8 dihedral transforms applied identically to LR and HR")
    optimizer: Literal["adam", "adamw"] = opt("adam", "optimizer")
    learning_rate: float = opt(2e-4, "peak learning rate")
    weight_decay: float = opt(0.0, "weight decay")
    scheduler: Literal["step", "cosine", "constant"] = opt(
        "cosine", "'step' halves every step_epochs epochs, 'cosine' decays after warmup")
    step_epochs: int = opt(3, "StepLR period in epochs")
    step_gamma: float = opt(0.5, "StepLR factor")
    warmup_steps: int = opt(0, "linear warmup steps (cosine)")
    min_learning_rate: float = opt(1e-6, "floor of the cosine schedule")
    loss_l1: float = opt(2.0, "weight of the L1 loss")
    loss_mse: float = opt(1.0, "weight of the MSE loss")
    grad_clip: float = opt(0.0, "clip the gradient norm to this; 0 = off")
    ema_decay: float = opt(0.999, "EMA decay of the weights; 0 = no EMA")
    precision: Precision = opt(
        "auto", "autocast dtype; auto = bf16 on CUDA/bf16-capable CPUs, fp32 elsewhere")
    channels_last: bool = opt(True, "NHWC memory format for convolutions")
    max_steps: int = opt(0, "stop after this many optimizer steps; 0 = no limit")
    max_epochs: int = opt(0, "stop after this many epochs; 0 = no limit")
    max_minutes: float = opt(
        0.0, "wall-clock budget of the run, summed over resumes; then validate, save and exit; 0 = none")
    val_every: int = opt(200, "validate every this many steps")
    patience: int = opt(0, "stop after this many validations without improvement; 0 = never")
    save_every: int = opt(500, "write the last checkpoint every this many steps")
    save_minutes: float = opt(10.0, "and at least every this many minutes")
    keep_last: int = opt(3, "step checkpoints kept in models/<run>/history (for infer.last_k)")
    resume: Literal["auto", "never", "force"] = opt(
        "auto", "auto = resume when models/<run>/last.pth exists; force = fail if it does not")
    deterministic: bool = opt(
        False, "deterministic algorithms, for bit-exact resumes (the data order always depends on seed and epoch only)")
    workers: int = opt(2, "data loader workers per process")
    log_every: int = opt(20, "log scalars every this many steps")


@dataclass(frozen=True)
class InferConfig:
    tta: Literal[1, 2, 4, 8] = opt(8, "self-ensemble ways (dihedral transforms)")
    tile: int = opt(128, "LR tile side; 0 = whole image")
    stride: int = opt(64, "LR stride between tiles")
    blend: Literal["mean", "hann"] = opt(
        "hann", "tile weights: 'hann' (raised window with a floor; measured +0.05 dB over 'mean' on held-out "
        "demo images, BENCHMARKS.md) or 'mean' (equal, the reference team's)")
    pad: int = opt(0, "LR pixels of reflection added on all four sides (then cropped) so edges get context")
    margin: int = opt(0, "LR pixels at tile sides facing another tile given weight 0 (<= (tile-stride)/2)")
    batch: int = opt(0, "tiles per forward pass; 0 = sized to the device")
    precision: Precision = opt("auto", "autocast dtype; auto = bf16 where it is fast")
    channels_last: bool = opt(True, "NHWC memory format")
    checkpoint: Literal["best", "last"] = opt("best", "which checkpoint of the run")
    weights: Literal["ema", "params"] = opt("ema", "prefer EMA weights (falls back to params)")
    runs: tuple[str, ...] = opt((), "extra runs averaged at the output (multi-model ensemble)")
    last_k: int = opt(0, "average the outputs of the run's last k kept checkpoints; 0 = off")
    input: str = opt("", "folder of LR images (--input); default: the dataset's test set")
    output: str = opt("", "folder for SR PNGs (--output); default: submit/<run>/pred")
    split: Literal["test", "val"] = opt("test", "which images of --data to infer")


@dataclass(frozen=True)
class SubmitConfig:
    check: str = opt("", "validate this existing zip instead of writing one (--check)")
    format: Literal["zip", "csv"] = opt("zip", "zip of PNGs, or a CSV table for contests that take one")


@dataclass(frozen=True)
class EvaluateConfig:
    sr: str = opt("", "folder of predictions (--sr)")
    hr: str = opt("", "folder of ground truth with the same file stems (--hr)")
    protocol: Literal["competition", "paper"] = opt(
        "competition", "competition = RGB uint8 PSNR; paper = Y channel, scale-pixel border cropped")
    csv: str = opt("", "per-image CSV to write (--csv)")


@dataclass(frozen=True)
class AblateConfig:
    tta: tuple[int, ...] = opt((1, 2, 4, 8), "ensemble ways to try")
    tiles: tuple[str, ...] = opt(
        ("0", "128/64", "128/96", "256/128"), "tile/stride pairs to try; '0' = whole image")
    blends: tuple[str, ...] = opt(("mean", "hann"), "blends to try")
    precisions: tuple[str, ...] = opt(("fp32", "auto"), "precisions to try")
    runs: tuple[str, ...] = opt((), "extra model sets: runs averaged with the main run")


@dataclass(frozen=True)
class DemoConfig:
    out: str = opt("data/demo", "where demo-data writes the dataset (--out)")
    seed: int = opt(0, "seed of the crops chosen per photo")
    train_minutes: float = opt(5.0, "training budget of the demo model (a fresh run each time)")


@dataclass(frozen=True)
class ExportConfig:
    format: Literal["onnx", "safetensors"] = opt(
        "onnx", "onnx (dynamic batch/height/width, checked against PyTorch with ONNX Runtime) or safetensors "
        "(weights only, arch and kwargs in the metadata)")
    opset: int = opt(17, "ONNX opset version")
    checkpoint: Literal["best", "last"] = opt("best", "which checkpoint of the run; the output is models/<run>/<it>.*")
    weights: Literal["ema", "params"] = opt("ema", "prefer EMA weights (falls back to params)")
    image: str = opt("", "LR image the ONNX check runs on; default: a 40x52 crop of a photo scikit-image ships")


@dataclass(frozen=True)
class Config:
    run: str = opt("default", "run name: checkpoints in models/<run>, outputs in submit/<run>")
    seed: int = opt(0, "global seed (splits, data order, initialisation)")
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    patch: PatchConfig = field(default_factory=PatchConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# ---------------------------------------------------------------------------------------------
# Type checking of values coming from YAML or the command line.


def _check(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float, list -> tuple) or raise ConfigError."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value stands for a one-element tuple
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return tuple(_check(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {value!r} does not match {tp}")
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `run=1` or a tile spec like `0` is still a name
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _merge(obj: Any, values: dict[str, Any], prefix: str) -> Any:
    """A copy of dataclass ``obj`` with ``values`` (a nested dict) applied and type-checked."""
    cls = type(obj)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown(key, all_keys())
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of settings, got {value!r}")
            changes[name] = _merge(getattr(obj, name), value, f"{key}.")
        else:
            changes[name] = _check(value, tp, key)
    return dataclasses.replace(obj, **changes)


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.learning_rate=2e-4'`` -> ``('train.learning_rate', 0.0002)`` (YAML scalars)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse {raw!r}: {exc}") from None
    # YAML 1.1 reads 2e-4 as a string (no dot); take it as the float the user meant.
    if isinstance(value, str) and _FLOAT.fullmatch(raw.strip()):
        value = float(raw)
    return key.strip(), value


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is a setting, not a section")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides, each checked against the schema."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            values = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            cfg = _merge(cfg, values, "")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    flat = dict(parse_override(o) for o in overrides)
    return _merge(cfg, _nest(flat), "")


def with_overrides(cfg: Config, **flat: Any) -> Config:
    """``with_overrides(cfg, **{"infer.tta": 1})``: a checked copy, for code that varies settings."""
    return _merge(cfg, _nest(flat), "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML and checkpoints."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def from_dict(values: dict[str, Any]) -> Config:
    """Inverse of ``to_dict`` (checked, so an old file with a removed key is an error)."""
    return _merge(Config(), values, "")


def save_config(cfg: Config, path: str | Path, sections: tuple[str, ...] = ()) -> Path:
    """Write the resolved config (all of it, or the top level plus ``sections``) atomically."""
    from pipeline.images import atomic_write

    values = to_dict(cfg)
    if sections:
        top = {k: v for k, v in values.items() if not isinstance(v, dict)}
        values = {**top, **{s: values[s] for s in sections}}
    text = yaml.safe_dump(values, sort_keys=False)
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def describe(section: str) -> list[tuple[str, str, str]]:
    """``(key, default, help)`` rows of one section (or ``''`` for the top level) for ``--help``."""
    rows = []
    if section:
        cls = _hints(Config)[section]
        prefix = f"{section}."
    else:
        cls, prefix = Config, ""
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(_hints(cls)[f.name]):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        rows.append((f"{prefix}{f.name}", repr(default), f.metadata.get("help", "")))
    return rows

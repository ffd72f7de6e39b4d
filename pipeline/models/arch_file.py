"""A network from its authors' architecture file: ``model.arch=path/to/file.py:Class``.

Most published networks ship as a Python file with the class and a weights file; spandrel knows
only some of them. ``model.arch`` names such a file and class, ``model.arch_kwargs`` its constructor
arguments, ``model.arch_range`` the input range it was trained on (1 or 255), ``model.arch_key`` the
entry of the weights file holding its state dict, ``model.arch_multiple`` a size its input must
divide by. The network is wrapped like every other model (``FileNetwork``, an ``archs.Padded``): RGB
in [0,1] in, x4 out; its state dict keeps the authors' bare keys, so their code loads our checkpoints.

Running a user's Python file is the user's choice: a file is imported only when ``model.arch``
names it, or when a run that was trained from it is rebuilt (its checkpoint records the file's
absolute path and sha256; checkpoint.py). The file is read once, hashed, and those very bytes run
(``importlib`` module under a private name ``_sr_arch_<sha>``), so what ran is what was recorded; a
recorded file that changed or is gone is refused before it runs. A weights file never names a
Python file to run: one saved from such a run loads only when ``model.arch`` names the same file.

How a checkpoint records it: ``arch`` = ``file:<absolute path>:<Class>``, ``kwargs`` =
``{sha256, kwargs, range, multiple}`` (``record``); ``models/<run>/model.yaml`` shows the same card.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import sys
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from pipeline.core.config import ModelConfig, kwargs_of, split_arch
from pipeline.core.errors import CheckpointError, UserError
from pipeline.models.archs import SCALE, Padded, pad_to_size
from pipeline.models.table import ModelCard, count_parameters

ARCH_PREFIX = "file:"  # checkpoint arch of a network built from its authors' file
# An unknown network may overflow fp16's range (as spandrel's transformers do); bf16 has fp32's range.
FILE_PRECISIONS = ("fp32", "bf16")
PROBE_SIDE = 32  # LR side of the shape check every built network passes
_AUTO_KEYS = ("params", "state_dict", "model")  # after params_ema (or before it, with ema off)
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel / DDP, torch.compile


@dataclass(frozen=True)
class ArchSpec:
    """A network of an architecture file as the settings (or a checkpoint's record) describe it."""

    path: Path  # absolute
    cls: str
    kwargs: dict[str, Any]
    value_range: int = 1  # 1: RGB in [0,1]; 255: RGB in [0,255]
    multiple: int = 1
    key: str = "auto"  # the weights file's entry holding the state dict (model.arch_key)

    @property
    def arch(self) -> str:
        return f"{ARCH_PREFIX}{self.path}:{self.cls}"

    def record(self, sha256: str) -> dict[str, Any]:
        """The checkpoint's ``kwargs`` for this network (plain types)."""
        return {"sha256": sha256, "kwargs": self.kwargs, "range": self.value_range, "multiple": self.multiple}


def spec_of(model: ModelConfig) -> ArchSpec | None:
    """The network ``model.arch*`` name, or None when model.arch is empty."""
    if not model.arch:
        return None
    path, cls = split_arch(model.arch)
    return ArchSpec(Path(path).expanduser().resolve(), cls, kwargs_of(model.arch_kwargs), model.arch_range,
                    model.arch_multiple, model.arch_key)


def is_file_arch(arch: Any) -> bool:
    return isinstance(arch, str) and arch.startswith(ARCH_PREFIX)


def spec_of_record(arch: str, kwargs: Any, where: str | Path) -> tuple[ArchSpec, str]:
    """(the spec, the recorded sha256) of a checkpoint's ``arch`` / ``kwargs``; a malformed record names ``where``."""
    path, _sep, cls = arch.removeprefix(ARCH_PREFIX).rpartition(":")
    ok = (isinstance(kwargs, dict) and isinstance(kwargs.get("sha256"), str) and len(kwargs["sha256"]) == 64
          and isinstance(kwargs.get("kwargs"), dict) and kwargs.get("range") in (1, 255)
          and type(kwargs.get("multiple")) is int and 1 <= kwargs["multiple"] <= 1024)
    if not (path and cls.isidentifier() and Path(path).is_absolute() and ok):
        raise CheckpointError(f"{where}: malformed record of an architecture file (arch {arch[:80]!r})")
    return ArchSpec(Path(path), cls, kwargs["kwargs"], kwargs["range"], kwargs["multiple"]), kwargs["sha256"]


def read_source(path: Path) -> tuple[bytes, str]:
    """The file's bytes and their sha256; a missing file is a one-line error."""
    if not path.is_file():
        raise UserError(f"{path}: architecture file not found (model.arch)")
    source = path.read_bytes()
    return source, hashlib.sha256(source).hexdigest()


def check_unchanged(path: Path, recorded: str, where: str | Path) -> tuple[bytes, str]:
    """The recorded file's bytes, refused when the file is gone or its sha256 is not the recorded one."""
    if not path.is_file():
        raise CheckpointError(f"{path}: architecture file not found; {where} was trained from it (sha256 "
                              f"{recorded[:16]}...): restore it")
    source, sha = read_source(path)
    if sha != recorded:
        raise _changed(path, recorded, sha, where, "restore it, or train again from it")
    return source, sha


def _changed(path: Path, recorded: str, sha: str, where: str | Path, advice: str) -> CheckpointError:
    return CheckpointError(f"{path}: the architecture file changed since {where} was written (sha256 "
                           f"{recorded[:16]}... then, {sha[:16]}... now); {advice}")


def check_resumable(state: dict[str, Any], where: str | Path, arch: str, kwargs: dict[str, Any]) -> None:
    """A run of an architecture file goes on only with the recorded file, unchanged, and the same arguments
    (``state``: its checkpoint; ``arch`` / ``kwargs``: what this start built)."""
    then = state.get("kwargs")
    if not is_file_arch(arch) or state.get("arch") != arch or then == kwargs:
        return
    advice = "restore it, or use another run name, or train.resume=never to start over (the old run is moved aside)"
    if not isinstance(then, dict) or then.get("sha256") != kwargs["sha256"]:
        recorded = then.get("sha256", "?") if isinstance(then, dict) else "?"
        raise _changed(Path(arch.removeprefix(ARCH_PREFIX).rpartition(":")[0]), str(recorded), kwargs["sha256"],
                       where, advice)
    differ = ", ".join(f"{k} {then.get(k)!r} then, {v!r} now" for k, v in kwargs.items() if then.get(k) != v)
    raise CheckpointError(f"{where}: a run of {arch.removeprefix(ARCH_PREFIX)} with other settings ({differ[:300]}; "
                          "model.arch_kwargs / arch_range / arch_multiple); use the run's, another run name, or "
                          "train.resume=never to start over")


_MODULES: dict[str, ModuleType] = {}  # by sha256: each version of a file runs once per process


def _import(path: Path, source: bytes, sha: str) -> ModuleType:
    """Run ``source`` (the bytes just hashed) as module ``_sr_arch_<sha>``; its folder is importable meanwhile."""
    if sha in _MODULES:
        return _MODULES[sha]
    name = f"_sr_arch_{sha[:16]}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None:
        raise UserError(f"{path}: cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses and pickling look a class's module up by name)
    folder = str(path.parent)
    sys.path.insert(0, folder)  # the authors' helper modules beside the file
    try:
        exec(compile(source, str(path), "exec"), module.__dict__)  # noqa: S102 (model.arch names this file)
    except (Exception, SystemExit) as exc:
        del sys.modules[name]
        raise UserError(f"{path}: cannot import it ({_first(exc)})") from None
    finally:
        sys.path.remove(folder)
    _MODULES[sha] = module
    return module


def _first(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:300]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class FileNetwork(Padded):
    """An authors' network as the pipeline runs it: (B,3,h,w) in [0,1] -> (B,3,4h,4w) in [0,1]."""

    def __init__(self, net: nn.Module, value_range: int = 1, multiple: int = 1) -> None:
        super().__init__(net, 0, multiple)
        self.value_range = value_range

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.value_range == 1:
            return super().forward(x)
        return super().forward(x * self.value_range) / self.value_range  # a [0,255] network, seen in [0,1]


def build(spec: ArchSpec, source: bytes, sha: str) -> FileNetwork:
    """``spec.cls(**spec.kwargs)`` from ``source`` (the file's bytes, hashed as ``sha``), wrapped and checked to be
    x4 RGB; its card records the file. Every failure is one line naming the file."""
    module = _import(spec.path, source, sha)
    cls = module.__dict__.get(spec.cls)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        found = sorted(n for n, v in vars(module).items()
                       if inspect.isclass(v) and issubclass(v, nn.Module) and v.__module__ == module.__name__)
        what = "no class" if cls is None else "a name that is not a torch.nn.Module class:"
        raise UserError(f"{spec.path}: {what} {spec.cls!r} (its network classes: {', '.join(found) or 'none'})")
    try:
        net = cls(**spec.kwargs)
    except Exception as exc:  # wrong or missing arguments, or the constructor's own checks
        args = ", ".join(f"{k}={v!r}" for k, v in spec.kwargs.items())
        raise UserError(f"{spec.path}: {spec.cls}({args[:200]}) failed ({_first(exc)}); check model.arch_kwargs"
                        ) from None
    model = FileNetwork(net, spec.value_range, spec.multiple)
    _check_x4(model, spec)
    note = (f"{spec.cls} of {spec.path} (sha256 {sha[:16]}..., {count_parameters(model):,} parameters, "
            f"input range [0,{spec.value_range}])")
    model.card = ModelCard(spec.arch, spec.record(sha), FILE_PRECISIONS, note)
    return model


def _check_x4(model: FileNetwork, spec: ArchSpec) -> None:
    """One forward of the bare network at a small size: it must map (1,3,h,w) to (1,3,4h,4w)."""
    x = pad_to_size(torch.full((1, 3, PROBE_SIDE, PROBE_SIDE), 0.5), 0, spec.multiple) * spec.value_range
    h, w = x.shape[-2:]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model.net(x)
    except Exception as exc:
        raise UserError(f"{spec.path}: {spec.cls} fails on a 1x3x{h}x{w} input ({_first(exc)}); "
                        "model.arch_multiple sets a size its input must divide by") from None
    finally:
        model.train(was_training)
    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
    if shape != (1, 3, SCALE * h, SCALE * w):
        raise UserError(f"{spec.path}: {spec.cls} maps a (1, 3, {h}, {w}) input to {shape}; the pipeline needs "
                        f"x{SCALE} RGB, (1, 3, {SCALE * h}, {SCALE * w}) (check model.arch_kwargs)")


def state_dict_of(state: dict[str, Any], path: str | Path, key: str, ema: bool) -> tuple[dict[str, torch.Tensor], str]:
    """(the state dict in a weights file, the entry it came from) by ``model.arch_key``; a shared prefix of
    DataParallel or torch.compile is stripped."""
    if key == "file":
        weights, where = state, "the file itself"
    elif key != "auto":
        if not isinstance(state.get(key), dict):
            raise CheckpointError(f"{path}: no state dict under model.arch_key={key!r} (its entries: "
                                  f"{', '.join(map(str, list(state)[:12]))})")
        weights, where = state[key], key
    elif state and all(isinstance(v, torch.Tensor) for v in state.values()):
        weights, where = state, "the file itself"
    else:
        order = ("params_ema", *_AUTO_KEYS) if ema else ("params", "params_ema", *_AUTO_KEYS[1:])
        where = next((k for k in order if isinstance(state.get(k), dict)), "")
        if not where:
            raise CheckpointError(f"{path}: no state dict found (looked for tensors, {', '.join(order)}); name its "
                                  f"entry with model.arch_key (its entries: {', '.join(map(str, list(state)[:12]))})")
        weights = state[where]
    for prefix in _PREFIXES:
        if weights and all(isinstance(k, str) and k.startswith(prefix) for k in weights):
            weights = {k.removeprefix(prefix): v for k, v in weights.items()}
    if not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: {where} is not a state dict (a mapping of names to tensors)")
    return weights, where

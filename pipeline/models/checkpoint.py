"""Checkpoints and weights files: ours (.pth or .safetensors) and any published one, plain types only.

Our checkpoint (.pth) is a dict:
    params       model state dict (basicsr's key: other SR tools load it as is)
    params_ema   EMA state dict (inference prefers it), or absent
    arch         model table name, or ``spandrel:<ArchId>`` for a detected model outside the table
    kwargs       the table's keyword arguments (or spandrel's detected hyper-parameters)
    step, epoch, best_psnr, and for training state: optimizer, scheduler, scaler, rng, config
Everything is a tensor, number, string, list or dict, so ``torch.load(weights_only=True)`` works.
Our .safetensors (``export export.format=safetensors``) holds one set of weights (EMA when
present) with ``arch`` / ``kwargs`` (JSON) in its metadata.

Any other weights file (.pth/.pt/.ckpt/.safetensors: basicsr ``params``/``params_ema``, KAIR and
original repositories' bare state dicts, ``model``/``state_dict``/``net`` wrappers, ``module.`` /
``netG.`` prefixes) is unwrapped with spandrel's ``canonicalize_state_dict`` and either fits the
table model asked for, or its architecture and hyper-parameters are detected (``zoo.detect``).

Checkpoint arguments are checked against the model table BEFORE anything is built: a file cannot
make us allocate what the table does not describe. Loading is bounded by the file's size: a .pth
archive whose members are compressed (``torch.save`` never compresses; a 1 MB file could inflate to
GBs) is refused before ``torch.load``, and so is a tensor that claims more elements than its data
holds (a zero-stride view: a 2 KB file "holding" 10^12 values that a detected architecture would be
built for). Weights loaded into a model must be finite, so NaN weights are named as such, not
blamed on the learning rate or an image.
"""

from __future__ import annotations

import dataclasses
import json
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import safe_open
from safetensors.torch import save_file
from spandrel import MAIN_REGISTRY, canonicalize_state_dict
from torch import nn

from pipeline.core.errors import CheckpointError
from pipeline.core.files import atomic_write, weights_file_problem
from pipeline.models import arch_file, zoo
from pipeline.models.table import MODELS, ModelCard, build_model, card_of, count_parameters, model_kwargs
from pipeline.models.zoo import SPANDREL_PREFIX, plain

__all__ = ["CheckpointError", "check_archive", "check_finite", "check_table_kwargs", "load_checkpoint",
           "load_state_into", "load_weights", "load_weights_file", "model_from_checkpoint", "save_checkpoint",
           "save_model_card", "save_safetensors", "state_dict_from", "weights_key"]

_TRAINING_STATE = ("params", "params_ema", "optimizer", "scheduler", "scaler", "rng")
PRODUCER = "sr-pipeline"


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a truncated file."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def save_safetensors(path: str | Path, weights: dict[str, torch.Tensor], arch: str, kwargs: dict[str, Any],
                     check: Callable[[Path], None] | None = None, **extra: str) -> Path:
    """Weights only, atomically, with the model's table name and arguments in the metadata; ``check(tmp)``
    (raising to refuse) reads the written file back before it replaces ``path``."""
    # safetensors refuses views and tensors sharing storage: give it one contiguous copy of each.
    tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in weights.items()}
    metadata = {"producer": PRODUCER, "arch": arch, "kwargs": json.dumps(plain(kwargs)), **extra}
    with atomic_write(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
        if check is not None:
            check(tmp)
    return Path(path)


def _load_safetensors(path: Path, map_location: str | torch.device) -> dict[str, Any]:
    """A .safetensors file as a checkpoint dict: ours -> params + arch/kwargs; foreign -> the bare tensors."""
    with safe_open(str(path), framework="pt", device=str(map_location)) as f:
        metadata = f.metadata() or {}
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    if metadata.get("producer") != PRODUCER or "arch" not in metadata:
        return tensors
    try:
        kwargs = json.loads(metadata.get("kwargs", "{}"))
    except json.JSONDecodeError:
        raise CheckpointError(f"{path}: metadata 'kwargs' is not JSON") from None
    return {"params": tensors, "arch": metadata["arch"], "kwargs": kwargs}


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu", mmap: bool = False,
                    safetensors: bool | None = None) -> dict[str, Any]:
    """Load a .pth/.pt/.ckpt with ``weights_only=True`` (no code execution) or a .safetensors; errors name the file.

    ``mmap``: map a .pth's tensors instead of reading them (for its metadata alone). ``safetensors``: the
    format, when the suffix does not say it (a temporary file); by default the suffix decides.
    """
    path = Path(path)
    problem = weights_file_problem(path)
    if problem:
        raise CheckpointError(problem)
    if safetensors is None:
        safetensors = path.suffix.lower() == ".safetensors"
    try:
        if safetensors:
            state = _load_safetensors(path, map_location)
        else:
            check_archive(path)
            state = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except CheckpointError:
        raise
    except pickle.UnpicklingError as exc:  # weights_only refused the file: never advise loading it unsafely
        what = _refusal(exc)
        if not what.startswith(_OBJECT_REFUSALS):  # bytes that are no pickle at all: a damaged or foreign file
            raise CheckpointError(f"{path}: cannot load checkpoint (not a PyTorch weights file, or a damaged one: "
                                  f"{what})") from None
        raise CheckpointError(f"{path}: refused: it holds pickled objects that safe loading does not allow "
                              f"({what}); nothing in it was run. Load weights only from sources you trust, "
                              "as a plain state dict (.pth) or .safetensors") from None
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        first = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {first})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(state).__name__}")
    _check_views(state, path)
    return state


# How torch's weights-only unpickler words a refused object (a class, a function to call) rather than bytes
# that are no pickle at all (_weights_only_unpickler.py).
_OBJECT_REFUSALS = ("Unsupported global", "Trying to load unsupported GLOBAL", "Trying to call reduce",
                    "Can only create new object", "Can only build Tensor")


def _refusal(exc: pickle.UnpicklingError) -> str:
    """What torch's weights-only unpickler refused: its first sentence, without its advice (to load unsafely,
    or to allowlist the refused global)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Weights only load failed", "Check the documentation",
                                                              "(1)", "(2)")) and "weights_only" not in line]
    text = useful[0] if useful else "an object that is not a tensor, number, string, list or dict"
    text = text.removeprefix("WeightsUnpickler error: ").split(". ")[0]
    return text.rstrip(".")[:200]


def check_archive(path: Path) -> None:
    """Refuse a .pth zip archive that would load into more memory than its size, before ``torch.load``.

    ``torch.save`` stores every member uncompressed; a compressed member (deflate: ~1000x) would be
    inflated in memory by the loader before anything else could be checked.
    """
    if not zipfile.is_zipfile(path):
        return  # the legacy format: its storages are read as stored, bounded by the file
    size = path.stat().st_size
    with zipfile.ZipFile(path) as zf:
        total = 0
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(f"{path}: member {info.filename!r} is compressed ({info.compress_size} bytes "
                                      f"that inflate to {info.file_size}); torch.save never compresses: refused before "
                                      "loading")
            if info.file_size != info.compress_size:
                raise CheckpointError(f"{path}: member {info.filename!r} declares {info.file_size} bytes but stores "
                                      f"{info.compress_size}: refused before loading")
            total += info.file_size
        if total > size:
            raise CheckpointError(f"{path}: its members declare {total} bytes, more than the file's {size}: refused "
                                  "before loading")


def _check_views(value: Any, path: Path, depth: int = 0) -> None:
    """Every tensor in a loaded file holds at most as many values as its stored data (no broadcast views)."""
    if isinstance(value, torch.Tensor):
        if value.is_nested or value.layout != torch.strided:  # (they have no one storage to measure)
            kind = "nested" if value.is_nested else str(value.layout).removeprefix("torch.")
            raise CheckpointError(f"{path}: holds a {kind} tensor; weights files hold dense tensors")
        if value.numel() * value.element_size() > value.untyped_storage().nbytes():
            raise CheckpointError(f"{path}: a tensor of shape {tuple(value.shape)} is a view of only "
                                  f"{value.untyped_storage().nbytes()} stored bytes (zero strides): refused")
    elif depth < 16 and isinstance(value, dict):
        for item in value.values():
            _check_views(item, path, depth + 1)
    elif depth < 16 and isinstance(value, (list, tuple)):
        for item in value:
            _check_views(item, path, depth + 1)


def check_finite(model: nn.Module, path: str | Path) -> None:
    """Refuse weights with NaN or infinite values: every output would be NaN, whatever the image or rate."""
    for name, p in model.named_parameters():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            bad = int((~torch.isfinite(p)).sum())
            raise CheckpointError(f"{path}: weights {name!r} hold {bad} NaN or infinite value(s): the file is broken "
                                  "(a diverged run?); use another checkpoint")


def weights_key(ema: bool) -> str:
    """Which weights of our checkpoint to use: ``params_ema`` (the EMA, what inference prefers) or ``params``."""
    return "params_ema" if ema else "params"


def state_dict_from(state: dict[str, Any], path: str | Path, prefer: str = "params_ema") -> dict[str, torch.Tensor]:
    """The weights in a file: ``prefer``'s dict when present, else unwrapped as spandrel does.

    spandrel's ``canonicalize_state_dict`` looks for ``state_dict``, ``params_ema``, ``params``,
    ``model``, ``net`` ... wrappers and strips ``module.`` (DataParallel/DDP) and ``netG.`` prefixes.
    """
    weights = state[prefer] if isinstance(state.get(prefer), dict) else canonicalize_state_dict(state)
    weights = {k.removeprefix("module."): v for k, v in weights.items()}
    if not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: no state dict found (looked for {prefer}, params_ema, params, "
                              "state_dict, model, bare tensors)")
    return weights


def _load_into(model: nn.Module, weights: dict[str, torch.Tensor], path: str | Path, what: str) -> None:
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as exc:
        first = " ".join(str(exc).strip().splitlines()[:3])[:400]
        raise CheckpointError(f"{path}: weights do not fit {what}: {first}") from None
    check_finite(model, path)


def load_weights(model: nn.Module, path: str | Path, ema: bool = True) -> None:
    """Load a weights file (any layout above) into ``model``, its EMA first when ``ema``; a key or shape
    mismatch names the file."""
    _load_into(model, state_dict_from(load_checkpoint(path), path, weights_key(ema)), path, "the model")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def check_table_kwargs(path: str | Path, arch: Any, kwargs: Any) -> None:
    """A checkpoint's (arch, kwargs) must be a table entry with exactly its preset's values.

    Raised before anything is built, so a file claiming ``num_feat=4096`` allocates nothing.
    """
    if not isinstance(arch, str) or arch not in MODELS:
        raise CheckpointError(f"{path}: arch {_short(arch)} is not in the model table (see `train --help`)")
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: kwargs must be a mapping, got {type(kwargs).__name__}")
    preset = MODELS[arch].kwargs
    for key, value in kwargs.items():
        if key not in preset:
            raise CheckpointError(f"{path}: argument {_short(key)} is not an argument of {arch} "
                                  f"(it takes {', '.join(sorted(preset)) or 'none'})")
        if plain(value) != plain(preset[key]):
            raise CheckpointError(f"{path}: argument {key}={_short(value)} differs from the {arch} preset "
                                  f"({_short(plain(preset[key]))}); checkpoints hold the table's arguments")


def _rebuild(state: dict[str, Any], path: str | Path, prefer: str) -> nn.Module:
    """The model one of our checkpoints describes, with its weights (arguments checked first)."""
    arch, kwargs = state["arch"], state.get("kwargs", {})
    weights = state_dict_from(state, path, prefer)
    if arch_file.is_file_arch(arch):  # the recorded file, refused before it runs if it changed
        spec, recorded = arch_file.spec_of_record(arch, kwargs, path)
        model = arch_file.build(spec, *arch_file.check_unchanged(spec.path, recorded, path))
        _load_into(model, weights, path, f"{spec.cls} of {spec.path}")
        return model
    if isinstance(arch, str) and arch.startswith(SPANDREL_PREFIX):
        arch_id = arch.removeprefix(SPANDREL_PREFIX)
        if arch_id not in MAIN_REGISTRY or not isinstance(kwargs, dict):
            raise CheckpointError(f"{path}: arch {_short(arch)} is not an architecture spandrel knows")
        found = zoo.detect(weights, path)  # rebuilt from the weights' own shapes, never from kwargs
        check_finite(found.model, path)
        if found.arch_id != arch_id:
            raise CheckpointError(f"{path}: arch says {arch_id} but the weights are {found.arch_id}")
        for key, value in kwargs.items():
            if found.hyperparameters.get(key) != plain(value):
                raise CheckpointError(f"{path}: argument {key}={_short(value)} does not match the weights "
                                      f"({_short(found.hyperparameters.get(key))})")
        found.model.card = ModelCard(arch, found.hyperparameters, found.precisions, detected=found.summary())
        return found.model
    check_table_kwargs(path, arch, kwargs)
    model = build_model(arch)
    _load_into(model, weights, path, arch)
    return model


def model_from_checkpoint(path: str | Path, ema: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model one of our checkpoints describes and load its weights (EMA first when asked)."""
    state = load_checkpoint(path)
    if "arch" not in state:
        raise CheckpointError(f"{path}: no 'arch' entry; run a published weights file with --weights "
                              "(architecture detected) or train from it with model.pretrained")
    model = _rebuild(state, path, weights_key(ema))
    meta = {k: v for k, v in state.items() if k not in _TRAINING_STATE}
    return model.eval(), meta


def _fitting_table_model(name: str, weights: dict[str, torch.Tensor]) -> nn.Module | None:
    """Table model ``name`` when ``weights`` have exactly its keys and shapes, else None."""
    try:
        with torch.device("meta"):  # shapes without memory
            model = build_model(name)
    except RuntimeError:  # constructors that read tensor values (drop-path schedules) need real ones
        model = build_model(name)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if not shapes or shapes != {k: tuple(v.shape) for k, v in weights.items()}:
        return None
    return build_model(name) if next(iter(model.state_dict().values())).is_meta else model


def _table_entry(found: zoo.Detected) -> str | None:
    """The table entry a detected model is (same family, every preset argument equal), if any."""
    family = zoo.FAMILIES.get(found.arch_id)
    for name, spec in MODELS.items():
        if family is not None and spec.builder is family:
            wanted = {**family.fixed, **spec.kwargs}
            if all(found.hyperparameters.get(k) == plain(v) for k, v in wanted.items()):
                return name
    return None


def load_weights_file(path: str | Path, name: str = "", ema: bool = True,
                      arch: arch_file.ArchSpec | None = None) -> nn.Module:
    """Any weights file -> a model holding its weights, with a card saying what it is and how it was found.

    Our checkpoints rebuild themselves (``model.name`` is then ignored, said in the card's note),
    one of an architecture file only when ``arch`` (model.arch) names that file. With ``arch``, any
    other file's state dict (``arch_file.state_dict_of``) loads into its network. Else a file that
    fits table model ``name`` loads into it as is, and anything else is detected by spandrel
    (refused unless x4 RGB super-resolution) and built as the matching table entry when one has
    exactly its hyper-parameters, else as ``spandrel:<ArchId>``.
    """
    state = load_checkpoint(path)
    prefer = weights_key(ema)
    if "arch" in state and arch_file.is_file_arch(state["arch"]) and (arch is None or arch.arch != state["arch"]):
        recorded = str(state["arch"]).removeprefix(arch_file.ARCH_PREFIX)
        raise CheckpointError(f"{path}: weights of the network in {recorded}; a Python file runs only when "
                              f"model.arch names it: model.arch={recorded}" + (f" (not {arch.path}:{arch.cls})"
                                                                               if arch else ""))
    if arch is not None and not arch_file.is_file_arch(state.get("arch")):
        model = arch_file.build(arch, *arch_file.read_source(arch.path))
        tensors, where = arch_file.state_dict_of(state, path, arch.key, ema)
        _load_into(model, tensors, path, f"{arch.cls} of {arch.path}")
        card = card_of(model)
        model.card = dataclasses.replace(card, note=f"{card.note}; weights: {where} of {path}")
        return model
    if "arch" in state:
        model = _rebuild(state, path, prefer)
        card = card_of(model)
        if name and name != card.arch and arch is None:
            model.card = ModelCard(card.arch, card.kwargs, card.precisions,
                                   f"{path} is a {card.arch} checkpoint: using it, not model.name={name}",
                                   card.detected)
        return model
    tensors = state_dict_from(state, path, prefer)
    model = _fitting_table_model(name, tensors) if name in MODELS else None
    if model is not None:
        _load_into(model, tensors, path, name)
        return model
    found = zoo.detect(tensors, path)
    check_finite(found.model, path)
    entry = _table_entry(found)
    what = f"{found.arch_id} x{found.scale} ({found.parameters / 1e6:.3f}M parameters, detected by spandrel)"
    note = f"{path} holds a {what}" + (f", not model.name={name}" if name else "")
    if entry is not None:  # spandrel built exactly the table's model: it only needs the table's name
        found.model.card = ModelCard(entry, model_kwargs(entry), MODELS[entry].precisions,
                                     f"{note}: using the table's {entry}", found.summary())
        return found.model
    arch = SPANDREL_PREFIX + found.arch_id
    found.model.card = ModelCard(arch, found.hyperparameters, found.precisions, f"{note}: using it as {arch}",
                                 found.summary())
    return found.model


def save_model_card(path: str | Path, model: nn.Module, pretrained: str = "") -> Path:
    """``models/<run>/model.yaml``: the model a run trains and, with model.pretrained, what the file held."""
    text = yaml.safe_dump(card_record(model, pretrained), sort_keys=False)
    with atomic_write(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def card_record(model: nn.Module, pretrained: str = "") -> dict[str, Any]:
    """The model's card as plain data: arch, kwargs, parameters, precisions, pretrained file, detection."""
    card = card_of(model)
    record: dict[str, Any] = {"arch": card.arch, "kwargs": card.kwargs, "parameters": count_parameters(model),
                              "precisions": list(card.precisions), "pretrained": pretrained or None}
    if card.note:
        record["note"] = card.note
    if card.detected:
        record["detected"] = card.detected
    return record


def load_state_into(model: nn.Module, state: dict[str, Any], path: str | Path, ema: bool = True,
                    ) -> dict[str, Any]:
    """Load a checkpoint dict's weights into an already built ``model`` (EMA first when asked); returns the
    dict's other entries. For models of other tables (volume models) whose arguments their table checked."""
    _load_into(model, state_dict_from(state, path, weights_key(ema)), path, str(state.get("arch")))
    return {k: v for k, v in state.items() if k not in _TRAINING_STATE}

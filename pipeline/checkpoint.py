"""One checkpoint format, basicsr-compatible, plain types only, written atomically.

A checkpoint is a dict:
    params       model state dict (basicsr's key: other SR tools load it as is)
    params_ema   EMA state dict (inference prefers it), or absent
    arch         model table name; kwargs: the builder's keyword arguments
    step, epoch, best_psnr, and for training state: optimizer, scheduler, scaler, rng, config
Everything is a tensor, number, string, list or dict, so ``torch.load(weights_only=True)`` works.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.files import atomic_write
from pipeline.models import build_model


class CheckpointError(UserError):
    """A checkpoint or weights file that is missing, unreadable or does not fit the model."""


_TRAINING_STATE = ("params", "params_ema", "optimizer", "scheduler", "scaler", "rng")


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """``torch.save`` to a temporary file, then rename: a crash never leaves a truncated file."""
    with atomic_write(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load with ``weights_only=True`` (no code execution); errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(state).__name__}")
    return state


def state_dict_from(state: dict[str, Any], path: str | Path, prefer: str = "params_ema") -> dict[str, torch.Tensor]:
    """The weights in a basicsr-style file: ``prefer`` key, else ``params_ema``/``params``, else bare.

    ``module.`` prefixes left by DataParallel/DDP are stripped.
    """
    for key in (prefer, "params_ema", "params"):
        if isinstance(state.get(key), dict):
            weights = state[key]
            break
    else:
        weights = state
    if not weights or not all(isinstance(v, torch.Tensor) for v in weights.values()):
        raise CheckpointError(f"{path}: no state dict found (looked for {prefer}, params_ema, params, bare)")
    return {k.removeprefix("module."): v for k, v in weights.items()}


def load_weights(model: nn.Module, path: str | Path, prefer: str = "params_ema", strict: bool = True) -> None:
    """Load a basicsr-format weights file into ``model``; a key or shape mismatch names the file."""
    weights = state_dict_from(load_checkpoint(path), path, prefer)
    try:
        model.load_state_dict(weights, strict=strict)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        raise CheckpointError(f"{path}: weights do not fit the model: {' '.join(first[:3])[:400]}") from None


def model_from_checkpoint(path: str | Path, weights: str = "ema") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights (EMA first when asked)."""
    state = load_checkpoint(path)
    if "arch" not in state:
        raise CheckpointError(f"{path}: no 'arch' entry; load bare weights with model.pretrained instead")
    model = build_model(state["arch"], **state.get("kwargs", {}))
    return model.eval(), load_state_into(model, state, path, weights)


def load_state_into(model: nn.Module, state: dict[str, Any], path: str | Path, weights: str = "ema",
                    ) -> dict[str, Any]:
    """Load a checkpoint dict's weights into ``model`` (EMA first when asked); returns its other entries."""
    prefer = "params_ema" if weights == "ema" else "params"
    try:
        model.load_state_dict(state_dict_from(state, path, prefer), strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit {state.get('arch')}: {str(exc)[:300]}") from None
    return {k: v for k, v in state.items() if k not in _TRAINING_STATE}

"""The table of volume and slice models: name -> builder, keyword arguments, and what the model maps.

Explicit like ``pipeline.models.table``'s image table (a second registration of a name raises), kept
apart because these models differ in kind: ``role`` says what a model is for (``generator``: a
volume SR model; ``critic``: a WGAN-GP critic; ``cycle``: SRResCycGAN's four networks, whose
``forward`` is the HR generator), ``dims`` the spatial axes of its input (3 = (B,1,D,H,W),
2 = (B,1,H,W)), ``scale`` its output / input size per spatial axis (1 = same grid).
``build_volume_model(name, **overrides)`` rebuilds a model from a checkpoint's name and kwargs.

Checkpoints: the project's one format (``pipeline.models.checkpoint``: ``params`` / ``params_ema``, plain
types, ``weights_only`` loads) with ``arch`` a name of this table and ``kwargs`` its full keyword
arguments (``checkpoint_state`` builds the dict, ``save_checkpoint`` writes it);
``volume_model_from_checkpoint`` checks the name and the kwargs against the table before building.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from pipeline.core.errors import UserError
from pipeline.models.checkpoint import CheckpointError, load_checkpoint, load_state_into
from pipeline.mri.archs import MDCSRN, ConvCritic, SRResCycGAN

Role = Literal["generator", "critic", "cycle"]


@dataclass(frozen=True)
class VolumeModelSpec:
    builder: Callable[..., nn.Module]
    role: Role
    dims: int
    scale: tuple[int, ...] | None  # per spatial axis; None for critics
    summary: str
    kwargs: dict[str, Any] = field(default_factory=dict)


VOLUME_MODELS: dict[str, VolumeModelSpec] = {}


def register(name: str, builder: Callable[..., nn.Module], role: Role, dims: int, scale: tuple[int, ...] | None,
             summary: str, **kwargs: Any) -> None:
    """Add a model to the table; a second registration of a name is a bug, so it raises."""
    if name in VOLUME_MODELS:
        raise KeyError(f"volume model {name!r} is already registered")
    VOLUME_MODELS[name] = VolumeModelSpec(builder, role, dims, scale, summary, kwargs)


def _critic3d(**kw: Any) -> nn.Module:
    return ConvCritic(dims=3, **kw)


register("mdcsrn", MDCSRN, "generator", 3, (1, 1, 1),
         "mDCSRN b4u4, growth 16 (the paper's size, 0.40M parameters)", growth=16, blocks=4, units=4)
register("mdcsrn-tiny", MDCSRN, "generator", 3, (1, 1, 1), "mDCSRN b2u2, growth 4 (tests, CPU demo)",
         growth=4, blocks=2, units=2)
register("critic3d", _critic3d, "critic", 3, None, "3-D WGAN-GP critic: 4 stride-2 stages from 32 features, "
         "layer norm", width=32, stages=4, norm="layer")
register("critic3d-tiny", _critic3d, "critic", 3, None, "3-D critic, 2 stages from 4 features (tests)",
         width=4, stages=2, norm="layer")
register("srrescycgan", SRResCycGAN, "cycle", 2, (4, 4),
         "SRResCycGAN 4x on slices: 64 features, 5 residual blocks per generator, two discriminators",
         features=64, blocks=5, disc_width=32, disc_stages=4)
register("srrescycgan-tiny", SRResCycGAN, "cycle", 2, (4, 4), "SRResCycGAN 8 features, 1 block (tests)",
         features=8, blocks=1, disc_width=4, disc_stages=2)


def volume_model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The full keyword arguments ``build_volume_model(name, **overrides)`` uses (for checkpoints)."""
    if name not in VOLUME_MODELS:
        raise UserError(f"unknown volume model {name!r}; known: {', '.join(sorted(VOLUME_MODELS))}")
    spec = VOLUME_MODELS[name]
    unknown = set(overrides) - set(spec.kwargs)
    if unknown:
        raise UserError(f"volume model {name!r} has no argument(s) {sorted(unknown)}; it takes {sorted(spec.kwargs)}")
    return {**spec.kwargs, **overrides}


def build_volume_model(name: str, **overrides: Any) -> nn.Module:
    """Build a model from the table; ``overrides`` replace its keyword arguments."""
    kwargs = volume_model_kwargs(name, **overrides)  # checks the name and the overrides
    return VOLUME_MODELS[name].builder(**kwargs)


def checkpoint_state(name: str, model: nn.Module, kwargs: dict[str, Any] | None = None,
                     ema: dict[str, torch.Tensor] | None = None, **extra: Any) -> dict[str, Any]:
    """The dict of a volume checkpoint: ``params`` (+ ``params_ema``), ``arch``, ``kwargs``, then ``extra``
    (step, best_psnr, optimizer ... as the trainer keeps them). ``kwargs``: the overrides it was built with."""
    full = volume_model_kwargs(name, **(kwargs or {}))
    state: dict[str, Any] = {"params": {k: v.detach().cpu() for k, v in model.state_dict().items()}}
    if ema is not None:
        state["params_ema"] = {k: v.detach().cpu() for k, v in ema.items()}
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in full.items()}
    return {**state, "arch": name, "kwargs": plain, **extra}


def volume_model_from_checkpoint(path: str | Path, ema: bool = True) -> tuple[nn.Module, str, dict[str, Any]]:
    """(model in eval mode, its table name, the checkpoint's other entries) of a volume checkpoint."""
    state = load_checkpoint(path)
    name = state.get("arch")
    if not isinstance(name, str) or name not in VOLUME_MODELS:
        raise CheckpointError(f"{path}: arch {name!r} is not a volume model (known: {', '.join(sorted(VOLUME_MODELS))})"
                              "; image checkpoints are for the infer stage")
    kwargs = state.get("kwargs", {})
    if not isinstance(kwargs, dict):
        raise CheckpointError(f"{path}: kwargs must be a dict, got {type(kwargs).__name__}")
    try:
        full = volume_model_kwargs(name, **kwargs)
    except UserError as exc:
        raise CheckpointError(f"{path}: {exc}") from None
    model = VOLUME_MODELS[name].builder(**{k: tuple(v) if isinstance(v, list) else v for k, v in full.items()})
    meta = load_state_into(model, state, path, ema)
    return model.eval(), name, meta

"""The table of volume and slice models: name -> builder, keyword arguments, and what the model maps.

Explicit like ``pipeline.models``'s image table (a second registration of a name raises), kept
apart because these models differ in kind: ``role`` says what a model is for (``generator``: a
volume SR model; ``critic``: a WGAN-GP critic; ``cycle``: SRResCycGAN's four networks, whose
``forward`` is the HR generator), ``dims`` the spatial axes of its input (3 = (B,1,D,H,W),
2 = (B,1,H,W)), ``scale`` its output / input size per spatial axis (1 = same grid).
``build_volume_model(name, **overrides)`` rebuilds a model from a checkpoint's name and kwargs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from pipeline.errors import UserError
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

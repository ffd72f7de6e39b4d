"""The field's published architectures through spandrel: families for the model table, and detection.

A ``Family`` is one spandrel architecture as the model table builds it: the reference class, the
constructor arguments every x4 RGB model shares, the input-size requirements spandrel declares for
it (plus the attention window the reference code pads to, and how), and the precisions spandrel
says it supports. ``detect`` reads any weights file's state dict through spandrel's registry
(architecture and hyper-parameters from the tensor shapes) and returns the model wrapped the same
way, so a published file and a table model of the same family behave identically.

What each family expects (all map RGB in [0,1] to RGB in [0,1] from the caller's point of view):
- HAT, DAT, DRCT, ATD: subtract the DIV2K mean (0.4488, 0.4371, 0.4040) and add it back, img_range 1.
- RCAN: scales to [0,255] (rgb_range 255) and subtracts/adds the DIV2K mean with frozen 1x1 convs.
- SPAN: subtracts the DIV2K mean and multiplies by 255 (img_range 255); its output is [0,1] as is.
- SAFMN, OmniSR, ESRGAN (RRDB): no normalisation.
spandrel cannot read img_range / rgb_range from a state dict and assumes the published values; the
table uses the same values, so our checkpoints and published ones mean the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from spandrel import MAIN_REGISTRY, ImageModelDescriptor, UnsupportedModelError
from spandrel.architectures.ATD import ATD
from spandrel.architectures.DAT import DAT
from spandrel.architectures.DRCT import DRCT
from spandrel.architectures.ESRGAN import ESRGAN
from spandrel.architectures.HAT import HAT
from spandrel.architectures.OmniSR import OmniSR
from spandrel.architectures.RCAN import RCAN
from spandrel.architectures.SAFMN import SAFMN
from spandrel.architectures.SPAN import SPAN
from torch import nn

from pipeline.core.errors import CheckpointError
from pipeline.models.archs import SCALE, Padded

ALL_PRECISIONS = ("fp32", "bf16", "fp16")
SPANDREL_PREFIX = "spandrel:"  # checkpoint arch of a detected model outside the table: spandrel:<ArchId>


@dataclass(frozen=True)
class Family:
    """One spandrel architecture as the model table builds it (see the module docstring)."""

    arch_id: str  # spandrel's ArchId
    cls: type[nn.Module]
    fixed: dict[str, Any] = field(default_factory=dict)  # x4 RGB arguments shared by every preset
    minimum: int = 0  # spandrel's SizeRequirements for the architecture
    multiple_of: int = 1
    window_key: str = ""  # constructor argument holding the attention window the reference code pads to
    window_mode: str = "reflect"  # how the reference code pads to it
    fp16: bool = True  # spandrel's supports_half (every family here supports bf16)
    # Last layer of the deep-feature residual branch, zeroed when the table builds a model for
    # training from scratch: the untrained transformer body then adds nothing and the model starts
    # as a shallow CNN (conv_first -> upsampler), the "zero-init last layer" of ResNets. Measured on
    # the demo data: hat-tiny +1.9 dB validation PSNR at step 300, +0.1 dB at 1200 (BENCHMARKS.md, section 9).
    # Weights loaded from any file replace it; the architecture and its state dict are unchanged.
    zero_init: str = ""

    @property
    def precisions(self) -> tuple[str, ...]:
        return ALL_PRECISIONS if self.fp16 else ("fp32", "bf16")

    def wrap(self, net: nn.Module, arguments: dict[str, Any]) -> Padded:
        window = int(arguments.get(self.window_key, 1)) if self.window_key else 1
        return Padded(net, self.minimum, self.multiple_of, window, self.window_mode)

    def __call__(self, **kwargs: Any) -> Padded:
        """The builder the model table calls: (B,3,h,w) in [0,1] -> (B,3,4h,4w)."""
        arguments = {**self.fixed, **kwargs}
        net = self.cls(**arguments)
        if self.zero_init:
            layer = net.get_submodule(self.zero_init)
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        return self.wrap(net, arguments)

    def __repr__(self) -> str:  # the table's --help and error messages name the family
        return f"Family({self.arch_id})"


_TRANSFORMER = dict(upscale=SCALE, in_chans=3, img_range=1.0, upsampler="pixelshuffle", resi_connection="1conv")
_BODY = "conv_after_body"
HAT_FAMILY = Family("HAT", HAT, _TRANSFORMER, minimum=16, window_key="window_size", fp16=False, zero_init=_BODY)
DAT_FAMILY = Family("DAT", DAT, _TRANSFORMER, minimum=16, fp16=False, zero_init=_BODY)
DRCT_FAMILY = Family("DRCT", DRCT, _TRANSFORMER, multiple_of=16, window_key="window_size", fp16=False,
                     zero_init=_BODY)
ATD_FAMILY = Family("ATD", ATD, _TRANSFORMER, minimum=8, window_key="window_size", window_mode="symmetric",
                    fp16=False, zero_init=_BODY)
RCAN_FAMILY = Family("RCAN", RCAN, dict(scale=SCALE, n_colors=3, rgb_range=255, norm=True), fp16=False)
SPAN_FAMILY = Family("SPAN", SPAN, dict(num_in_ch=3, num_out_ch=3, upscale=SCALE, img_range=255.0))
SAFMN_FAMILY = Family("SAFMN", SAFMN, dict(upscaling_factor=SCALE), multiple_of=8, fp16=False)
OMNISR_FAMILY = Family("OmniSR", OmniSR, dict(num_in_ch=3, num_out_ch=3, up_scale=SCALE), minimum=16,
                       window_key="window_size", window_mode="constant")
ESRGAN_FAMILY = Family("ESRGAN", ESRGAN, dict(in_nc=3, out_nc=3, scale=SCALE), minimum=2)
FAMILIES = {f.arch_id: f for f in (HAT_FAMILY, DAT_FAMILY, DRCT_FAMILY, ATD_FAMILY, RCAN_FAMILY, SPAN_FAMILY,
                                   SAFMN_FAMILY, OMNISR_FAMILY, ESRGAN_FAMILY)}


def plain(value: Any) -> Any:
    """Tuples as lists (YAML and ``weights_only`` checkpoints hold plain types only)."""
    return [plain(v) for v in value] if isinstance(value, (list, tuple)) else value


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


@dataclass(frozen=True)
class Detected:
    """What spandrel found in a weights file; ``model`` holds the file's weights."""

    arch_id: str
    hyperparameters: dict[str, Any]  # the plain-typed constructor arguments (norm layers etc. left out)
    scale: int
    parameters: int
    tags: tuple[str, ...]
    precisions: tuple[str, ...]
    model: nn.Module

    def summary(self) -> dict[str, Any]:
        """The record saved beside a run (models/<run>/model.yaml) and shown by infer."""
        return {"architecture": self.arch_id, "scale": self.scale, "parameters": self.parameters,
                "precisions": list(self.precisions), "tags": list(self.tags),
                "hyperparameters": self.hyperparameters}


def detect(state_dict: dict[str, torch.Tensor], path: Any) -> Detected:
    """Architecture and hyper-parameters of a state dict, by spandrel; a non-x4 or non-SR model is refused."""
    try:
        # spandrel's loaders may rewrite the dict they get (ESRGAN renames keys): give them a copy.
        descriptor = MAIN_REGISTRY.load(dict(state_dict))
    except UnsupportedModelError:
        raise CheckpointError(f"{path}: no architecture spandrel knows matches these weights; if it is one of "
                              "the model table's, name it with model.name=...") from None
    except Exception as exc:  # a detected architecture whose loader chokes on a damaged dict
        raise CheckpointError(f"{path}: weights look like a known architecture but do not load "
                              f"({type(exc).__name__}: {str(exc)[:200]})") from None
    arch_id = str(descriptor.architecture.id)
    if not isinstance(descriptor, ImageModelDescriptor):
        raise CheckpointError(f"{path}: a {arch_id} {descriptor.purpose} model, not image super-resolution")
    if descriptor.scale != SCALE:
        raise CheckpointError(f"{path}: a x{descriptor.scale} {arch_id} model; this pipeline is x{SCALE} only "
                              f"(use x{SCALE} weights)")
    if descriptor.purpose != "SR":
        raise CheckpointError(f"{path}: a {arch_id} {descriptor.purpose} model, not general super-resolution")
    if descriptor.input_channels != 3 or descriptor.output_channels != 3:
        raise CheckpointError(f"{path}: a {arch_id} model with {descriptor.input_channels} input / "
                              f"{descriptor.output_channels} output channels; RGB (3/3) is needed")
    net = descriptor.model
    hyper = {k: plain(v) for k, v in getattr(net, "hyperparameters", {}).items() if _is_plain(v)}
    req = descriptor.size_requirements
    if req.square:
        raise CheckpointError(f"{path}: {arch_id} needs square inputs, which the tiler does not provide")
    family = FAMILIES.get(arch_id)
    model = family.wrap(net, hyper) if family else Padded(net, req.minimum, req.multiple_of)
    precisions = tuple(p for p, ok in (("fp32", True), ("bf16", descriptor.supports_bfloat16),
                                       ("fp16", descriptor.supports_half)) if ok)
    return Detected(arch_id, hyper, descriptor.scale, sum(p.numel() for p in net.parameters()),
                    tuple(descriptor.tags), precisions, model)


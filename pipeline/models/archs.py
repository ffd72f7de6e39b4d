"""Input-size handling shared by every architecture: pad the LR input once, run, crop the SR output.

Transformer models attend within windows, so their input side must be a multiple of the window
(and some need a minimum side). ``Padded`` does that padding for every model of the table and
every detected published model, the same way each architecture's reference code (and spandrel's
call API) does it, so outputs match theirs exactly at any size. The window padding is a traced
graph operation (ONNX export keeps dynamic height and width); padding up to a minimum side is
Python the trace does not keep, which pipeline/export.py accounts for.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

SCALE = 4


def _ceil_to(n: int, multiple: int) -> int:
    # Positive operands only: traced for ONNX, `//` becomes an integer Div, which truncates.
    return (n + multiple - 1) // multiple * multiple


def pad_to_size(x: torch.Tensor, minimum: int, multiple_of: int) -> torch.Tensor:
    """Pad the bottom/right of (B,C,h,w) up to ``minimum`` and a multiple of ``multiple_of``.

    Reflection as far as it reaches (side - 1 pixels), then edge replication: spandrel's rule
    for size requirements, so a detected model sees exactly the input spandrel would give it.
    """
    h, w = x.shape[-2:]
    ph = _ceil_to(max(h, minimum), multiple_of) - h
    pw = _ceil_to(max(w, minimum), multiple_of) - w
    if not (ph or pw):
        return x
    rh, rw = min(ph, h - 1), min(pw, w - 1)
    x = F.pad(x, (0, rw, 0, rh), mode="reflect")  # (B,C,h,w) -> (B,C,h+rh,w+rw)
    if ph > rh or pw > rw:
        x = F.pad(x, (0, pw - rw, 0, ph - rh), mode="replicate")  # -> (B,C,h+ph,w+pw)
    return x


def pad_to_window(x: torch.Tensor, window: int, mode: str) -> torch.Tensor:
    """Pad the bottom/right of (B,C,h,w) to a multiple of ``window`` with the architecture's own mode.

    ``reflect`` (HAT, SwinIR, DRCT; edge replication where the image is smaller than the pad),
    ``symmetric`` (ATD: the image followed by its mirror image, edge pixel repeated) or
    ``constant`` (OmniSR: zeros).
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % window, (-w) % window
    if not (ph or pw):
        return x
    if mode == "symmetric":
        x = torch.cat([x, x.flip(-2)], -2)[..., : h + ph, :]  # (B,C,h,w) -> (B,C,h+ph,w)
        return torch.cat([x, x.flip(-1)], -1)[..., : w + pw]  # -> (B,C,h+ph,w+pw)
    if mode == "reflect" and not (ph < h and pw < w):
        mode = "replicate"  # reflection cannot reach further than the image itself
    return F.pad(x, (0, pw, 0, ph), mode=mode)  # (B,C,h,w) -> (B,C,h+ph,w+pw)


class Padded(nn.Module):
    """``net`` with its input padded to its size requirements and its output cropped back.

    The checkpoint holds ``net``'s bare keys (no ``net.`` prefix), so the architecture's own
    repository, basicsr and spandrel load our weights as they are.
    """

    def __init__(self, net: nn.Module, minimum: int = 0, multiple_of: int = 1, window: int = 1,
                 mode: str = "reflect") -> None:
        super().__init__()
        if mode not in ("reflect", "symmetric", "constant"):
            raise ValueError(f"unknown window padding mode {mode!r}")
        self.net = net
        self.minimum, self.multiple_of, self.window, self.mode = minimum, multiple_of, window, mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        padded = pad_to_window(pad_to_size(x, self.minimum, self.multiple_of), self.window, self.mode)
        if padded is x:
            # Some reference code scales its input in place (RCAN: `x *= rgb_range`); the
            # caller's tensor (a self-ensemble way, a training batch) must not change.
            padded = x.clone()
        out = self.net(padded)  # (B,3,H,W) -> (B,3,4H,4W)
        return out[..., : h * SCALE, : w * SCALE]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)


MIN_SIDE = 2  # LR pixels: a 1-pixel sample is one colour, nothing to upscale, and the dihedral transforms keep it


def smallest_side(model: nn.Module) -> int:
    """The smallest LR side worth training ``model`` on: 2 pixels, and no less than one window (or minimum
    side, or size multiple) of any ``Padded`` part: a smaller sample would be mostly padding."""
    side = MIN_SIDE
    for m in model.modules():
        if isinstance(m, Padded):
            side = max(side, m.minimum, m.window, m.multiple_of)
    return side

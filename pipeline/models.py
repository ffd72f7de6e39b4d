"""The model table: name -> builder and its keyword arguments. Explicit, no discovery by filename.

Every model maps (B,3,h,w) in [0,1] to (B,3,4h,4w). A checkpoint stores the table name and the
keyword arguments it was built with, so ``build_model(name, **kwargs)`` rebuilds it exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.compat import EDSR, MSRResNet, RRDBNet, SwinIR
from pipeline.errors import UserError
from pipeline.wdsr import wdsr_a, wdsr_b

SCALE = 4


def _matlab_bicubic_matrix(n_in: int, scale: int) -> torch.Tensor:
    """(scale*n_in, n_in) matrix A with A @ x == MATLAB imresize of the 1-D signal x.

    Built from basicsr's own weights/indices, folding its symmetric edge padding back into the
    matrix, so the separable product A_h @ X @ A_w^T equals ``basicsr.imresize`` to float
    precision while running batched on any device.
    """
    from basicsr.utils.matlab_functions import calculate_weights_indices

    n_out = n_in * scale
    weights, indices, sym_s, _sym_e = calculate_weights_indices(n_in, n_out, scale, "cubic", 4, True)
    # basicsr's indices point into the signal padded by sym_s samples at the start (0-based).
    src = indices.long() - sym_s
    # The padding mirrors with the edge sample repeated (symmetric): -1 -> 0, -2 -> 1, n -> n-1.
    src = torch.where(src < 0, -src - 1, src)
    src = torch.where(src >= n_in, 2 * n_in - 1 - src, src)
    a = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out).unsqueeze(1).expand_as(src)
    a.index_put_((rows, src), weights.double(), accumulate=True)
    return a


class Bicubic(nn.Module):
    """Parameter-free MATLAB-compatible bicubic upscaling (the baseline papers report)."""

    def __init__(self, scale: int = SCALE) -> None:
        super().__init__()
        self.scale = scale
        self._cache: dict[tuple[int, str, torch.dtype], torch.Tensor] = {}

    def _matrix(self, n: int, like: torch.Tensor) -> torch.Tensor:
        key = (n, str(like.device), like.dtype)
        if key not in self._cache:
            self._cache[key] = _matlab_bicubic_matrix(n, self.scale).to(like.device, like.dtype)
        return self._cache[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype if x.dtype in (torch.float32, torch.float64) else torch.float32
        x = x.to(dtype)
        a_h = self._matrix(x.shape[-2], x)
        a_w = self._matrix(x.shape[-1], x)
        # Autocast would run these matmuls in bf16 (8-bit mantissa: errors near one grey level),
        # which would lower the baseline's PSNR and SRCNN's input; the baseline stays exact.
        with torch.autocast(x.device.type, enabled=False):
            # (B,3,h,w) -> (B,3,4h,w) -> (B,3,4h,4w)
            return torch.matmul(torch.matmul(a_h, x), a_w.t())


class SRCNN(nn.Module):
    """The 9-5-5 network of the founding SR paper, applied to the bicubic-upscaled input."""

    def __init__(self, features: tuple[int, int] = (64, 32), kernels: tuple[int, int, int] = (9, 5, 5)) -> None:
        super().__init__()
        f1, f2 = features
        k1, k2, k3 = kernels
        self.upscale = Bicubic(SCALE)
        self.body = nn.Sequential(
            nn.Conv2d(3, f1, k1, padding=k1 // 2), nn.ReLU(inplace=True),
            nn.Conv2d(f1, f2, k2, padding=k2 // 2), nn.ReLU(inplace=True),
            nn.Conv2d(f2, 3, k3, padding=k3 // 2),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        up = self.upscale(x.float()).to(x.dtype)  # (B,3,h,w) -> (B,3,4h,4w)
        return up + self.body(up)  # residual on bicubic: same optimum, faster convergence


class PaddedSwinIR(nn.Module):
    """SwinIR with the input reflect-padded to a multiple of the window size, output cropped."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.window = kwargs["window_size"]
        self.net = SwinIR(**kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        ph, pw = (-h) % self.window, (-w) % self.window
        if ph or pw:
            mode = "reflect" if ph < h and pw < w else "replicate"
            x = F.pad(x, (0, pw, 0, ph), mode=mode)
        out = self.net(x)  # (B,3,H,W) -> (B,3,4H,4W)
        return out[..., : h * SCALE, : w * SCALE]

    # Checkpoints hold the bare SwinIR keys so basicsr and the SwinIR repo load them as is.
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.net.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        return self.net.load_state_dict(state_dict, strict=strict, assign=assign)


def _rrdb(**kw: Any) -> nn.Module:
    return RRDBNet(num_in_ch=3, num_out_ch=3, scale=SCALE, **kw)


def _edsr(**kw: Any) -> nn.Module:
    # basicsr's EDSR scales [0,1] input by img_range=255 internally and subtracts the DIV2K mean.
    return EDSR(num_in_ch=3, num_out_ch=3, upscale=SCALE, img_range=255.0, **kw)


def _swinir(**kw: Any) -> nn.Module:
    return PaddedSwinIR(upscale=SCALE, in_chans=3, img_range=1.0, upsampler="pixelshuffle",
                        resi_connection="1conv", **kw)


def _as_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    summary: str = ""


MODELS: dict[str, ModelSpec] = {}


def register(name: str, builder: Callable[..., nn.Module], summary: str, **kwargs: Any) -> None:
    """Add a model to the table; a second registration of a name is a bug, so it raises."""
    if name in MODELS:
        raise KeyError(f"model {name!r} is already registered")
    MODELS[name] = ModelSpec(builder, kwargs, summary)


_SWIN_FULL = dict(img_size=48, window_size=8, depths=(6,) * 6, embed_dim=180,
                  num_heads=(6,) * 6, mlp_ratio=2.0)
register("rrdb", _rrdb, "ESRGAN's RRDBNet (PSNR model): 64 features, 23 blocks, growth 32",
         num_feat=64, num_block=23, num_grow_ch=32)
register("rrdb-tiny", _rrdb, "RRDBNet 32 features, 3 blocks, growth 16 (CPU runs)",
         num_feat=32, num_block=3, num_grow_ch=16)
register("rrdb-nano", _rrdb, "RRDBNet 8 features, 1 block (tests)", num_feat=8, num_block=1, num_grow_ch=4)
register("swinir", _swinir, "SwinIR classical x4 (paper configuration)", **_SWIN_FULL)
register("swinir-tiny", _swinir, "SwinIR 2 stages of depth 2, 48 channels (CPU runs)",
         img_size=32, window_size=8, depths=(2, 2), embed_dim=48, num_heads=(3, 3), mlp_ratio=2.0)
register("swinir-nano", _swinir, "SwinIR 1 stage of depth 1, 12 channels (tests)",
         img_size=16, window_size=4, depths=(1,), embed_dim=12, num_heads=(2,), mlp_ratio=1.0)
register("edsr", _edsr, "EDSR baseline: 64 features, 16 blocks", num_feat=64, num_block=16, res_scale=1.0)
register("edsr-large", _edsr, "EDSR: 256 features, 32 blocks, residual scale 0.1",
         num_feat=256, num_block=32, res_scale=0.1)
register("edsr-tiny", _edsr, "EDSR 32 features, 8 blocks (CPU runs)", num_feat=32, num_block=8, res_scale=1.0)
register("edsr-nano", _edsr, "EDSR 8 features, 1 block (tests)", num_feat=8, num_block=1, res_scale=1.0)
register("srcnn", SRCNN, "SRCNN 9-5-5 on bicubic-upscaled input", features=(64, 32), kernels=(9, 5, 5))
register("bicubic", Bicubic, "MATLAB-compatible bicubic, no parameters (the baseline)")

# Generators of the perceptual / adversarial write-ups (issue 10): SRResNet is SRGAN's generator as basicsr's
# MSRResNet (no batch norm, bilinear skip); WDSR is ours (pipeline/wdsr.py).
def _srresnet(**kw: Any) -> nn.Module:
    return MSRResNet(num_in_ch=3, num_out_ch=3, upscale=SCALE, **kw)


def _wdsr_a(**kw: Any) -> nn.Module:
    return wdsr_a(scale=SCALE, **kw)


def _wdsr_b(**kw: Any) -> nn.Module:
    return wdsr_b(scale=SCALE, **kw)


register("srresnet", _srresnet, "SRResNet (SRGAN's generator, basicsr's MSRResNet): 64 features, 16 blocks",
         num_feat=64, num_block=16)
register("srresnet-tiny", _srresnet, "SRResNet 32 features, 4 blocks (CPU runs)", num_feat=32, num_block=4)
register("srresnet-nano", _srresnet, "SRResNet 8 features, 1 block (tests)", num_feat=8, num_block=1)
register("wdsr-a", _wdsr_a, "WDSR-A: 32 features, 16 wide blocks (3x3 widened 4x, ReLU, 3x3)",
         num_feat=32, num_block=16, expansion=4, res_scale=1.0)
register("wdsr-a-tiny", _wdsr_a, "WDSR-A 16 features, 4 blocks, 4x wide (CPU runs)",
         num_feat=16, num_block=4, expansion=4, res_scale=1.0)
register("wdsr-a-nano", _wdsr_a, "WDSR-A 4 features, 1 block, 2x wide (tests)",
         num_feat=4, num_block=1, expansion=2, res_scale=1.0)
register("wdsr-b", _wdsr_b, "WDSR-B: 32 features, 16 blocks (1x1 widened 6x, ReLU, 1x1 to 0.8x, 3x3)",
         num_feat=32, num_block=16, expansion=6, low_rank=0.8, res_scale=1.0)
register("wdsr-b-tiny", _wdsr_b, "WDSR-B 16 features, 4 blocks, 6x wide, 0.8 low rank (CPU runs)",
         num_feat=16, num_block=4, expansion=6, low_rank=0.8, res_scale=1.0)
register("wdsr-b-nano", _wdsr_b, "WDSR-B 4 features, 1 block, 2x wide, 0.8 low rank (tests)",
         num_feat=4, num_block=1, expansion=2, low_rank=0.8, res_scale=1.0)


def build_model(name: str, **overrides: Any) -> nn.Module:
    """Build a model from the table; ``overrides`` replace its keyword arguments."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    kwargs = {**spec.kwargs, **{k: _as_tuple(v) for k, v in overrides.items()}}
    unknown = set(overrides) - set(spec.kwargs)
    if unknown:
        raise UserError(f"model {name!r} has no argument(s) {sorted(unknown)}; it takes {sorted(spec.kwargs)}")
    model = spec.builder(**kwargs)
    model.scale = SCALE
    return model


def model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The full keyword arguments ``build_model(name, **overrides)`` uses (stored in checkpoints)."""
    kwargs = {**MODELS[name].kwargs, **overrides}
    return {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


"""The model table: name -> builder and its keyword arguments. Explicit, no discovery by filename.

Every model maps (B,3,h,w) in [0,1] to (B,3,4h,4w) for any h, w (transformers pad to their window
once, in ``archs.Padded``). A checkpoint stores the table name and the preset's keyword arguments,
and loading checks them against the table before building (``checkpoint.check_table_kwargs``);
``build_model``'s overrides are for experiments and tests, not for checkpoints. The published architectures
(HAT, DAT, DRCT, ATD, RCAN, SPAN, SAFMN, OmniSR, ESRGAN) are spandrel's reference classes, built
through ``zoo.Family``; RRDB / SwinIR / EDSR are basicsr's. Each entry records the autocast
precisions its architecture supports (spandrel's descriptors for the ones spandrel knows);
``autocast_cap`` keeps fp16-unsafe models in bf16 or fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pipeline.core.compat import EDSR, MSRResNet, RRDBNet, SwinIR
from pipeline.core.errors import UserError
from pipeline.core.runtime import precision_name
from pipeline.models import zoo
from pipeline.models.archs import SCALE, Padded
from pipeline.models.wdsr import wdsr_a, wdsr_b
from pipeline.models.zoo import ALL_PRECISIONS, plain


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


def _rrdb(**kw: Any) -> nn.Module:
    return RRDBNet(num_in_ch=3, num_out_ch=3, scale=SCALE, **kw)


def _edsr(**kw: Any) -> nn.Module:
    # basicsr's EDSR scales [0,1] input by img_range=255 internally and subtracts the DIV2K mean.
    return EDSR(num_in_ch=3, num_out_ch=3, upscale=SCALE, img_range=255.0, **kw)


def _swinir(**kw: Any) -> nn.Module:
    net = SwinIR(upscale=SCALE, in_chans=3, img_range=1.0, upsampler="pixelshuffle", resi_connection="1conv", **kw)
    return Padded(net, window=kw["window_size"])


def _as_tuple(v: Any) -> Any:
    return tuple(v) if isinstance(v, list) else v


@dataclass(frozen=True)
class ModelSpec:
    builder: Callable[..., nn.Module]
    kwargs: dict[str, Any] = field(default_factory=dict)
    summary: str = ""
    precisions: tuple[str, ...] = ALL_PRECISIONS  # autocast dtypes the architecture is safe in


MODELS: dict[str, ModelSpec] = {}


@dataclass(frozen=True)
class ModelCard:
    """What a built model is: how a checkpoint rebuilds it and which autocast dtypes it is safe in."""

    arch: str  # table name, or "spandrel:<ArchId>" for a detected model outside the table
    kwargs: dict[str, Any]  # plain types: what checkpoints store
    precisions: tuple[str, ...]
    note: str = ""  # how it was obtained when not built from the table (detected in a file ...)
    detected: dict[str, Any] | None = None  # spandrel's findings (zoo.Detected.summary) for a weights file


def register(name: str, builder: Callable[..., nn.Module], summary: str, *,
             precisions: tuple[str, ...] | None = None, **kwargs: Any) -> None:
    """Add a model to the table; a second registration of a name is a bug, so it raises.

    ``precisions`` defaults to the builder's own (a ``zoo.Family`` knows spandrel's), else all three.
    """
    if name in MODELS:
        raise KeyError(f"model {name!r} is already registered")
    MODELS[name] = ModelSpec(builder, kwargs, summary, precisions or getattr(builder, "precisions", ALL_PRECISIONS))


_SWIN_FULL = dict(img_size=48, window_size=8, depths=(6,) * 6, embed_dim=180,
                  num_heads=(6,) * 6, mlp_ratio=2.0)
register("rrdb", _rrdb, "ESRGAN's RRDBNet (PSNR model): 64 features, 23 blocks, growth 32",
         num_feat=64, num_block=23, num_grow_ch=32)
register("rrdb-tiny", _rrdb, "RRDBNet 32 features, 3 blocks, growth 16 (CPU runs)",
         num_feat=32, num_block=3, num_grow_ch=16)
register("rrdb-nano", _rrdb, "RRDBNet 8 features, 1 block (tests)", num_feat=8, num_block=1, num_grow_ch=4)
_NO_FP16 = ("fp32", "bf16")  # spandrel: SwinIR does not support half precision
register("swinir", _swinir, "SwinIR classical x4 (paper configuration)", precisions=_NO_FP16, **_SWIN_FULL)
register("swinir-tiny", _swinir, "SwinIR 2 stages of depth 2, 48 channels (CPU runs)", precisions=_NO_FP16,
         img_size=32, window_size=8, depths=(2, 2), embed_dim=48, num_heads=(3, 3), mlp_ratio=2.0)
register("swinir-nano", _swinir, "SwinIR 1 stage of depth 1, 12 channels (tests)", precisions=_NO_FP16,
         img_size=16, window_size=4, depths=(1,), embed_dim=12, num_heads=(2,), mlp_ratio=1.0)
register("edsr", _edsr, "EDSR baseline: 64 features, 16 blocks", num_feat=64, num_block=16, res_scale=1.0)
register("edsr-large", _edsr, "EDSR: 256 features, 32 blocks, residual scale 0.1",
         num_feat=256, num_block=32, res_scale=0.1)
register("edsr-tiny", _edsr, "EDSR 32 features, 8 blocks (CPU runs)", num_feat=32, num_block=8, res_scale=1.0)
register("edsr-nano", _edsr, "EDSR 8 features, 1 block (tests)", num_feat=8, num_block=1, res_scale=1.0)
register("srcnn", SRCNN, "SRCNN 9-5-5 on bicubic-upscaled input", features=(64, 32), kernels=(9, 5, 5))
register("bicubic", Bicubic, "MATLAB-compatible bicubic, no parameters (the baseline)", precisions=("fp32",))

# The published architectures, through spandrel (pipeline/models/zoo.py). Full presets are the papers' x4
# configurations; -tiny runs a forward+backward on a 16x16 LR batch in about a second on a 2-core
# CPU, -nano is for tests. Arguments spandrel cannot read from a state dict (img_size,
# drop_path_rate, conv_scale ...) keep its defaults, so published files map back to these entries.
_HAT = dict(img_size=64, window_size=16, compress_ratio=3, squeeze_factor=30, overlap_ratio=0.5,
            depths=(6,) * 6, embed_dim=180, num_heads=(6,) * 6, mlp_ratio=2.0, num_feat=64)
register("hat", zoo.HAT_FAMILY, "HAT x4 (HAT_SRx4): 6 groups of 6 blocks, 180 channels, window 16", **_HAT)
register("hat-l", zoo.HAT_FAMILY, "HAT-L x4: 12 groups of 6 blocks (8th place's model)",
         **{**_HAT, "depths": (6,) * 12, "num_heads": (6,) * 12})
register("hat-tiny", zoo.HAT_FAMILY, "HAT 2 groups of 2 blocks, 48 channels, window 8 (CPU runs)",
         **{**_HAT, "window_size": 8, "squeeze_factor": 8, "depths": (2, 2), "embed_dim": 48, "num_heads": (3, 3),
            "num_feat": 32})
register("hat-nano", zoo.HAT_FAMILY, "HAT 1 block, 12 channels, window 4 (tests)",
         **{**_HAT, "window_size": 4, "compress_ratio": 2, "squeeze_factor": 3, "depths": (1,), "embed_dim": 12,
            "num_heads": (2,), "mlp_ratio": 1.0, "num_feat": 8})
_DAT = dict(img_size=64, split_size=(8, 32), depth=(6,) * 6, embed_dim=180, num_heads=(6,) * 6, expansion_factor=4.0)
register("dat", zoo.DAT_FAMILY, "DAT x4: 6 groups of 6 blocks, 180 channels, split 8x32", **_DAT)
register("dat-tiny", zoo.DAT_FAMILY, "DAT 2 groups of 2 blocks, 48 channels, split 4x8 (CPU runs)",
         **{**_DAT, "split_size": (4, 8), "depth": (2, 2), "embed_dim": 48, "num_heads": (2, 2),
            "expansion_factor": 2.0})
register("dat-nano", zoo.DAT_FAMILY, "DAT 1 group of 2 blocks, 16 channels, split 2x4 (tests)",
         **{**_DAT, "split_size": (2, 4), "depth": (2,), "embed_dim": 16, "num_heads": (2,), "expansion_factor": 1.0})
_DRCT = dict(img_size=64, window_size=16, depths=(6,) * 6, embed_dim=180, num_heads=(6,) * 6, mlp_ratio=2.0, gc=32)
register("drct", zoo.DRCT_FAMILY, "DRCT x4: 6 dense residual groups, 180 channels, window 16", **_DRCT)
register("drct-tiny", zoo.DRCT_FAMILY, "DRCT 1 group, 32 channels, growth 16, window 8 (CPU runs)",
         **{**_DRCT, "window_size": 8, "depths": (6,), "embed_dim": 32, "num_heads": (2,), "gc": 16})
register("drct-nano", zoo.DRCT_FAMILY, "DRCT 1 group, 12 channels, growth 4, window 4 (tests)",
         **{**_DRCT, "img_size": 16, "window_size": 4, "depths": (6,), "embed_dim": 12, "num_heads": (2,),
            "mlp_ratio": 1.0, "gc": 4})
_ATD = dict(img_size=64, window_size=16, depths=(6,) * 6, embed_dim=210, num_heads=(6,) * 6, category_size=256,
            num_tokens=128, reducted_dim=20, convffn_kernel_size=5, mlp_ratio=2.0)
register("atd", zoo.ATD_FAMILY, "ATD x4: 6 groups of 6 blocks, 210 channels, 128 tokens, window 16", **_ATD)
register("atd-tiny", zoo.ATD_FAMILY, "ATD 1 group of 2 blocks, 48 channels, 32 tokens, window 8 (CPU runs)",
         **{**_ATD, "window_size": 8, "depths": (2,), "embed_dim": 48, "num_heads": (3,), "num_tokens": 32,
            "reducted_dim": 8})
register("atd-nano", zoo.ATD_FAMILY, "ATD 1 group of 2 blocks, 12 channels, 8 tokens, window 4 (tests)",
         **{**_ATD, "window_size": 4, "depths": (2,), "embed_dim": 12, "num_heads": (2,), "num_tokens": 8,
            "reducted_dim": 4, "convffn_kernel_size": 3, "mlp_ratio": 1.0})
_RCAN = dict(n_resgroups=10, n_resblocks=20, n_feats=64, reduction=16, kernel_size=3, res_scale=1)
register("rcan", zoo.RCAN_FAMILY, "RCAN x4: 10 residual groups of 20 channel-attention blocks, 64 features", **_RCAN)
register("rcan-tiny", zoo.RCAN_FAMILY, "RCAN 3 groups of 4 blocks, 32 features (CPU runs)",
         **{**_RCAN, "n_resgroups": 3, "n_resblocks": 4, "n_feats": 32, "reduction": 8})
register("rcan-nano", zoo.RCAN_FAMILY, "RCAN 1 group of 1 block, 8 features (tests)",
         **{**_RCAN, "n_resgroups": 1, "n_resblocks": 1, "n_feats": 8, "reduction": 4})
register("span", zoo.SPAN_FAMILY, "SPAN x4 (NTIRE 2024 efficient SR winner): 48 channels", feature_channels=48)
register("span-tiny", zoo.SPAN_FAMILY, "SPAN 24 channels (CPU runs)", feature_channels=24)
register("span-nano", zoo.SPAN_FAMILY, "SPAN 8 channels (tests)", feature_channels=8)
register("safmn", zoo.SAFMN_FAMILY, "SAFMN x4: 36 channels, 8 blocks", dim=36, n_blocks=8, ffn_scale=2.0)
register("safmn-tiny", zoo.SAFMN_FAMILY, "SAFMN 24 channels, 4 blocks (CPU runs)", dim=24, n_blocks=4, ffn_scale=2.0)
register("safmn-nano", zoo.SAFMN_FAMILY, "SAFMN 8 channels, 1 block (tests)", dim=8, n_blocks=1, ffn_scale=1.0)
_OMNI = dict(num_feat=64, block_num=1, pe=True, window_size=8, res_num=5, bias=True)
register("omnisr", zoo.OMNISR_FAMILY, "Omni-SR x4: 5 groups, 64 channels, window 8", **_OMNI)
register("omnisr-tiny", zoo.OMNISR_FAMILY, "Omni-SR 2 groups, 32 channels (CPU runs)",
         **{**_OMNI, "num_feat": 32, "res_num": 2})
register("omnisr-nano", zoo.OMNISR_FAMILY, "Omni-SR 1 group, 8 channels, window 4 (tests)",
         **{**_OMNI, "num_feat": 8, "window_size": 4, "res_num": 1})
register("esrgan", zoo.ESRGAN_FAMILY, "ESRGAN's RRDB as spandrel builds it (old-arch keys): 64 features, 23 blocks",
         num_filters=64, num_blocks=23)
register("esrgan-tiny", zoo.ESRGAN_FAMILY, "ESRGAN RRDB 24 features, 2 blocks (CPU runs)", num_filters=24, num_blocks=2)
register("esrgan-nano", zoo.ESRGAN_FAMILY, "ESRGAN RRDB 8 features, 1 block (tests)", num_filters=8, num_blocks=1)

# Generators of the perceptual / adversarial write-ups (issue 10): SRResNet is SRGAN's generator as basicsr's
# MSRResNet (no batch norm, bilinear skip); WDSR is ours (pipeline/models/wdsr.py).
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
    """Build a model from the table; ``overrides`` replace its keyword arguments (such a model's
    checkpoints do not load: a checkpoint's arguments must be its preset's)."""
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(MODELS))}")
    spec = MODELS[name]
    kwargs = {**spec.kwargs, **{k: _as_tuple(v) for k, v in overrides.items()}}
    unknown = set(overrides) - set(spec.kwargs)
    if unknown:
        raise UserError(f"model {name!r} has no argument(s) {sorted(unknown)}; it takes {sorted(spec.kwargs)}")
    model = spec.builder(**kwargs)
    model.card = ModelCard(name, model_kwargs(name, **overrides), spec.precisions)
    return model


def check_scale(scale: int) -> None:
    """``data.scale`` against the models: every table model, and every weights file the pipeline accepts
    (``zoo.detect`` refuses the others), upscales by ``SCALE``."""
    if scale != SCALE:
        raise UserError(f"data.scale={scale}, but every model of the table and every weights file this pipeline "
                        f"accepts is x{SCALE}; a x{scale} dataset can be prepared and scored, not trained or inferred")


def model_kwargs(name: str, **overrides: Any) -> dict[str, Any]:
    """The full keyword arguments ``build_model(name, **overrides)`` uses (stored in checkpoints)."""
    kwargs = {**MODELS[name].kwargs, **overrides}
    return {k: plain(v) for k, v in kwargs.items()}


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def card_of(model: nn.Module) -> ModelCard:
    """The model's card; a module built elsewhere is taken as safe in every precision."""
    card = getattr(model, "card", None)
    return card if isinstance(card, ModelCard) else ModelCard("?", {}, ALL_PRECISIONS)


def autocast_cap(models: Sequence[nn.Module], dtype: torch.dtype | None, device: torch.device) -> torch.dtype | None:
    """``dtype`` lowered to what every model is safe in: fp16 -> bf16 (where the device has it) -> fp32 (None).

    spandrel marks the transformer models (and RCAN, SAFMN) as not fp16-safe: activations overflow
    fp16's range. Inference and training call this once with the dtype the precision setting chose.
    """
    if dtype is None:
        return None
    allowed = set(ALL_PRECISIONS)
    for m in models:
        allowed &= set(card_of(m).precisions)
    if precision_name(dtype) in allowed:
        return dtype
    if "bf16" in allowed and (device.type != "cuda" or torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return None


def markdown_table() -> str:
    """docs/models.md's model table (``python -m pipeline.models.table``): every entry, its parameters, precisions."""
    rows = ["| model | parameters | precisions | what it is |", "|---|---:|---|---|"]
    for name, spec in MODELS.items():
        params = count_parameters(build_model(name))
        rows.append(f"| `{name}` | {params:,} | {' '.join(spec.precisions)} | {spec.summary} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())

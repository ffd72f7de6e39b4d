"""Perceptual networks from local weight files, and the image-quality columns of ``evaluate``.

Nothing here downloads: the VGG19 of the perceptual loss and the AlexNet/VGG16 backbone of LPIPS
are read from torchvision-format state dicts (the files torchvision's ``weights=...`` would fetch),
given as paths. A setting that needs a file and has none is a one-line ``UserError`` naming the
file. ``ImageQuality`` gives ``evaluate`` two columns per image: ``sharpness`` (always; defined in
``sharpness``) and ``lpips`` (a distance, or the reason it is missing).
"""

from __future__ import annotations

import functools
import math
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torchvision.models.vgg import cfgs, make_layers

from pipeline.core.errors import UserError

VGG19_FILE = "vgg19-dcbb9e9d.pth"
LPIPS_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
# The statistics every torchvision ImageNet classifier was trained with (inputs in [0,1]).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def load_torchvision_weights(path: str | Path, setting: str, file_name: str, purpose: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (``setting``'s value); every problem is a one-line UserError."""
    where = f"put torchvision's ImageNet weights {file_name} in models/ and set {setting}=models/{file_name}"
    if not str(path):
        raise UserError(f"{purpose} needs {setting}: {where} (nothing is downloaded)")
    path = Path(path)
    if not path.exists():
        raise UserError(f"{setting}={path}: file not found; {purpose} needs torchvision's {file_name}")
    from pipeline.models.checkpoint import load_checkpoint  # bounded and safe loading, the one way files load

    state = load_checkpoint(path)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path}: not a state dict of tensors; {purpose} needs torchvision's {file_name}")
    return state


# -- VGG19 features for the perceptual loss --------------------------------------------------------


@functools.cache
def vgg19_layer_names() -> tuple[str, ...]:
    """Names of torchvision's ``vgg19().features`` by index: conv1_1, relu1_1, conv1_2, ..., pool5.

    Derived from torchvision's own layer list (config "E": a number is a 3x3 conv + ReLU, "M" a
    max-pool ending a block), so ``conv5_4`` is index 34 and ``conv2_2`` index 7.
    """
    names: list[str] = []
    block, conv = 1, 0
    for item in cfgs["E"]:
        if item == "M":
            names.append(f"pool{block}")
            block, conv = block + 1, 0
        else:
            conv += 1
            names += [f"conv{block}_{conv}", f"relu{block}_{conv}"]
    return tuple(names)


class VGGFeatures(nn.Module):
    """Frozen VGG19 ``features`` up to the deepest requested layer; returns {layer name: activation}.

    Input (B,3,H,W) in [0,1], ImageNet-normalised inside. A ``conv*`` layer is taken before its
    ReLU (SRGAN's VGG54 / ESRGAN's choice: the activations after ReLU are sparse and weak).
    """

    def __init__(self, state: dict[str, torch.Tensor], layers: tuple[str, ...], source: str = "weights") -> None:
        super().__init__()
        names = vgg19_layer_names()
        unknown = [name for name in layers if name not in names]
        if unknown or not layers:
            raise UserError(f"loss.perceptual_layers: unknown VGG19 layer(s) {unknown}; known: {', '.join(names)}")
        self.wanted = {names.index(name): name for name in layers}
        last = max(self.wanted)
        self.features = make_layers(cfgs["E"])[: last + 1]
        for layer in self.features:
            if isinstance(layer, nn.ReLU):
                layer.inplace = False  # an in-place ReLU would overwrite a conv output already collected
        prefix = "features."
        wanted_state = {k[len(prefix):]: v for k, v in state.items()
                        if k.startswith(prefix) and int(k.split(".")[1]) <= last}
        try:
            self.features.load_state_dict(wanted_state)
        except RuntimeError as exc:
            detail = " ".join(str(exc).split())[:200]
            raise UserError(f"{source}: not torchvision's VGG19 weights ({VGG19_FILE}): {detail}") from None
        self.features.requires_grad_(False).eval()
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        x = (x - self.mean) / self.std
        out = {}
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.wanted:
                out[self.wanted[index]] = x
        return out


def load_vgg_features(path: str | Path, layers: tuple[str, ...]) -> VGGFeatures:
    """VGG19 features at ``layers`` with torchvision's ImageNet weights from ``path`` (``loss.vgg_weights``)."""
    state = load_torchvision_weights(path, "loss.vgg_weights", VGG19_FILE, "the perceptual loss (loss.perceptual > 0)")
    return VGGFeatures(state, layers, str(path))


# -- evaluation columns -------------------------------------------------------------------------


def load_lpips(net: str, path: str | Path) -> nn.Module:
    """``lpips.LPIPS`` with the package's own linear layers and the ``net`` backbone read from ``path``."""
    import lpips

    if net not in LPIPS_FILES:
        raise UserError(f"evaluate.lpips_net={net!r}: choose {' or '.join(LPIPS_FILES)}")
    state = load_torchvision_weights(path, "evaluate.lpips_weights", LPIPS_FILES[net], f"LPIPS ({net})")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's note on lpips's `pretrained=False`
        # pretrained=True: the calibrated linear layers shipped inside the package; pnet_rand=True: the
        # backbone is left random here (no download) and filled from the local file below.
        model = lpips.LPIPS(net=net, pretrained=True, pnet_rand=True, verbose=False)
    # lpips cuts torchvision's `features` into slices that keep the original indices as module names.
    slice_of = {index: name for name, part in model.net.named_children() for index, _ in part.named_children()}
    backbone = {}
    for key, value in state.items():
        if key.startswith("features."):
            _, index, param = key.split(".", 2)
            backbone[f"{slice_of.get(index, 'unused')}.{index}.{param}"] = value
    try:
        model.net.load_state_dict(backbone)
    except RuntimeError as exc:
        detail = " ".join(str(exc).split())[:200]
        raise UserError(f"{path}: not torchvision's {net} weights ({LPIPS_FILES[net]}): {detail}") from None
    return model.eval()


def _to_tensor(img: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(img).to(device).permute(2, 0, 1)[None].float().div(255)  # (H,W,3) -> (1,3,H,W)


@torch.inference_mode()
def lpips_distance(model: nn.Module, sr: np.ndarray, hr: np.ndarray) -> float:
    """LPIPS between two (H,W,3) uint8 RGB images (0 = identical; lower is closer)."""
    device = next(model.parameters()).device
    return float(model(_to_tensor(sr, device), _to_tensor(hr, device), normalize=True).item())


def laplacian_energy(img: np.ndarray) -> float:
    """Mean squared 5-point Laplacian of the BT.601 luma Y (8-bit scale) over interior pixels.

    Y is basicsr's ``rgb2ycbcr(img / 255, y_only=True) * 255``; L = Y[i-1,j] + Y[i+1,j] + Y[i,j-1]
    + Y[i,j+1] - 4 Y[i,j] for 1 <= i <= H-2, 1 <= j <= W-2 (no padding, so borders add nothing).
    """
    from pipeline.core.compat import rgb2ycbcr

    y = rgb2ycbcr(img.astype(np.float32) / 255.0, y_only=True).astype(np.float64) * 255.0
    lap = y[:-2, 1:-1] + y[2:, 1:-1] + y[1:-1, :-2] + y[1:-1, 2:] - 4.0 * y[1:-1, 1:-1]
    return float(np.mean(lap**2))


def sharpness(sr: np.ndarray, hr: np.ndarray) -> float:
    """High-frequency energy of the prediction relative to the ground truth's: E(sr) / E(hr).

    E is ``laplacian_energy``. It needs no pixel alignment, so it measures detail, not fidelity:
    1 = as much fine detail as the HR; below 1 = smoother (bicubic and PSNR-trained models, whose
    MSE optimum averages textures away); above 1 = more (GAN texture, noise, ringing). Shown beside
    PSNR it makes the perception-distortion trade-off visible. A flat HR gives 1 if the prediction
    is flat too, else infinity.
    """
    e_sr, e_hr = laplacian_energy(sr), laplacian_energy(hr)
    if e_hr == 0:
        return 1.0 if e_sr == 0 else math.inf
    return e_sr / e_hr


class ImageQuality:
    """The extra columns of ``evaluate`` for one image pair: ``sharpness`` and ``lpips``."""

    def __init__(self, lpips_weights: str = "", lpips_net: str = "alex", device: torch.device | None = None) -> None:
        self.lpips: nn.Module | None = None
        self.missing = f"missing: set evaluate.lpips_weights ({LPIPS_FILES.get(lpips_net, lpips_net)})"
        if lpips_weights:
            from pipeline.core.runtime import pick_device

            self.lpips = load_lpips(lpips_net, lpips_weights).to(device or pick_device())

    def __call__(self, sr: np.ndarray, hr: np.ndarray) -> dict[str, Any]:
        """``{"sharpness": float, "lpips": float or the reason it is missing}``."""
        score = lpips_distance(self.lpips, sr, hr) if self.lpips is not None else self.missing
        return {"sharpness": sharpness(sr, hr), "lpips": score}

"""The one place basicsr is imported.

basicsr 1.4.2 imports ``torchvision.transforms.functional_tensor``, a module torchvision
removed in 0.17. Its only use there is ``rgb_to_grayscale``, which lives on in
``torchvision.transforms.functional`` with the same signature, so we register that module
under the old name before basicsr loads. Everything the project uses from basicsr is
re-exported here; ``tests/test_compat.py`` imports each of them.
"""

from __future__ import annotations

import sys

import torchvision.transforms.functional as _tv_functional

if "torchvision.transforms.functional_tensor" not in sys.modules:
    try:  # an old torchvision still ships the module: use it
        import torchvision.transforms.functional_tensor  # noqa: F401
    except ImportError:
        sys.modules["torchvision.transforms.functional_tensor"] = _tv_functional

from basicsr.archs.discriminator_arch import UNetDiscriminatorSN, VGGStyleDiscriminator  # noqa: E402
from basicsr.archs.edsr_arch import EDSR  # noqa: E402
from basicsr.archs.rrdbnet_arch import RRDBNet  # noqa: E402
from basicsr.archs.srresnet_arch import MSRResNet  # noqa: E402
from basicsr.archs.swinir_arch import SwinIR  # noqa: E402
from basicsr.data.degradations import add_gaussian_noise, add_jpg_compression, bivariate_Gaussian  # noqa: E402
from basicsr.metrics.psnr_ssim import calculate_psnr, calculate_ssim  # noqa: E402
from basicsr.utils.color_util import rgb2ycbcr  # noqa: E402
from basicsr.utils.matlab_functions import imresize  # noqa: E402

__all__ = ["EDSR", "MSRResNet", "RRDBNet", "SwinIR", "UNetDiscriminatorSN", "VGGStyleDiscriminator",
           "add_gaussian_noise", "add_jpg_compression", "bivariate_Gaussian", "calculate_psnr", "calculate_ssim",
           "imresize", "rgb2ycbcr"]

"""basicsr 1.4.2 imports a module torchvision removed; pipeline.core.compat is the one shim."""

import subprocess
import sys

import numpy as np
from procs import ROOT


def test_basicsr_names_import_through_the_shim():
    from pipeline.core import compat

    for name in compat.__all__:
        assert getattr(compat, name) is not None
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 3)).astype(np.float64)
    b = np.clip(a + rng.normal(0, 4, a.shape), 0, 255)
    assert 20 < compat.calculate_psnr(a, b, crop_border=0) < 60
    assert 0 < compat.calculate_ssim(a, b, crop_border=0) <= 1
    assert compat.imresize(a / 255, 0.25).shape == (4, 4, 3)


def test_shim_is_needed_and_sufficient_in_a_fresh_interpreter():
    """Without the shim basicsr fails to import (so the shim is not dead code); with it, it imports."""
    bare = subprocess.run([sys.executable, "-c", "import basicsr"], capture_output=True, text=True)
    assert bare.returncode != 0 and "functional_tensor" in bare.stderr
    shimmed = subprocess.run([sys.executable, "-c", "import pipeline.core.compat, basicsr; print('ok')"],
                             cwd=ROOT, capture_output=True, text=True)
    assert shimmed.returncode == 0, shimmed.stderr

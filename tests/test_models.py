"""Every model of the table runs forward and backward on the CPU; the bicubic baseline is MATLAB's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.compat import imresize
from pipeline.errors import UserError
from pipeline.models import MODELS, build_model, count_parameters, model_kwargs

LR_SIDE = 8


pytestmark = pytest.mark.usefixtures("fast_cpu")  # tests/conftest.py


@pytest.mark.parametrize("name", sorted(MODELS))
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    lr = torch.rand(2, 3, LR_SIDE, LR_SIDE + 4)  # non-square, so a swapped axis shows up
    if count_parameters(model) == 0:
        assert name == "bicubic"
        with torch.no_grad():
            sr = model(lr)
        assert sr.shape == (2, 3, 4 * LR_SIDE, 4 * (LR_SIDE + 4))
        assert torch.isfinite(sr).all()
        return
    model.train()
    sr = model(lr)  # (2,3,h,w) -> (2,3,4h,4w)
    assert sr.shape == (2, 3, 4 * LR_SIDE, 4 * (LR_SIDE + 4))
    assert torch.isfinite(sr).all()
    sr.mean().backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rebuild_from_kwargs(name: str) -> None:
    """A checkpoint's (arch, kwargs) rebuilds the same architecture: same keys and shapes."""
    model = build_model(name)
    again = build_model(name, **model_kwargs(name))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}


def test_bicubic_matches_matlab_imresize() -> None:
    rng = np.random.default_rng(0)
    lr = rng.random((7, 9, 3))
    expected = imresize(lr, 4)  # (7,9,3) -> (28,36,3), basicsr's MATLAB port
    x = torch.from_numpy(lr).permute(2, 0, 1)[None]  # (h,w,3) -> (1,3,h,w) float64
    sr = build_model("bicubic")(x)[0].permute(1, 2, 0).numpy()  # (1,3,4h,4w) -> (4h,4w,3)
    np.testing.assert_allclose(sr, expected, atol=1e-6)  # basicsr computes in float32


def test_bicubic_stays_fp32_under_autocast() -> None:
    """bf16 matmuls would move the baseline by about a grey level; autocast must not reach them."""
    x = torch.rand(1, 3, 8, 8)
    model = build_model("bicubic")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        sr = model(x)
    assert sr.dtype == torch.float32
    torch.testing.assert_close(sr, model(x), rtol=0, atol=1e-6)


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(UserError, match="edsr-tiny"):
        build_model("edsr-tinyy")
    with pytest.raises(UserError, match="no argument"):
        build_model("edsr-tiny", num_feats=3)


def test_table_has_the_issue_models() -> None:
    for name in ("rrdb", "swinir", "edsr", "edsr-large", "srcnn", "bicubic"):
        assert name in MODELS
    assert model_kwargs("rrdb") == {"num_feat": 64, "num_block": 23, "num_grow_ch": 32}
    assert model_kwargs("swinir")["embed_dim"] == 180 and model_kwargs("swinir")["depths"] == [6] * 6
    assert model_kwargs("edsr") == {"num_feat": 64, "num_block": 16, "res_scale": 1.0}
    assert model_kwargs("srcnn")["kernels"] == [9, 5, 5]

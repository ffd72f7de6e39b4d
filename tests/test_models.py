"""The model table: every small model runs forward and backward on the CPU, every full preset is built
and counted (against the table in docs/models.md), the padding matches spandrel's, the table agrees with what
spandrel detects in its own weights, fp16-unsafe models stay in bf16/fp32, bicubic is MATLAB's."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch
from spandrel import MAIN_REGISTRY, SizeRequirements
from spandrel.architectures.HAT import HAT

from pipeline.core.compat import imresize
from pipeline.core.errors import UserError
from pipeline.models import zoo
from pipeline.models.archs import pad_to_size
from pipeline.models.checkpoint import _table_entry
from pipeline.models.table import MODELS, autocast_cap, build_model, card_of, count_parameters, model_kwargs

LR_SIDE = 8
MODEL_DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"

def _is_full_preset(name: str) -> bool:
    """A large preset of a family that has -tiny/-nano presets (rrdb, hat-l, edsr-large ...)."""
    family = name.split("-")[0]
    return not name.endswith(("-tiny", "-nano")) and any(m.startswith(f"{family}-") and m.endswith(
        ("-tiny", "-nano")) for m in MODELS)


# Forward/backward on the presets sized for tests and CPU runs (and models that have no others); the
# full presets are built and counted only (test_model_table_counts_every_model): seconds per forward.
SMALL = sorted(n for n in MODELS if not _is_full_preset(n))
FAMILY_MODELS = sorted(n for n in MODELS if isinstance(MODELS[n].builder, zoo.Family) and n in SMALL)


pytestmark = pytest.mark.usefixtures("fast_cpu")  # tests/conftest.py


@pytest.mark.parametrize("name", SMALL)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name)
    lr = torch.rand(2, 3, LR_SIDE, LR_SIDE + 4)  # non-square and no window's multiple: padding is exercised
    before = lr.clone()
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
    assert torch.equal(lr, before)  # RCAN scales its input in place: the wrapper hands it a copy
    sr.mean().backward()
    # SPAN's eval_conv is recomputed from its training branches at eval time: it gets no gradient.
    grads = [p.grad for n, p in model.named_parameters() if p.requires_grad and ".eval_conv." not in n]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", sorted(n for n in FAMILY_MODELS if n.endswith("-nano")))
def test_spandrel_families_train_a_few_steps(name: str) -> None:
    """Five Adam steps on one batch lower its loss (same seed for both measurements: same drop-path masks)."""
    torch.manual_seed(0)
    model = build_model(name).train()
    lr, hr = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 64, 64)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)

    def loss() -> torch.Tensor:
        torch.manual_seed(1)
        return torch.nn.functional.l1_loss(model(lr), hr)

    before = loss().item()
    for _ in range(5):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < before


@pytest.mark.parametrize("name", SMALL)
def test_rebuild_from_kwargs(name: str) -> None:
    """A checkpoint's (arch, kwargs) rebuilds the same architecture: same keys and shapes."""
    model = build_model(name)
    again = build_model(name, **model_kwargs(name))
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    assert shapes == {k: v.shape for k, v in again.state_dict().items()}
    assert card_of(model).arch == name and card_of(model).kwargs == model_kwargs(name)


def _table_rows() -> dict[str, tuple[int, str]]:
    rows = {}
    for line in MODEL_DOC.read_text().splitlines():
        m = re.match(r"\| `([\w-]+)` \| ([\d,]+) \| ([\w ]+) \|", line)
        if m:
            rows[m.group(1)] = (int(m.group(2).replace(",", "")), m.group(3).strip())
    return rows


@pytest.mark.parametrize("name", sorted(MODELS))
def test_model_table_counts_every_model(name: str) -> None:
    """Every entry, full presets included, builds; docs/models.md lists its parameter count and precisions."""
    rows = _table_rows()
    assert name in rows, f"docs/models.md misses {name} (regenerate its table with `python -m pipeline.models.table`)"
    assert rows[name] == (count_parameters(build_model(name)), " ".join(MODELS[name].precisions))


def test_published_presets() -> None:
    """The full presets are the papers' x4 configurations (parameter counts as published)."""
    for name in ("rrdb", "swinir", "edsr", "edsr-large", "srcnn", "bicubic", "hat", "hat-l", "dat", "drct", "atd",
                 "rcan", "span", "safmn", "omnisr", "esrgan"):
        assert name in MODELS
    assert model_kwargs("rrdb") == {"num_feat": 64, "num_block": 23, "num_grow_ch": 32}
    assert model_kwargs("swinir")["embed_dim"] == 180 and model_kwargs("swinir")["depths"] == [6] * 6
    assert model_kwargs("edsr") == {"num_feat": 64, "num_block": 16, "res_scale": 1.0}
    assert model_kwargs("srcnn")["kernels"] == [9, 5, 5]
    hat = model_kwargs("hat")
    assert (hat["window_size"], hat["embed_dim"], hat["depths"], hat["squeeze_factor"]) == (16, 180, [6] * 6, 30)
    assert model_kwargs("hat-l")["depths"] == [6] * 12
    assert model_kwargs("dat")["split_size"] == [8, 32] and model_kwargs("atd")["num_tokens"] == 128
    assert model_kwargs("rcan")["n_resgroups"] == 10 and model_kwargs("rcan")["n_resblocks"] == 20
    assert model_kwargs("omnisr")["res_num"] == 5 and model_kwargs("safmn")["dim"] == 36


@pytest.mark.parametrize("name", FAMILY_MODELS)
def test_table_agrees_with_spandrel(name: str) -> None:
    """spandrel reads our weights back as the same architecture, table entry, size needs and precisions."""
    torch.manual_seed(0)
    model = build_model(name).eval()
    descriptor = MAIN_REGISTRY.load(dict(model.state_dict()))
    family = MODELS[name].builder
    assert descriptor.architecture.id == family.arch_id and descriptor.scale == 4
    assert descriptor.size_requirements == SizeRequirements(family.minimum, family.multiple_of)
    found = zoo.detect(model.state_dict(), name)
    assert found.precisions == MODELS[name].precisions
    assert _table_entry(found) == name
    # Same outputs as spandrel's own call API at a size every padding step touches (it clamps to [0,1]).
    lr = torch.rand(1, 3, 18, 26)
    with torch.no_grad():
        ours = model(lr).clamp(0, 1)
    assert torch.equal(ours, descriptor(lr))


def test_swinir_precisions_are_spandrels() -> None:
    """basicsr's SwinIR is the one spandrel knows: the table's precisions are spandrel's."""
    descriptor = MAIN_REGISTRY.load(dict(build_model("swinir-nano").state_dict()))
    assert descriptor.architecture.id == "SwinIR" and not descriptor.supports_half
    assert MODELS["swinir"].precisions == ("fp32", "bf16")


def test_pad_to_size_is_spandrels_rule() -> None:
    """Reflection as far as it reaches, then edge replication; nothing when the size fits."""
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    out = pad_to_size(x, 0, 8)  # (1,1,3,4) -> (1,1,8,8): 2 reflected rows, then 3 replicated
    assert out.shape == (1, 1, 8, 8)
    assert torch.equal(out[0, 0, :, 0], torch.tensor([0.0, 4, 8, 4, 0, 0, 0, 0]))
    assert pad_to_size(x, 2, 1) is x


def test_autocast_cap() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    hat, span, bicubic = build_model("hat-nano"), build_model("span-nano"), build_model("bicubic")
    assert autocast_cap([hat], torch.float16, cpu) is torch.bfloat16  # spandrel: HAT is not fp16-safe
    assert autocast_cap([span], torch.float16, cpu) is torch.float16
    assert autocast_cap([span, hat], torch.float16, cpu) is torch.bfloat16  # every model must be safe
    assert autocast_cap([hat], torch.bfloat16, cpu) is torch.bfloat16
    assert autocast_cap([bicubic], torch.bfloat16, cpu) is None
    assert autocast_cap([hat], None, cpu) is None
    if not torch.cuda.is_available() or not torch.cuda.is_bf16_supported():
        assert autocast_cap([hat], torch.float16, cuda) is None  # a GPU without bf16: fp32


def test_detected_hat_outside_the_table_keeps_spandrels_hyperparameters() -> None:
    """A HAT no preset describes is detected as itself, with the arguments its shapes imply."""
    torch.manual_seed(0)
    net = HAT(upscale=4, embed_dim=20, depths=(1,), num_heads=(2,), window_size=4, compress_ratio=2,
              squeeze_factor=5, mlp_ratio=1.5, num_feat=8)
    found = zoo.detect(net.state_dict(), "hat.pth")
    assert found.arch_id == "HAT" and _table_entry(found) is None
    assert found.hyperparameters["embed_dim"] == 20 and found.hyperparameters["mlp_ratio"] == 1.5
    assert "norm_layer" not in found.hyperparameters  # only plain types go into checkpoints


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


def test_help_lists_the_table() -> None:
    """``--help`` lists models from a name tuple that needs no torch: it is the table's names, in order."""
    from pipeline.models.names import MODEL_NAMES

    assert MODEL_NAMES == tuple(MODELS)

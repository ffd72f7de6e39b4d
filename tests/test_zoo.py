"""Published weights files: each architecture's own class, saved in every supported layout, is detected
and gives exactly spandrel's own output through `infer --weights`; x2 files and checkpoints with
arguments the table does not have are refused in one line before anything is built; detected models
train on the demo data and their checkpoints rebuild themselves."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from procs import ROOT
from safetensors.torch import save_file
from spandrel import ModelLoader
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

from pipeline.cli import main as cli
from pipeline.core.compat import RRDBNet, imresize
from pipeline.core.images import read_float, read_uint8, to_uint8, write_png
from pipeline.models import checkpoint
from pipeline.models.checkpoint import CheckpointError, load_weights_file, model_from_checkpoint, save_checkpoint
from pipeline.models.table import build_model, card_of, model_kwargs

EXACT = ["infer.tile=0", "infer.tta=1", "infer.precision=fp32", "infer.channels_last=false"]

# The architectures' own classes (spandrel ships the reference code) in sizes no table preset has,
# so detection builds them as spandrel:<ArchId> from the shapes alone.
OWN: dict[str, Callable[[], nn.Module]] = {
    "HAT": lambda: HAT(upscale=4, embed_dim=16, depths=(1,), num_heads=(2,), window_size=4, compress_ratio=2,
                       squeeze_factor=4, mlp_ratio=1.0, num_feat=8),
    "DAT": lambda: DAT(upscale=4, embed_dim=16, split_size=(2, 4), depth=(2,), num_heads=(4,), expansion_factor=1.0),
    "DRCT": lambda: DRCT(upscale=4, upsampler="pixelshuffle", img_size=16, window_size=4, depths=(6,), embed_dim=8,
                         num_heads=(2,), mlp_ratio=1.0, gc=4),
    "ATD": lambda: ATD(upscale=4, upsampler="pixelshuffle", window_size=4, depths=(2,), embed_dim=8, num_heads=(2,),
                       num_tokens=4, reducted_dim=4, convffn_kernel_size=3, mlp_ratio=1.0),
    "RCAN": lambda: RCAN(scale=4, n_resgroups=1, n_resblocks=2, n_feats=8, reduction=2),
    "SPAN": lambda: SPAN(num_in_ch=3, num_out_ch=3, feature_channels=6, upscale=4),
    "SAFMN": lambda: SAFMN(dim=12, n_blocks=1, ffn_scale=1.0, upscaling_factor=4),
    "OmniSR": lambda: OmniSR(num_feat=12, window_size=4, res_num=1, up_scale=4),
    "ESRGAN": lambda: ESRGAN(num_filters=6, num_blocks=1, scale=4),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def lr_dir(tmp_path: Path) -> Path:
    """One smooth 18x26 LR image: no window divides it, so every padding step runs."""
    small = np.random.default_rng(0).random((7, 9, 3))
    write_png(tmp_path / "lr" / "img.png", to_uint8(imresize(small, 4)[:18, :26].clip(0, 1)))
    return tmp_path / "lr"


def _random(make: Callable[[], nn.Module], seed: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    net = make()
    with torch.no_grad():  # move the weights off their init so every branch matters
        for p in net.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return net.state_dict()


def _spandrel_png(weights: Path, lr: Path) -> np.ndarray:
    """spandrel's own loader and call API (pads to its size requirements, clamps to [0,1])."""
    descriptor = ModelLoader().load_from_file(weights)
    x = torch.from_numpy(read_float(lr)).permute(2, 0, 1)[None]  # (H,W,3) -> (1,3,H,W)
    return to_uint8(descriptor(x)[0].permute(1, 2, 0).numpy())  # (1,3,4H,4W) -> (4H,4W,3)


def _infer(weights: Path, lr_dir: Path, out: Path, *extra: str) -> int:
    return cli(["infer", "--weights", str(weights), "--input", str(lr_dir), "--output", str(out), *EXACT, *extra])


@pytest.mark.parametrize("arch", sorted(OWN))
def test_every_architecture_is_detected_and_matches_spandrel(arch: str, lr_dir: Path, tmp_path: Path) -> None:
    weights = tmp_path / f"{arch}.pth"
    torch.save(_random(OWN[arch]), weights)  # the original repositories' layout: a bare state dict
    assert _infer(weights, lr_dir, tmp_path / "sr") == 0
    got = read_uint8(tmp_path / "sr" / "img.png")
    assert got.shape == (72, 104, 3)
    assert np.array_equal(got, _spandrel_png(weights, lr_dir / "img.png"))
    assert f"spandrel:{arch}" in (tmp_path / "sr" / "timing.json").read_text()


def _layouts(weights: dict[str, torch.Tensor], tmp_path: Path) -> list[Path]:
    """The same weights as basicsr, KAIR, DataParallel, Lightning-style and safetensors files."""
    zeros = {k: torch.zeros_like(v) for k, v in weights.items()}
    files = {"basicsr_ema.pth": {"params_ema": weights, "params": zeros}, "basicsr.pth": {"params": weights},
             "kair.pth": weights, "ddp.pt": {"state_dict": {f"module.{k}": v for k, v in weights.items()}},
             "wrapped.ckpt": {"model": weights}}
    paths = []
    for name, content in files.items():
        torch.save(content, tmp_path / name)
        paths.append(tmp_path / name)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp_path / "plain.safetensors"))
    return [*paths, tmp_path / "plain.safetensors"]


def test_every_layout_is_detected(lr_dir: Path, tmp_path: Path) -> None:
    new_arch = tmp_path / "new"  # basicsr's / Real-ESRGAN's RRDBNet keys (conv_first, body.N.rdbM ...)
    new_arch.mkdir()
    files = _layouts(_random(OWN["ESRGAN"]), tmp_path) + _layouts(
        _random(lambda: RRDBNet(num_in_ch=3, num_out_ch=3, scale=4, num_feat=6, num_block=1, num_grow_ch=32)),
        new_arch)
    for i, weights in enumerate(files):
        out = tmp_path / f"sr{i}"
        assert _infer(weights, lr_dir, out) == 0, weights
        assert np.array_equal(read_uint8(out / "img.png"), _spandrel_png(weights, lr_dir / "img.png")), weights


def test_scale_2_weights_are_refused_in_one_line(lr_dir: Path, tmp_path: Path, patched_demo: Path,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    weights = tmp_path / "hat_x2.pth"
    torch.save(_random(lambda: HAT(upscale=2, embed_dim=16, depths=(1,), num_heads=(2,), window_size=4,
                                   compress_ratio=2, squeeze_factor=4, num_feat=8)), weights)
    capsys.readouterr()
    assert _infer(weights, lr_dir, tmp_path / "sr") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(weights) in err and "x2 HAT" in err
    assert not (tmp_path / "sr").exists()
    assert cli(["train", "--data", str(patched_demo), f"paths.models={tmp_path / 'm'}", "run=x2",
                f"model.pretrained={weights}"]) == 2
    assert "x2 HAT" in capsys.readouterr().err
    assert not (tmp_path / "m" / "x2").exists()


def _bad_checkpoint(path: Path, **changes: object) -> Path:
    state = {"params": build_model("rrdb-nano").state_dict(), "arch": "rrdb-nano",
             "kwargs": model_kwargs("rrdb-nano"), "step": 1}
    state.update(changes)
    save_checkpoint(path, state)
    return path


def test_bad_checkpoint_arguments_are_refused_before_building(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              lr_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    def refuse(*_args: object, **_kwargs: object) -> nn.Module:
        raise AssertionError("a model was built from a checkpoint that should have been refused")

    cases = {"num_feat=4096": {"kwargs": {**model_kwargs("rrdb-nano"), "num_feat": 4096}},
             "'width'": {"kwargs": {**model_kwargs("rrdb-nano"), "width": 3}},
             "not in the model table": {"arch": "rrdb-huge"},
             "kwargs must be a mapping": {"kwargs": [64]}}
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "build_model", refuse)
        for i, (message, changes) in enumerate(cases.items()):
            path = _bad_checkpoint(tmp_path / f"bad{i}.pth", **changes)
            with pytest.raises(CheckpointError, match=message) as error:
                model_from_checkpoint(path)
            assert str(path) in str(error.value)
    # Through the CLI, as `infer` of a run whose best.pth claims 4096 features: one line, exit 2.
    _bad_checkpoint(tmp_path / "models" / "r" / "best.pth", kwargs={**model_kwargs("rrdb-nano"), "num_feat": 4096})
    capsys.readouterr()
    assert cli(["infer", "--input", str(lr_dir), "--output", str(tmp_path / "sr"), "run=r",
                f"paths.models={tmp_path / 'models'}", *EXACT]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "best.pth" in err and "num_feat=4096" in err


def test_detected_checkpoint_must_match_its_weights(tmp_path: Path) -> None:
    weights = _random(OWN["SAFMN"])
    good = {"params": weights, "arch": "spandrel:SAFMN", "kwargs": {"dim": 12, "n_blocks": 1}}
    save_checkpoint(tmp_path / "good.pth", good)
    model, _meta = model_from_checkpoint(tmp_path / "good.pth")
    assert card_of(model).arch == "spandrel:SAFMN" and card_of(model).kwargs["dim"] == 12
    save_checkpoint(tmp_path / "liar.pth", {**good, "kwargs": {"dim": 4096}})
    with pytest.raises(CheckpointError, match="dim=4096"):
        model_from_checkpoint(tmp_path / "liar.pth")
    save_checkpoint(tmp_path / "wrong.pth", {**good, "arch": "spandrel:HAT"})
    with pytest.raises(CheckpointError, match="weights are SAFMN"):
        model_from_checkpoint(tmp_path / "wrong.pth")


def test_table_weights_load_into_model_name_and_published_presets_map_to_the_table(tmp_path: Path) -> None:
    torch.save(build_model("edsr-nano").state_dict(), tmp_path / "edsr.pth")  # spandrel has no EDSR: fits by name
    assert card_of(load_weights_file(tmp_path / "edsr.pth", "edsr-nano")).arch == "edsr-nano"
    with pytest.raises(CheckpointError, match="edsr.pth"):
        load_weights_file(tmp_path / "edsr.pth", "edsr-tiny")
    torch.save({"params_ema": _random(lambda: build_model("omnisr-nano").net)}, tmp_path / "omni.pth")
    model = load_weights_file(tmp_path / "omni.pth", "edsr-nano")
    card = card_of(model)
    assert card.arch == "omnisr-nano" and "not model.name=edsr-nano" in card.note and card.detected


def _train(data: Path, models: Path, run: str, *extra: str) -> int:
    return cli(["train", "--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(data), f"paths.models={models}",
                f"run={run}",
                "train.max_steps=3", "train.val_every=3", "train.batch_size=4", "train.workers=0", *extra])


def test_spandrel_models_train_and_fine_tune(patched_demo: Path, tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "m"
    # A table model from spandrel's classes trains like any other.
    assert _train(patched_demo, models, "hat", "model.name=hat-nano") == 0
    best = torch.load(models / "hat" / "best.pth", weights_only=True)
    assert best["arch"] == "hat-nano" and best["kwargs"] == model_kwargs("hat-nano") and best["step"] == 3
    record = yaml.safe_load((models / "hat" / "model.yaml").read_text())
    assert record["arch"] == "hat-nano" and record["precisions"] == ["fp32", "bf16"] and record["pretrained"] is None
    # Fine-tuning from that checkpoint with another model.name: the checkpoint's architecture is used, and said.
    capsys.readouterr()
    assert _train(patched_demo, models, "ft", "model.name=edsr-nano",
                  f"model.pretrained={models / 'hat' / 'best.pth'}") == 0
    assert "is a hat-nano checkpoint: using it, not model.name=edsr-nano" in capsys.readouterr().out
    assert torch.load(models / "ft" / "best.pth", weights_only=True)["arch"] == "hat-nano"
    # A published file of a size no preset has trains as spandrel:HAT, and its checkpoint rebuilds itself.
    torch.save({"params_ema": _random(OWN["HAT"])}, tmp_path / "HAT_SRx4_custom.pth")
    assert _train(patched_demo, models, "det", f"model.pretrained={tmp_path / 'HAT_SRx4_custom.pth'}") == 0
    record = yaml.safe_load((models / "det" / "model.yaml").read_text())
    assert record["arch"] == "spandrel:HAT" and record["detected"]["architecture"] == "HAT"
    assert record["detected"]["scale"] == 4 and record["detected"]["hyperparameters"]["embed_dim"] == 16
    assert record["parameters"] == record["detected"]["parameters"] > 0
    model, meta = model_from_checkpoint(models / "det" / "best.pth")
    assert meta["arch"] == "spandrel:HAT" and card_of(model).kwargs == meta["kwargs"]
    reference = load_weights_file(tmp_path / "HAT_SRx4_custom.pth").eval()
    reference.load_state_dict(torch.load(models / "det" / "best.pth", weights_only=True)["params_ema"])
    lr = torch.rand(1, 3, 20, 20)
    with torch.no_grad():
        assert torch.equal(model(lr), reference(lr))


@pytest.mark.parametrize("name", ["hat-nano", "dat-nano", "drct-nano", "atd-nano"])
def test_from_scratch_transformers_start_as_the_shallow_path_and_files_replace_it(name: str, tmp_path: Path) -> None:
    # The table zeroes conv_after_body for training from scratch (zoo.Family.zero_init): the untrained
    # body adds nothing, so the output equals the same model with its whole body's output zeroed.
    model = build_model(name).eval()
    net = model.net if hasattr(model, "net") else model
    body = net.get_submodule("conv_after_body")
    assert not body.weight.any() and not body.bias.any()
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.manual_seed(0)
        for p in net.parameters():  # every other layer random: only the zeroed layer can silence the body
            if p is not body.weight and p is not body.bias:
                p.normal_(0, 0.1)
        hook = body.register_forward_hook(lambda m, i, o: torch.zeros_like(o))
        silenced = model(x)
        hook.remove()
        assert torch.equal(model(x), silenced)
        # weights loaded from a file (here: a trained-looking body) replace the zeros
        body.weight.normal_(0, 0.1)
        path = tmp_path / "w.pth"
        torch.save({"params": net.state_dict()}, path)
        loaded = load_weights_file(path, name)
    loaded_net = loaded.net if hasattr(loaded, "net") else loaded
    assert torch.equal(loaded_net.get_submodule("conv_after_body").weight, body.weight)

"""Networks from their authors' architecture files (model.arch): the four published networks of
../shared/zoo/ntire2024_esr load by their files through `infer --weights` and reproduce their own forward;
one fine-tunes, resumes exactly, exports to ONNX, and is refused once its file changed or is gone; a weights
file never runs a Python file by itself; every bad spec is one line naming the file or setting."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
import yaml
from procs import ROOT
from skimage.data import astronaut

from pipeline.cli import main as cli
from pipeline.core.compat import imresize
from pipeline.core.images import read_float, read_uint8, to_uint8, write_png
from pipeline.export import MAX_DIFF

# the shared folder beside the checkout; resolved, as model.arch records and names its file (shared/ may be a link)
ZOO = (ROOT.parent / "shared" / "zoo" / "ntire2024_esr").resolve()
pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(not ZOO.is_dir(), reason=f"the published networks are not at {ZOO}")]
EXACT = ["infer.tile=0", "infer.tta=1", "infer.precision=fp32", "infer.channels_last=false"]

# The zoo's README: weights, file, class, constructor arguments, the entry holding the state dict, input range.
NETWORKS = {
    "rcn": ("team04_rcn.pth", "team04_RCN.py", "RCN", {"feature_channels": 40, "mid_channels": 40}, None, 1),
    "rlfn": ("team05_RLFN_mogai.pth", "team05_RLFF.py", "RLFN_mogai", {}, "params", 1),
    "slimrlfn": ("team21_slimrlfn.pth", "team21_SlimRLFN.py", "SlimRLFN", {}, None, 255),
    "safmnpp": ("team23_safmnpp.pth", "team23_safmnpp.py", "SAFMNPP",
                {"dim": 36, "n_blocks": 6, "ffn_scale": 1.5, "upscaling_factor": 4}, "params_ema", 1),
}


def _settings(name: str, arch_file: Path | None = None) -> list[str]:
    """model.arch* as a user types them; the state dict's entry only where detection would pick another."""
    _weights, file, cls, kwargs, key, value_range = NETWORKS[name]
    settings = [f"model.arch={arch_file or ZOO / 'models' / file}:{cls}", f"model.arch_range={value_range}"]
    if kwargs:
        settings.append(f"model.arch_kwargs={json.dumps(kwargs)}")
    if key == "params":  # the README's entry; detection prefers params_ema, which holds other weights
        settings.append("model.arch_key=params")
    return settings


def _by_hand(name: str, lr: np.ndarray) -> np.ndarray:
    """The authors' class built and called as their README says: (H,W,3) float LR -> (4H,4W,3) uint8."""
    weights, file, cls, kwargs, key, value_range = NETWORKS[name]
    spec = importlib.util.spec_from_file_location(f"_test_{name}", ZOO / "models" / file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    net = getattr(module, cls)(**kwargs).eval()
    state = torch.load(ZOO / "weights" / weights, map_location="cpu", weights_only=True)
    net.load_state_dict(state[key] if key else state, strict=True)
    x = torch.from_numpy(lr).permute(2, 0, 1)[None].float()  # (H,W,3) -> (1,3,H,W)
    with torch.no_grad():
        out = net(x * value_range) / value_range  # (1,3,H,W) -> (1,3,4H,4W), in the network's range
    return to_uint8(out[0].permute(1, 2, 0).numpy())


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(255**2 / mse)


@pytest.fixture(scope="module")
def photo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """(folder with one 56x48 LR photo, its 224x192 HR): a crop of scikit-image's astronaut, MATLAB bicubic x1/4."""
    hr = astronaut()[64:288, 160:352]
    folder = tmp_path_factory.mktemp("photo") / "lr"
    write_png(folder / "astronaut.png", to_uint8(imresize(hr.astype(np.float64) / 255, 1 / 4).clip(0, 1)))
    return folder, hr


def _infer(weights: Path, lr_dir: Path, out: Path, *extra: str) -> int:
    return cli(["infer", "--weights", str(weights), "--input", str(lr_dir), "--output", str(out), *EXACT, *extra])


@pytest.mark.parametrize("name", sorted(NETWORKS))
def test_zoo_network_by_its_file_reproduces_its_own_forward(name: str, photo: tuple[Path, np.ndarray],
                                                            tmp_path: Path) -> None:
    lr_dir, hr = photo
    assert _infer(ZOO / "weights" / NETWORKS[name][0], lr_dir, tmp_path / "sr", *_settings(name)) == 0
    got = read_uint8(tmp_path / "sr" / "astronaut.png")
    assert got.shape == (224, 192, 3)
    assert _psnr(got, _by_hand(name, read_float(lr_dir / "astronaut.png"))) >= 60
    # A working x4 network (its range and state dict right), not just the same numbers: it beats bicubic.
    bicubic = to_uint8(imresize(read_float(lr_dir / "astronaut.png").astype(np.float64), 4).clip(0, 1))
    assert _psnr(got, hr) > _psnr(bicubic, hr) + 1
    timing = json.loads((tmp_path / "sr" / "timing.json").read_text())
    assert timing["model"].startswith(f"file:{ZOO / 'models' / NETWORKS[name][1]}:{NETWORKS[name][2]}")


def _train(data: Path, models: Path, run: str, steps: int, *extra: str) -> int:
    return cli(["train", "--config", str(ROOT / "configs" / "demo.yaml"), "--data", str(data), f"paths.models={models}",
                f"run={run}", f"train.max_steps={steps}", "train.val_every=2", "train.batch_size=4", "train.workers=0",
                "train.precision=fp32", "train.deterministic=true", "train.scheduler=constant", "train.warmup_steps=0",
                "train.learning_rate=1e-3", *extra])


def _one_line_error(capsys: pytest.CaptureFixture[str], *parts: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: "), err
    for part in parts:
        assert part in err, err
    return err


def test_file_network_fine_tunes_resumes_exactly_and_refuses_its_file_once_changed(
        patched_demo: Path, photo: tuple[Path, np.ndarray], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    arch = tmp_path / "arch" / "slim.py"  # a copy of the authors' file, to edit later
    arch.parent.mkdir()
    arch.write_bytes((ZOO / "models" / "team21_SlimRLFN.py").read_bytes())
    pretrained = ZOO / "weights" / "team21_slimrlfn.pth"
    settings = [f"model.pretrained={pretrained}", *_settings("slimrlfn", arch)]
    models, lr_dir = tmp_path / "m", photo[0]
    assert _train(patched_demo, models, "ft", 2, *settings) == 0
    # The run records the file (absolute path, sha256) and its settings: the checkpoint, shown in model.yaml.
    sha = hashlib.sha256(arch.read_bytes()).hexdigest()
    record = {"sha256": sha, "kwargs": {}, "range": 255, "multiple": 1}
    card = yaml.safe_load((models / "ft" / "model.yaml").read_text())
    assert card["arch"] == f"file:{arch.resolve()}:SlimRLFN" and card["kwargs"] == record
    best = torch.load(models / "ft" / "best.pth", weights_only=True)
    assert best["arch"] == card["arch"] and best["kwargs"] == record
    # Resumed for one more step, it ends with exactly the weights of an uninterrupted 3-step run.
    capsys.readouterr()
    assert _train(patched_demo, models, "ft", 3, *settings) == 0
    assert "resuming" in capsys.readouterr().out
    assert _train(patched_demo, models, "whole", 3, *settings) == 0
    resumed = torch.load(models / "ft" / "last.pth", weights_only=True)
    whole = torch.load(models / "whole" / "last.pth", weights_only=True)
    start = torch.load(pretrained, weights_only=True)
    assert resumed["step"] == whole["step"] == 3
    for key in ("params", "params_ema"):
        assert all(torch.equal(v, whole[key][k]) for k, v in resumed[key].items()), key
    assert any(not torch.equal(v, start[k]) for k, v in resumed["params"].items())  # training moved them
    # A later stage rebuilds the run's network from the recorded file, without model.arch.
    assert cli(["infer", "--input", str(lr_dir), "--output", str(tmp_path / "sr"), "run=ft",
                f"paths.models={models}", *EXACT]) == 0
    assert read_uint8(tmp_path / "sr" / "astronaut.png").shape == (224, 192, 3)
    # The run's weights file alone never runs a Python file: model.arch must name it.
    capsys.readouterr()
    assert _infer(models / "ft" / "best.pth", lr_dir, tmp_path / "no") == 2
    _one_line_error(capsys, str(models / "ft" / "best.pth"), f"model.arch={arch.resolve()}:SlimRLFN")
    assert not (tmp_path / "no").exists()
    # Edited: every stage that would rebuild it refuses, naming the file, before running it.
    arch.write_text(arch.read_text() + "\n# edited\n")
    assert cli(["infer", "--input", str(lr_dir), "--output", str(tmp_path / "sr2"), "run=ft",
                f"paths.models={models}", *EXACT]) == 2
    _one_line_error(capsys, str(arch.resolve()), "architecture file changed", sha[:16])
    assert not (tmp_path / "sr2").exists()
    assert _train(patched_demo, models, "ft", 4, *settings) == 2
    _one_line_error(capsys, str(arch.resolve()), "architecture file changed", "last.pth")
    assert torch.load(models / "ft" / "last.pth", weights_only=True)["step"] == 3
    arch.unlink()
    assert cli(["export", "run=ft", f"paths.models={models}"]) == 2
    _one_line_error(capsys, str(arch.resolve()), "not found")


def test_file_network_exports_to_onnx_and_safetensors(photo: tuple[Path, np.ndarray], tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    weights, models = ZOO / "weights" / "team21_slimrlfn.pth", tmp_path / "m"
    capsys.readouterr()
    assert cli(["export", "--weights", str(weights), "run=pub", f"paths.models={models}", *_settings("slimrlfn")]) == 0
    printed = capsys.readouterr().out
    assert float(printed.rsplit("max abs diff", 1)[1].split()[0]) <= MAX_DIFF
    # The graph holds the [0,255] scaling: ONNX Runtime on the photo gives the authors' own forward.
    lr = read_float(photo[0] / "astronaut.png")
    session = onnxruntime.InferenceSession(str(models / "pub" / "team21_slimrlfn.onnx"),
                                           providers=["CPUExecutionProvider"])
    (sr,) = session.run(["sr"], {"lr": np.ascontiguousarray(lr.transpose(2, 0, 1)[None], dtype=np.float32)})
    assert _psnr(to_uint8(sr[0].transpose(1, 2, 0)), _by_hand("slimrlfn", lr)) >= 60
    # safetensors: read back through model.arch, the same network as the authors' file.
    assert cli(["export", "--weights", str(weights), "run=pub", f"paths.models={models}", "export.format=safetensors",
                *_settings("slimrlfn")]) == 0
    exported = models / "pub" / "team21_slimrlfn.safetensors"
    assert _infer(exported, photo[0], tmp_path / "st", *_settings("slimrlfn")) == 0
    assert _infer(weights, photo[0], tmp_path / "pth", *_settings("slimrlfn")) == 0
    assert np.array_equal(read_uint8(tmp_path / "st" / "astronaut.png"), read_uint8(tmp_path / "pth" / "astronaut.png"))


_X2 = """import torch.nn as nn


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 12, 3, padding=1), nn.PixelShuffle(2))

    def forward(self, x):
        return self.body(x)
"""
SLIM, RCN = ZOO / "models" / "team21_SlimRLFN.py", ZOO / "models" / "team04_RCN.py"
W21, W04, W05 = (ZOO / "weights" / w for w in ("team21_slimrlfn.pth", "team04_rcn.pth", "team05_RLFN_mogai.pth"))
# case -> (model.arch* settings, weights file, what the one line names and says); {tmp}: the test's folder
BAD = {
    "no colon": ([f"model.arch={SLIM}"], W21, ["model.arch=", "must be FILE.py:Class"]),
    "not a python file": ([f"model.arch={ZOO / 'README.md'}:X"], W21, ["README.md", "is not a Python file"]),
    "missing file": (["model.arch={tmp}/none.py:Net"], W21, ["{tmp}/none.py", "architecture file not found"]),
    "import fails": (["model.arch={tmp}/broken.py:Net"], W21,
                     ["{tmp}/broken.py", "cannot import it (ModuleNotFoundError"]),
    "missing class": ([f"model.arch={SLIM}:SlimRLFNN"], W21,
                      [str(SLIM), "no class 'SlimRLFNN' (its network classes: ESA, PixelShufflePack"]),
    "bad kwargs": ([f"model.arch={SLIM}:SlimRLFN", "model.arch_kwargs={widths: 3}"], W21,
                   [str(SLIM), "SlimRLFN(widths=3) failed (TypeError"]),
    "kwargs not a mapping": ([f"model.arch={SLIM}:SlimRLFN", "model.arch_kwargs=[3]"], W21,
                             ["model.arch_kwargs: expected a mapping"]),
    "state dict mismatch": ([f"model.arch={RCN}:RCN", "model.arch_kwargs={feature_channels: 32, mid_channels: 32}"],
                            W04, [str(W04), f"weights do not fit RCN of {RCN}", "size mismatch"]),
    "no such entry": ([f"model.arch={SLIM}:SlimRLFN", "model.arch_key=net_g"], W05,
                      [str(W05), "no state dict under model.arch_key='net_g' (its entries: params, params_ema)"]),
    "not x4": (["model.arch={tmp}/twice.py:Twice"], W21,
               ["{tmp}/twice.py", "maps a (1, 3, 32, 32) input to (1, 3, 64, 64); the pipeline needs x4"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_spec_is_one_line_naming_the_file(case: str, photo: tuple[Path, np.ndarray], tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "broken.py").write_text("import no_such_module_for_this_test\n")
    (tmp_path / "twice.py").write_text(_X2)
    settings, weights, says = BAD[case]
    capsys.readouterr()
    assert _infer(weights, photo[0], tmp_path / "sr", *[s.replace("{tmp}", str(tmp_path)) for s in settings]) == 2
    _one_line_error(capsys, *[s.replace("{tmp}", str(tmp_path)) for s in says])
    assert not (tmp_path / "sr").exists()

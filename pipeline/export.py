"""``export``: a run's checkpoint (or ``--weights FILE``) -> ``models/<run>/<name>.onnx`` or ``.safetensors``.

ONNX: the TorchScript exporter (``torch.onnx.export(dynamo=False)``; the dynamo exporter needs
onnxscript, which this project does not ship), input ``lr`` (batch, 3, height, width) in [0,1],
output ``sr`` (batch, 3, 4*height, 4*width), batch/height/width dynamic. The graph is traced at a
size that needs every padding step, then ONNX Runtime runs it on a test image of another size
and must reproduce PyTorch within ``MAX_DIFF`` (the maximum absolute difference is printed);
otherwise it is an error and no file is written. Inputs must be at least the model's minimum side
(16 for HAT, DAT, OmniSR): smaller ones are padded by Python code the trace does not keep.

safetensors: the weights inference uses (EMA first), with ``arch`` and ``kwargs`` in the
metadata. Either file is written to a temporary name and checked there (ONNX Runtime's output, or
the safetensors read back and compared); only a file that passes replaces the previous export, so
a failed export never costs the good one. Temporary files of a killed export are removed by the
next write into the folder.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from pipeline.core.config import Config, save_config
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write, disk_full, write_error
from pipeline.core.images import read_float
from pipeline.core.layout import RunLayout
from pipeline.models import arch_file
from pipeline.models.checkpoint import load_checkpoint, load_weights_file, model_from_checkpoint, save_safetensors
from pipeline.models.table import SCALE, Bicubic, card_of

MAX_DIFF = 1e-3
TRACE_SIDE = 37  # odd and prime: every padding step of every architecture is in the trace
_AXES = {"lr": {0: "batch", 2: "height", 3: "width"}, "sr": {0: "batch", 2: "sr_height", 3: "sr_width"}}


def _model(cfg: Config) -> tuple[nn.Module, Path, str]:
    """The model to export, the path without suffix it goes to, and what it came from."""
    run = RunLayout(Path(cfg.paths.models), cfg.run)
    if cfg.model.weights:
        model = load_weights_file(cfg.model.weights, cfg.model.name, cfg.export.ema, arch_file.spec_of(cfg.model))
        return model.eval(), run.dir / Path(cfg.model.weights).stem, cfg.model.weights
    path = run.checkpoint(cfg.export.checkpoint)
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found (train run {cfg.run!r} first, or export --weights FILE)")
    model, _meta = model_from_checkpoint(path, cfg.export.ema)
    return model, run.dir / cfg.export.checkpoint, str(path)


def check_image(path: str = "") -> np.ndarray:
    """(H,W,3) float LR image of the ONNX check: ``path``, or a 40x52 crop of scikit-image's astronaut photo."""
    if path:
        return read_float(path)
    try:
        from skimage.data import astronaut
    except ImportError:
        raise UserError("export.image is not set and scikit-image (its bundled photo) is not installed") from None
    photo = astronaut().astype(np.float32) / 255  # (512,512,3) uint8 RGB -> float in [0,1]
    return photo[96:136, 180:232]  # face and helmet edge: texture on a size no window divides


@contextlib.contextmanager
def _stdout_discarded() -> Iterator[None]:
    """Discard what C++ code writes to file descriptor 1 (the exporter prints whole graphs there)."""
    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _torch_output(model: nn.Module, lr: torch.Tensor) -> np.ndarray:
    with torch.no_grad():
        return model(lr).float().numpy()


def export_onnx(model: nn.Module, out: Path, opset: int, image: np.ndarray) -> float:
    """Write ``out`` and return ONNX Runtime's maximum absolute difference to PyTorch on ``image``."""
    import onnxruntime

    name = card_of(model).arch
    if any(isinstance(m, Bicubic) for m in model.modules()):
        raise UserError(f"{name}: cannot export to ONNX: its bicubic resize matrices are built in Python for each "
                        "input size, so a traced graph would only take the traced size")
    lr = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)).permute(2, 0, 1)[None]  # (1,3,H,W)
    trace = torch.rand(1, 3, TRACE_SIDE, TRACE_SIDE + 4, generator=torch.Generator().manual_seed(0))
    expected = _torch_output(model, lr)
    with atomic_write(out) as tmp:
        try:
            # TracerWarnings about sizes (the check below is the judge) and the TorchScript graph the
            # exporter prints when an operator has no ONNX form: the one-line error below says it.
            with warnings.catch_warnings(), _stdout_discarded():
                warnings.simplefilter("ignore")
                torch.onnx.export(model, (trace,), str(tmp), dynamo=False, opset_version=opset,
                                  input_names=["lr"], output_names=["sr"], dynamic_axes=_AXES)
        except Exception as exc:  # unsupported operators, opsets, tracing failures (or a full disk)
            if disk_full(exc, out.parent):
                raise write_error(out, exc) from exc
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0].split(" Please feel free")[0][:300]
            raise UserError(f"{name}: cannot export to ONNX opset {opset}: {first}") from None
        try:
            session = onnxruntime.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
            (sr,) = session.run(["sr"], {"lr": lr.numpy()})
        except Exception as exc:
            first = str(exc).strip().splitlines()[0][:300]
            raise UserError(f"{name}: the ONNX graph does not run on a {lr.shape[2]}x{lr.shape[3]} input in "
                            f"ONNX Runtime (sizes fixed by the trace?): {first}") from None
        if sr.shape != expected.shape:
            raise UserError(f"{name}: ONNX output {sr.shape} differs from PyTorch's {expected.shape}")
        diff = float(np.abs(sr - expected).max())
        if not diff <= MAX_DIFF:
            raise UserError(f"{name}: ONNX Runtime differs from PyTorch by {diff:.3g} (> {MAX_DIFF}) on the test "
                            "image; nothing written")
    return diff


def export_safetensors(model: nn.Module, out: Path, source: str) -> None:
    """Write ``out``, checked before it replaces anything: it must read back as the same weights and architecture."""
    card = card_of(model)
    weights = model.state_dict()

    def check(tmp: Path) -> None:
        back = load_checkpoint(tmp, safetensors=True)
        same = back.get("arch") == card.arch and back["params"].keys() == weights.keys() and all(
            torch.equal(back["params"][k], v.cpu()) for k, v in weights.items())
        if not same:
            raise UserError(f"{out}: the written file does not read back as the model's weights; not kept"
                            + (" (the previous export is unchanged)" if out.exists() else ""))

    save_safetensors(out, weights, card.arch, card.kwargs, check=check, source=Path(source).name)


def main(cfg: Config) -> None:
    e = cfg.export
    model, stem, source = _model(cfg)
    model = model.float().eval()
    if e.format == "safetensors":
        out = stem.with_suffix(".safetensors")
        export_safetensors(model, out, source)
        print(f"{out}: {card_of(model).arch} weights ({len(model.state_dict())} tensors) from {source}")
    else:
        image = check_image(e.image)
        out = stem.with_suffix(".onnx")
        diff = export_onnx(model, out, e.opset, image)
        h, w = image.shape[:2]
        print(f"{out}: {card_of(model).arch}, opset {e.opset}, lr (batch,3,height,width) in [0,1] -> sr "
              f"(batch,3,{SCALE}*height,{SCALE}*width); ONNX Runtime vs PyTorch on a {h}x{w} image: "
              f"max abs diff {diff:.2e}")
    save_config(cfg, stem.parent / "export.yaml", ("model", "export", "paths"))

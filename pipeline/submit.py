"""``submit``: package ``submit/<run>/pred`` as the contest wants it, after checking every file.

``submission.zip`` (``submit.format=zip``, the default): flat, one PNG per test id named
``<img_id>.png`` (e.g. ``20000.png``), no folders, stored without recompression (PNG is
already compressed). The ids are the sample submission's when ``sample_submission.zip`` exists,
else the test set's (``test.csv`` / ``test/lr``).

``submission.csv`` (``submit.format=csv``, for contests that take a table): a header and one row
per image, two columns:
    img_id       the test id (text, e.g. 20000)
    png_base64   the prediction's PNG file, base64-encoded (standard alphabet, no line breaks)
so a row decodes to exactly the PNG the zip would hold (about 1.33x its size; a pixel-per-row
table would be ~50x larger for a 2048x2048 image).

Every image must be exactly ``data.scale`` x its LR image in both sides and an 8-bit RGB PNG
(colour type 2: no alpha, no palette, no gray, no 16 bit). Any problem refuses the whole
submission with a ``SubmissionError`` naming the file and the problem; the archive is written to
a temporary file, re-checked, and only then renamed into place, so a refused submission leaves
no file behind. ``submit --check FILE`` validates an existing zip or CSV: ids and sizes against
``--data`` (or the default data.dir when it holds a test set), else its structure alone.
"""

from __future__ import annotations

import base64
import binascii
import io
import struct
import zipfile
from dataclasses import fields
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from pipeline.config import Config, DataConfig
from pipeline.errors import UserError
from pipeline.images import atomic_write, image_size

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
CSV_COLUMNS = ("img_id", "png_base64")


class SubmissionError(UserError):
    """A submission that the contest would reject; the message names the file and the problem."""


def png_info(data: bytes, where: str) -> tuple[int, int, int, int]:
    """(width, height, bit depth, colour type) from a PNG's IHDR chunk."""
    if not data.startswith(PNG_SIGNATURE):
        raise SubmissionError(f"{where}: not a PNG file (bad signature)")
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise SubmissionError(f"{where}: PNG has no IHDR header (truncated?)")
    width, height, depth, colour = struct.unpack(">IIBB", data[16:26])
    return width, height, depth, colour


def check_png(data: bytes, where: str, size: tuple[int, int] | None = None) -> None:
    """Refuse anything but a decodable 8-bit RGB PNG of ``size`` (height, width) when given."""
    width, height, depth, colour = png_info(data, where)
    if colour != 2:
        raise SubmissionError(f"{where}: PNG is {COLOUR_TYPES.get(colour, f'colour type {colour}')}, "
                              "expected 3-channel RGB (colour type 2)")
    if depth != 8:
        raise SubmissionError(f"{where}: PNG has {depth}-bit channels, expected 8-bit")
    if size is not None and (height, width) != size:
        raise SubmissionError(f"{where}: image is {width}x{height}, expected {size[1]}x{size[0]} "
                              "(scale x the LR image)")
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.shape != (height, width, 3):
        raise SubmissionError(f"{where}: PNG data does not decode to {width}x{height} RGB (corrupt?)")


def expected_outputs(root: Path, scale: int) -> dict[str, tuple[int, int]]:
    """Test id -> required (height, width) of its prediction: the sample submission's ids when present."""
    from pipeline.prepare import read_test_table

    if not root.is_dir():
        raise SubmissionError(f"{root}: data folder not found (--data)")
    table = read_test_table(root)
    if table.empty:
        raise SubmissionError(f"{root}: no test set (neither test.csv nor test/lr)")
    lr_paths = {str(i): root / p for i, p in zip(table["img_id"], table["lr_path"])}
    ids = list(lr_paths)
    sample = root / "sample_submission.zip"
    if sample.is_file():
        try:
            with zipfile.ZipFile(sample) as zf:
                ids = [Path(n).stem for n in zf.namelist() if not n.endswith("/")]
        except zipfile.BadZipFile:
            raise SubmissionError(f"{sample}: not a valid zip file") from None
        unknown = [i for i in ids if i not in lr_paths]
        if unknown:
            raise SubmissionError(f"{sample}: id {unknown[0]!r} has no test LR image in {root}")
    out = {}
    for i in ids:
        h, w = image_size(lr_paths[i])
        out[i] = (h * scale, w * scale)
    return out


def _check_ids(found: list[str], expected: dict[str, tuple[int, int]], where: str) -> None:
    dup = sorted({i for i in found if found.count(i) > 1})
    if dup:
        raise SubmissionError(f"{where}: id {dup[0]!r} appears more than once")
    missing = [i for i in expected if i not in found]
    extra = [i for i in found if i not in expected]
    if missing or extra:
        parts = [f"{len(found)} image(s) but the test set has {len(expected)}"]
        if missing:
            parts.append(f"missing: {', '.join(f'{i}.png' for i in missing[:5])}")
        if extra:
            parts.append(f"not test ids: {', '.join(f'{i}.png' for i in extra[:5])}")
        raise SubmissionError(f"{where}: " + "; ".join(parts))


def _zip_entries(path: Path) -> dict[str, bytes]:
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SubmissionError(f"{path}: not a valid zip file ({exc})") from None
    entries: dict[str, bytes] = {}
    with zf:
        for info in zf.infolist():
            name = info.filename
            if info.is_dir() or "/" in name or "\\" in name:
                raise SubmissionError(f"{path}: {name!r} is inside a folder; the zip must be flat (PNGs at the top)")
            if Path(name).suffix != ".png":
                raise SubmissionError(f"{path}: {name!r} is not a .png file")
            if name in entries:
                raise SubmissionError(f"{path}: {name!r} appears twice")
            entries[name] = zf.read(info)
    return entries


def _csv_entries(path: Path) -> dict[str, bytes]:
    try:
        df = pd.read_csv(path, dtype=str, keep_default_na=False)
    except Exception as exc:
        raise SubmissionError(f"{path}: cannot read CSV ({exc})") from None
    if tuple(df.columns) != CSV_COLUMNS:
        raise SubmissionError(f"{path}: columns are {', '.join(df.columns)}; expected {', '.join(CSV_COLUMNS)}")
    entries: dict[str, bytes] = {}
    for row, (img_id, b64) in enumerate(zip(df["img_id"], df["png_base64"]), start=2):
        try:
            data = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            raise SubmissionError(f"{path}: line {row} ({img_id}): png_base64 is not valid base64") from None
        if f"{img_id}.png" in entries:
            raise SubmissionError(f"{path}: id {img_id!r} appears twice")
        entries[f"{img_id}.png"] = data
    return entries


def check_submission(path: str | Path, expected: dict[str, tuple[int, int]] | None = None,
                     fmt: str | None = None) -> list[str]:
    """Validate a submission zip or CSV (``fmt``, default: by suffix); returns its ids.

    ``expected`` (test id -> (height, width)) adds the id and size checks.
    """
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: file not found")
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "zip")
    entries = _csv_entries(path) if fmt == "csv" else _zip_entries(path)
    if not entries:
        raise SubmissionError(f"{path}: the submission is empty")
    ids = [Path(n).stem for n in entries]
    if expected is not None:
        _check_ids(ids, expected, str(path))
    for name, data in entries.items():
        check_png(data, f"{path}:{name}", expected[Path(name).stem] if expected else None)
    return ids


def check_predictions(pred_dir: Path, expected: dict[str, tuple[int, int]]) -> dict[str, Path]:
    """Test id -> PNG in ``pred_dir``, after checking ids, format and sizes of every file."""
    if not pred_dir.is_dir():
        raise SubmissionError(f"{pred_dir}: no predictions; run `python -m pipeline infer` first")
    files = sorted(p for p in pred_dir.iterdir() if p.is_file() and p.suffix.lower() in
                   (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"))
    for p in files:
        if p.suffix != ".png":
            raise SubmissionError(f"{p}: predictions must be .png files")
    found = {p.stem: p for p in files}
    _check_ids([p.stem for p in files], expected, str(pred_dir))
    for img_id, p in found.items():
        check_png(p.read_bytes(), str(p), expected[img_id])
    return {i: found[i] for i in expected}


def write_submission(files: dict[str, Path], out: Path, expected: dict[str, tuple[int, int]],
                     fmt: str = "zip") -> Path:
    """Write the zip (or CSV) atomically; it is re-checked before it replaces ``out``."""
    with atomic_write(out) as tmp:
        if fmt == "zip":
            with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
                for img_id, p in files.items():
                    zf.writestr(f"{img_id}.png", p.read_bytes())
        else:
            rows = [(i, base64.b64encode(p.read_bytes()).decode("ascii")) for i, p in files.items()]
            buf = io.StringIO()
            pd.DataFrame(rows, columns=list(CSV_COLUMNS)).to_csv(buf, index=False)
            tmp.write_text(buf.getvalue())
        check_submission(tmp, expected, fmt)
    return out


def _check_against(cfg: Config) -> Path | None:
    """The dataset ``--check`` compares with: ``--data`` when set, the default data.dir when it
    holds a test set, else none (structure only)."""
    root = Path(cfg.data.dir)
    default = next(f.default for f in fields(DataConfig) if f.name == "dir")
    if cfg.data.dir != default:
        return root
    return root if (root / "test.csv").is_file() or (root / "test" / "lr").is_dir() else None


def main(cfg: Config) -> None:
    if cfg.submit.check:
        root = _check_against(cfg)
        if root is None:
            ids = check_submission(cfg.submit.check)
            print(f"{cfg.submit.check}: OK, {len(ids)} image(s); checked structure only "
                  "(add --data DIR to check ids and sizes)")
            return
        try:
            ids = check_submission(cfg.submit.check, expected_outputs(root, cfg.data.scale))
        except SubmissionError as exc:
            raise SubmissionError(f"{exc} (checked against the test set of {root}; --data DIR picks another)") from None
        print(f"{cfg.submit.check}: OK, {len(ids)} image(s); ids and sizes match the test set of {root}")
        return
    expected = expected_outputs(Path(cfg.data.dir), cfg.data.scale)
    run_dir = Path(cfg.paths.submit) / cfg.run
    files = check_predictions(run_dir / "pred", expected)
    out = run_dir / f"submission.{cfg.submit.format}"
    write_submission(files, out, expected, cfg.submit.format)
    print(f"{out}: {len(files)} image(s), {out.stat().st_size / 2**20:.1f} MiB, checked against {cfg.data.dir}")

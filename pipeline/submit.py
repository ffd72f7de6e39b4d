"""``submit``: package ``submit/<run>/pred`` (``submit/<blend.name>/pred`` for a blend) as the contest wants
it, after checking every file.

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

Memory stays bounded whatever the file: zip members are checked by their declared size before
anything is decompressed, then read one at a time and stopped at a cap (a header that lies about
its size cannot make us read more), and a PNG's header size is checked before it is decoded.
Encrypted members, unknown compression and bad CRCs are refused in one line. Only a finished
prediction folder (``infer`` writes ``timing.json`` last and swaps the folder in whole) is packed;
when a submit fails, an earlier ``submission.zip`` is renamed ``submission.zip.stale`` so that the
old file cannot be uploaded by mistake.
"""

from __future__ import annotations

import base64
import binascii
import csv
import io
import os
import struct
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path

import numpy as np

from pipeline.core.config import Config, DataConfig
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write, clean_stale
from pipeline.core.images import ImageError, check_pixels, image_size
from pipeline.core.layout import COMPLETE_MARK, DataLayout, OutputLayout, output_name

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
COLOUR_TYPES = {0: "grayscale", 2: "RGB", 3: "palette", 4: "grayscale+alpha", 6: "RGBA"}
CSV_COLUMNS = ("img_id", "png_base64")
MAX_ENTRY_BYTES = 64 * 2**20  # a PNG of a submission, when the expected size is unknown (2048^2 RGB ~ 12 MiB)
ZIP_METHODS = {zipfile.ZIP_STORED: "stored", zipfile.ZIP_DEFLATED: "deflate", zipfile.ZIP_BZIP2: "bzip2",
               zipfile.ZIP_LZMA: "lzma"}
Expected = dict[str, tuple[int, int]] | None  # test id -> (height, width) of its prediction, or unknown
Entries = tuple[list[str], Iterator[tuple[str, bytes]]]  # member names, and their bytes one at a time


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
    try:
        check_pixels(width, height, where)  # before decoding: the header may claim anything
    except ImageError as exc:
        raise SubmissionError(str(exc)) from None
    import cv2  # here, not at the top: submit's settings and folders are checked before OpenCV loads

    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None or img.shape != (height, width, 3):
        raise SubmissionError(f"{where}: PNG data does not decode to {width}x{height} RGB (corrupt?)")


def expected_outputs(root: Path, scale: int) -> dict[str, tuple[int, int]]:
    """Test id -> required (height, width) of its prediction: the sample submission's ids when present."""
    data = DataLayout(Path(root))
    if not data.root.is_dir():
        raise SubmissionError(f"{root}: data folder not found (--data)")
    table = data.test_table()
    if table.empty:
        raise SubmissionError(f"{root}: no test set (neither test.csv nor test/lr)")
    lr_paths = {str(i): data.root / p for i, p in zip(table["img_id"], table["lr_path"])}
    ids = data.sample_ids() or list(lr_paths)
    unknown = [i for i in ids if i not in lr_paths]
    if unknown:
        raise SubmissionError(f"{data.sample_submission}: id {unknown[0]!r} has no test LR image in {root}")
    out = {}
    for i in ids:
        h, w = image_size(lr_paths[i])
        out[i] = (h * scale, w * scale)
    return out


def entry_cap(size: tuple[int, int] | None) -> int:
    """Most bytes a submission PNG of ``size`` (height, width) can need: the raw rows stored without
    compression plus deflate's block headers, with room for metadata; a fixed cap when unknown."""
    if size is None:
        return MAX_ENTRY_BYTES
    h, w = size
    return int(h * (w * 3 + 1) * 1.01) + 2**20


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


def _zip_infos(zf: zipfile.ZipFile, path: Path, expected: Expected) -> list[zipfile.ZipInfo]:
    """Every member checked from the central directory alone (nothing decompressed yet)."""
    infos, seen = [], set()
    for info in zf.infolist():
        name = info.filename
        if info.is_dir() or "/" in name or "\\" in name:
            raise SubmissionError(f"{path}: {name!r} is inside a folder; the zip must be flat (PNGs at the top)")
        if Path(name).suffix != ".png":
            raise SubmissionError(f"{path}: {name!r} is not a .png file")
        if name in seen:
            raise SubmissionError(f"{path}: {name!r} appears twice")
        seen.add(name)
        if info.flag_bits & 0x1:
            raise SubmissionError(f"{path}: {name!r} is encrypted; the contest needs a plain zip")
        if info.compress_type not in ZIP_METHODS:
            raise SubmissionError(f"{path}: {name!r} uses compression method {info.compress_type}, which this "
                                  "check cannot read (use stored or deflate)")
        cap = entry_cap(expected.get(Path(name).stem) if expected else None)
        if info.file_size > cap:
            raise SubmissionError(f"{path}: {name!r} declares {info.file_size} bytes uncompressed, more than a "
                                  f"submission PNG can need ({cap}); refused before decompressing")
        infos.append(info)
    return infos


def _zip_entries(path: Path, expected: Expected) -> Entries:
    """The member names, and an iterator reading them one at a time (each stopped at its cap)."""
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise SubmissionError(f"{path}: not a valid zip file ({exc})") from None
    try:
        infos = _zip_infos(zf, path, expected)
    except BaseException:
        zf.close()
        raise

    def read() -> Iterator[tuple[str, bytes]]:
        with zf:
            for info in infos:
                cap = entry_cap(expected.get(Path(info.filename).stem) if expected else None)
                where = f"{path}:{info.filename}"
                try:
                    with zf.open(info) as member:
                        data = member.read(cap + 1)  # at most cap + 1 bytes in memory, whatever it says
                        if len(data) > cap:
                            raise SubmissionError(f"{where}: decompresses to more than {cap} bytes (the header "
                                                  f"says {info.file_size}); refused")
                        member.read(1)  # reaching the end checks the CRC
                except zipfile.BadZipFile as exc:
                    raise SubmissionError(f"{where}: corrupt member ({exc})") from None
                except (zlib.error, EOFError, NotImplementedError, RuntimeError, OSError) as exc:
                    raise SubmissionError(f"{where}: cannot decompress ({type(exc).__name__}: {exc})") from None
                yield info.filename, data

    return [i.filename for i in infos], read()


def _csv_entries(path: Path, expected: Expected) -> Entries:
    """The ids of a submission CSV, and an iterator decoding its rows one at a time."""
    field_cap = 4 * (max(map(entry_cap, expected.values())) if expected else MAX_ENTRY_BYTES) // 3 + 4
    csv.field_size_limit(field_cap)

    def rows() -> Iterator[list[str]]:
        try:
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.reader(f)
                header = next(reader, None)
                if header is None or tuple(header) != CSV_COLUMNS:
                    got = ", ".join(header or [])
                    raise SubmissionError(f"{path}: columns are {got or 'missing'}; expected {', '.join(CSV_COLUMNS)}")
                yield from reader
        except csv.Error as exc:
            raise SubmissionError(f"{path}: cannot read CSV ({exc}; a field may exceed {field_cap} bytes)") from None
        except UnicodeDecodeError as exc:
            raise SubmissionError(f"{path}: cannot read CSV (not UTF-8 text: {exc})") from None

    ids = []
    for line, row in enumerate(rows(), start=2):
        if len(row) != 2:
            raise SubmissionError(f"{path}: line {line} has {len(row)} fields, expected 2")
        ids.append(row[0])

    def read() -> Iterator[tuple[str, bytes]]:
        for line, (img_id, b64) in enumerate(rows(), start=2):
            try:
                data = base64.b64decode(b64, validate=True)
            except (binascii.Error, ValueError):
                raise SubmissionError(f"{path}: line {line} ({img_id}): png_base64 is not valid base64") from None
            yield f"{img_id}.png", data

    return [f"{i}.png" for i in ids], read()


def check_submission(path: str | Path, expected: dict[str, tuple[int, int]] | None = None,
                     fmt: str | None = None) -> list[str]:
    """Validate a submission zip or CSV (``fmt``, default: by suffix); returns its ids.

    ``expected`` (test id -> (height, width)) adds the id and size checks.
    """
    path = Path(path)
    if not path.is_file():
        raise SubmissionError(f"{path}: file not found")
    fmt = fmt or ("csv" if path.suffix.lower() == ".csv" else "zip")
    names, entries = (_csv_entries if fmt == "csv" else _zip_entries)(path, expected)
    if not names:
        raise SubmissionError(f"{path}: the submission is empty")
    ids = [Path(n).stem for n in names]
    if expected is not None:
        _check_ids(ids, expected, str(path))
    for name, data in entries:  # one member in memory at a time
        check_png(data, f"{path}:{name}", expected[Path(name).stem] if expected else None)
    return ids


def check_predictions(pred_dir: Path, expected: dict[str, tuple[int, int]]) -> dict[str, Path]:
    """Test id -> PNG in ``pred_dir``, after checking ids, format and sizes of every file."""
    if not pred_dir.is_dir():
        raise SubmissionError(f"{pred_dir}: no predictions; run `python -m pipeline infer` first")
    if not (pred_dir / COMPLETE_MARK).is_file():
        raise SubmissionError(f"{pred_dir}: no {COMPLETE_MARK}, so not a finished `infer` output; run infer again")
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
            import pandas as pd

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
    out_layout = OutputLayout(Path(cfg.paths.submit), output_name(cfg))  # a blend's name, else the run's
    out = out_layout.submission(cfg.submit.format)
    clean_stale(out_layout.dir)
    try:
        expected = expected_outputs(Path(cfg.data.dir), cfg.data.scale)
        files = check_predictions(out_layout.pred, expected)
        write_submission(files, out, expected, cfg.submit.format)
    except UserError as exc:
        if out.is_file():  # never leave an older submission looking like the answer to this run
            stale = out.with_name(out.name + ".stale")
            os.replace(out, stale)
            raise type(exc)(f"{exc} (the earlier {out.name} was renamed {stale.name} so that it is not "
                            "uploaded by mistake)") from None
        raise
    print(f"{out}: {len(files)} image(s), {out.stat().st_size / 2**20:.1f} MiB, checked against {cfg.data.dir}")

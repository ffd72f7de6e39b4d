"""``prepare``: check a dataset in the contest layout and assign folds by source image.

Accepted layouts (paths relative to ``--data``):
- ``train.csv`` (img_id, lr_img_path, hr_img_path[, source]) and ``test.csv`` (img_id,
  lr_img_path) when present;
- otherwise the folders ``train/lr``, ``train/hr`` (paired by file stem) and ``test/lr``.
``sample_submission.zip``, when present, must name exactly the test ids.

Every pair must exist, decode, and have HR exactly ``scale`` x LR in both dimensions; ids must be
unique. Every problem found is listed; then the stage fails with the first one and writes
nothing. On success it writes ``splits.csv`` (img_id, source, fold, lr_path, hr_path): K folds
assigned to whole SOURCE images (the ``source`` column when given, else each image is its own
source) before any patch exists, so no photo is split between training and validation.
Extra pairs made by ``add-data`` (``extra.csv``) are checked the same way and join splits.csv
with fold -1: training only, never a validation fold.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from tqdm import tqdm

from pipeline.core.config import Config, save_config
from pipeline.core.errors import DataError
from pipeline.core.files import atomic_write
from pipeline.core.folds import assign_folds
from pipeline.core.images import ImageError, image_size
from pipeline.core.layout import EXTRA_FOLD, SPLIT_COLUMNS, DataLayout
from pipeline.core.locks import data_lock
from pipeline.core.workers import process_pool

if TYPE_CHECKING:  # pandas loads once the settings and the folder are checked
    import pandas as pd


def _size_or_error(path: Path) -> tuple[int, int] | str:
    try:
        return image_size(path)
    except ImageError as exc:
        return str(exc)


def _sizes(paths: list[Path], workers: int, desc: str) -> list[tuple[int, int] | str]:
    """Decode every image (in worker processes); a failure becomes its error message."""
    if workers <= 1 or len(paths) < 8:
        return [_size_or_error(p) for p in tqdm(paths, desc=desc, leave=False, disable=len(paths) < 50)]
    with process_pool(workers) as pool:
        return list(tqdm(pool.map(_size_or_error, paths, chunksize=8), total=len(paths), desc=desc, leave=False,
                         disable=len(paths) < 50))


def check_pairs(root: Path, train: pd.DataFrame, test: pd.DataFrame, scale: int, workers: int) -> tuple[
        list[str], dict[str, tuple[int, int]]]:
    """All problems found (one line each) and the LR/HR/test sizes seen (for the summary)."""
    problems: list[str] = []
    lr_sizes = _sizes([root / p for p in train["lr_path"]], workers, "check train LR")
    hr_sizes = _sizes([root / p for p in train["hr_path"]], workers, "check train HR")
    for lr_path, hr_path, lr, hr in zip(train["lr_path"], train["hr_path"], lr_sizes, hr_sizes):
        for size in (lr, hr):
            if isinstance(size, str):
                problems.append(size)
        if isinstance(lr, tuple) and isinstance(hr, tuple) and hr != (lr[0] * scale, lr[1] * scale):
            problems.append(f"{root / hr_path}: HR is {hr[1]}x{hr[0]} but LR {lr_path} is {lr[1]}x{lr[0]}; "
                            f"expected exactly {scale}x ({lr[1] * scale}x{lr[0] * scale})")
    test_sizes = _sizes([root / p for p in test["lr_path"]], workers, "check test LR")
    problems += [s for s in test_sizes if isinstance(s, str)]
    seen = {"train LR": lr_sizes, "train HR": hr_sizes, "test LR": test_sizes}
    summary = {k: _most_common(v) for k, v in seen.items()}
    return problems, summary


def _most_common(sizes: list) -> tuple[int, int]:
    ok = [s for s in sizes if isinstance(s, tuple)]
    return max(set(ok), key=ok.count) if ok else (0, 0)


def check_sample_submission(data: DataLayout, test: pd.DataFrame) -> list[str]:
    """Problems between test ids and ``sample_submission.zip`` (when present)."""
    path = data.sample_submission
    try:
        sample = data.sample_ids()
    except DataError as exc:
        return [str(exc)]
    if sample is None:
        return []
    names = set(sample)
    missing = sorted(set(test["img_id"]) - names)
    extra = sorted(names - set(test["img_id"]))
    out = []
    if missing:
        out.append(f"{path}: test id(s) absent from the sample submission: {', '.join(missing[:5])}")
    if extra:
        out.append(f"{path}: names absent from the test set: {', '.join(extra[:5])}")
    return out


def main(cfg: Config) -> None:
    data = DataLayout(Path(cfg.data.dir))
    data.check_exists()
    with data_lock(data.root, "prepare"):  # splits.csv follows extra.csv: no add-data in between
        _prepare(cfg, data)


def _prepare(cfg: Config, data: DataLayout) -> None:
    root = data.root
    if not 0 <= cfg.data.val_fold < cfg.data.folds:
        raise DataError(f"data.val_fold={cfg.data.val_fold} is outside 0..{cfg.data.folds - 1}")
    import pandas as pd

    train = data.train_table()
    test = data.test_table()
    for table, col in ((train, "lr_path"), (train, "hr_path"), (test, "lr_path")):
        for rel in table[col]:
            if not (root / rel).is_file():
                raise DataError(f"{root / rel}: listed in {root.name}'s CSV but the file does not exist")
    problems, sizes = check_pairs(root, train, test, cfg.data.scale, cfg.data.workers)
    problems += check_sample_submission(data, test)
    train["fold"] = assign_folds(train, cfg.data.folds, cfg.seed)
    extra = data.extra_table()
    clash = sorted(set(extra["img_id"]) & set(train["img_id"]))
    if clash:
        raise DataError(f"{data.extra_csv}: id {clash[0]!r} is also a contest training image")
    extra_sizes: dict[str, tuple[int, int]] = {}
    if len(extra):
        extra_problems, extra_sizes = check_pairs(root, extra, extra.iloc[0:0], cfg.data.scale, cfg.data.workers)
        problems += extra_problems
        extra["fold"] = EXTRA_FOLD  # training only: validation folds are >= 0

    rows = [("train pairs", len(train), sizes["train LR"], sizes["train HR"]),
            ("test images", len(test), sizes["test LR"], None),
            ("source images", train["source"].nunique(), None, None)]
    if len(extra):
        rows.append(("extra pairs (training only)", len(extra), extra_sizes["train LR"], extra_sizes["train HR"]))
    table = pd.DataFrame([(n, c, _fmt(lr), _fmt(hr)) for n, c, lr, hr in rows],
                         columns=["", "count", "LR size", "HR size"])
    print(table.to_string(index=False))
    per_fold = train.groupby("fold").agg(images=("img_id", "size"), sources=("source", "nunique"))
    print(per_fold.T.to_string())
    print(f"problems: {len(problems)}")
    if problems:
        for p in problems[:10]:
            print(f"  {p}")
        more = f" (and {len(problems) - 1} more problem(s) listed above)" if len(problems) > 1 else ""
        raise DataError(problems[0] + more)

    splits = pd.concat([train[list(SPLIT_COLUMNS)], extra[list(SPLIT_COLUMNS)]], ignore_index=True) if len(
        extra) else train[list(SPLIT_COLUMNS)]
    with atomic_write(data.splits_csv) as tmp:
        splits.to_csv(tmp, index=False)
    save_config(cfg, data.prepare_config, sections=("data",))
    print(f"wrote {data.splits_csv} ({cfg.data.folds} folds by source, validation fold {cfg.data.val_fold})")


def _fmt(size: tuple[int, int] | None) -> str:
    return "" if not size else f"{size[1]}x{size[0]}"

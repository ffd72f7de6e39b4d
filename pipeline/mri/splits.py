"""A folder of volumes split into folds by subject: ``mri_splits.csv``, like the 2-D ``splits.csv``.

Subject of a file (docs/volumes.md):
- ``subjects.csv`` in the folder (columns ``file,subject``; ``file`` is the file name) when present:
  it must list every volume file in the folder and nothing else;
- otherwise ``mri.subject_pattern`` searched in the file name without its suffix: the match's
  ``subject`` group if it has one, else the whole match (default ``^[^_]+``: the text before the
  first ``_``, so ``sub-01_T1w`` and ``sub-01_T2w`` are one subject). A name it does not match is
  an error.
Every volume of one subject lands in one fold, so validation never sees a subject training saw.
Items: one per file, or one per volume of a 4-D scan with ``mri.volume4d=all`` (item id
``<stem>_t<k>``, all of them in the subject's fold).

Columns of ``mri_splits.csv``: item, subject, fold, path (relative to the folder), volume (index
along the fourth axis; 0 for 3-D files).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.config import MriConfig
from pipeline.core.errors import DataError
from pipeline.core.files import atomic_write
from pipeline.core.folds import assign_folds  # the project's one fold rule: a subject plays a source photo's part
from pipeline.core.layout import VOLUME_SPLIT_COLUMNS as SPLIT_COLUMNS
from pipeline.core.layout import VolumeLayout, check_id, read_table, resolve_under
from pipeline.mri.volumes import list_volumes, volume_shape, volume_stem

if TYPE_CHECKING:  # pandas loads once the folder is found (mri-prepare's first check)
    import pandas as pd

SUBJECTS_CSV = VolumeLayout(Path(".")).subjects_csv.name
_MRI = MriConfig()  # the defaults live in the config schema, one place


def splits_path(root: str | Path) -> Path:
    """Where the split of a volume folder lives."""
    return VolumeLayout(Path(root)).splits_csv


def subject_of(stem: str, pattern: str) -> str:
    """The subject id in a file stem by ``pattern`` (its ``subject`` group, else the whole match)."""
    try:
        match = re.search(pattern, stem)
    except re.error as exc:
        raise DataError(f"mri.subject_pattern={pattern!r} is not a valid regex ({exc})") from None
    if match is None:
        raise DataError(f"{stem}: mri.subject_pattern={pattern!r} does not match this file name; "
                        f"change the pattern or list the file in {SUBJECTS_CSV}")
    subject = match.group("subject") if "subject" in match.re.groupindex else match.group(0)
    if not subject:
        raise DataError(f"{stem}: mri.subject_pattern={pattern!r} gives an empty subject id")
    return subject


def _subjects_from_csv(root: Path, files: list[Path]) -> dict[str, str]:
    path = VolumeLayout(root).subjects_csv
    table = read_table(path, ("file", "subject"), "expected columns file,subject")
    listed = dict(zip(table["file"], table["subject"]))
    names = {p.name for p in files}
    for name, subject in listed.items():
        if name not in names:
            raise DataError(f"{path}: {name!r} is not a volume file in {root}")
        if not subject:
            raise DataError(f"{path}: {name!r} has an empty subject")
    absent = sorted(names - set(listed))
    if absent:
        raise DataError(f"{path}: no subject for {absent[0]}" + (f" (and {len(absent) - 1} more)" if len(absent) > 1
                                                                else ""))
    return listed


def list_items(root: str | Path, subject_pattern: str = _MRI.subject_pattern, volume4d: str = _MRI.volume4d,
               ) -> pd.DataFrame:
    """item, subject, path, volume of every volume in ``root`` (headers only: no voxel is read)."""
    root = Path(root)
    files = list_volumes(root)
    csv_subjects = _subjects_from_csv(root, files) if (root / SUBJECTS_CSV).is_file() else None
    rows = []
    for path in files:
        stem = volume_stem(path)
        subject = csv_subjects[path.name] if csv_subjects is not None else subject_of(stem, subject_pattern)
        _shape, count = volume_shape(path)
        if volume4d == "all" and count > 1:
            rows += [(f"{stem}_t{k}", subject, path.name, k) for k in range(count)]
        else:
            rows.append((stem, subject, path.name, 0))
    import pandas as pd

    table = pd.DataFrame(rows, columns=["item", "subject", "path", "volume"])
    dup = table["item"][table["item"].duplicated()]
    if len(dup):
        raise DataError(f"{root}: two items are named {dup.iloc[0]!r} (a 4-D scan's volume and another file)")
    return table


def build_splits(root: str | Path, folds: int, seed: int, subject_pattern: str = _MRI.subject_pattern,
                 volume4d: str = _MRI.volume4d) -> pd.DataFrame:
    """The split table: every item with its subject's fold (whole subjects, seeded, balanced by items)."""
    table = list_items(root, subject_pattern, volume4d)
    subjects = table["subject"].nunique()
    if subjects < folds:
        raise DataError(f"{root}: {subjects} subject(s) cannot fill {folds} folds; set mri.folds lower")
    table["fold"] = assign_folds(table.rename(columns={"subject": "source"}), folds, seed).to_numpy()
    return table[list(SPLIT_COLUMNS)]


def write_splits(root: str | Path, table: pd.DataFrame) -> Path:
    """Write ``mri_splits.csv`` atomically."""
    path = splits_path(root)
    with atomic_write(path) as tmp:
        table[list(SPLIT_COLUMNS)].to_csv(tmp, index=False)
    return path


def read_splits(root: str | Path) -> pd.DataFrame:
    """``mri_splits.csv`` of a folder, checked for its columns (ids stay strings), its items (safe file names)
    and its paths (inside the folder: absolute paths and ``..`` are refused, as in the image CSVs)."""
    path = splits_path(root)
    VolumeLayout(Path(root)).need_splits()
    table = read_table(path, SPLIT_COLUMNS, "split the folder first (pipeline.mri.splits.write_splits)")
    for item in table["item"]:
        check_id(item, str(path), "item")
    for rel in table["path"]:
        resolve_under(Path(root), rel, str(path))
    try:
        return table.astype({"fold": int, "volume": int})
    except ValueError:
        raise DataError(f"{path}: the fold and volume columns must be integers") from None

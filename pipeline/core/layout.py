"""The on-disk contract of the pipeline: every folder, file name, table and id, in one place.

    data/<set>/                       DataLayout(root)
        train.csv  test.csv  sample_submission.zip         the contest's files (or the folders:)
        train/lr/<id>.png  train/hr/<id>.png  test/lr/<id>.png
        extra.csv  extra/<name>/{lr,hr}/<id>.png            add-data: extra training pairs (fold -1)
        splits.csv  prepare.yaml                            prepare
        patches/  manifest.csv fingerprint.yaml config.yaml lr/ hr/ done/   PatchLayout (patchify)
    models/<run>/                     RunLayout(models_root, run)
        config.yaml model.yaml last.pth best.pth history/step_00000500.pth log.jsonl curves.png tb/ profile/
        best.onnx best.safetensors (export)
    submit/<run or blend>/            OutputLayout(submit_root, name)
        pred/ val_pred/ (whole folders, swapped in complete)  submission.zip|csv  ablation.csv|png
        blend.yaml blend_scores.csv blend_config.yaml   (blend: members, weights, validation scores)
    submit/leaderboard.csv
    submit/leaderboard/<time>-<name>.csv   per-image scores of each leaderboard row (+ bicubic-<key>.csv)
    <volumes>/                        VolumeLayout(root): a folder of MRI volumes (HR)
        *.nii *.nii.gz *.npy  subjects.csv (optional)  mri_splits.csv  mri-prepare
        lr/<item>.<suffix> lr/degradation.yaml          mri-prepare: LR volumes and how they were made
        sr/<name>/<item>.<suffix> timing.json            mri-infer: one folder per run or baseline
        scores/<name>.csv                               mri-evaluate

Ids and run names become file and folder names, so they are checked here and nowhere else: a
safe character set (letters, digits, ``_ . -``), starting with a letter, digit or ``_`` (no
hidden files, nothing a shell reads as a flag), no separators, at most 128 characters. Every
path a CSV gives is resolved under the dataset root: absolute paths and ``..`` that would leave
it are refused (symbolic links inside the root are the user's own and kept).
The same checks apply whether ``prepare`` ran or a stage reads the contest files directly.
"""

from __future__ import annotations

import posixpath
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.core.errors import DataError, UserError
from pipeline.core.images import images_by_stem

if TYPE_CHECKING:  # pandas is imported where a table is read: stages check their folders before that
    import pandas as pd

    from pipeline.core.config import Config

ID_RULE = "letters, digits, '_', '.', '-'; starting with a letter, digit or '_'; at most 128 characters"
_SAFE_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")

TRAIN_COLUMNS = ("img_id", "lr_img_path", "hr_img_path")  # train.csv (+ optional "source")
TEST_COLUMNS = ("img_id", "lr_img_path")  # test.csv
SPLIT_COLUMNS = ("img_id", "source", "fold", "lr_path", "hr_path")  # splits.csv
EXTRA_COLUMNS = ("img_id", "source", "lr_path", "hr_path")  # extra.csv (written by add-data)
EXTRA_FOLD = -1  # the fold of extra pairs in splits.csv: training only, never a validation fold (>= 0)
MANIFEST_COLUMNS = ("patch_id", "img_id", "fold", "y", "x", "lr_path", "hr_path")  # patches/manifest.csv
VOLUME_SPLIT_COLUMNS = ("item", "subject", "fold", "path", "volume")  # <volumes>/mri_splits.csv
LEADERBOARD_COLUMNS = ("timestamp", "run", "model", "settings", "images", "psnr", "ssim", "sec_per_image", "device",
                       "gain_db", "gain_lo", "gain_hi", "scores")  # gain over bicubic, its 95% interval, per-image file
COMPLETE_MARK = "timing.json"  # every finished prediction folder holds it (written last)


def check_id(value: object, where: str, what: str = "img_id") -> str:
    """``value`` as a safe file-name stem, or a DataError naming ``where`` and the rule."""
    text = str(value)
    if not _SAFE_ID.fullmatch(text):
        raise DataError(f"{where}: {what} {text!r} is not a safe name ({ID_RULE})")
    return text


def check_run(name: str) -> str:
    """A run name (``run=``, ``infer.runs``): it names folders under models/ and submit/."""
    if not _SAFE_ID.fullmatch(name):
        raise UserError(f"run={name!r} is not a safe folder name ({ID_RULE})")
    return name


def resolve_under(root: Path, rel: object, where: str) -> Path:
    """``root / rel`` for a relative path that stays inside ``root``; else a DataError naming ``where``."""
    text = str(rel).replace("\\", "/")
    if not text or text.startswith("/") or re.match(r"[A-Za-z]:", text):
        raise DataError(f"{where}: path {str(rel)!r} must be relative to {root}")
    norm = posixpath.normpath(text)
    if norm == ".." or norm.startswith("../"):
        raise DataError(f"{where}: path {str(rel)!r} leaves the dataset folder {root}")
    return root / norm


@dataclass(frozen=True)
class Pair:
    """One LR/HR file pair (a training patch or a whole validation image)."""

    name: str
    lr_path: Path
    hr_path: Path


def need_file(path: Path, make: str) -> None:
    """A DataError naming ``path`` and how to get it (``make``) when it is not a file."""
    if not path.is_file():
        raise DataError(f"{path}: not found; {make}")


def read_table(path: Path, columns: tuple[str, ...], make: str) -> pd.DataFrame:
    """A CSV written by a stage or the contest, with its columns checked; ``make`` says how to get it.

    Every cell is text ('0007' is a file name, not the number 7) and blanks stay '' (not NaN).
    """
    need_file(path, make)
    import pandas as pd

    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as exc:
        raise DataError(f"{path}: not a readable CSV ({exc})") from None
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(table.columns)})")
    return table


def _int_column(table: pd.DataFrame, column: str, path: Path) -> pd.Series:
    try:
        return table[column].astype(int)
    except ValueError:
        raise DataError(f"{path}: column {column} must hold integers") from None


def _unique_ids(ids: pd.Series, where: Path) -> None:
    dup = ids[ids.duplicated()]
    if len(dup):
        raise DataError(f"{where}: duplicate img_id {dup.iloc[0]!r}")


@dataclass(frozen=True)
class PatchLayout:
    """``<data>/patches``: the patch pairs of every training image and how they were cut."""

    dir: Path

    @property
    def manifest(self) -> Path:
        return self.dir / "manifest.csv"

    @property
    def fingerprint(self) -> Path:
        return self.dir / "fingerprint.yaml"  # its presence marks a folder patchify made

    @property
    def config(self) -> Path:
        return self.dir / "config.yaml"

    @staticmethod
    def patch_id(img_id: str, y: int, x: int) -> str:
        return f"{img_id}_{y:04d}_{x:04d}"

    @staticmethod
    def relative(kind: str, patch_id: str) -> str:
        """The manifest's path of a patch (``lr/<id>.png``), relative to the patches folder."""
        return f"{kind}/{patch_id}.png"

    def done(self, img_id: str) -> Path:
        """One per finished image: its manifest rows and the signature of its source files."""
        return self.dir / "done" / f"{img_id}.json"

    def _make(self) -> str:
        return f"run `python -m pipeline patchify --data {self.dir.parent}`"

    def need_manifest(self) -> None:
        """The error ``training_pairs`` gives without a manifest, without reading anything (train checks it first)."""
        need_file(self.manifest, self._make())

    def training_pairs(self, val_fold: int) -> list[Pair]:
        """The manifest's patches outside the validation fold, in manifest order."""
        table = read_table(self.manifest, MANIFEST_COLUMNS, self._make())
        folds = _int_column(table, "fold", self.manifest)
        rows = table[folds != val_fold]
        if rows.empty:
            raise DataError(f"{self.manifest}: no patch outside the validation fold data.val_fold={val_fold} "
                            f"(folds present: {sorted(folds.unique())})")
        where = str(self.manifest)
        return [Pair(check_id(r.patch_id, where, "patch_id"), resolve_under(self.dir, r.lr_path, where),
                     resolve_under(self.dir, r.hr_path, where)) for r in rows.itertuples()]


@dataclass(frozen=True)
class DataLayout:
    """A dataset folder in the contest layout (``--data``)."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    train_csv = property(lambda self: self.root / "train.csv")
    test_csv = property(lambda self: self.root / "test.csv")
    sample_submission = property(lambda self: self.root / "sample_submission.zip")
    splits_csv = property(lambda self: self.root / "splits.csv")
    prepare_config = property(lambda self: self.root / "prepare.yaml")
    patches = property(lambda self: PatchLayout(self.root / "patches"))
    extra_csv = property(lambda self: self.root / "extra.csv")

    def extra_dir(self, name: str) -> Path:
        """``extra/<name>``: one set of extra pairs made by add-data (``lr/``, ``hr/``, ``add-data.yaml``)."""
        return self.root / "extra" / check_id(name, "add_data.name", "name")

    def extra_table(self) -> pd.DataFrame:
        """img_id, source, lr_path, hr_path of the extra training pairs (empty without extra.csv)."""
        import pandas as pd

        if not self.extra_csv.is_file():
            return pd.DataFrame(columns=list(EXTRA_COLUMNS))
        where = str(self.extra_csv)
        table = read_table(self.extra_csv, EXTRA_COLUMNS, "written by add-data")
        for i in table["img_id"]:
            check_id(i, where)
        _unique_ids(table["img_id"], self.extra_csv)
        for col in ("lr_path", "hr_path"):
            table[col] = [str(resolve_under(self.root, p, where).relative_to(self.root)) for p in table[col]]
        return table[list(EXTRA_COLUMNS)].reset_index(drop=True)

    def check_exists(self) -> None:
        if not self.root.is_dir():
            raise DataError(f"{self.root}: data folder not found (--data)")

    def _folder_table(self, folder: str, role: str) -> dict[str, str]:
        """{stem: path relative to root} of a contest image folder (two files with one stem refused)."""
        files = images_by_stem(self.root / folder, role)
        where = str(self.root / folder)
        return {check_id(stem, where): f"{folder}/{p.name}" for stem, p in files.items()}

    def train_table(self) -> pd.DataFrame:
        """img_id, source, lr_path, hr_path of every training pair, ids and paths checked.

        ``train.csv`` when present (its ``source`` column, if any, groups crops of one photo: every
        row must have one), else ``train/lr`` and ``train/hr`` paired by file stem (each image is its
        own source).
        """
        self.check_exists()
        import pandas as pd

        if self.train_csv.is_file():
            where = self.train_csv
            df = read_table(where, TRAIN_COLUMNS, "expected the contest's train.csv")
            df = df.rename(columns={"lr_img_path": "lr_path", "hr_img_path": "hr_path"})
            if "source" in df.columns:
                blank = df.index[df["source"].str.strip() == ""]
                if len(blank):
                    i = blank[0]
                    raise DataError(f"{where}: line {i + 2} (img_id {df.at[i, 'img_id']!r}) has a blank source; "
                                    f"fill it ({len(blank)} row(s) blank), or drop the column to make every image "
                                    "its own source")
            else:
                df["source"] = df["img_id"]
        else:
            where = self.root / "train"
            for d in ("lr", "hr"):
                if not (where / d).is_dir():
                    raise DataError(f"{where / d}: folder not found (and no train.csv in {self.root})")
            lr, hr = self._folder_table("train/lr", "train LR"), self._folder_table("train/hr", "train HR")
            if set(lr) != set(hr):
                only_lr, only_hr = sorted(set(lr) - set(hr)), sorted(set(hr) - set(lr))
                raise DataError(f"{where}: LR and HR counts differ ({len(lr)} vs {len(hr)}); "
                                f"LR only: {only_lr[:5]}, HR only: {only_hr[:5]}")
            df = pd.DataFrame({"img_id": list(lr), "lr_path": list(lr.values()), "hr_path": [hr[k] for k in lr]})
            df["source"] = df["img_id"]
        if df.empty:
            raise DataError(f"{where}: the train set is empty")
        for i in df["img_id"]:
            check_id(i, str(where))
        _unique_ids(df["img_id"], where)
        for col in ("lr_path", "hr_path"):
            df[col] = [str(resolve_under(self.root, p, str(where)).relative_to(self.root)) for p in df[col]]
        return df[["img_id", "source", "lr_path", "hr_path"]].reset_index(drop=True)

    def test_table(self) -> pd.DataFrame:
        """img_id, lr_path of every test image (empty when the dataset has no test set)."""
        self.check_exists()
        import pandas as pd

        if self.test_csv.is_file():
            where = self.test_csv
            df = read_table(where, TEST_COLUMNS, "expected the contest's test.csv").rename(
                columns={"lr_img_path": "lr_path"})
        elif (self.root / "test" / "lr").is_dir():
            where = self.root / "test" / "lr"
            stems = self._folder_table("test/lr", "test LR")
            df = pd.DataFrame({"img_id": list(stems), "lr_path": list(stems.values())})
        else:
            return pd.DataFrame(columns=["img_id", "lr_path"])
        for i in df["img_id"]:
            check_id(i, str(where))
        _unique_ids(df["img_id"], where)
        df["lr_path"] = [str(resolve_under(self.root, p, str(where)).relative_to(self.root)) for p in df["lr_path"]]
        return df[["img_id", "lr_path"]].reset_index(drop=True)

    def test_items(self) -> list[tuple[str, Path]]:
        """(img_id, LR path) of the test set; none is an error."""
        table = self.test_table()
        if table.empty:
            raise DataError(f"{self.root}: no test set (neither test.csv nor test/lr)")
        return [(i, self.root / p) for i, p in zip(table["img_id"], table["lr_path"])]

    def sample_ids(self) -> list[str] | None:
        """The ids ``sample_submission.zip`` names (its members' stems), or None without the file."""
        path = self.sample_submission
        if not path.is_file():
            return None
        try:
            with zipfile.ZipFile(path) as zf:
                names = [n for n in zf.namelist() if not n.endswith("/")]
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"{path}: not a valid zip file ({exc})") from None
        return [check_id(posixpath.splitext(posixpath.basename(n))[0], str(path)) for n in names]

    def _make_splits(self) -> str:
        return f"run `python -m pipeline prepare --data {self.root}` first"

    def need_splits(self) -> None:
        """The error ``splits`` gives without splits.csv, without reading anything (for checks before torch loads)."""
        need_file(self.splits_csv, self._make_splits())

    def splits(self) -> pd.DataFrame:
        """splits.csv (written by prepare), ids and paths checked, fold as int."""
        table = read_table(self.splits_csv, SPLIT_COLUMNS, self._make_splits())
        table["fold"] = _int_column(table, "fold", self.splits_csv)
        where = str(self.splits_csv)
        for i in table["img_id"]:
            check_id(i, where)
        _unique_ids(table["img_id"], self.splits_csv)
        for col in ("lr_path", "hr_path"):
            for p in table[col]:
                resolve_under(self.root, p, where)
        return table

    def validation_pairs(self, val_fold: int) -> list[Pair]:
        """The whole images of the validation fold, sorted by image id."""
        table = self.splits()
        rows = table[table["fold"] == val_fold].sort_values("img_id")
        if rows.empty:
            raise DataError(f"{self.splits_csv}: no image in the validation fold data.val_fold={val_fold} "
                            f"(folds present: {sorted(table['fold'].unique())})")
        return [Pair(r.img_id, self.root / r.lr_path, self.root / r.hr_path) for r in rows.itertuples()]


@dataclass(frozen=True)
class RunLayout:
    """``models/<run>``: one training run's checkpoints, log and plots."""

    models_root: Path
    run: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "models_root", Path(self.models_root))
        check_run(self.run)

    dir = property(lambda self: self.models_root / self.run)
    config = property(lambda self: self.dir / "config.yaml")
    model_card = property(lambda self: self.dir / "model.yaml")  # what the run trains (and what a file held)
    last = property(lambda self: self.dir / "last.pth")
    best = property(lambda self: self.dir / "best.pth")
    history_dir = property(lambda self: self.dir / "history")
    log = property(lambda self: self.dir / "log.jsonl")
    curves = property(lambda self: self.dir / "curves.png")
    tb = property(lambda self: self.dir / "tb")
    profile = property(lambda self: self.dir / "profile")  # train.profile_steps: trace.json, ops.txt, sections.txt

    def checkpoint(self, which: str) -> Path:
        """``best`` or ``last``."""
        return self.dir / f"{which}.pth"

    def history_path(self, step: int) -> Path:
        return self.history_dir / f"step_{step:08d}.pth"

    def history_files(self) -> list[Path]:
        """Kept step checkpoints, oldest first (the zero-padded names sort by step)."""
        return sorted(self.history_dir.glob("step_*.pth"))

    def has_weights(self) -> bool:
        """True when the folder holds any trained weights (which nothing may delete implicitly)."""
        return self.last.is_file() or self.best.is_file() or bool(self.history_files())


def output_name(cfg: Config) -> str:
    """The folder under submit/ that infer and submit use: ``blend.name`` when set (a blend is applied
    and packed like a run), else ``run``."""
    return cfg.blend.name or cfg.run


@dataclass(frozen=True)
class OutputLayout:
    """``submit/<run>``: predictions, submissions and ablations of one run."""

    submit_root: Path
    run: str

    def __post_init__(self) -> None:
        object.__setattr__(self, "submit_root", Path(self.submit_root))
        check_run(self.run)

    dir = property(lambda self: self.submit_root / self.run)
    pred = property(lambda self: self.dir / "pred")
    val_pred = property(lambda self: self.dir / "val_pred")
    ablation_csv = property(lambda self: self.dir / "ablation.csv")
    ablation_png = property(lambda self: self.dir / "ablation.png")
    ablate_config = property(lambda self: self.dir / "ablate.yaml")
    report = property(lambda self: self.dir / "report.png")
    blend_yaml = property(lambda self: self.dir / "blend.yaml")  # members, weights, validation scores
    blend_scores = property(lambda self: self.dir / "blend_scores.csv")  # per image: members, mean, blend
    blend_config = property(lambda self: self.dir / "blend_config.yaml")
    leaderboard = property(lambda self: self.submit_root / "leaderboard.csv")
    leaderboard_dir = property(lambda self: self.submit_root / "leaderboard")  # per-image scores of its rows

    def leaderboard_scores(self, row_id: str) -> Path:
        """Per-image scores of one leaderboard row (``<time>-<name>``), or of the bicubic reference."""
        return self.leaderboard_dir / f"{check_id(row_id, 'leaderboard', 'row')}.csv"

    def submission(self, fmt: str) -> Path:
        return self.dir / f"submission.{fmt}"


@dataclass(frozen=True)
class VolumeLayout:
    """A folder of medical volumes (``mri.dir``): the scans, their subjects and their folds."""

    root: Path

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))

    splits_csv = property(lambda self: self.root / "mri_splits.csv")
    subjects_csv = property(lambda self: self.root / "subjects.csv")  # optional: file -> subject
    lr_dir = property(lambda self: self.root / "lr")  # LR volumes made by mri-prepare, one per item
    lr_record = property(lambda self: self.lr_dir / "degradation.yaml")  # the mri settings that made them

    def need_splits(self) -> None:
        """``mri_splits.csv``, or an error saying how to make it (checked before a stage loads torch)."""
        need_file(self.splits_csv, "split the folder first (pipeline.mri.splits.write_splits)")

    def need_record(self) -> None:
        """``lr/degradation.yaml``, or an error saying how to make it (checked before a stage loads torch)."""
        need_file(self.lr_record, f"run `python -m pipeline mri-prepare --volumes {self.root}` first")

    def sr_dir(self, name: str) -> Path:
        """``sr/<name>``: mri-infer's volumes of one run or baseline (a whole folder, swapped in complete)."""
        return self.root / "sr" / check_run(name)

    def report_dir(self, name: str) -> Path:
        """``report/<name>``: demo-mri's report.md and figure of the run ``name``."""
        return self.root / "report" / check_run(name)

    def scores_csv(self, name: str) -> Path:
        """``scores/<name>.csv``: mri-evaluate's table for ``sr/<name>`` (with the baselines as rows)."""
        return self.root / "scores" / f"{check_run(name)}.csv"

    @staticmethod
    def lr_name(item: str, suffix: str) -> str:
        """The LR (and SR) file of an item: ``<item><suffix>`` with the HR file's suffix."""
        return f"{check_id(item, 'mri_splits.csv', 'item')}{suffix}"

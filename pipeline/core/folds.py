"""The one fold rule of the project: whole groups (source photos, MRI subjects) to folds.

A group never straddles two folds, so validation never sees a photo or a subject that training saw.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.core.errors import DataError

if TYPE_CHECKING:
    import pandas as pd


def assign_folds(train: pd.DataFrame, folds: int, seed: int) -> pd.Series:
    """Fold of each row: whole ``source`` groups, in a seeded order, each to the fold with fewest rows.

    (Balanced enough for contest data, where sources are similar in size, and it leaves the
    validation fold a random source rather than always the largest.)
    """
    counts = train.groupby("source").size()
    sources = counts.index.to_numpy()
    if len(sources) < folds:
        raise DataError(f"{len(sources)} source image(s) cannot fill {folds} folds; set data.folds lower")
    order = np.random.default_rng(seed).permutation(len(sources))
    load = [0] * folds
    fold_of: dict[str, int] = {}
    for i in order:
        f = min(range(folds), key=lambda k: (load[k], k))
        fold_of[sources[i]] = f
        load[f] += int(counts.iloc[i])
    return train["source"].map(fold_of).astype(int)

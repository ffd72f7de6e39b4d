"""Figures of volumes: orthogonal slices through a point, one column per volume (LR | SR | HR ...).

``orthogonal_slices(path, panels, zooms)``: three rows (the planes normal to voxel axes 0, 1 and 2
through ``centre``, default the centre of the last panel's foreground), one column per panel, in
one shared intensity window (the last panel's 0.5 / 99.5 percentiles, so every column is shown
on the reference's scale). Panels on a coarser grid (thick-slice LR) are shown on the reference's
grid by nearest interpolation, so their blocks stay visible; ``zooms`` (voxel size per axis, mm)
sets each plane's aspect, so anisotropic voxels are drawn at their true proportions.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write
from pipeline.mri.degrade import INTERPOLATIONS, to_grid
from pipeline.mri.metrics import foreground_mask

PLANES = ("axis 0", "axis 1", "axis 2")


def foreground_centre(volume: np.ndarray) -> tuple[int, int, int]:
    """The centre of the foreground's bounding box (the volume's centre when it has no foreground)."""
    try:
        mask = foreground_mask(volume, dilate=0)
    except UserError:  # a constant volume has no Otsu threshold: show its middle
        mask = np.ones(volume.shape, dtype=bool)
    where = np.argwhere(mask)
    lo, hi = where.min(axis=0), where.max(axis=0)
    return tuple(int(v) for v in (lo + hi) // 2)  # type: ignore[return-value]


def orthogonal_slices(path: str | Path, panels: Mapping[str, np.ndarray], zooms: Sequence[float] = (1.0, 1.0, 1.0),
                      centre: Sequence[int] | None = None, title: str = "") -> Path:
    """Write a PNG of three orthogonal planes through ``centre`` of every panel (module docstring)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not panels:
        raise ValueError("orthogonal_slices needs at least one volume")
    names = list(panels)
    ref = np.asarray(panels[names[-1]], dtype=np.float64)
    if ref.ndim != 3:
        raise ValueError(f"volumes must be 3-D, got {ref.shape}")
    shown = {name: np.asarray(v, dtype=np.float64) if np.shape(v) == ref.shape
             else to_grid(np.asarray(v), ref.shape, INTERPOLATIONS["nearest"]) for name, v in panels.items()}
    c = tuple(centre) if centre is not None else foreground_centre(ref)
    low, high = np.percentile(ref, (0.5, 99.5))
    fig, axes = plt.subplots(3, len(names), figsize=(2.6 * len(names), 7.8), squeeze=False)
    for row, axis in enumerate(range(3)):
        i, j = (a for a in range(3) if a != axis)  # the plane's two in-plane axes
        for col, name in enumerate(names):
            plane = np.take(shown[name], c[axis], axis=axis)  # (n_i, n_j)
            ax = axes[row][col]
            # Rows of the picture run along j, columns along i; a pixel is zooms[j] tall, zooms[i] wide.
            ax.imshow(plane.T, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=zooms[j] / zooms[i],
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if row == 0:
                ax.set_title(name, fontsize=10)
            if col == 0:
                ax.set_ylabel(f"{PLANES[axis]} = {c[axis]}", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path

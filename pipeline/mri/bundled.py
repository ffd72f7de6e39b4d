"""Real MRI volumes that ship inside installed packages (nothing is downloaded): tests and demo-mri.

Found through each package's own folder (importlib, without importing the package).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.core.errors import UserError

# (package, path inside it): shape, stored dtype, what it is
BUNDLED_SCANS = (
    ("dipy", "data/files/S0_10slices.nii.gz"),  # (128,128,10,1) uint16, 2x2 mm in-plane, 10 thick slices
    ("dipy", "data/files/aniso_vox.nii.gz"),  # (58,58,24) int16, 4x4x5 mm brain
    ("nibabel", "tests/data/example4d.nii.gz"),  # (128,96,24,2) int16, two volumes of a time series
    ("nibabel", "tests/data/anatomical.nii"),  # (33,41,25) big-endian int16, 2 mm
)


def bundled_scan(package: str, rel: str) -> Path:
    """The path of one bundled scan; an error if the package or the file is missing."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"package {package!r} is not installed; it provides the bundled scan {rel}")
    path = Path(spec.submodule_search_locations[0]) / rel
    if not path.is_file():
        raise UserError(f"{path}: bundled scan not found in the installed {package}")
    return path


def bundled_scans() -> list[Path]:
    """Paths of every bundled scan, in ``BUNDLED_SCANS`` order."""
    return [bundled_scan(package, rel) for package, rel in BUNDLED_SCANS]

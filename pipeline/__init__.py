"""A 4x single-image super-resolution pipeline for PSNR contests.

The stages are the modules of this package, one per stage (``cli.STAGES`` lists them); what they
share lives in the sub-packages ``core``, ``models``, ``inference`` and ``training``; ``mri`` holds
the volume stages. README.md, "The code", draws the map.

Every entry point (``python -m pipeline``, torchrun, the benchmarks, the tests) imports this
package first, so process-wide settings that must precede a library's import live here.
"""

import os

# albumentations asks PyPI for its latest version when imported, and on an offline machine (a
# cluster node, a contest kernel) warns on every stage; this is its documented switch.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

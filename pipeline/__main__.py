import os
import sys

# On a shared or small CPU, busy-waiting OpenMP threads slow every stage many-fold when another
# process holds a core (measured: an edsr-tiny training step 0.09 s -> 1.78 s). Set before torch loads.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline.cli import main  # noqa: E402

sys.exit(main())

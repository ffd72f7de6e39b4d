"""Names the mri stages check and list before anything heavy loads: the volume-model table's (for
``--help``) and the interpolation baselines (what ``mri_infer.model`` may name besides a table model).

``tests/test_mri_models.py`` checks the tuple against ``pipeline.mri.models.VOLUME_MODELS``, so the
two cannot drift.
"""

VOLUME_MODEL_NAMES = (
    "mdcsrn", "mdcsrn-tiny", "critic3d", "critic3d-tiny", "srrescycgan", "srrescycgan-tiny",
)  # pipeline.mri.models.VOLUME_MODELS, in registration order

BASELINES = {"nearest": "nearest", "trilinear": "linear", "tricubic": "cubic"}  # baseline -> interpolation (degrade)

"""The names of the volume-model table, for ``--help`` without importing torch.

``tests/test_mri_models.py`` checks the tuple against ``pipeline.mri.models.VOLUME_MODELS``, so the
two cannot drift.
"""

VOLUME_MODEL_NAMES = (
    "mdcsrn", "mdcsrn-tiny", "critic3d", "critic3d-tiny", "srrescycgan", "srrescycgan-tiny",
)  # pipeline.mri.models.VOLUME_MODELS, in registration order

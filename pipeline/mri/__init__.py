"""Medical volumes: NIfTI / NumPy IO, LR degradations, 3-D and slice networks, volume inference and metrics.

Core: ``volumes`` (read, normalise, write back), ``splits`` (folds by subject), ``degrade``
(k-space truncation, thick slices, interpolation back to the HR grid, grid affines), ``archs`` +
``models`` (mDCSRN, the WGAN-GP critic, SRResCycGAN, their table and checkpoints), ``metrics``
(masked PSNR / SSIM / NRMSE and the interpolation baselines), ``lrset`` (a prepared folder's LR volumes and their
record), ``predict`` (a volume through a model, tiled in 3-D, or an interpolation baseline),
``data`` (3-D foreground patches, validation), ``slices`` (unpaired LR / HR slices), ``cycle``
(SRResCycGAN's losses and schedule), ``figures`` (orthogonal slices), ``bundled`` (scans shipped
in dipy and nibabel), ``names`` (the volume table's and the baselines' names, for checks and ``--help``
before torch loads).
``cycle`` also holds the train stage's ``cycle`` objective.
Stages: ``prepare`` (mri-prepare), ``train`` (mri-train), ``cycle_train`` (mri-cycle-train), ``infer``
(mri-infer), ``evaluate`` (mri-evaluate), ``demo_data`` (demo-mri-data), ``demo`` (demo-mri).
"""

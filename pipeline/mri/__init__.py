"""Medical volumes: NIfTI / NumPy IO, LR degradations, 3-D and slice networks, volume metrics.

Modules: ``volumes`` (read, normalise, write back), ``splits`` (folds by subject), ``degrade``
(k-space truncation, thick slices, interpolation back to the HR grid), ``archs`` + ``models``
(mDCSRN, the WGAN-GP critic, SRResCycGAN and their table), ``metrics`` (masked PSNR / SSIM /
NRMSE and the interpolation baselines), ``losses`` (gradient penalty, total variation; any
number of spatial dimensions).
"""

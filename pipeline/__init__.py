"""A 4x single-image super-resolution pipeline for PSNR contests: one module per stage."""

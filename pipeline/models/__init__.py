"""Networks and their weights: the model table, published architectures, checkpoints.

``table`` (name -> builder with presets; ``build_model``), ``zoo`` (spandrel's architectures and
detection from weights files), ``archs`` (padding per architecture), ``wdsr``, ``discriminators``
(the GAN table), ``perceptual`` (VGG19 features and LPIPS from local files), ``checkpoint`` (our
checkpoints and any published weights file, loaded with ``weights_only``), ``names`` (the two tables'
names for ``--help``, which must not wait for torch).
"""

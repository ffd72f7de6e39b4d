"""The names of the model and discriminator tables, for ``--help`` without importing torch.

Building either table imports torch, basicsr and spandrel (seconds); listing what ``model.name``
and ``gan.discriminator`` accept must not. ``tests/test_models.py`` and
``tests/test_discriminators.py`` check each tuple against its table, so the two cannot drift.
"""

MODEL_NAMES = (
    "rrdb", "rrdb-tiny", "rrdb-nano", "swinir", "swinir-tiny", "swinir-nano",
    "edsr", "edsr-large", "edsr-tiny", "edsr-nano", "srcnn", "bicubic",
    "hat", "hat-l", "hat-tiny", "hat-nano", "dat", "dat-tiny", "dat-nano",
    "drct", "drct-tiny", "drct-nano", "atd", "atd-tiny", "atd-nano",
    "rcan", "rcan-tiny", "rcan-nano", "span", "span-tiny", "span-nano",
    "safmn", "safmn-tiny", "safmn-nano", "omnisr", "omnisr-tiny", "omnisr-nano",
    "esrgan", "esrgan-tiny", "esrgan-nano", "srresnet", "srresnet-tiny", "srresnet-nano",
    "wdsr-a", "wdsr-a-tiny", "wdsr-a-nano", "wdsr-b", "wdsr-b-tiny", "wdsr-b-nano",
)  # pipeline.models.table.MODELS, in registration order

DISCRIMINATOR_NAMES = (
    "vgg128", "vgg256", "vgg128-ln", "vgg128-nano", "unet-sn", "unet-sn-nano",
)  # pipeline.models.discriminators.DISCRIMINATORS

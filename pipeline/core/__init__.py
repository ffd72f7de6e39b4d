"""The core every stage shares: settings, the on-disk layout, files, images, metrics, devices.

``config`` (one frozen dataclass per stage section, YAML + ``key=value``), ``layout`` (every folder,
file name and table of the pipeline), ``files`` (atomic writes, staged folders), ``images``
(decode / encode / size caps), ``metrics`` (the one PSNR), ``folds`` (folds by source),
``runtime`` (device, precision, seeds), ``distributed`` (torchrun ranks), ``errors``, ``steps``
(timed demo steps), ``compat`` (the basicsr shim). Nothing here imports a stage, a model or training.
"""

"""Training: one loop for every task (2-D images, 3-D volumes, unpaired slices) and every objective.

``run`` (setup: loader, resume, start line; ``run(cfg, make_task)``), ``loop`` (the ``Trainer``:
steps, validation, checkpoints, stopping), ``phases`` (train.phases: what each stretch of a run
sets, and where the run stands), ``objectives`` (what a step optimises: psnr, gan), ``updates``
(optimizers, learning-rate schedules, saved update state), ``task`` (what a task hands the loop),
``run_folder`` (models/<run>: best.pth rules, log.jsonl, curves), ``loader`` (the data order),
``votes`` (what torchrun's ranks decide together), ``augment`` (MixUp, CutBlur), ``patch_data`` +
``validation`` (the image task's data and held-out metric), ``losses``, ``compile`` and ``profile``.
Stages (``pipeline.train``, ``pipeline.mri.train``, ``pipeline.mri.cycle_train``) build a task and
call ``run``; nothing here imports a stage.
"""

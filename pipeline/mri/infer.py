"""``mri-infer``: super-resolve LR volumes with a volume model or an interpolation baseline.

What runs (``mri_infer.model``):
- ``trilinear`` / ``tricubic`` / ``nearest``: the LR interpolated onto the HR grid (no model);
- empty: the run's checkpoint (``mri_infer.checkpoint`` = best / last of ``models/<run>``, or a
  checkpoint file), rebuilt from its ``arch`` and ``kwargs`` (``models.volume_model_from_checkpoint``);
- a volume model name with ``mri_infer.pretrained`` bare weights.
Which volumes: by default the validation fold (``mri_infer.split=all``: every item) of
``<mri.dir>/lr`` made by mri-prepare, whose ``degradation.yaml`` gives the LR grid, written to
``<mri.dir>/sr/<run, or the baseline's name>``; with ``--input DIR --output DIR`` every volume in
DIR, the LR grid from this config's ``mri`` section. Outputs keep each input's file name, format,
dtype and scaling (``predict.write_sr``), beside ``timing.json`` (written last) and ``config.yaml``;
the folder is built beside its place and swapped in whole (``files.staged_dir``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.core.config import Config, MriConfig, save_config
from pipeline.core.errors import UserError
from pipeline.core.files import atomic_write, staged_dir
from pipeline.core.layout import COMPLETE_MARK, RunLayout, VolumeLayout
from pipeline.mri.names import BASELINES

if TYPE_CHECKING:  # torch and the volume modules load in the functions that compute, after work's checks
    from torch import nn

    from pipeline.mri.models import VolumeModelSpec


def checkpoint_path(cfg: Config) -> Path:
    """``mri_infer.checkpoint``: best / last of the run, or a file."""
    which = cfg.mri_infer.checkpoint
    path = RunLayout(Path(cfg.paths.models), cfg.run).checkpoint(which) if which in ("best", "last") else Path(which)
    if path.is_dir():
        raise UserError(f"mri_infer.checkpoint={path}: is a folder, not a checkpoint file")
    if not path.is_file():
        raise UserError(f"{path}: checkpoint not found (train run {cfg.run!r} first, name a file in "
                        "mri_infer.checkpoint, or use mri_infer.model=tricubic)")
    return path


def load_volume_model(cfg: Config) -> tuple[nn.Module, VolumeModelSpec, str]:
    """(model, its table entry, a description) of ``mri_infer`` (not a baseline)."""
    from pipeline.models.checkpoint import load_weights
    from pipeline.mri.models import build_volume_model, volume_model_from_checkpoint
    from pipeline.mri.predict import spec_of

    c = cfg.mri_infer
    if c.model:
        spec = spec_of(c.model)
        if not c.pretrained:
            raise UserError(f"mri_infer.model={c.model} needs mri_infer.pretrained (weights); for the run's own "
                            "checkpoint leave mri_infer.model empty")
        model = build_volume_model(c.model)
        load_weights(model, c.pretrained, c.ema)
        return model.eval(), spec, f"{c.model} ({Path(c.pretrained).name})"
    path = checkpoint_path(cfg)
    model, name, meta = volume_model_from_checkpoint(path, c.ema)
    return model, spec_of(name), f"{name} ({path.name}, step {meta.get('step', '?')}, {'ema' if c.ema else 'params'})"


def work(cfg: Config) -> tuple[list[tuple[str, Path]], Path, MriConfig]:
    """(name, LR path) of every volume, the output folder, and the mri settings that made the LR."""
    c = cfg.mri_infer
    if c.input:
        if not c.output:
            raise UserError("--input needs --output (the folder the SR volumes go to)")
        from pipeline.mri.volumes import list_volumes, volume_stem

        return [(volume_stem(p), p) for p in list_volumes(c.input)], Path(c.output), cfg.mri
    root = Path(cfg.mri.dir)
    VolumeLayout(root).need_splits()  # before pandas and the volume modules load
    from pipeline.mri.lrset import lr_items, read_record

    name = c.model if c.model in BASELINES else cfg.run
    out = Path(c.output) if c.output else VolumeLayout(root).sr_dir(name)
    return lr_items(root, c.split, cfg.mri.val_fold), out, read_record(root)


def run(cfg: Config, items: list[tuple[str, Path]], stage: Path, mri: MriConfig) -> dict[str, Any]:
    """Every volume of ``items`` into ``stage``; the timing summary."""
    from pipeline.core.runtime import pick_device
    from pipeline.mri.predict import VolumeSettings, grid_factors, interpolate, super_resolve, volume_scale, write_sr
    from pipeline.mri.volumes import read_volume

    c = cfg.mri_infer
    settings = VolumeSettings.from_config(c)
    upsample = grid_factors(mri)
    device = pick_device()
    model, spec, desc = (None, None, c.model) if c.model in BASELINES else load_volume_model(cfg)
    seconds, tiles = 0.0, 0
    for name, path in items:
        lr = read_volume(path, max_voxels=mri.max_voxels)
        if model is None:
            sr = interpolate(lr, upsample, c.model)
        else:
            assert spec is not None
            if upsample != (1, 1, 1) and volume_scale(spec, settings.slice_axis) != (1, 1, 1):
                raise UserError(f"{desc} changes the voxel grid itself; thick-slice LR (mri.degradation=thick) "
                                "needs a same-grid model such as mdcsrn")
            sr = super_resolve(model, spec, lr, settings, upsample, device, mri.norm_percentiles)
        write_sr(stage / path.name, sr, lr)
        seconds += sr.seconds
        tiles += sr.tiles
        print(f"{name}: {lr.data.shape} -> {sr.data.shape} in {sr.seconds:.1f} s")
    return {"volumes": len(items), "seconds_total": round(seconds, 3),
            "seconds_per_volume": round(seconds / max(len(items), 1), 3), "tile_forwards": tiles,
            "device": str(device), "model": desc, "upsample": list(upsample),
            "settings": {k: getattr(settings, k) for k in settings.__dataclass_fields__}}


def main(cfg: Config) -> None:
    c = cfg.mri_infer
    if c.model and c.model not in BASELINES:
        from pipeline.mri.predict import spec_of

        spec_of(c.model)  # an unknown name is an error before any folder is touched
    items, out, mri = work(cfg)
    with staged_dir(out, COMPLETE_MARK) as stage:
        summary = run(cfg, items, stage, mri)
        save_config(cfg, stage / "config.yaml")
        with atomic_write(stage / COMPLETE_MARK) as tmp:  # written last: marks the set complete
            tmp.write_text(json.dumps(summary, indent=2))
    print(f"{summary['volumes']} volume(s) by {summary['model']} -> {out}  ({summary['seconds_per_volume']:.2f} "
          f"s/volume on {summary['device']})")

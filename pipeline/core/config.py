"""Typed configuration: one frozen dataclass per section, YAML defaults, dotted overrides.

A setting is addressed as ``section.field`` (``train.learning_rate=2e-4``) or, for the few
top-level settings, by its bare name (``run=baseline``). Unknown keys and values of the wrong
type are errors (``ConfigError``) that name the key. The resolved config is written next to a
stage's outputs with ``save_config`` so that every folder says how it was made.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import re
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from pipeline.core.errors import UserError
from pipeline.core.yaml_bounded import YamlTooLarge, load_yaml


class ConfigError(UserError):
    """A config file or override that does not match the schema."""


def opt(default: Any, help: str, *, ge: float | None = None, gt: float | None = None,
        le: float | None = None) -> Any:
    """A dataclass field with its help text (shown by ``--help``) and optional numeric bounds
    (``ge``: >=, ``gt``: >, ``le``: <=), checked whenever a value is set."""
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults so configs stay immutable")
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le)) if v is not None}
    return field(default=default, metadata={"help": help, "bounds": bounds})


# Text settings with a format of their own, checked when set (pipeline.core.config._TEXT_CHECKS).
ArchText = typing.NewType("ArchText", str)  # '' or 'FILE.py:Class' (model.arch)
KwargsText = typing.NewType("KwargsText", str)  # a mapping of plain values held as JSON text: configs stay immutable
Precision = Literal["auto", "fp32", "bf16", "fp16"]
CompileMode = Literal["auto", "off", "default", "reduce-overhead"]  # torch.compile modes, or auto / off
MAX_PAD = 512  # infer.pad: LR pixels of reflection per side; more only costs memory
# Every learning rate: Adam moves each weight by about the rate per step, so past 10 no network survives one
# step, and near float32's limit Adam's own step size overflows (a traceback from inside torch).
MAX_LEARNING_RATE = 10.0


@dataclass(frozen=True)
class PathsConfig:
    models: str = opt("models", "folder holding one sub-folder per training run")
    submit: str = opt("submit", "folder holding predictions, submissions and ablations per run")


@dataclass(frozen=True)
class DataConfig:
    dir: str = opt("data/demo", "dataset root in the contest layout (--data)")
    folds: int = opt(5, "number of folds; images are assigned by source image", ge=2)
    val_fold: int = opt(0, "fold held out for validation, ablation and the leaderboard", ge=0)
    scale: int = opt(4, "upscaling factor: HR side = scale x LR side; prepare / patchify / submit / evaluate take "
                        "any, while train and infer check it against the models (all x4)", ge=1)
    workers: int = opt(2, "processes that decode images while checking the dataset", ge=0)
    max_pixels: int = opt(
        8192 * 8192, "largest image (width x height) any stage decodes; larger files are refused before "
        "decoding (a guard against huge or forged images)", ge=1)


@dataclass(frozen=True)
class PatchifyConfig:
    size: int = opt(512, "HR patch side in pixels (must divide by data.scale); the LR patch is size/scale", ge=1)
    stride: int = opt(0, "HR stride between patches (must divide by data.scale); 0 = size (no overlap)", ge=0)
    edge: Literal["shift", "drop"] = opt(
        "shift", "edges that do not divide: 'shift' adds a last patch flush with the edge, "
        "'drop' leaves the remainder out")
    workers: int = opt(2, "worker processes", ge=0)


@dataclass(frozen=True)
class ModelConfig:
    name: str = opt(
        "edsr-tiny", "architecture from the model table (see `train --help`); model.arch, when set, replaces it")
    pretrained: str = opt(
        "", "weights file to start from (.pth/.pt/.safetensors, any layout); a file that is not model.name "
        "is detected (architecture + hyper-parameters) and used instead, recorded in models/<run>/model.yaml")
    weights: str = opt(
        "", "weights file infer/export run as is (--weights), architecture detected (or model.arch's); replaces the "
        "run's checkpoint")
    arch: ArchText = opt(
        "", "a network from its authors' architecture file, FILE.py:Class (e.g. models/team23_safmnpp.py:SAFMNPP), "
        "used instead of model.name with model.pretrained / --weights (or trained from scratch); the pipeline runs a "
        "Python file only when this setting names it; a run records the file's path and sha256, and a later stage "
        "refuses the file once it changed")
    arch_kwargs: KwargsText = opt(
        "", "model.arch's constructor arguments, a mapping of plain values: model.arch_kwargs='{dim: 36, n_blocks: "
        "6}' (in YAML: arch_kwargs: {dim: 36, n_blocks: 6}); empty = none")
    arch_range: Literal[1, 255] = opt(
        1, "the input range model.arch's network was trained on: 1 = RGB in [0,1]; 255 = RGB in [0,255] (the "
        "pipeline, which works in [0,1], scales its input by 255 and its output back)")
    arch_key: str = opt(
        "auto", "the entry of the weights file holding model.arch's state dict: a key (params_ema, params, "
        "state_dict ...) or 'file' (the file itself); auto = the file when it holds tensors only, else params_ema "
        "(params first with infer.ema=false), params, state_dict, model; a 'module.' prefix is stripped")
    arch_multiple: int = opt(
        1, "model.arch's input is padded (bottom/right, reflection) to a multiple of this and its output cropped "
        "back, for a class that needs divisible sizes", ge=1, le=1024)


Scheduler = Literal["step", "cosine", "constant"]
BatchAugKind = Literal["mixup", "cutblur"]  # train.batch_aug (pipeline/training/augment.py)


@dataclass(frozen=True)
class PhaseConfig:
    """One entry of ``train.phases``: a stretch of the run with a few train.* settings of its own."""

    name: str = opt("", "label in log.jsonl and curves.png; default phase1, phase2, ...")
    steps: int | None = opt(None, "length of the phase in optimizer steps", ge=1)
    minutes: float | None = opt(None, "length of the phase in minutes (the phase ends at the first log point after)",
                                gt=0)
    learning_rate: float | None = opt(None, "peak learning rate of the phase (its own warm-up and schedule)", ge=0,
                                       le=MAX_LEARNING_RATE)
    min_learning_rate: float | None = opt(None, "floor of the phase's cosine", ge=0, le=MAX_LEARNING_RATE)
    scheduler: Scheduler | None = opt(None, "the phase's schedule, over its own steps")
    warmup_steps: int | None = opt(None, "linear warm-up steps at the start of the phase", ge=0)
    loss_l1: float | None = opt(None, "weight of the L1 loss in this phase", ge=0)
    loss_mse: float | None = opt(None, "weight of the MSE loss in this phase (an L2 phase: loss_l1=0 loss_mse=1)",
                                 ge=0)
    crop: int | None = opt(None, "random LR crop of this phase (0 = whole patches)", ge=0)
    batch_size: int | None = opt(None, "global batch of this phase", ge=1)
    grad_clip: float | None = opt(None, "gradient clipping of this phase", ge=0)


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = opt(16, "global batch size (split across processes under torchrun)", ge=1)
    crop: int = opt(0, "random LR crop inside each patch; 0 = whole patch", ge=0)
    augment: bool = opt(True, "8 dihedral transforms applied identically to LR and HR")
    batch_aug: tuple[BatchAugKind, ...] = opt(
        (), "augmentations of whole batches on the device, one drawn per batch from (seed, step): mixup (a "
        "convex mix of two samples, LR and HR alike: bicubic is linear, so the pair stays consistent), cutblur "
        "(a box of the LR input replaced by the HR's 4x4 average, or the reverse; the target stays HR); "
        "empty = off")
    batch_aug_prob: float = opt(0.5, "share of batches that get one of train.batch_aug", ge=0, le=1)
    optimizer: Literal["adam", "adamw", "adamw-schedulefree"] = opt(
        "adam", "optimizer; adamw-schedulefree = schedule-free AdamW (the schedulefree package): no schedule to fit "
        "to a budget (train.scheduler is ignored, train.warmup_steps is its warm-up), its averaged weights are "
        "validated and saved; PSNR runs only")
    learning_rate: float = opt(
        2e-4, "peak learning rate (at most 10: Adam moves every weight by about the rate each step)", ge=0,
        le=MAX_LEARNING_RATE)
    weight_decay: float = opt(0.0, "weight decay", ge=0)
    adam_beta2: float = opt(
        0.999, "Adam / AdamW's second-moment decay; 0.99 follows a change of gradient scale ~10x sooner (fewer "
        "loss spikes at high learning rates)", ge=0, le=0.9999)
    scheduler: Scheduler = opt(
        "cosine", "'step' halves every step_epochs epochs, 'cosine' decays after warmup")
    step_epochs: int = opt(3, "StepLR period in epochs", ge=1)
    step_gamma: float = opt(0.5, "StepLR factor", gt=0, le=1)
    warmup_steps: int = opt(0, "linear warmup steps (cosine)", ge=0)
    min_learning_rate: float = opt(1e-6, "floor of the cosine schedule", ge=0, le=MAX_LEARNING_RATE)
    loss_l1: float = opt(2.0, "weight of the L1 loss", ge=0)
    loss_mse: float = opt(1.0, "weight of the MSE loss", ge=0)
    grad_clip: float = opt(0.0, "clip the gradient norm to this; 0 = off", ge=0)
    blowup: float = opt(
        10.0, "a log point's mean loss above this many times the lowest one so far (with the same mix of loss "
        "terms: a phase of another mix starts afresh) is a spike; a run whose loss stays above it for "
        "train.blowup_points log points has diverged and stops (Adam at too high a rate: measured 0.07 -> 783 "
        "within 20 steps, never back); last.pth and best.pth keep the weights from before the spike; PSNR runs "
        "only; 0 = off", ge=0)
    blowup_points: int = opt(
        5, "log points the loss must stay above train.blowup x its lowest before the run counts as diverged; a "
        "spike that comes back sooner is survived (measured: 0.049 -> 5.9 for one log point, back under 0.06 "
        "within 220 steps, and the run went on to its normal PSNR); periodic saves wait while a spike lasts",
        ge=1)
    ema_decay: float = opt(0.999, "EMA decay of the weights; 0 = no EMA", ge=0, le=0.99999)
    ema_warmup: bool = opt(
        True, "EMA decay warms up (1 - (1+step)^-2/3, capped at ema_decay) so short runs from scratch get a "
        "useful average; false = ema_decay from the first step, so a fine-tune's EMA starts at the loaded weights "
        "and leaves them slowly")
    precision: Precision = opt(
        "auto", "autocast dtype; auto = bf16 only where it is fast on the device and this kind of run (image or "
        "volume, PSNR or GAN loss) was measured stable in it, else fp32; the run's first line says which and why. "
        "Fast: on CUDA from 131072 LR pixels per GPU per step (batch x LR sample side^2, e.g. 16 x 128^2; smaller "
        "steps are launch-bound: fp32 with TF32), on a CPU with native bf16 (AMX / AVX-512 BF16; the environment "
        "variable SR_BF16=force or forbid takes the CPU as one with or without). Measured stable: PSNR runs of "
        "image networks; GAN and volume runs train in fp32. fp32 when train.deterministic")
    compile: CompileMode = opt(
        "auto", "torch.compile the training step for its fixed patch shape; reduce-overhead adds CUDA graphs; "
        "auto = reduce-overhead on CUDA when, at the first log point, >= ~7.2 min of training are left (by "
        "max_minutes, or max_steps at the pace so far; no limit counts as long), else off (~2-3 min warm-up); "
        "PSNR runs only: GAN fine-tunes (gan.discriminator) run eager")
    channels_last: bool = opt(True, "NHWC memory format for convolutions")
    max_steps: int = opt(0, "stop after this many optimizer steps; 0 = no limit", ge=0)
    max_epochs: int = opt(0, "stop after this many epochs; 0 = no limit", ge=0)
    max_minutes: float = opt(
        0.0, "wall-clock budget of the run, summed over resumes; then validate, save and exit; 0 = none", ge=0)
    val_every: int = opt(200, "validate every this many steps", ge=1)
    val_share: float = opt(
        0.1, "at most this share of the time validating: a validation slower than that moves the next ones "
        "to a multiple of val_every steps (large validation folds); 0 = always every val_every; off when "
        "deterministic", ge=0, le=1)
    val_crop: int = opt(
        0, "validate on the centre LR crop of this side of each held-out image (the contest metric on part of "
        "every image) instead of the whole images: for CPU budgets where a validation of whole 512^2 images costs "
        "minutes (CRAFT: ~13 s an image); 0 = whole images", ge=0)
    patience: int = opt(0, "stop after this many validations without improvement; 0 = never", ge=0)
    save_every: int = opt(500, "write the last checkpoint every this many steps", ge=1)
    save_minutes: float = opt(10.0, "and at least every this many minutes", ge=0)
    keep_last: int = opt(3, "step checkpoints kept in models/<run>/history (for infer.last_k)", ge=0)
    resume: Literal["auto", "never", "force"] = opt(
        "auto", "auto = resume when models/<run>/last.pth exists; force = fail if it does not")
    deterministic: bool = opt(
        False, "deterministic algorithms, and fp32 under precision=auto: on the CPU a killed and resumed run ends "
        "with exactly the weights of an uninterrupted one, and torchrun's processes or a compiled step match one "
        "eager process to fp32 rounding, on CPUs with or without native bf16 (the data order always depends on "
        "seed and epoch only)")
    workers: int = opt(2, "data loader workers per process (started once per run, kept across epochs)", ge=0)
    prefetch: int = opt(
        4, "batches each loader worker prepares ahead; at most 64: each is a batch held in memory, and a few keep "
        "the device fed", ge=1, le=64)
    log_every: int = opt(
        20, "log scalars every this many steps; at most 10000: NaN and blow-up checks run at log points, and every "
        "step's losses wait on the device until the next one", ge=1, le=10000)
    phases: tuple[PhaseConfig, ...] = opt(
        (), "ordered phases of one run, each a mapping of train settings for a stretch of it: steps or minutes "
        "(its length), learning_rate, min_learning_rate, scheduler, warmup_steps, loss_l1, loss_mse, crop, "
        "batch_size, grad_clip, name; e.g. [{steps: 600, loss_l1: 1, loss_mse: 0, crop: 16}, {steps: 300, "
        "loss_l1: 0, loss_mse: 1, crop: 0, learning_rate: 2e-5}]; the run ends after the last phase (or at "
        "max_steps / max_minutes / patience); empty = one phase of train.* (PSNR runs)")
    profile_steps: int = opt(
        0, "torch.profiler over this many steps (after the warm-up): models/<run>/profile/ gets trace.json, "
        "ops.txt, sections.txt; 0 = off; at most 1000: the profiler keeps every event in memory, and a few dozen "
        "steps show the pattern", ge=0, le=1000)


@dataclass(frozen=True)
class InferConfig:
    tta: Literal[1, 2, 4, 8] = opt(8, "self-ensemble ways (dihedral transforms)")
    tile: int | Literal["auto"] = opt(
        128, "LR tile side; 0 = whole image; auto = the whole image when its forward (the infer.tta ways in calls "
        "of a few images) fits the memory budget, priced by a probe tile's measured peak (CUDA: 8 GiB or half the "
        "free VRAM; CPU: half the available RAM), else the largest tile that fits, a multiple of the model's window "
        "(and of 8), stride tile/2; infer says what it chose and why", ge=0)
    stride: int = opt(64, "LR stride between tiles (not used by tile=auto)", ge=1)
    windows: tuple[str, ...] = opt(
        (), "multi-window self-ensemble: several windows, each 'TILE/STRIDE', '0' (whole image) or 'auto', e.g. "
        "[0, 64/32, 128/64]; each runs the infer.tta-way ensemble and their SRs are merged by infer.merge, one "
        "window after another; empty = the one window of infer.tile / infer.stride")
    window_weights: tuple[float, ...] = opt(
        (), "one weight >= 0 per entry of infer.windows (normalised; needs infer.merge=mean); empty = equal",
        ge=0)
    tile_blend: Literal["mean", "hann"] = opt(
        "hann", "tile weights: 'hann' (raised window with a floor; measured +0.05 dB over 'mean' on held-out "
        "demo images, BENCHMARKS.md) or 'mean' (equal, the reference team's)")
    pad: int = opt(0, "LR pixels of reflection added on all four sides (then cropped) so edges get context",
                   ge=0, le=MAX_PAD)
    margin: int = opt(0, "LR pixels at tile sides facing another tile given weight 0 (<= (tile-stride)/2)", ge=0)
    batch: int = opt(0, "tiles per forward pass; 0 = sized to the device", ge=0)
    precision: Precision = opt(
        "auto", "autocast dtype; auto = bf16 where it is fast (CUDA; a CPU with native bf16: AMX / AVX-512 BF16, or "
        "SR_BF16=force), else fp32; an image that overflows is run again in fp32")
    channels_last: bool = opt(True, "NHWC memory format")
    merge: Literal["mean", "median"] = opt(
        "mean", "how the ensemble's ways, then the models of infer.runs/last_k, are merged per pixel: 'mean' or "
        "'median' (the reference contest's winner took the median of 8 ways); median holds every way's output "
        "of a tile batch at once: ways x the batch's SR output in memory")
    compile: CompileMode = opt(
        "auto", "torch.compile the model for the fixed tile batch (time reported as compile_seconds); "
        "'reduce-overhead' adds CUDA graphs; auto = 'default' only on CUDA when images x tiles x ways x tile "
        "area >= ~1.1e9 LR pixels (~170 images of 512^2 at 49 tiles x 8 ways): compiling RRDB took 46-62 s on "
        "an H100 and saved ~0.7 s/image; never on the CPU (minutes of compiling, no gain measured)")
    checkpoint: Literal["best", "last"] = opt("best", "which checkpoint of the run")
    ema: bool = opt(True, "a checkpoint's EMA weights (params_ema) when it has them; false = its raw weights (params)")
    runs: tuple[str, ...] = opt((), "extra runs averaged at the output (multi-model ensemble)")
    last_k: int = opt(0, "average the outputs of the run's last k kept checkpoints; 0 = off", ge=0)
    input: str = opt("", "folder of LR images (--input); default: the dataset's test set")
    output: str = opt("", "folder for SR PNGs (--output); default: submit/<run>/pred (a blend: submit/<name>/pred)")
    split: Literal["test", "val"] = opt("test", "which images of --data to infer")


@dataclass(frozen=True)
class SubmitConfig:
    check: str = opt("", "validate this existing zip instead of writing one (--check)")
    format: Literal["zip", "csv"] = opt("zip", "zip of PNGs, or a CSV table for contests that take one")


@dataclass(frozen=True)
class EvaluateConfig:
    sr: str = opt("", "folder of predictions (--sr)")
    hr: str = opt("", "folder of ground truth with the same file stems (--hr)")
    protocol: Literal["competition", "paper"] = opt(
        "competition", "competition = RGB uint8 PSNR; paper = Y channel, scale-pixel border cropped")
    csv: str = opt("", "per-image CSV to write (--csv)")
    lpips_weights: str = opt(
        "", "torchvision ImageNet weights of the LPIPS backbone (alex: alexnet-owt-7be5be79.pth, vgg: "
        "vgg16-397923af.pth); empty = the lpips column says it is missing")
    lpips_net: Literal["alex", "vgg"] = opt("alex", "LPIPS backbone (the lpips package ships its linear layers)")
    vs: str = opt(
        "", "a second folder of predictions of the same images (--vs): prints the gain of --sr over it, per-image "
        "PSNR differences averaged, with a paired bootstrap 95% interval")


@dataclass(frozen=True)
class AblateConfig:
    tta: tuple[int, ...] = opt((1, 2, 4, 8), "ensemble ways to try")
    tiles: tuple[str, ...] = opt(
        ("0", "128/64", "128/96", "256/128"), "tile/stride pairs to try; '0' = whole image, 'auto' = infer.tile=auto")
    tile_blends: tuple[str, ...] = opt(("mean", "hann"), "tile weights (infer.tile_blend) to try")
    precisions: tuple[str, ...] = opt(("fp32", "auto"), "precisions to try")
    merges: tuple[str, ...] = opt(("mean",), "ensemble merge rules to try (mean, median)")
    windows: tuple[str, ...] = opt(
        (), "window sets to try beside ablate.tiles, each windows joined by '+' (e.g. '0+64/32+128/64': "
        "infer.windows=[0, 64/32, 128/64], equal weights)")
    runs: tuple[str, ...] = opt((), "extra model sets: runs averaged with the main run")


@dataclass(frozen=True)
class BlendConfig:
    name: str = opt(
        "", "blend name: the blend stage writes submit/<name>/blend.yaml; infer (and submit) with it set apply the "
        "blend, outputs in submit/<name>/ as for a run")
    members: tuple[str, ...] = opt(
        (), "members (at least 2): RUN (its infer.checkpoint), RUN:last_k=K (its last K kept checkpoints averaged), "
        "RUN:checkpoint=best|last, RUN:ema=false, options chained (RUN:last_k=3:ema=false), or weights=FILE "
        "(a published weights file); each runs with the infer.* settings")
    method: Literal["lstsq", "greedy"] = opt(
        "lstsq", "the weights infer applies (both are fitted and reported): lstsq = least squares on pixels, "
        "non-negative weights summing to 1, solved exactly; greedy = forward selection with replacement on the "
        "mean per-image PSNR, weights = pick counts / greedy_rounds")
    greedy_rounds: int = opt(
        100, "picks of the greedy selection (its weights are multiples of 1/rounds); at most 10000: weights in steps "
        "of 1e-4 are finer than any PSNR difference a validation fold resolves, and 10000 rounds already take ~1 s",
        ge=1, le=10000)


@dataclass(frozen=True)
class AddDataConfig:
    source: str = opt("", "folder of HR photos to add as training pairs (--from)")
    name: str = opt("", "name of this set (default: the --from folder's name); ids become <name>_<file stem>")
    blur: float = opt(0.0, "sigma (HR pixels) of an isotropic Gaussian blur before the x1/scale bicubic; 0 = none",
                      ge=0, le=20)
    noise: float = opt(0.0, "sigma of Gaussian noise added to the LR, in 8-bit levels; 0 = none", ge=0, le=100)
    jpeg: int = opt(0, "JPEG quality the LR is compressed with (1-100); 0 = none", ge=0, le=100)
    workers: int = opt(2, "worker processes", ge=0)


@dataclass(frozen=True)
class DemoConfig:
    out: str = opt("data/demo", "where demo-data writes the dataset (--out)")
    seed: int = opt(0, "seed of the crops chosen per photo", ge=0, le=2**32 - 1)
    train_minutes: float = opt(5.0, "training budget of the demo model (a fresh run each time)", ge=0)


@dataclass(frozen=True)
class MriConfig:
    dir: str = opt("data/mri", "folder of volumes (.nii, .nii.gz, .npy) split into folds by subject")
    folds: int = opt(5, "number of folds; whole subjects are assigned to a fold", ge=2)
    val_fold: int = opt(0, "fold held out for validation", ge=0)
    subject_pattern: str = opt(
        r"^[^_]+", "regex applied to a file's name without suffix; its 'subject' group (or the whole match) "
        "is the subject id (default: the text before the first '_', BIDS-style sub-01_T1w -> sub-01); "
        "a subjects.csv (file,subject) in the folder overrides it")
    volume4d: Literal["first", "all"] = opt(
        "first", "4-D scans: 'first' takes volume 0 of the 4th axis, 'all' makes every volume an item of the "
        "same subject")
    max_voxels: int = opt(2**27, "voxel cap of one 3-D volume (2^27 = 512^3); larger inputs are refused", ge=1)
    norm_percentiles: tuple[float, ...] = opt(
        (0.5, 99.5), "intensity percentiles mapped to 0 and 1 per volume (not clipped: exactly invertible)")
    degradation: Literal["kspace", "thick"] = opt(
        "kspace", "LR from HR: 'kspace' keeps the centre of the 3-D spectrum (same grid), 'thick' averages "
        "consecutive slices along thick_axis (coarser grid)")
    kspace_keep: tuple[float, ...] = opt(
        (0.5, 0.5, 1.0), "fraction of the spectrum kept along each axis (0.5 x 0.5 x 1 keeps a quarter of k-space)")
    thick_factor: Literal[2, 4] = opt(4, "slices averaged into one thick slice")
    thick_axis: int = opt(2, "axis of the thick slices (2 = the third voxel axis)", ge=0, le=2)
    interp: tuple[str, ...] = opt(
        ("nearest", "linear", "cubic"), "interpolations drawn per sample to bring thick slices back to the HR grid")
    mask_dilate: int = opt(2, "voxels the Otsu foreground mask of HR is dilated by before scoring (at most 64: "
                              "each voxel is one pass over the volume)", ge=0, le=64)


@dataclass(frozen=True)
class DemoMriConfig:
    out: str = opt("data/demo-mri", "where demo-mri-data writes the volume folder (--out)")
    pretrain_steps: int = opt(1800, "demo-mri: L1 pre-training steps of the demo model", ge=1)
    gan_steps: int = opt(100, "demo-mri: WGAN-GP fine-tuning steps from the L1 run's best.pth", ge=1)
    critic: str = opt("critic3d-tiny", "demo-mri: the WGAN-GP critic (volume model table)")
    gan_learning_rate: float = opt(2e-4, "demo-mri: the generator's learning rate in the WGAN-GP fine-tune", ge=0,
                                     le=MAX_LEARNING_RATE)


@dataclass(frozen=True)
class MriTrainConfig:
    """mri-train: a volume model on 3-D patches of <mri.dir> (pipeline/mri/train.py); train.*, gan.* as train."""

    model: str = opt("mdcsrn", "generator from the volume model table (pipeline/mri/models.py)")
    patch: int = opt(64, "cubic HR training patch side in voxels (mDCSRN: 64); thinner volumes are mirrored; at most "
                         "512 (mri.max_voxels' default side)", ge=4, le=512)
    stride: int = opt(48, "voxels between patch corners (< patch: overlapping)", ge=1)
    min_foreground: float = opt(0.1, "share of a patch's voxels inside the anatomy for it to be a sample", ge=0,
                                le=1)


@dataclass(frozen=True)
class MriInferConfig:
    """mri-infer: volumes in, volumes out (pipeline/mri/predict.py)."""

    model: str = opt(
        "", "'' = the run's checkpoint (mri_infer.checkpoint); trilinear / tricubic / nearest = interpolation "
        "baselines; a volume model name (pipeline/mri/models.py) = that model with mri_infer.pretrained weights")
    checkpoint: str = opt("best", "best or last of models/<run>, or the path of a volume checkpoint file")
    pretrained: str = opt("", "bare weights (params_ema / params / state dict) for mri_infer.model")
    ema: bool = opt(True, "a checkpoint's EMA weights (params_ema) when it has them; false = its raw weights (params)")
    tile: int = opt(64, "tile side in voxels, per axis (an axis shorter than it is taken whole); 0 = whole volume",
                    ge=0)
    stride: int = opt(48, "voxels between tiles", ge=1)
    margin: int = opt(
        0, "voxels at tile sides facing another tile given weight 0; the model's receptive radius (mdcsrn 17, "
        "mdcsrn-tiny 5) makes tiled == whole-volume inference; needs 2 x margin <= tile - stride", ge=0)
    pad: int = opt(0, "voxels of reflection added on every side (then cropped)", ge=0, le=MAX_PAD)
    tile_blend: Literal["mean", "hann"] = opt(
        "hann", "tile weights, as infer.tile_blend (hann: per-axis window with a floor)")
    batch: int = opt(0, "tiles per forward pass; 0 = sized to the device", ge=0)
    interp: Literal["nearest", "linear", "cubic"] = opt(
        "cubic", "thick slices: how LR is brought to the HR grid before a same-grid model (mdcsrn)")
    slice_axis: int = opt(2, "slice models (srrescycgan): the axis the volume is cut along; the other two are "
                             "upscaled", ge=0, le=2)
    split: Literal["val", "all"] = opt("val", "items of <mri.dir>/lr to infer: the validation fold or all")
    input: str = opt("", "folder of LR volumes (--input); default: <mri.dir>/lr, made by mri-prepare")
    output: str = opt("", "folder for the SR volumes (--output); default: <mri.dir>/sr/<run, or the baseline>")


@dataclass(frozen=True)
class MriEvaluateConfig:
    """mri-evaluate: masked PSNR / SSIM / NRMSE per volume (pipeline/mri/metrics.py)."""

    sr: str = opt("", "folder of SR volumes (--sr); default: <mri.dir>/sr/<run>")
    baselines: tuple[str, ...] = opt(
        ("trilinear", "tricubic"), "interpolations of <mri.dir>/lr scored as rows beside it (nearest, trilinear, "
        "tricubic)")
    csv: str = opt("", "table to write (--csv); default: <mri.dir>/scores/<SR folder name>.csv")


@dataclass(frozen=True)
class MriCycleTrainConfig:
    """SRResCycGAN on slices (pipeline/mri/cycle.py): the write-up's loss weights and schedule."""

    perceptual: float = opt(1.0, "weight of the VGG19 feature loss (needs loss.vgg_weights)", ge=0)
    adversarial: float = opt(1.0, "weight of the adversarial terms (both discriminators)", ge=0)
    tv: float = opt(1.0, "weight of the total variation of the SR slice", ge=0)
    l1: float = opt(5.0, "weight of the L1 content term", ge=0)
    cycle: float = opt(10.0, "weight of the cycle terms (LR -> HR -> LR and HR -> LR -> HR)", ge=0)
    adversarial_loss: Literal["vanilla", "relativistic", "wgan-gp"] = opt(
        "vanilla", "adversarial kind for both discriminators (pipeline/training/losses.py)")
    learning_rate: float = opt(1e-4, "Adam learning rate of all four networks", ge=0, le=MAX_LEARNING_RATE)
    halve_every: int = opt(10000, "optimizer steps between halvings of the learning rate", ge=1)
    model: str = opt("srrescycgan", "the SRResCycGAN entry of the volume model table that mri-cycle-train trains")
    hr_size: int = opt(320, "HR slice side (fastMRI knee: 320); the LR slice is hr_size / 4 (80); at most 4096",
                       ge=4, le=4096)


@dataclass(frozen=True)
class LossConfig:
    """Generator loss terms beside the pixel loss (train.loss_l1, train.loss_mse); see pipeline/training/losses.py."""

    perceptual: float = opt(0.0, "weight of the VGG19 feature loss; > 0 needs loss.vgg_weights", ge=0)
    perceptual_layers: tuple[str, ...] = opt(
        ("conv5_4",), "VGG19 layers compared, summed: conv5_4 = SRGAN's VGG54 (before its ReLU), conv2_2 = VGG22")
    perceptual_criterion: Literal["l1", "mse"] = opt("l1", "feature distance: l1 (ESRGAN) or mse (SRGAN)")
    vgg_weights: str = opt("", "torchvision's ImageNet VGG19 state dict (vgg19-dcbb9e9d.pth), never downloaded")
    tv: float = opt(0.0, "weight of the total-variation loss (mean absolute difference of neighbours)", ge=0)


@dataclass(frozen=True)
class GanConfig:
    """Adversarial fine-tuning (the train stage's GAN mode): pipeline/training/objectives.py, losses.py and
    pipeline/models/discriminators.py."""

    discriminator: str = opt(
        "", "discriminator from the table (vgg128, vgg256, vgg128-ln, unet-sn, ...): turns GAN fine-tuning on "
        "(start the generator from a PSNR run with model.pretrained=models/<run>/best.pth); GAN steps run eager "
        "(train.compile off); empty = PSNR training")
    pretrained: str = opt("", "discriminator weights to start from; empty = from scratch")
    loss: Literal["vanilla", "relativistic", "wgan-gp"] = opt(
        "relativistic", "vanilla (SRGAN, BCE), relativistic (ESRGAN, relativistic average) or wgan-gp")
    weight: float = opt(5e-3, "weight of the adversarial term in the generator loss (ESRGAN 5e-3, SRGAN 1e-3)", ge=0)
    gp_weight: float = opt(10.0, "gradient penalty weight of wgan-gp (lambda)", ge=0)
    critic_steps: int = opt(
        1, "discriminator updates per generator update (the WGAN-GP paper uses 5); at most 100: more leaves the "
        "generator all but frozen and a step minutes long", ge=1, le=100)
    learning_rate: float = opt(1e-4, "discriminator learning rate (same optimizer and scheduler kind as train.*)",
                               ge=0, le=MAX_LEARNING_RATE)
    best: Literal["auto", "lpips", "last", "psnr"] = opt(
        "auto", "what best.pth keeps: lpips = lowest validation LPIPS (needs evaluate.lpips_weights), last = the "
        "latest validation, psnr = highest PSNR (falls as the GAN sharpens); auto = lpips when "
        "evaluate.lpips_weights is given, else last")
    collapse_points: int = opt(
        10, "stop when the discriminator wins outright for this many consecutive log points (periodic saves wait "
        "meanwhile, so last.pth is from before); 0 = never", ge=0)
    collapse_d_loss: float = opt(0.01, "vanilla/relativistic collapse: D's loss at or below this ...", ge=0)
    collapse_g_loss: float = opt(10.0, "... while G's adversarial loss is at or above this", ge=0)
    collapse_gap: float = opt(
        1.0, "wgan-gp collapse: the critic's gap mean C(hr) - mean C(sr) per sqrt(values in a sample) at or above "
        "this (a 1-Lipschitz critic stays below the RMS pixel difference, <= 1)", gt=0)


@dataclass(frozen=True)
class ExportConfig:
    format: Literal["onnx", "safetensors"] = opt(
        "onnx", "onnx (dynamic batch/height/width, checked against PyTorch with ONNX Runtime) or safetensors "
        "(weights only, arch and kwargs in the metadata)")
    opset: int = opt(17, "ONNX opset version (ONNX export needs 9 or later)", ge=9)
    checkpoint: Literal["best", "last"] = opt("best", "which checkpoint of the run; the output is models/<run>/<it>.*")
    ema: bool = opt(True, "a checkpoint's EMA weights (params_ema) when it has them; false = its raw weights (params)")
    image: str = opt("", "LR image the ONNX check runs on; default: a 40x52 crop of a photo scikit-image ships")


@dataclass(frozen=True)
class Config:
    run: str = opt("default", "run name: checkpoints in models/<run>, outputs in submit/<run>")
    seed: int = opt(0, "global seed (splits, data order, initialisation)", ge=0, le=2**32 - 1)
    paths: PathsConfig = field(default_factory=PathsConfig)
    data: DataConfig = field(default_factory=DataConfig)
    patchify: PatchifyConfig = field(default_factory=PatchifyConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    infer: InferConfig = field(default_factory=InferConfig)
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    ablate: AblateConfig = field(default_factory=AblateConfig)
    blend: BlendConfig = field(default_factory=BlendConfig)
    add_data: AddDataConfig = field(default_factory=AddDataConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    mri: MriConfig = field(default_factory=MriConfig)
    mri_infer: MriInferConfig = field(default_factory=MriInferConfig)
    demo_mri: DemoMriConfig = field(default_factory=DemoMriConfig)
    mri_train: MriTrainConfig = field(default_factory=MriTrainConfig)
    mri_evaluate: MriEvaluateConfig = field(default_factory=MriEvaluateConfig)
    mri_cycle_train: MriCycleTrainConfig = field(default_factory=MriCycleTrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    gan: GanConfig = field(default_factory=GanConfig)
    export: ExportConfig = field(default_factory=ExportConfig)


# ---------------------------------------------------------------------------------------------
# Views: some fields of a section as a small frozen dataclass, defaults read from the schema.

ViewT = typing.TypeVar("ViewT", bound="SectionView")


class SectionView:
    """Base of a ``view_of`` dataclass: ``from_config(section)`` picks its fields from a resolved section."""

    @classmethod
    def from_config(cls: type[ViewT], section: Any) -> ViewT:
        return cls(**{f.name: getattr(section, f.name) for f in dataclasses.fields(cls)})  # type: ignore[arg-type]


def view_of(section: type) -> typing.Callable[[type], type]:
    """Class decorator: a frozen dataclass of some of ``section``'s fields (the class's annotations, by
    name), each defaulting to the schema's default, so a default lives in the schema alone."""
    def wrap(cls: type) -> type:
        defaults = section()
        for name in cls.__dict__.get("__annotations__", {}):
            setattr(cls, name, getattr(defaults, name))
        return dataclass(frozen=True)(cls)
    return wrap


# ---------------------------------------------------------------------------------------------
# Type checking of values coming from YAML or the command line.

def _repr_for_messages() -> reprlib.Repr:
    """A bounded repr: a value quoted in an error message is at most a line, whatever its size."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = 60
    r.maxlist = r.maxtuple = r.maxdict = 6
    r.maxlevel = 3
    return r


_short = _repr_for_messages().repr
FLOAT32_MAX = 3.4028234e38  # settings reach torch as float32
INT64_MAX = 2**63 - 1  # and integers numpy / torch as int64


def split_arch(text: str) -> tuple[str, str]:
    """``'path/to/file.py:Class'`` -> ``('path/to/file.py', 'Class')`` (the last ':' splits, so a path may hold one)."""
    path, sep, name = text.rpartition(":")
    if not sep or not path.strip() or not name.isidentifier():
        raise ConfigError(f"model.arch={_short(text)} must be FILE.py:Class (a Python file, a colon, the class name)")
    if not path.endswith(".py"):
        raise ConfigError(f"model.arch={_short(text)}: {path!r} is not a Python file (.py)")
    return path, name


def _arch_text(value: Any, key: str) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected FILE.py:Class, got {_short(value)}")
    if value:
        split_arch(value)
    return value


def _plain_value(value: Any, key: str, depth: int = 0) -> Any:
    """A constructor argument as plain data (numbers, strings, booleans, null, lists and mappings of them)."""
    if depth > 8:
        raise ConfigError(f"{key}: nested more than 8 levels deep")
    if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 1e-3 as a string
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise ConfigError(f"{key}={value} is not a finite number")
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_plain_value(v, f"{key}[{i}]", depth + 1) for i, v in enumerate(value)]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"{key}: mapping keys must be names, got {_short(list(value))}")
        return {k: _plain_value(v, f"{key}.{k}", depth + 1) for k, v in value.items()}
    raise ConfigError(f"{key}: {_short(value)} is not a number, string, boolean, list or mapping")


def _kwargs_text(value: Any, key: str) -> str:
    """A mapping (or its YAML / JSON text) -> canonical JSON text; '' for none."""
    if isinstance(value, str):
        try:
            value = load_yaml(value) if value.strip() else None
        except (yaml.YAMLError, YamlTooLarge) as exc:
            raise ConfigError(f"{key}: cannot parse {_short(value)}: {' '.join(str(exc).split())[:200]}") from None
    if value is None or value == {}:
        return ""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: expected a mapping such as {{dim: 36, n_blocks: 6}}, got {_short(value)}")
    bad = [k for k in value if not (isinstance(k, str) and k.isidentifier())]
    if bad:
        raise ConfigError(f"{key}: {_short(bad[0])} is not an argument name")
    return json.dumps(_plain_value(value, key), sort_keys=True)


def kwargs_of(text: str) -> dict[str, Any]:
    """The mapping a ``KwargsText`` setting holds."""
    return json.loads(text) if text else {}


_TEXT_CHECKS = {ArchText: _arch_text, KwargsText: _kwargs_text}


def _check(value: Any, tp: Any, key: str) -> Any:
    """Return ``value`` converted to ``tp`` (int -> float, list -> tuple) or raise ConfigError."""
    if tp in _TEXT_CHECKS:
        return _TEXT_CHECKS[tp](value, key)
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if isinstance(value, bool) and value not in choices:
            value = "on" if value else "off"  # YAML 1.1 reads a bare on/off (train.compile=off) as a boolean
        if value not in choices:
            raise ConfigError(f"{key}: {_short(value)} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            value = [value]  # a single value stands for a one-element tuple
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {_short(value)}")
        return tuple(_check(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value))
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _check(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"{key}: {_short(value)} is not {' or '.join(_type_name(a) for a in typing.get_args(tp))}")
    if tp is type(None):
        if value is not None:
            raise ConfigError(f"{key}: expected null, got {_short(value)}")
        return None
    if dataclasses.is_dataclass(tp):  # an entry of a list of sections (train.phases)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping of settings, got {_short(value)}")
        return _merge(tp(), value, f"{key}.")
    if tp is float and isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
        return float(value)  # YAML 1.1 reads 2e-4 (no dot) as a string, also inside lists and mappings
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)  # `run=1` or a tile spec like `0` is still a name
    if tp is str and isinstance(value, bool):
        raise ConfigError(f"{key}: expected str, got {value} (YAML reads a bare yes / no / on / off / true / false "
                          f"as a boolean: quote the name, e.g. {key}='{'on' if value else 'off'}')")
    if tp in (int, float, str, bool) and (type(value) is not tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {_short(value)}")
    return value


def _type_name(tp: Any) -> str:
    """``int``, ``'auto'``: a type of a union as an error message names it."""
    if typing.get_origin(tp) is Literal:
        return " or ".join(map(repr, typing.get_args(tp)))
    return getattr(tp, "__name__", str(tp))


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def _unknown(key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return ConfigError(f"unknown config key {key!r}{hint}")


def all_keys(cls: type = Config, prefix: str = "") -> list[str]:
    """Every dotted key of the schema."""
    keys = []
    for f in dataclasses.fields(cls):
        tp = _hints(cls)[f.name]
        if dataclasses.is_dataclass(tp):
            keys += all_keys(tp, f"{prefix}{f.name}.")
        else:
            keys.append(f"{prefix}{f.name}")
    return keys


def _merge(obj: Any, values: dict[str, Any], prefix: str) -> Any:
    """A copy of dataclass ``obj`` with ``values`` (a nested dict) applied and type-checked."""
    cls = type(obj)
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    changes = {}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            raise _unknown(key, [f"{prefix}{n}" for n in sorted(names)] + all_keys())
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise ConfigError(f"{key}: expected a mapping of settings, got {_short(value)}")
            changes[name] = _merge(getattr(obj, name), value, f"{key}.")
        else:
            changes[name] = _check_bounds(_check(value, tp, key), _fields(cls)[name], key)
    return dataclasses.replace(obj, **changes)


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(cls)}


_BOUND_TEXT = {"ge": ">=", "gt": ">", "le": "<="}
_BOUND_OK = {"ge": lambda v, b: v >= b, "gt": lambda v, b: v > b, "le": lambda v, b: v <= b}


def _check_bounds(value: Any, f: dataclasses.Field, key: str) -> Any:
    """A value outside the field's declared bounds is a ConfigError naming the key and the bound; a list
    setting's bounds hold for each of its values (``infer.window_weights[1]=inf``)."""
    if isinstance(value, tuple):
        for i, item in enumerate(value):
            _check_number(item, f.metadata.get("bounds", {}), f"{key}[{i}]")
        return value
    return _check_number(value, f.metadata.get("bounds", {}), key)


def _check_number(value: Any, bounds: dict[str, float], key: str) -> Any:
    if isinstance(value, float) and not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise ConfigError(f"{key}={value} is not a finite float32 number" if value == value else
                          f"{key}: nan is not a number")
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return value
    for kind, limit in bounds.items():
        if not _BOUND_OK[kind](value, limit):
            raise ConfigError(f"{key}={_short(value)} must be {_BOUND_TEXT[kind]} {_bound(limit)}")
    if isinstance(value, int) and abs(value) > INT64_MAX:  # numpy / torch would overflow
        raise ConfigError(f"{key}={_short(value)} does not fit a 64-bit integer")
    return value


def _bound(limit: float) -> str:
    return str(limit) if isinstance(limit, int) else f"{limit:g}"


def bounds_text(f: dataclasses.Field) -> str:
    """``'>= 1'``, ``'>= 0, <= 512'``: a field's bounds for --help."""
    return ", ".join(f"{_BOUND_TEXT[k]} {_bound(v)}" for k, v in f.metadata.get("bounds", {}).items())


def parse_override(text: str) -> tuple[str, Any]:
    """``'train.learning_rate=2e-4'`` -> ``('train.learning_rate', 0.0002)`` (YAML scalars)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except YamlTooLarge as exc:
        raise ConfigError(f"{key}: {exc}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{key}: cannot parse {_short(raw)}: {exc}") from None
    # YAML 1.1 reads 2e-4 as a string (no dot); take it as the float the user meant.
    if isinstance(value, str) and _FLOAT.fullmatch(raw.strip()):
        value = float(raw)
    return key.strip(), value


_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _nest(flat: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in flat.items():
        parts = key.split(".")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is a setting, not a section")
        node[parts[-1]] = value
    return nested


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Defaults, then the YAML file, then ``key=value`` overrides, each checked against the schema."""
    cfg = Config()
    if path:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            values = load_yaml(path.read_text()) or {}
        except YamlTooLarge as exc:
            raise ConfigError(f"{path}: {exc}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(values, dict):
            raise ConfigError(f"{path}: expected a mapping at the top level")
        try:
            cfg = _merge(cfg, values, "")
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    flat = dict(parse_override(o) for o in overrides)
    return _merge(cfg, _nest(flat), "")


def with_overrides(cfg: Config, **flat: Any) -> Config:
    """``with_overrides(cfg, **{"infer.tta": 1})``: a checked copy, for code that varies settings."""
    return _merge(cfg, _nest(flat), "")


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain nested dict (tuples as lists) for YAML and checkpoints."""
    def plain(v: Any) -> Any:
        if isinstance(v, tuple):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v
    return plain(dataclasses.asdict(cfg))


def from_dict(values: dict[str, Any]) -> Config:
    """Inverse of ``to_dict`` (checked, so an old file with a removed key is an error)."""
    return _merge(Config(), values, "")


def save_config(cfg: Config, path: str | Path, sections: tuple[str, ...] = ()) -> Path:
    """Write the resolved config (all of it, or the top level plus ``sections``) atomically."""
    from pipeline.core.files import atomic_write

    values = to_dict(cfg)
    if sections:
        top = {k: v for k, v in values.items() if not isinstance(v, dict)}
        values = {**top, **{s: values[s] for s in sections}}
    text = yaml.safe_dump(values, sort_keys=False)
    with atomic_write(path) as tmp:
        Path(tmp).write_text(text)
    return Path(path)


def describe(section: str) -> list[tuple[str, str, str]]:
    """``(key, default, help)`` rows of one section (or ``''`` for the top level) for ``--help``."""
    rows = []
    if section:
        cls = _hints(Config)[section]
        prefix = f"{section}."
    else:
        cls, prefix = Config, ""
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(_hints(cls)[f.name]):
            continue
        default = f.default if f.default is not dataclasses.MISSING else None
        limits = bounds_text(f)
        text = f.metadata.get("help", "") + (f" ({limits})" if limits else "")
        rows.append((f"{prefix}{f.name}", repr(default), text))
    return rows

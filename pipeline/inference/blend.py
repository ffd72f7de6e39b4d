"""Blends of several models: which members, their per-image statistics, the fitted weights, applying them.

A blend is ``sum_j w_j * clamp(sr_j)`` over the float SR predictions of its members (each member a run,
its last K checkpoints averaged, or a weights file, run with the ``infer.*`` settings), clamped to
[0, 1] each (as each member's own submission would be), with weights ``w_j >= 0`` summing to 1, rounded
to uint8 once at the end as every prediction is. Clamping before weighting keeps the blend linear in
the weights (a convex mix of values in [0, 1] needs no clamp), so pixel statistics describe it exactly.

Fitting works from per-image sufficient statistics, so memory does not grow with the validation fold:
for image i with members' residuals ``e_j = 255 clamp(sr_j) - hr`` (8-bit levels, every value)
the residual Gram ``R_i[j,k] = sum e_j e_k``. Because the weights sum to 1, the blend's residual is
``sum_j w_j e_j`` and its float MSE is ``w' R_i w / n_i`` (n_i values), for any ``w``.

- ``lstsq``: least squares on pixels, the mean over images of that MSE minimised over the simplex,
  exactly: with ``R`` the mean of ``R_i / n_i``, ``min_{v >= 0} v'Rv/2 - 1'v`` is a non-negative least
  squares problem (``scipy.optimize.nnls`` on a square root of R) whose solution scaled to sum 1 is the
  simplex minimiser (their KKT conditions coincide, multipliers scaled by the minimum ``w'Rw``).
- ``greedy``: forward selection with replacement (a member may be picked again) on the mean per-image
  PSNR, the contest's own figure; the weights are the pick counts over ``blend.greedy_rounds``.

The contest scores the uint8 rounded blend, which no statistic summarises (rounding is not linear in
w), and weights fitted after the pass cannot be scored on pixels that are gone without running every
member again. Members and the equal mean are scored exactly (``score_psnr`` on the rounded image)
while their predictions are in memory; a fitted blend's per-image MSE is its float MSE (exact) plus
the rounding term measured on the same image for the equal mean (``mse_uint8 - mse_float``, about
1/12 level^2 where residuals spread over several levels). The rounding term varies with the weights
where residuals sit within a level of zero (flat, exactly predicted regions), and it is not smooth near
a member alone (interpolating it from the members' own terms measured worse), so a fitted blend's PSNR
is an estimate: measured on 6 demo images of 512^2 (bicubic and two edsr-nano runs, 6 weight vectors)
within 0.005 dB per image and 0.0006 dB on the mean, within 0.003 dB on 256^2 photos (tests/test_blend.py);
``infer blend.name=NAME infer.split=val`` scores the applied blend exactly. A blend whose weights are
one member, or all equal, gets the exact scores.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml
from scipy.optimize import nnls
from torch import nn

from pipeline.core.config import Config, with_overrides
from pipeline.core.errors import UserError
from pipeline.core.images import to_uint8
from pipeline.core.layout import OutputLayout, check_run
from pipeline.core.metrics import score_psnr
from pipeline.inference.predict import Settings, Timing, iter_predict, load_models

METHODS = ("lstsq", "greedy")
MEMBER_OPTIONS = ("last_k", "checkpoint", "ema")
PEAK = 255.0**2


# ---------------------------------------------------------------------------------------------
# Members: `RUN`, `RUN:last_k=3`, `RUN:checkpoint=last:ema=false`, `weights=FILE`.


@dataclass(frozen=True)
class Member:
    """One member of a blend, as ``blend.members`` names it (``spec`` is its name in every table)."""

    spec: str
    run: str = ""
    weights: str = ""
    last_k: int = 0
    checkpoint: str = ""  # '' = infer.checkpoint
    ema: bool | None = None  # None = infer.ema


def parse_member(spec: str) -> Member:
    """A ``blend.members`` entry -> ``Member``; a malformed one is a one-line error naming it."""
    text = str(spec).strip()
    where = f"blend.members: {text!r}"
    if text.startswith("weights="):
        path = text[len("weights="):]
        if not path:
            raise UserError(f"{where}: weights= needs a file")
        return Member(text, weights=path)
    run, *options = text.split(":")
    if not run:
        raise UserError(f"{where}: expected RUN, RUN:last_k=K, RUN:checkpoint=best|last, RUN:ema=false "
                        "or weights=FILE")
    check_run(run)
    values: dict[str, object] = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in MEMBER_OPTIONS:
            raise UserError(f"{where}: unknown option {option!r} (options: {', '.join(MEMBER_OPTIONS)})")
        if key == "last_k":
            if not value.isdigit() or int(value) < 1:
                raise UserError(f"{where}: last_k must be a whole number >= 1")
            values[key] = int(value)
        elif key == "checkpoint":
            if value not in ("best", "last"):
                raise UserError(f"{where}: checkpoint must be best or last")
            values[key] = value
        else:
            if value not in ("true", "false"):
                raise UserError(f"{where}: ema must be true or false")
            values[key] = value == "true"
    return Member(text, run=run, **values)  # type: ignore[arg-type]


def parse_members(specs: Sequence[str]) -> list[Member]:
    """Every entry parsed; at least two, none twice."""
    members = [parse_member(s) for s in specs]
    if len(members) < 2:
        raise UserError(f"blend.members: a blend needs at least 2 members (got {len(members)}), "
                        "e.g. blend.members=[run_a,run_b:last_k=3]")
    seen = set()
    for m in members:
        if m.spec in seen:
            raise UserError(f"blend.members: {m.spec!r} appears twice")
        seen.add(m.spec)
    return members


def member_config(cfg: Config, member: Member) -> Config:
    """The config whose ``load_models`` gives this member: its run (and options) or its weights file,
    with ``cfg``'s inference settings and nothing else averaged in."""
    if cfg.model.name == "bicubic":
        raise UserError("blend members are runs or weights files; drop model.name=bicubic")
    overrides: dict[str, object] = {"infer.runs": (), "infer.last_k": member.last_k, "model.pretrained": "",
                                    "model.weights": member.weights}
    if member.run:
        overrides["run"] = member.run
    if member.checkpoint:
        overrides["infer.checkpoint"] = member.checkpoint
    if member.ema is not None:
        overrides["infer.ema"] = member.ema
    return with_overrides(cfg, **overrides)


# ---------------------------------------------------------------------------------------------
# Running several members on the same images.


def iter_members(members: Sequence[Sequence[nn.Module]], items: Iterable[tuple[str, np.ndarray]],
                 settings: Settings, device: torch.device, timings: Sequence[Timing],
                 total_images: int | None = None) -> Iterator[tuple[str, list[np.ndarray]]]:
    """Yield ``(name, [sr of each member])`` per ``(name, lr)``: each member's ``iter_predict`` in turn
    on the same image, so only one image's predictions are ever in memory."""
    queues: list[deque[tuple[str, np.ndarray]]] = [deque() for _ in members]

    def feed(queue: deque[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
        while queue:  # the driver below puts one image in before it asks for one prediction
            yield queue.popleft()

    streams = [iter_predict(models, feed(q), settings, device, t, total_images)
               for models, q, t in zip(members, queues, timings)]
    try:
        for name, lr in items:
            srs = []
            for queue, stream in zip(queues, streams):
                queue.append((name, lr))
                got, sr = next(stream)
                if got != name:
                    raise RuntimeError(f"member prediction for {got!r} while blending {name!r}")
                srs.append(sr)
            yield name, srs
    finally:
        for stream in streams:
            stream.close()


def merge_timings_into(timing: Timing, parts: Sequence[Timing]) -> None:
    """``timing`` = the members' timings on the same images: their work adds up, the images do not."""
    timing.images = max(t.images for t in parts)
    timing.seconds = sum(t.seconds for t in parts)
    timing.tiles = sum(t.tiles for t in parts)
    timing.compile_seconds = sum(t.compile_seconds for t in parts)
    timing.fp32_fallbacks = sorted({n for t in parts for n in t.fp32_fallbacks})
    timing.precision = ",".join(dict.fromkeys(t.precision for t in parts))
    timing.compile = ",".join(dict.fromkeys(t.compile for t in parts))
    timing.batch = parts[0].batch


def iter_blend(members: Sequence[Sequence[nn.Module]], weights: Sequence[float],
               items: Iterable[tuple[str, np.ndarray]], settings: Settings, device: torch.device, timing: Timing,
               total_images: int | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield ``(name, sum_j w_j clamp(sr_j))`` per ``(name, lr)``: float in [0, 1], rounded when written."""
    parts = [Timing(device=timing.device, precision="") for _ in members]
    for name, srs in iter_members(members, items, settings, device, parts, total_images):
        sr = sum(float(w) * np.clip(s, 0, 1) for w, s in zip(weights, srs))
        merge_timings_into(timing, parts)
        yield name, np.asarray(sr, dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# Per-image statistics and the fits.


def residual_gram(srs: Sequence[np.ndarray], hr: np.ndarray, rows: int = 256) -> np.ndarray:
    """(M,M) float64 ``sum e_j e_k`` over every value, ``e_j = 255 sr_j - hr`` in 8-bit levels."""
    gram = np.zeros((len(srs), len(srs)))
    for top in range(0, hr.shape[0], rows):  # a band of rows at a time: memory of M float64 bands
        target = hr[top:top + rows].reshape(-1).astype(np.float64)
        e = np.stack([s[top:top + rows].reshape(-1) for s in srs], axis=1)  # M x (h,W,3) -> (h*W*3, M)
        e = e.astype(np.float64) * 255.0 - target[:, None]
        gram += e.T @ e
    return gram


def mse_of_psnr(psnr: np.ndarray) -> np.ndarray:
    """The MSE (8-bit levels^2) a PSNR stands for; an infinite PSNR is 0."""
    return PEAK / np.power(10.0, np.asarray(psnr, dtype=np.float64) / 10)


def psnr_of_mse(mse: np.ndarray) -> np.ndarray:
    """10 log10(255^2 / MSE) per entry; an MSE <= 0 is an infinite PSNR, as the metric gives."""
    mse = np.asarray(mse, dtype=np.float64)
    with np.errstate(divide="ignore"):
        return np.where(mse > 0, 10 * np.log10(PEAK / np.maximum(mse, 1e-300)), math.inf)


@dataclass
class FoldStats:
    """Everything the fits and scores need about the members on the validation fold, per image."""

    members: list[str]
    names: list[str] = field(default_factory=list)
    grams: list[np.ndarray] = field(default_factory=list)  # per image (M,M): residual Gram
    values: list[int] = field(default_factory=list)  # per image: values scored (H*W*3)
    member_psnr: list[list[float]] = field(default_factory=list)  # per image, per member: exact, uint8
    mean_psnr: list[float] = field(default_factory=list)  # per image: the equal mean's, exact, uint8

    def add(self, name: str, srs: Sequence[np.ndarray], hr: np.ndarray) -> None:
        """One image: every member's float prediction (clamped here, as the blend clamps it) and the uint8
        ground truth."""
        for spec, sr in zip(self.members, srs):
            if sr.shape != hr.shape:
                raise UserError(f"{name}: member {spec!r} predicts {sr.shape[1]}x{sr.shape[0]}, the HR is "
                                f"{hr.shape[1]}x{hr.shape[0]}")
        srs = [np.clip(sr, 0, 1) for sr in srs]
        self.names.append(name)
        self.grams.append(residual_gram(srs, hr))
        self.values.append(hr.size)
        self.member_psnr.append([score_psnr(to_uint8(sr), hr) for sr in srs])
        self.mean_psnr.append(score_psnr(to_uint8(sum(srs) / len(srs)), hr))

    def arrays(self) -> FoldArrays:
        return FoldArrays(self.members, self.names, np.stack(self.grams), np.asarray(self.values, np.float64),
                          np.asarray(self.member_psnr, np.float64), np.asarray(self.mean_psnr, np.float64))


@dataclass(frozen=True)
class FoldArrays:
    """``FoldStats`` as arrays: gram (N,M,M), values (N,), member_psnr (N,M), mean_psnr (N,)."""

    members: list[str]
    names: list[str]
    gram: np.ndarray
    values: np.ndarray
    member_psnr: np.ndarray
    mean_psnr: np.ndarray

    @property
    def size(self) -> int:
        return len(self.names)

    def float_mse(self, w: np.ndarray) -> np.ndarray:
        """(N,) MSE of the unrounded blend ``w`` per image."""
        return np.einsum("j,ijk,k->i", w, self.gram, w) / self.values

    @property
    def rounding(self) -> np.ndarray:
        """(N,) what rounding and clamping added to the equal mean's MSE, per image (levels^2)."""
        m = len(self.members)
        return mse_of_psnr(self.mean_psnr) - self.float_mse(np.full(m, 1.0 / m))

    def psnr(self, w: np.ndarray) -> np.ndarray:
        """(N,) contest PSNR of blend ``w`` per image: exact for one member or the equal mean, else
        the float MSE plus the equal mean's rounding term (see the module docstring)."""
        w = np.asarray(w, dtype=np.float64)
        m = len(self.members)
        if np.allclose(w, 1.0 / m, rtol=0, atol=1e-12):
            return self.mean_psnr.copy()
        single = np.flatnonzero(np.abs(w - 1) <= 1e-12)
        if single.size == 1 and np.abs(np.delete(w, single)).max() <= 1e-12:
            return self.member_psnr[:, single[0]].copy()
        return psnr_of_mse(self.float_mse(w) + self.rounding)

    def subset(self, idx: np.ndarray) -> FoldArrays:
        return FoldArrays(self.members, [self.names[i] for i in idx], self.gram[idx], self.values[idx],
                          self.member_psnr[idx], self.mean_psnr[idx])


def fit_lstsq(stats: FoldArrays) -> np.ndarray:
    """Weights >= 0 summing to 1 that minimise the mean over images of the blend's float MSE (exact)."""
    r = (stats.gram / stats.values[:, None, None]).mean(axis=0)  # (N,M,M) -> (M,M): mean per-value Gram
    m = r.shape[0]
    if not np.trace(r) > 0:  # every member exact on every pixel: any blend is
        return np.full(m, 1.0 / m)
    r = r / (np.trace(r) / m) + 1e-12 * np.eye(m)  # scale-free; the ridge keeps exact mixtures solvable
    lower = np.linalg.cholesky(r)  # r = L L'
    # v'Rv/2 - 1'v = ||L'v - L^-1 1||^2 / 2 + const: a non-negative least squares problem in v.
    v, _residual = nnls(lower.T, np.linalg.solve(lower, np.ones(m)), maxiter=50 * m)
    return _normalised(v)


def fit_greedy(stats: FoldArrays, rounds: int) -> np.ndarray:
    """Forward selection with replacement: ``rounds`` picks, each the member whose addition gives the
    highest mean per-image PSNR (ties: the first member); the weights are the pick counts."""
    m = len(stats.members)
    counts = np.zeros(m)
    for r in range(rounds):
        best, best_score = 0, -math.inf
        for j in range(m):
            trial = counts.copy()
            trial[j] += 1
            score = float(np.mean(stats.psnr(trial / (r + 1))))
            if score > best_score:
                best, best_score = j, score
        counts[best] += 1
    return counts / rounds


def fit(stats: FoldArrays, method: str, rounds: int) -> np.ndarray:
    if method == "lstsq":
        return fit_lstsq(stats)
    if method == "greedy":
        return fit_greedy(stats, rounds)
    raise UserError(f"blend.method={method!r}: choose {' or '.join(METHODS)}")


def _normalised(w: np.ndarray) -> np.ndarray:
    w = np.clip(np.asarray(w, dtype=np.float64), 0, None)
    w[w < 1e-9 * w.sum()] = 0.0  # numerically zero: the member is left out (and not run by infer)
    return w / w.sum()


def halves(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two disjoint halves of ``range(n)`` drawn by ``seed``, each sorted (n >= 2)."""
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[: n // 2]), np.sort(order[n // 2:])


def cross_fitted_psnr(stats: FoldArrays, method: str, rounds: int, seed: int,
                      ) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
    """(N,) per-image PSNR of the blend fitted on the other half of the images, the two halves'
    weights, and each image's half (0 or 1): an honest estimate of the blend on unseen images."""
    if stats.size < 2:
        raise UserError(f"cross-fitting needs at least 2 validation images (the fold has {stats.size})")
    out = np.empty(stats.size)
    half_of = np.empty(stats.size, dtype=int)
    parts = halves(stats.size, seed)
    weights = []
    for h, (fit_on, score_on) in enumerate(((parts[0], parts[1]), (parts[1], parts[0]))):
        w = fit(stats.subset(fit_on), method, rounds)
        out[score_on] = stats.psnr(w)[score_on]
        half_of[fit_on] = h
        weights.append(w)
    return out, weights, half_of


# ---------------------------------------------------------------------------------------------
# blend.yaml, as infer reads it.


@dataclass(frozen=True)
class BlendSpec:
    """What ``infer blend.name=NAME`` applies: the members and their weights (and the settings fitted with)."""

    name: str
    members: tuple[str, ...]
    weights: tuple[float, ...]
    settings: dict[str, object] = field(default_factory=dict)


def read_blend(path: Path, name: str) -> BlendSpec:
    """``submit/<name>/blend.yaml`` checked: members and weights of one length, weights >= 0 summing to 1."""
    if not path.is_file():
        raise UserError(f"{path}: not found; fit the blend first: python -m pipeline blend --data DIR "
                        f"blend.name={name} blend.members=[run_a,run_b]")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise UserError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(values, dict) or not isinstance(values.get("members"), list) \
            or not isinstance(values.get("weights"), list):
        raise UserError(f"{path}: expected lists 'members' and 'weights' (written by the blend stage)")
    members = tuple(str(m) for m in values["members"])
    # Numbers only: float() would also take true / false (YAML's booleans) as 1 / 0, and strings.
    if not all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in values["weights"]):
        raise UserError(f"{path}: weights must be numbers (got {str(values['weights'])[:80]})")
    weights = tuple(float(w) if abs(w) < 1e300 else math.inf for w in values["weights"])  # (a 400-digit int)
    if len(members) != len(weights) or not members:
        raise UserError(f"{path}: {len(members)} member(s) but {len(weights)} weight(s)")
    if any(not math.isfinite(w) or w < 0 for w in weights) or abs(sum(weights) - 1) > 1e-6:
        raise UserError(f"{path}: weights must be >= 0 and sum to 1 (got {list(weights)})")
    settings = values.get("settings") if isinstance(values.get("settings"), dict) else {}
    return BlendSpec(name, members, weights, settings)


COMPUTING = ("tta", "tile", "stride", "tile_blend", "pad", "margin", "merge", "precision")  # change the pixels


def blend_predictions(cfg: Config, settings: Settings, device: torch.device, timing: Timing,
                      items: Iterable[tuple[str, np.ndarray]], total_images: int | None = None,
                      ) -> tuple[Iterator[tuple[str, np.ndarray]], str]:
    """``infer blend.name=NAME``: the blended predictions of ``items`` and a description for tables.
    Members of weight 0 are not run. Settings other than those the blend was fitted with are used
    (infer.* always says how infer runs) and named in a note."""
    spec = read_blend(OutputLayout(Path(cfg.paths.submit), cfg.blend.name).blend_yaml, cfg.blend.name)
    used = [(parse_member(m), w) for m, w in zip(spec.members, spec.weights) if w > 0]
    models = [load_models(member_config(cfg, m))[0] for m, _w in used]
    now = dataclasses.asdict(settings)
    changed = [f"infer.{k}={now[k]} (fitted with {spec.settings[k]})" for k in COMPUTING
               if k in spec.settings and spec.settings[k] != now[k]]
    if changed:
        print(f"note: blend {spec.name} applied with other settings than it was fitted with: {', '.join(changed)}")
    desc = f"blend {spec.name}: " + " + ".join(f"{w:.3f} {m.spec}" for m, w in used)
    return iter_blend(models, [w for _m, w in used], items, settings, device, timing, total_images), desc

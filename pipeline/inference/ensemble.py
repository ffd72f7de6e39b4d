"""Self-ensemble over the dihedral group and averaging over several models.

Transform ``k`` (0..7) of an image batch: flip the width axis if bit 0 is set, flip the height
axis if bit 1 is set, then transpose height and width if bit 2 is set. Its inverse undoes the
steps in reverse order. The ways in use are the first 1, 2, 4 or 8 transforms: 1 = identity,
2 = + horizontal flip, 4 = all flips (shapes kept), 8 = the whole group (with transposes).

The transformed copies go through the model as ONE batch per output shape: square inputs
(tiles) make a single call of ways x N images; a non-square whole image makes two calls, one
for the transforms that keep its shape and one for the transposed ones. Outputs are mapped back
and merged in fp32 before any clamping (rounding happens once, when the image is written).

Merge rules (``merge``): ``mean`` (running sum, memory of one output) or ``median`` per pixel, as
the reference contest's winner merged its 8 ways (``numpy.median`` semantics: the mean of the two
middle values for an even count). The median stacks the ways' outputs: ways x one output in memory.
A multi-model ensemble merges each model's ensemble first, then the models with the same rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Forward = Callable[[torch.Tensor], torch.Tensor]  # (N,C,h,w) -> (N,C,sh,sw)

WAYS = (1, 2, 4, 8)
MERGES = ("mean", "median")


def median(outputs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-element median of equally shaped tensors; an even count gives the mean of the middle two."""
    stacked = torch.stack(list(outputs))  # K x (N,C,H,W) -> (K,N,C,H,W)
    k = stacked.shape[0]
    if k == 1:
        return stacked[0]
    ordered = stacked.sort(dim=0).values
    return ordered[k // 2] if k % 2 else (ordered[k // 2 - 1] + ordered[k // 2]) / 2


def _check_merge(merge: str) -> None:
    if merge not in MERGES:
        raise ValueError(f"merge must be one of {MERGES}, got {merge!r}")


def dihedral(x: torch.Tensor, k: int) -> torch.Tensor:
    """Transform ``k`` of a (..., H, W) tensor (see the module docstring for the numbering)."""
    if k & 1:
        x = x.flip(-1)
    if k & 2:
        x = x.flip(-2)
    if k & 4:
        x = x.transpose(-2, -1)  # (..., H, W) -> (..., W, H)
    return x


def dihedral_inverse(x: torch.Tensor, k: int) -> torch.Tensor:
    """Undo ``dihedral(., k)``: each step is its own inverse, applied in reverse order."""
    if k & 4:
        x = x.transpose(-2, -1)  # (..., W, H) -> (..., H, W)
    if k & 2:
        x = x.flip(-2)
    if k & 1:
        x = x.flip(-1)
    return x


def _calls(batch: torch.Tensor, per_call: int) -> list[torch.Tensor]:
    """``batch`` split into equal calls of at most ``per_call`` images (0 = one call): the largest divisor
    of its length, so a compiled model sees one shape."""
    n = batch.shape[0]
    if per_call <= 0 or per_call >= n:
        return [batch]
    size = max(d for d in range(1, per_call + 1) if n % d == 0)
    return list(batch.split(size))


def self_ensemble(fn: Forward, x: torch.Tensor, ways: int, merge: str = "mean", per_call: int = 0) -> torch.Tensor:
    """Mean (or median) of ``fn`` over ``ways`` dihedral transforms of ``x`` (N,C,h,w), each mapped back; fp32.

    ``per_call`` caps the images of one call of ``fn`` (0 = every transform of a shape in one call): a
    whole 512^2 image x 8 ways runs as 8 calls of one image instead of one of 8 (an eighth of the memory)."""
    if ways not in WAYS:
        raise ValueError(f"ways must be one of {WAYS}, got {ways}")
    _check_merge(merge)
    if ways == 1:
        parts = [fn(part).float() for part in _calls(x, per_call)]
        return parts[0] if len(parts) == 1 else torch.cat(parts)
    n = x.shape[0]
    square = x.shape[-2] == x.shape[-1]
    # Transforms with bit 2 transpose the input; they share a shape with the others only if square.
    groups = [list(range(ways))] if square else [[k for k in range(ways) if not k & 4],
                                                 [k for k in range(ways) if k & 4]]
    total: torch.Tensor | None = None
    kept: dict[int, list[torch.Tensor]] = {}  # median: every way's output, mapped back, in sample order
    for group in groups:
        if not group:
            continue
        batch = torch.cat([dihedral(x, k) for k in group])  # (G*N,C,h,w), G = transforms in the group
        done = 0  # images of ``batch`` already through fn: image i is transform group[i // n] of sample i % n
        for part in _calls(batch, per_call):
            out = fn(part).float()  # (P,C,sh,sw)
            i = 0
            while i < out.shape[0]:  # runs of one transform: mapped back and merged at once
                k, first = group[(done + i) // n], (done + i) % n
                count = min(n - first, out.shape[0] - i)
                back = dihedral_inverse(out[i:i + count], k)  # (count,C,sh,sw): samples first..first+count-1
                if merge == "median":
                    kept.setdefault(k, []).append(back)
                elif total is None and count == n:
                    total = back  # the first way: its output is the running sum (no copy of a 2048^2 image)
                else:
                    if total is None:
                        total = torch.zeros(n, *back.shape[1:], dtype=back.dtype, device=back.device)
                    total[first:first + count] += back
                i += count
            done += out.shape[0]
    if merge == "median":
        return median([torch.cat(kept[k]) for k in sorted(kept)])
    assert total is not None
    return total / ways


def average_models(fns: Sequence[Forward], x: torch.Tensor, ways: int = 1, merge: str = "mean",
                   per_call: int = 0) -> torch.Tensor:
    """Each model's ``ways``-fold self-ensemble of ``x`` (``per_call`` images per call at most), merged over
    the models by the same rule; fp32."""
    if not fns:
        raise ValueError("average_models needs at least one model")
    _check_merge(merge)
    if merge == "median":
        return median([self_ensemble(fn, x, ways, merge, per_call) for fn in fns])
    total = self_ensemble(fns[0], x, ways, per_call=per_call)
    for fn in fns[1:]:
        total = total + self_ensemble(fn, x, ways, per_call=per_call)
    return total / len(fns)

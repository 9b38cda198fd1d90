"""The summary pass of a data source: column statistics of ``x`` and ``y`` and the NaN check.

:meth:`pyromoe.core.sources.Source.summary` runs it once per source (cached), as the first pass
any estimator makes: :func:`summary_sums` per chunk, :func:`combine_summaries` over consecutive
chunks (and Dask blocks) in row order, :func:`summary_from_sums` at the end. Out-of-core data are
checked for NaN and infinite values here rather than by an extra read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "PILOT_ROWS",
    "Summary",
    "combine_summaries",
    "pilot_shifts",
    "summary_from_sums",
    "summary_sums",
]

_F64 = torch.float64
#: The first rows, read before the pass, that fix the shifts guarding the sums of squares.
PILOT_ROWS = 1024


@dataclass(frozen=True)
class Summary:
    """Column statistics of a source (float64, on the source's device).

    Attributes
    ----------
    num_rows : int
    x_mean, x_sd, x_absmax : Tensor (d,)
        ``x_sd`` uses the n - 1 denominator (``torch.std``'s default).
    y_mean, y_sd, y_absmax : float
    y_first : float
        ``y`` of the first row (for messages about a constant ``y``).
    """

    num_rows: int
    x_mean: torch.Tensor
    x_sd: torch.Tensor
    x_absmax: torch.Tensor
    y_mean: float
    y_sd: float
    y_absmax: float
    y_first: float


def summary_sums(x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, y_shift: float):
    """Partial sums of one chunk for :meth:`pyromoe.core.sources.Source.summary` (float64).

    Few passes over the chunk: the column sums and sums of squares (of ``x - shift``, the
    subtraction skipped when the shift is zero), the column minima and maxima in one pass. NaN or
    infinite values make those sums non-finite, so the row-by-row finiteness check runs only then
    (or when a square overflowed).
    """
    x64 = x.to(_F64)
    xs = x64 - shift if bool(shift.any()) else x64
    ys = y.to(_F64) - y_shift
    sums = xs.sum(0)
    squares = torch.linalg.vector_norm(xs, dim=0) ** 2
    if x.shape[0]:
        low, high = torch.aminmax(x, dim=0)
        peak = torch.maximum(low.abs(), high.abs()).to(_F64)
    else:
        peak = torch.zeros(x.shape[1], dtype=_F64, device=x.device)
    y_stats = torch.stack([ys.sum(), ys.pow(2).sum(), y.abs().max().to(_F64)])
    first_bad = math.inf
    if not bool(torch.isfinite(torch.cat([sums, squares, peak, y_stats])).all()):
        finite = torch.isfinite(x).all(dim=1) & torch.isfinite(y)
        bad = (~finite).nonzero()
        first_bad = float(bad[0, 0]) if bad.numel() else math.inf
    return (
        torch.tensor(float(x.shape[0]), dtype=_F64),
        sums,
        squares,
        peak,
        y_stats,
        torch.tensor(first_bad, dtype=_F64),
    )


def combine_summaries(total, part):
    """Two partial results of :func:`summary_sums` for consecutive rows, in row order: counts
    and sums added, maxima kept, and the first non-finite row counted from the first part."""
    if total is None:
        return part
    if part is None:
        return total
    count, sums, squares, peak, y_stats, bad = total
    first_bad = bad if math.isfinite(float(bad)) else count + part[5]
    return (
        count + part[0],
        sums + part[1],
        squares + part[2],
        torch.maximum(peak, part[3]),
        torch.stack(
            [y_stats[0] + part[4][0], y_stats[1] + part[4][1], y_stats[2].maximum(part[4][2])]
        ),
        first_bad,
    )


def pilot_shifts(pilot_x: torch.Tensor, pilot_y: torch.Tensor) -> tuple[torch.Tensor, float]:
    """The shifts subtracted from ``x`` and ``y`` in the pass, from the first rows.

    The shift guards the sums of squares against cancellation when a column's mean is large
    against its spread; otherwise it is zero (it would only cost a copy of every chunk).
    """
    pilot = pilot_x.to(_F64)
    shift = pilot.mean(0)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    if not bool((shift.abs() > pilot.std(0, correction=0)).any()):
        shift = torch.zeros_like(shift)
    y_shift = float(pilot_y.to(_F64).mean())
    return shift, (y_shift if math.isfinite(y_shift) else 0.0)


def summary_from_sums(sums, shift: torch.Tensor, y_shift: float, y_first: float, device) -> Summary:
    """The :class:`Summary` from the pass's combined sums (NaN-free data)."""
    count, sx, sxx, xmax, ysums, _ = sums
    n = float(count)
    mean = sx / n
    var = (sxx - n * mean**2).clamp_min(0) / max(n - 1, 1)
    y_mean = float(ysums[0]) / n
    y_var = max(float(ysums[1]) - n * y_mean * y_mean, 0.0) / max(n - 1, 1)  # inf, not an error
    return Summary(
        num_rows=int(n),
        x_mean=(mean + shift).to(device),
        x_sd=var.sqrt().to(device),
        x_absmax=xmax.to(device),
        y_mean=y_mean + y_shift,
        y_sd=math.sqrt(y_var),
        y_absmax=float(ysums[2]),
        y_first=y_first,
    )

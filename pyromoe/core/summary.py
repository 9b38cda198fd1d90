"""The summary pass of a data source: column statistics of ``x`` and ``y`` and the NaN check.

:meth:`pyromoe.core.sources.Source.summary` runs it once per source (cached), as the first pass
any estimator makes: :func:`summary_sums` per chunk, :func:`combine_summaries` over consecutive
chunks (and Dask blocks) in row order, :func:`summary_from_sums` at the end. Out-of-core data are
checked for NaN and infinite values here rather than by an extra read.

For ``d <= GRAM_MAX_FEATURES`` columns the pass forms the Gram of the shifted inputs,
``sum_n (x_n - shift)(x_n - shift)^T`` (its diagonal is the sums of squares the standard
deviations need), which :func:`pyromoe.core.moments.second_moments` then takes instead of forming
it again. The shift is :func:`pilot_shifts`'s, the one rule the moment passes use too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "GRAM_MAX_FEATURES",
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
#: The most columns for which the summary pass forms the Gram of the shifted ``x``. Measured
#: (float64, one thread, default chunks): at d = 50 that Gram costs about what the sums of squares
#: it replaces did, and the moment step saves a Gram pass with it; at d = 200 it is several times
#: the rest of the summary's work, a cost every caller (fit_em, fit_svi, run_nuts) would pay.
GRAM_MAX_FEATURES = 128


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
    x_shift : Tensor (d,) or None
        The shift subtracted from ``x`` in the pass (:func:`pilot_shifts`; zero unless a column's
        mean is large against its spread), exactly representable in the source's dtype.
    x_gram_shifted : Tensor (d, d) or None
        ``sum_n (x_n - x_shift)(x_n - x_shift)^T``, each chunk's product in the source's dtype
        (as the moment pass forms it), summed in float64; None when ``d > GRAM_MAX_FEATURES``.
    """

    num_rows: int
    x_mean: torch.Tensor
    x_sd: torch.Tensor
    x_absmax: torch.Tensor
    y_mean: float
    y_sd: float
    y_absmax: float
    y_first: float
    x_shift: torch.Tensor | None = None
    x_gram_shifted: torch.Tensor | None = None


def summary_sums(
    x: torch.Tensor, y: torch.Tensor, shift: torch.Tensor, y_shift: float, gram: bool = False
):
    """Partial sums of one chunk for :meth:`pyromoe.core.sources.Source.summary` (float64).

    ``xs = x - shift`` in ``x``'s dtype (the subtraction skipped when the shift is zero); the
    column sums of ``xs``; with ``gram`` the Gram ``xs^T xs`` (d, d) in ``x``'s dtype, else the
    column sums of squares of ``xs`` (d,), its diagonal; the columns' largest magnitudes
    (``|x|``'s column maxima, which NaN propagates through and an infinity reaches). NaN or
    infinite values make those sums non-finite, so the row-by-row finiteness check runs only then
    (or when a square overflowed).
    """
    xs = x - shift.to(x.dtype) if bool(shift.any()) else x
    ys = y.to(_F64) - y_shift
    sums = xs.sum(0, dtype=_F64)
    if gram:
        squares = (xs.T @ xs).to(_F64)
        diagonal = squares.diagonal()
    else:
        squares = diagonal = torch.linalg.vector_norm(xs, dim=0, dtype=_F64) ** 2
    if x.shape[0]:
        peak = x.abs().amax(0).to(_F64)
    else:
        peak = torch.zeros(x.shape[1], dtype=_F64, device=x.device)
    y_stats = torch.stack([ys.sum(), ys.pow(2).sum(), y.abs().max().to(_F64)])
    first_bad = math.inf
    if not bool(torch.isfinite(torch.cat([sums, diagonal, peak, y_stats])).all()):
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
    """Two partial results of :func:`summary_sums` for consecutive rows, in row order: counts,
    sums and sums of squares (or Grams) added, maxima kept, and the first non-finite row counted
    from the first part."""
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


def pilot_shifts(
    pilot_x: torch.Tensor, pilot_y: torch.Tensor, dtype: torch.dtype | None = None
) -> tuple[torch.Tensor, float]:
    """The shifts subtracted from ``x`` and ``y`` in the summary and moment passes, from the
    first rows (:data:`PILOT_ROWS`): ``x``'s (d,) float64, ``y``'s a float.

    ``x``'s shift is the pilot rows' column means when some column's mean exceeds its spread
    (the shift guards the sums of squares against cancellation), else zero (it would only cost a
    copy of every chunk); non-finite means count as zero. It is rounded to ``dtype`` (the
    source's, default ``pilot_x``'s), so that subtracting it in that dtype and adding it back in
    float64 use the same number.
    """
    pilot = pilot_x.to(_F64)
    shift = pilot.mean(0)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    if not bool((shift.abs() > pilot.std(0, correction=0)).any()):
        shift = torch.zeros_like(shift)
    shift = shift.to(dtype or pilot_x.dtype).to(_F64)
    y_shift = float(pilot_y.to(_F64).mean())
    return shift, (y_shift if math.isfinite(y_shift) else 0.0)


def summary_from_sums(sums, shift: torch.Tensor, y_shift: float, y_first: float, device) -> Summary:
    """The :class:`Summary` from the pass's combined sums (NaN-free data); the Gram, when the
    pass formed one (a (d, d) third entry), is kept with the shift it was formed with."""
    count, sx, squares, xmax, ysums, _ = sums
    gram = squares if squares.dim() == 2 else None
    sxx = squares.diagonal() if gram is not None else squares
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
        x_shift=shift.to(device),
        x_gram_shifted=None if gram is None else gram.to(device),
    )

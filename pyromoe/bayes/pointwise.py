"""The budget of the pointwise groups of a fit's InferenceData, and their evaluation in blocks.

A fit's ``log_likelihood`` and ``posterior_predictive`` groups hold one number per draw and row,
so unbounded they grow as draws x n (1000 draws of 54,000 rows in float64: 432 MB per group).
:func:`pointwise_rows` chooses the rows they keep, by the one setting ``pointwise`` that every fit
takes (:func:`pyromoe.run_nuts`, :func:`pyromoe.fit_svi`, :func:`pyromoe.fit_map`,
:func:`pyromoe.compare_experts`, :func:`pyromoe.to_inference_data`, ``MoERegression.fit`` and
``pyromoe fit --pointwise``):

- ``"auto"`` (default): every row while draws x rows is at most :data:`POINTWISE_CELLS`; beyond
  it a random subsample of ``POINTWISE_CELLS // draws`` rows;
- an int ``m``: at most ``m`` rows (every row when ``n <= m``, else a random subsample of ``m``);
- ``"all"``: every row.

All rows are kept in the data's dtype, as computed. A subsample is drawn uniformly without
replacement from a generator seeded by ``child_seed(seed, 4)`` of the fit's seed (so every fit
with the same seed, rows and draws keeps the same rows: the fits of
:func:`~pyromoe.compare_experts` are compared on the same rows) and kept in float32. Only the kept
rows are evaluated for these groups: nothing of size draws x n is ever held. The per-draw totals
(``sample_stats.log_likelihood_total``, ``attrs["chain_mean_log_likelihood"]``) still sum over
every row, in blocks of at most :data:`BLOCK_CELLS` draws x rows (:func:`blocks`).

The kept rows are recorded twice: as the ``obs`` coordinate of every group that has it (their row
numbers in the data) and, for a subsample, as ``attrs["pointwise_rows"]``; ``attrs`` also hold
``num_rows`` (n), ``pointwise`` (the setting), ``pointwise_num_rows`` (m) and ``pointwise_dtype``.
LOO on a subsample: :func:`arviz.loo` gives the elpd summed over the m kept rows; ``elpd / m`` is
the elpd per row, and ``elpd * n / m`` (its se times ``n / m`` too, which then counts the
subsampling error as well) estimates the total over all n rows. ``benchmarks/results_size.py``
measures what LOO loses to float32 and to the subsample.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from .._validation import child_seed
from ..core import likelihood
from ..core.sources import sample_rows

__all__ = ["BLOCK_CELLS", "POINTWISE_CELLS", "budget_rows", "pointwise_rows", "pointwise_rule"]

#: draws x rows the pointwise groups keep by default (``pointwise="auto"``): in float32, 8 MiB per
#: group (1000 draws: 2097 rows; NUTS' 4 x 500 draws: 1048 rows)
POINTWISE_CELLS = 2**21

#: draws x rows evaluated at once (each intermediate of the likelihood is this times k numbers);
#: blocks that stay in cache: 2**16 cells took 0.6x the time per cell of 2**20 (d = 6, k = 2)
BLOCK_CELLS = 2**16

#: rows of a block of :func:`blocks` when there are more (the draws per block fill the rest)
BLOCK_ROWS = 1024

#: the spawn key of the subsample's seed, ``child_seed(seed, POINTWISE_SEED_KEY)``
POINTWISE_SEED_KEY = 4


def pointwise_rule(value, name: str) -> str | int:
    """``"auto"``, ``"all"`` or a number of rows >= 1 (a rule of the fits' tables)."""
    if value in ("auto", "all") and isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value >= 1:
        return int(value)
    raise ValueError(
        f"{name} must be 'auto' (every row up to {POINTWISE_CELLS} draws x rows, beyond it a "
        f"random subsample), 'all' (every row) or a number of rows >= 1; got {value!r}"
    )


def budget_rows(pointwise: str | int, num_rows: int, num_draws: int) -> int:
    """The number of rows a checked ``pointwise`` keeps of ``num_rows`` with ``num_draws`` draws."""
    if pointwise == "all":
        return num_rows
    limit = max(1, POINTWISE_CELLS // max(num_draws, 1)) if pointwise == "auto" else pointwise
    return min(num_rows, int(limit))


def pointwise_rows(
    pointwise: str | int, num_rows: int, num_draws: int, seed: int
) -> torch.Tensor | None:
    """The sorted row indices (CPU int64) the pointwise groups keep, or None for every row.

    Examples
    --------
    >>> pointwise_rows("auto", 1000, 1000, seed=0) is None
    True
    >>> pointwise_rows("auto", 10_000, 1000, seed=0).shape
    torch.Size([2097])
    """
    kept = budget_rows(pointwise, num_rows, num_draws)
    if kept >= num_rows:
        return None
    generator = torch.Generator().manual_seed(child_seed(seed, POINTWISE_SEED_KEY))
    return sample_rows(num_rows, kept, generator)


def blocks(num_draws: int, num_rows: int, chunk_size: int) -> Iterator[tuple[slice, slice]]:
    """``(draws, rows)`` slices covering draws x rows in blocks of at most :data:`BLOCK_CELLS`
    cells: at most ``chunk_size`` draws and, where there are so many, at least
    :data:`BLOCK_ROWS` rows each (every row in one block whenever ``num_rows <= BLOCK_ROWS``).
    Blocks of every row and one draw had cost more at large n: each call of a model's
    ``log_likelihood`` checks the rows it is given, so they checked the data once per draw."""
    per_block = max(1, min(chunk_size, BLOCK_CELLS // max(min(num_rows, BLOCK_ROWS), 1)))
    rows_per_block = max(1, BLOCK_CELLS // per_block)
    for draws in _slices(num_draws, per_block):
        for rows in _slices(num_rows, rows_per_block):
            yield draws, rows


def _slices(total: int, size: int) -> Iterator[slice]:
    for start in range(0, total, size):
        yield slice(start, min(start + size, total))


def evaluate(
    model,
    x: torch.Tensor,
    y: torch.Tensor,
    flat: dict[str, torch.Tensor],
    *,
    chunk_size: int,
    keep: bool,
    generator: torch.Generator | None,
    dtype: np.dtype,
) -> tuple[torch.Tensor, np.ndarray | None, np.ndarray | None]:
    """``(totals, pointwise, predicted)`` of the draws ``flat`` (each site ``(S, ...)``) on ``x``,
    ``y``, block by block (:func:`blocks`): the total log-likelihood per draw ``(S,)`` in ``x``'s
    dtype; with ``keep`` the pointwise log-likelihood ``(S, n)`` as a numpy array of ``dtype``;
    with a ``generator`` one posterior predictive draw of ``y`` per draw ``(S, n)``, drawn by
    :func:`pyromoe.core.likelihood.sample_mixture`. Memory beyond the outputs: one block."""
    num_draws, n = next(iter(flat.values())).shape[0], x.shape[0]
    totals = torch.zeros(num_draws, dtype=x.dtype, device=x.device)
    pointwise = np.empty((num_draws, n), dtype=dtype) if keep else None
    predicted = np.empty((num_draws, n), dtype=dtype) if generator is not None else None
    with torch.no_grad():
        for draws, rows in blocks(num_draws, n, chunk_size):
            params = {name: value[draws] for name, value in flat.items()}
            block = model.log_likelihood(x[rows], y[rows], params)
            totals[draws] += block.sum(-1)
            if pointwise is not None:
                pointwise[draws, rows] = block.cpu().numpy()
            if predicted is not None:
                y_draws, _ = likelihood.sample_mixture(
                    x[rows], model.params(params, x), model.link, generator
                )
                predicted[draws, rows] = y_draws.cpu().numpy()
    return totals, pointwise, predicted

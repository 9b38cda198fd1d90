"""The design with covariates of the gate's own: ``[x | z]``, the experts' inputs then the gate's.

:func:`as_design_source` joins ``x`` and ``z`` into one :class:`~pyromoe.core.sources.Source`
(or takes an already joined design with ``gate_features``), so every pass, the likelihood
(:mod:`pyromoe.core.likelihood`: the weights' widths say which columns each part reads) and EM
see one array; :func:`gate_covariates` checks ``z`` against ``x``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from .._validation import as_tensor, as_tensors
from .sources import Source, _add, as_source, is_dask_array
from .summary import Summary

__all__ = ["as_design_source", "gate_covariates", "select_columns"]


def as_design_source(
    x,
    y,
    z=None,
    *,
    gate_features: int | None = None,
    device=None,
    in_features: int | None = None,
    min_rows: int = 1,
) -> tuple[Source, int | None]:
    """:func:`as_source` of the design ``x``, or of ``[x | z]`` with the gate's own covariates
    ``z`` (n, d_z) after the experts' inputs (:mod:`pyromoe.core.likelihood`).

    ``gate_features``: instead of ``z``, ``x`` already holds the joined design and its last
    ``gate_features`` columns are the gate's (any source kind, memory maps included).

    Returns
    -------
    (Source, gate_features)
        ``gate_features`` is ``d_z``, or None when the gate reads ``x`` (no ``z``).

    Raises
    ------
    TypeError, ValueError
        As :func:`as_source`; for ``z``: a memory map (pass ``x`` and ``z`` as Dask arrays, or in
        memory), a Dask ``z`` with an in-memory ``x`` or the reverse, a shape other than
        (n, d_z), NaN or infinite values (named as ``z``).
    """
    if gate_features is not None:
        if z is not None:
            raise ValueError("pass z or gate_features, not both")
        source = as_source(x, y, device=device, min_rows=min_rows)
        if isinstance(gate_features, bool) or not isinstance(gate_features, int):
            raise TypeError(f"gate_features must be an int; got {type(gate_features).__name__}")
        if not 1 <= gate_features < source.in_features:
            raise ValueError(
                f"gate_features must be between 1 and {source.in_features - 1} (x's last "
                f"gate_features columns are the gate's, the others the experts'); got "
                f"{gate_features}"
            )
        return source, gate_features
    if z is None:
        return as_source(x, y, device=device, in_features=in_features, min_rows=min_rows), None
    if isinstance(x, Source) or isinstance(z, np.memmap) or isinstance(x, np.memmap):
        raise TypeError(
            "z (the gate's covariates) goes with x in memory or as Dask arrays; for memory maps "
            "pass x and z as dask.array.from_array(...) (or join them into one design [x | z] "
            "and use gate_features)"
        )
    if is_dask_array(x) != is_dask_array(z):
        raise TypeError("x and z must both be Dask arrays, or both in memory")
    if is_dask_array(x):
        import dask.array as da

        if z.ndim != 2 or z.shape[1] == 0 or z.shape[0] != x.shape[0]:
            raise ValueError(
                f"z must be a 2-D array of shape (n, d_z) with the rows of x ({x.shape[0]}); "
                f"got shape {tuple(z.shape)}"
            )
        x_source = as_source(x, y, device=device, in_features=in_features, min_rows=min_rows)
        design = da.concatenate([x, z.rechunk({0: x.chunks[0]})], axis=1)
        return as_source(design, y, device=x_source.device, min_rows=min_rows), int(z.shape[1])
    x, y = as_tensors(x, y, in_features=in_features, min_rows=min_rows)
    if y is None:
        raise ValueError("y is required: pass the outputs y of shape (n,)")
    z = gate_covariates(z, x)
    source = as_source(torch.cat([x, z], dim=1), y, device=device)
    return source, int(z.shape[1])


def gate_covariates(z, x: torch.Tensor, gate_features: int | None = None) -> torch.Tensor:
    """The gate's own covariates ``z`` (n, gate_features) checked against the design ``x`` (n, d)
    and on its device and dtype, to be appended after ``x`` (``[x | z]``, see
    :mod:`pyromoe.core.likelihood`).

    Raises
    ------
    ValueError
        ``z`` not 2-D, without columns, with another number of rows than ``x`` or of columns than
        ``gate_features``, or with NaN or infinite values.
    """
    z = as_tensor(z, "z", like=x)
    if z.dim() != 2 or z.shape[1] == 0:
        raise ValueError(
            f"z (the gate's covariates) must be a 2-D array of shape (n, d_z) with d_z >= 1; got "
            f"shape {tuple(z.shape)}"
        )
    if z.shape[0] != x.shape[0]:
        raise ValueError(f"z must have one row per row of x ({x.shape[0]}); got {z.shape[0]}")
    if gate_features is not None and z.shape[1] != gate_features:
        raise ValueError(f"z must have gate_features={gate_features} columns; got {z.shape[1]}")
    if not bool(torch.isfinite(z).all()):
        row = int((~torch.isfinite(z)).any(dim=1).nonzero()[0, 0])
        raise ValueError(
            f"z contains NaN or infinite values (first at row {row}); drop or impute those rows"
        )
    return z


def select_columns(source: Source, index) -> Source:
    """``source`` with only the columns ``index`` of ``x`` (a sequence of positions), read chunk
    by chunk (e.g. the experts' continuous inputs for the moments); its summary is the source's,
    restricted (no further pass)."""
    index = [int(i) for i in index]
    if not index or not all(0 <= i < source.in_features for i in index):
        raise ValueError(f"columns must be positions 0 to {source.in_features - 1}; got {index}")
    if index == list(range(source.in_features)):
        return source
    return _ColumnSource(source, index)


class _ColumnSource(Source):
    """Some columns of ``x`` of a source (e.g. the experts' continuous inputs for the moments)."""

    def __init__(self, base: Source, index: list[int]):
        super().__init__(base.num_rows, len(index), base.dtype, base.device)
        self.kind = base.kind
        self.base = base
        self.index = torch.tensor(index, device=base.device)

    def chunks(self, chunk_size):
        for xc, yc in self.base.chunks(chunk_size):
            yield xc.index_select(1, self.index.to(xc.device)), yc

    def reduce(self, fn, chunk_size, *args, combine=_add):
        return self.base.reduce(_columns_call, chunk_size, fn, self.index, *args, combine=combine)

    def take(self, rows):
        x, y = self.base.take(rows)
        return x.index_select(1, self.index.to(x.device)), y

    def summary(self, chunk_size: int | None = None) -> Summary:
        """The base's summary restricted to the columns (the shifted Gram on both axes)."""
        if self._summary is None:
            base = self.base.summary(chunk_size)
            index = self.index.to(base.x_mean.device)
            gram = base.x_gram_shifted
            self._summary = dataclasses.replace(
                base,
                x_mean=base.x_mean[index],
                x_sd=base.x_sd[index],
                x_absmax=base.x_absmax[index],
                x_shift=None if base.x_shift is None else base.x_shift[index],
                x_gram_shifted=None if gram is None else gram[index][:, index],
            )
            self.summary_chunk_size = self.base.summary_chunk_size
        return self._summary

    def cached_summary(self) -> Summary | None:
        """The restricted summary when the base's is cached (no pass), else None."""
        if self._summary is None and self.base.cached_summary() is not None:
            self.summary()
        return self._summary


def _columns_call(x, y, fn, index, *args):
    return fn(x.index_select(1, index.to(x.device)), y, *args)

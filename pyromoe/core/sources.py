"""Row-chunk data sources: one way to read ``(x, y)`` for every n (docs/architecture.md).

Every estimator reads its data through a :class:`Source`, built once at the public boundary by
:func:`as_source` from

- a torch tensor or an in-memory numpy array (or pandas object): :class:`TensorSource`, the data
  as one tensor on the target device; chunks are views, so the chunked code path costs nothing;
- a numpy memory map (``np.memmap``, ``np.load(path, mmap_mode="r")``): :class:`MemmapSource`,
  read in row chunks in order, each chunk a tensor as it is used (on the CPU a view of the
  mapped pages when the file holds the dtype already; elsewhere copied to the device): the file
  is never read whole into memory;
- a ``dask.array.Array``: :class:`DaskSource`; each pass is ONE Dask graph of per-block
  partial sums, reduced by a tree of Dask tasks (each combining ``dask.config``'s
  ``split_every`` partial results, as dask.array's reductions do) on whatever scheduler is active
  (threads, processes or a ``dask.distributed`` cluster). Each block is read in pieces of a
  few MiB, each a tensor view of the block (:mod:`pyromoe.core.blocks`), so a large block is
  never converted whole. Dask does the distribution; pyromoe only says what to sum.

A pass over the data is :meth:`Source.reduce`: ``sum over chunks of fn(x_chunk, y_chunk, *args)``
for a function returning a tensor or a tuple of tensors (the sufficient statistics of a moment or
an EM step). Extra memory is that of one chunk plus the sums, whatever n.

``summary()`` is one pass (cached, :mod:`pyromoe.core.summary`) giving the column means, standard
deviations and largest magnitudes of ``x`` and ``y`` (and, for few columns, the Gram of the
shifted ``x`` that the moment step reuses), and checking that every value is finite;
out-of-core sources are checked there, in the first pass any estimator makes, rather than by an
extra read. It is a :meth:`Source.reduce` like every other pass, so every source (Dask included)
runs the same summary code. Chunks have ``chunk_size`` rows (:mod:`pyromoe.core.chunks`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import numpy as np
import torch

from .._validation import as_tensors, check_device, check_x_shape, check_y_shape
from .blocks import BlockPass, pass_graph, worker_chunk
from .blocks import chunk_tensor as _chunk_tensor
from .chunks import default_chunk_size
from .summary import (
    GRAM_MAX_FEATURES,
    PILOT_ROWS,
    Summary,
    combine_summaries,
    pilot_shifts,
    summary_from_sums,
    summary_sums,
)

__all__ = [
    "DaskSource",
    "MemmapSource",
    "Source",
    "Summary",
    "TensorSource",
    "as_source",
    "is_dask_array",
    "is_out_of_core",
    "sample_rows",
]

_F64 = torch.float64


def is_dask_array(value) -> bool:
    """Whether ``value`` is a ``dask.array.Array`` (without importing Dask)."""
    return type(value).__module__.split(".")[0] == "dask" and hasattr(value, "chunks")


def is_out_of_core(value) -> bool:
    """Whether ``value`` is read in chunks rather than converted whole (memmap or Dask)."""
    return (
        isinstance(value, np.memmap)
        or is_dask_array(value)
        or (isinstance(value, Source) and not isinstance(value, TensorSource))
    )


def _rebuild(like, values):
    """A tuple of ``like``'s type (a NamedTuple too) holding ``values``."""
    values = list(values)
    return type(like)(*values) if hasattr(like, "_fields") else type(like)(values)


def _add(total, part):
    """Elementwise sum of two partial results (tensors, None, or (named) tuples of them)."""
    if total is None:
        return part
    if isinstance(total, torch.Tensor):
        return total + part
    return _rebuild(total, (_add(a, b) for a, b in zip(total, part)))


def _to(value, device: torch.device):
    """``value`` with every tensor in it (through tuples, NamedTuples) on ``device``."""
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return _rebuild(value, (_to(v, device) for v in value))
    return value


def sample_rows(num_rows: int, rows: int, generator: torch.Generator) -> torch.Tensor:
    """``rows`` distinct row indices out of ``num_rows``, uniformly at random, sorted.

    Memory O(rows), not O(num_rows) (no permutation of all rows when ``rows`` is small): draws
    with replacement until enough distinct indices, then a random subset of those (every subset
    of that size is equally likely, by symmetry).
    """
    if 4 * rows >= num_rows:
        return torch.randperm(num_rows, generator=generator)[:rows].sort().values
    picked = torch.empty(0, dtype=torch.long)
    while picked.numel() < rows:
        extra = torch.randint(num_rows, (2 * (rows - picked.numel()) + 16,), generator=generator)
        picked = torch.unique(torch.cat([picked, extra]))
    keep = torch.randperm(picked.numel(), generator=generator)[:rows]
    return picked[keep].sort().values


class Source:
    """Rows of ``(x, y)`` read in chunks: the one data path of the estimators.

    Attributes
    ----------
    num_rows : int
    in_features : int
    dtype : torch.dtype
        The dtype computations run in (that of ``x``; integers become float64).
    device : torch.device
        Where chunks, sums and results live.
    kind : str
        ``"tensor"``, ``"memmap"`` or ``"dask"``.
    """

    kind = "source"

    def __init__(self, num_rows: int, in_features: int, dtype: torch.dtype, device: torch.device):
        self.num_rows = int(num_rows)
        self.in_features = int(in_features)
        self.dtype = dtype
        self.device = torch.device(device)
        self._summary: Summary | None = None
        #: rows per chunk of the summary pass, once it ran
        self.summary_chunk_size: int | None = None

    # ----------------------------------------------------------------- to implement
    def chunks(self, chunk_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(x_chunk, y_chunk)`` tensors on :attr:`device` in :attr:`dtype`, in row order."""
        raise NotImplementedError

    def take(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows at integer positions ``rows`` (any order) as tensors on :attr:`device`."""
        raise NotImplementedError

    # ----------------------------------------------------------------- shared
    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(num_rows={self.num_rows}, in_features={self.in_features}, "
            f"dtype={self.dtype}, device={self.device})"
        )

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_rows, self.in_features)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The whole data as tensors when it is in memory already, else None."""
        return None

    def reduce(self, fn: Callable, chunk_size: int, *args, combine: Callable = _add):
        """``sum over chunks of fn(x_chunk, y_chunk, *args)``: one pass over the data.

        ``fn`` returns a tensor or a tuple (nested tuples allowed) of tensors of fixed shapes;
        the sum is on :attr:`device`. Chunks have at most ``chunk_size`` rows. ``combine(total,
        part)`` adds the partial results of consecutive rows, in row order (default: elementwise
        sums; ``total`` is None at first).
        """
        total = None
        for xc, yc in self.chunks(chunk_size):
            total = combine(total, fn(xc, yc, *args))
        return total

    def head(self, rows: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first ``rows`` rows."""
        rows = min(int(rows), self.num_rows)
        return self.take(torch.arange(rows))

    def subsample(self, rows: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``rows`` rows drawn without replacement (all rows, in order, when ``rows >= n``)."""
        if rows >= self.num_rows:
            tensors = self.tensors()
            return tensors if tensors is not None else self.take(torch.arange(self.num_rows))
        return self.take(sample_rows(self.num_rows, rows, generator))

    def summary(self, chunk_size: int | None = None) -> Summary:
        """Means, standard deviations and largest magnitudes of ``x`` and ``y`` (one pass, cached).

        The first call's ``chunk_size`` (rows per chunk; default
        :func:`pyromoe.core.chunks.default_chunk_size`, or that of the source this one rescales)
        sets the pass's chunks: an entry point calls it first with its own ``chunk_size``.

        With at most :data:`pyromoe.core.summary.GRAM_MAX_FEATURES` columns the pass also forms
        the Gram of the shifted ``x`` (``Summary.x_gram_shifted``), which the moment step's
        second-moment pass then takes instead of forming it (:func:`pyromoe.core.moments.
        second_moments`).

        Raises
        ------
        ValueError
            When ``x`` or ``y`` holds NaN or infinite values (naming the argument, the first such
            row and, for ``x``, its first such column).
        """
        if self._summary is None:
            chunk = chunk_size or self.summary_chunk_size or default_chunk_size(self.in_features)
            self._summary = self._compute_summary(chunk)
            self.summary_chunk_size = chunk
        return self._summary

    def cached_summary(self) -> Summary | None:
        """The summary if a pass computed it already (no pass here), else None."""
        return self._summary

    def _compute_summary(self, chunk: int) -> Summary:
        pilot_x, pilot_y = self.head(PILOT_ROWS)
        shift, y_shift = pilot_shifts(pilot_x, pilot_y, self.dtype)
        gram = self.in_features <= GRAM_MAX_FEATURES
        sums = self.reduce(
            summary_sums, chunk, shift.to(self.device), y_shift, gram, combine=combine_summaries
        )
        if math.isfinite(float(sums[5])):
            raise ValueError(self.non_finite_message(int(sums[5])))
        return summary_from_sums(sums, shift, y_shift, float(pilot_y[0]), self.device)

    def non_finite_message(self, row: int) -> str:
        """The message for the first row holding NaN or infinite values, ``row``: it names the
        argument (x, else y) and, for x, the first such column (as the in-memory check does)."""
        xr, yr = self.take(torch.tensor([row]))
        bad = (~torch.isfinite(xr[0])).nonzero()
        if bad.numel():
            name, where = "x", f"row {row}, column {int(bad[0, 0])}"
        elif not bool(torch.isfinite(yr).all()):
            name, where = "y", f"row {row}"
        else:  # not found again (a file changed under us): name the row alone
            name, where = "x or y", f"row {row}"
        return (
            f"{name} contains NaN or infinite values (first at {where}); drop or impute those "
            "rows before fitting"
        )

    def rescaled(self, units) -> Source:
        """This source read through ``units`` (a :class:`pyromoe.core.units.AffineMap`, e.g. the
        exact powers of two of :func:`pyromoe.core.units.exact_scales`)."""
        return _RescaledSource(self, units)


class TensorSource(Source):
    """In-memory data as tensors on the target device; chunks are views (no copy)."""

    kind = "tensor"

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        super().__init__(x.shape[0], x.shape[1], x.dtype, x.device)
        self.x, self.y = x, y

    def tensors(self):
        return self.x, self.y

    def chunks(self, chunk_size):
        for start in range(0, self.num_rows, chunk_size):
            yield self.x[start : start + chunk_size], self.y[start : start + chunk_size]

    def reduce(self, fn, chunk_size, *args, combine=_add):
        if chunk_size >= self.num_rows:  # the whole data in one call: no slicing
            return fn(self.x, self.y, *args)
        return super().reduce(fn, chunk_size, *args, combine=combine)

    def take(self, rows):
        rows = rows.to(self.x.device)
        return self.x.index_select(0, rows), self.y.index_select(0, rows)

    # the summary is the chunked pass of Source: whole-array reductions (x.std(0), x.abs()) would
    # allocate temporaries the size of x (measured: 516 MiB extra at 1e6 x 50)

    def rescaled(self, units):
        return TensorSource(units.x_to_new(self.x), units.y_to_new(self.y))


class _RescaledSource(Source):
    """A source read through an affine map of x and y (exact powers of two for extreme
    magnitudes), chunk by chunk."""

    def __init__(self, base: Source, units):
        super().__init__(base.num_rows, base.in_features, base.dtype, base.device)
        self.kind = base.kind
        self.base = base
        self.units = units
        self.summary_chunk_size = base.summary_chunk_size

    def chunks(self, chunk_size):
        for xc, yc in self.base.chunks(chunk_size):
            yield self.units.x_to_new(xc), self.units.y_to_new(yc)

    def reduce(self, fn, chunk_size, *args, combine=_add):
        return self.base.reduce(_rescaled_call, chunk_size, fn, self.units, *args, combine=combine)

    def take(self, rows):
        x, y = self.base.take(rows)
        return self.units.x_to_new(x), self.units.y_to_new(y)

    # the summary is computed again through the scaled chunks (one more pass, extreme data only):
    # the base's sums of squares may overflow where the scaled ones do not


def _rescaled_call(x, y, fn, units, *args):
    return fn(units.x_to_new(x), units.y_to_new(y), *args)


def _numpy_dtype_to_torch(dtype: np.dtype) -> torch.dtype:
    if dtype == np.float32:
        return torch.float32
    return torch.float64  # float64, ints, bools (numpy's float); float16 is upcast


def _check_numeric(dtype, name: str) -> None:
    dtype = np.dtype(dtype)
    if not (np.issubdtype(dtype, np.number) or dtype == np.bool_) or np.issubdtype(
        dtype, np.complexfloating
    ):
        raise TypeError(
            f"{name} must hold real numbers; got an array of dtype {dtype}. Convert it with "
            ".astype(float) first."
        )


class MemmapSource(Source):
    """A numpy memory map (or any numpy array) read in row chunks, never whole.

    ``y`` may be a memory map too, or any 1-D array or tensor. Each chunk becomes a tensor on the
    target device (:func:`pyromoe.core.blocks.chunk_tensor`: on the CPU a view of the mapped
    pages when the dtype matches, else a copy), so the extra memory is at most one chunk.
    """

    kind = "memmap"

    def __init__(self, x: np.ndarray, y, device: torch.device):
        super().__init__(x.shape[0], x.shape[1], _numpy_dtype_to_torch(x.dtype), device)
        self.x = x
        self.y = y  # numpy array (maybe a memmap) of shape (n,)

    def chunks(self, chunk_size):
        for start in range(0, self.num_rows, chunk_size):
            stop = start + chunk_size
            yield (
                _chunk_tensor(self.x[start:stop], self.dtype, self.device),
                _chunk_tensor(self.y[start:stop], self.dtype, self.device),
            )

    def take(self, rows):
        index = rows.cpu().numpy()
        return (
            _chunk_tensor(self.x[index], self.dtype, self.device),
            _chunk_tensor(self.y[index], self.dtype, self.device),
        )


class DaskSource(Source):
    """A ``dask.array.Array`` (x, and y as a Dask or in-memory array): each pass one Dask graph
    (:func:`pyromoe.core.blocks.pass_graph`) of per-block partial sums, reduced by a tree of Dask
    tasks on the active scheduler (``dask.config``'s ``split_every`` partial results per task).

    Blocks are computed on the workers (CPU) and read there in pieces of at most ``chunk_size``
    rows (:func:`pyromoe.core.blocks.worker_chunk`), each piece a tensor view of the block; only
    the sums travel, and are moved to :attr:`device`.
    """

    kind = "dask"

    def __init__(self, x, y, device: torch.device):
        super().__init__(x.shape[0], x.shape[1], _numpy_dtype_to_torch(x.dtype), device)
        self.x, self.y = x, y

    def _blocks(self):
        return list(zip(self.x.to_delayed().ravel(), self.y.to_delayed().ravel()))

    def reduce(self, fn, chunk_size, *args, combine=_add):
        import dask

        args = _to(args, torch.device("cpu"))  # the blocks are computed on CPU workers
        rows = worker_chunk(chunk_size, self.in_features)
        spec = BlockPass(fn, args, combine, rows, self.dtype)
        # optimised per pass, as x.compute() does: optimised once at construction, they were
        # optimised again by take() and the scheduler got two definitions of the same keys
        x, y = dask.optimize(self.x, self.y)
        (total,) = dask.compute(pass_graph(x, y, spec))
        return _to(total, self.device)

    def chunks(self, chunk_size):
        import dask

        for xb, yb in self._blocks():
            xb, yb = dask.compute(xb, yb)
            yb = np.asarray(yb).reshape(-1)
            for start in range(0, xb.shape[0], chunk_size):
                stop = start + chunk_size
                yield (
                    _chunk_tensor(xb[start:stop], self.dtype, self.device),
                    _chunk_tensor(yb[start:stop], self.dtype, self.device),
                )

    def take(self, rows):
        import dask

        index = rows.cpu().numpy()
        xs, ys = dask.compute(self.x[index], self.y[index])
        return (
            _chunk_tensor(xs, self.dtype, self.device),
            _chunk_tensor(np.asarray(ys).reshape(-1), self.dtype, self.device),
        )


# ------------------------------------------------------------------------------------ the boundary
def _check_out_of_core_shapes(x, y, in_features, min_rows):
    """The shapes of an out-of-core ``(x, y)``, checked as for tensors; ``y`` flattened."""
    check_x_shape(tuple(x.shape), in_features, min_rows)
    return y.reshape(-1) if check_y_shape(tuple(y.shape), x.shape[0]) else y


def _unknown_chunks(array) -> bool:
    return any(isinstance(c, float) and math.isnan(c) for dim in array.chunks for c in dim)


def _dask_source(x, y, device, in_features, min_rows) -> DaskSource:
    import dask.array as da

    for name, value in (("x", x), ("y", y)):
        if is_dask_array(value) and _unknown_chunks(value):
            raise ValueError(
                f"{name} is a Dask array with unknown chunk sizes (NaN in {name}.chunks, e.g. "
                f"after boolean indexing); call {name}.compute_chunk_sizes() first"
            )
        if hasattr(value, "dtype"):
            _check_numeric(value.dtype, name)
    if not is_dask_array(y):
        if isinstance(y, torch.Tensor):
            y = y.detach().cpu().numpy()
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y.reshape(-1)
        if y.ndim == 1 and len(x.shape) == 2 and y.shape[0] == x.shape[0]:
            y = da.from_array(y, chunks=(x.chunks[0],))
    y = _check_out_of_core_shapes(x, y, in_features, min_rows)
    if y.chunks[0] != x.chunks[0]:
        raise ValueError(
            f"x and y are Dask arrays whose row chunks differ (x: {x.chunks[0][:4]}..., y: "
            f"{y.chunks[0][:4]}...); give them the same row chunks, e.g. "
            "y = y.rechunk((x.chunks[0],))"
        )
    if len(x.chunks[1]) > 1:
        x = x.rechunk({1: -1})  # whole rows per block (the partial sums need every column)
    return DaskSource(x, y, device)


def _memmap_source(x, y, device, in_features, min_rows) -> MemmapSource:
    _check_numeric(x.dtype, "x")
    if isinstance(y, torch.Tensor):
        y = y.detach().cpu().numpy()
    elif is_dask_array(y):
        raise TypeError("y is a Dask array but x is not; pass x as a Dask array too")
    elif not isinstance(y, np.ndarray):
        y = np.asarray(y)
    _check_numeric(y.dtype, "y")
    y = _check_out_of_core_shapes(x, y, in_features, min_rows)
    return MemmapSource(x, y, device)


def as_source(
    x,
    y,
    *,
    device=None,
    in_features: int | None = None,
    min_rows: int = 1,
) -> Source:
    """Validate ``(x, y)`` and wrap them as a :class:`Source` (the boundary of every estimator).

    Parameters
    ----------
    x : Tensor, ndarray, pandas object, numpy memmap, dask.array.Array or Source, shape (n, d)
    y : the same kinds, shape (n,) (or (n, 1)); ignored when ``x`` is a Source
    device : str or torch.device, optional
        Where to compute. Default: ``x``'s device (a tensor), else the CPU. In-memory data are
        moved there whole; memory maps and Dask arrays stream their chunks (or sums) there.
    in_features : int, optional
        Expected ``d``.
    min_rows : int
        Minimum number of rows.

    Raises
    ------
    TypeError
        Non-numeric dtypes, unsupported types.
    ValueError
        Wrong shapes, mismatched rows, too few rows, a Dask array with unknown chunk sizes or row
        chunks that differ between x and y, a device that does not exist; NaN or infinite values
        (in-memory data here; out-of-core data in the first pass, :meth:`Source.summary`).
    """
    target = None if device is None else check_device(device)
    if isinstance(x, Source):
        if target is not None and target != x.device:
            raise ValueError(
                f"x is a pyromoe Source on {x.device}; device={str(target)!r} differs. Build the "
                "source with as_source(x, y, device=...) instead"
            )
        return x
    if is_dask_array(x):
        return _dask_source(x, y, target or torch.device("cpu"), in_features, min_rows)
    if is_dask_array(y):
        raise TypeError("y is a Dask array but x is not; pass x as a Dask array too")
    if isinstance(x, np.memmap):
        return _memmap_source(x, y, target or torch.device("cpu"), in_features, min_rows)
    x, y = as_tensors(x, y, in_features=in_features, min_rows=min_rows)
    if y is None:
        raise ValueError("y is required: pass the outputs y of shape (n,)")
    if target is not None and x.device != target:
        x, y = x.to(target), y.to(target)
    return TensorSource(x, y)

"""Numpy blocks as tensors, and one pass over the blocks of a Dask array as one Dask graph.

:func:`chunk_tensor` turns a numpy block (a memory map's rows, a piece of a Dask block) into a
tensor, without a copy when the block holds the dtype already. :func:`pass_graph` builds the
graph of one pass of :class:`pyromoe.core.sources.DaskSource`: a task per block that reads the
block in pieces of at most :func:`worker_chunk` rows (:func:`block_sum`, so a large block is never
converted whole), and a tree of tasks combining the partial results in row order
(:func:`combine_parts`, ``split_every`` of them each, as dask.array's reductions do). Dask
schedules and distributes the graph; nothing here imports Dask at module level.
"""

from __future__ import annotations

import functools
import threading
import uuid
import warnings

import numpy as np
import torch

from .chunks import WORKER_CHUNK_BYTES, default_chunk_size

__all__ = [
    "BlockPass",
    "block_keys",
    "block_sum",
    "chunk_tensor",
    "combine_parts",
    "pass_graph",
    "split_every",
    "worker_chunk",
]


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return np.dtype(np.float32 if dtype == torch.float32 else np.float64)


#: torch.from_numpy warns that a read-only array (a memory map opened with mode "r") gives a
#: tensor it cannot protect from writes; pyromoe only reads the chunks it wraps. The warning is
#: silenced around that call alone, under a lock (``warnings.catch_warnings`` is not thread-safe
#: and Dask's threaded scheduler converts blocks on several threads).
_READ_ONLY_LOCK = threading.Lock()


def chunk_tensor(block, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A numpy block (a memmap slice, a piece of a Dask block) as a tensor on ``device``.

    No copy when the block already holds ``dtype`` in native byte order (a view of the block:
    float64 stays float64, and a memmap's pages are read in place); otherwise one converting copy.
    On another device, one copy there.
    """
    target = _numpy_dtype(dtype)
    array = np.asarray(block)
    if array.dtype != target or any(stride < 0 for stride in array.strides):
        array = (
            np.asarray(array, dtype=target, order="C") if array.dtype != target else array.copy()
        )
    if array.flags.writeable:
        tensor = torch.from_numpy(array)
    else:
        with _READ_ONLY_LOCK, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            tensor = torch.from_numpy(array)
    return tensor.to(device)


def worker_chunk(chunk_size: int, in_features: int) -> int:
    """Rows per piece of a block on a Dask worker: at most ``chunk_size`` rows and
    :data:`~pyromoe.core.chunks.WORKER_CHUNK_BYTES` (see :mod:`pyromoe.core.chunks`)."""
    return min(int(chunk_size), default_chunk_size(in_features, WORKER_CHUNK_BYTES))


class BlockPass:
    """What one pass computes on a Dask block (shipped inside each task of the pass's graph):
    ``fn(x_piece, y_piece, *args)`` over the block's rows in pieces of at most ``rows`` rows,
    each piece a tensor view of the block (:func:`chunk_tensor`), the results combined in row
    order. A block is never converted whole: the pieces bound the memory of a thread."""

    __slots__ = ("args", "combine", "dtype", "fn", "rows")

    def __init__(self, fn, args, combine, rows: int, dtype: torch.dtype):
        self.fn, self.args, self.combine, self.rows, self.dtype = fn, args, combine, rows, dtype


def block_sum(spec: BlockPass, xb, yb):
    """One Dask block's partial result (runs on a worker, CPU)."""
    total = None
    cpu = torch.device("cpu")
    yb = np.asarray(yb).reshape(-1)
    for start in range(0, xb.shape[0], spec.rows):
        stop = start + spec.rows
        xc = chunk_tensor(xb[start:stop], spec.dtype, cpu)
        yc = chunk_tensor(yb[start:stop], spec.dtype, cpu)
        total = spec.combine(total, spec.fn(xc, yc, *spec.args))
    return total


def combine_parts(spec: BlockPass, *parts):
    """The partial results of consecutive blocks combined in row order (empty blocks skipped)."""
    return functools.reduce(spec.combine, [part for part in parts if part is not None], None)


def split_every() -> int:
    """Partial results each task of a Dask reduction tree combines: ``dask.config``'s
    ``split_every`` (an int, or a dict read at axis 0), else dask.array's default, 4."""
    import dask

    value = dask.config.get("split_every", None)
    if isinstance(value, dict):
        value = value.get(0)
    return max(2, int(value)) if value else 4


def pass_graph(x, y, spec: BlockPass):
    """One pass as one Dask graph: a task per block (``x``'s and ``y``'s blocks as its inputs,
    no copy of them) and a tree of combining tasks, ``split_every`` partial results each, as
    dask.array's reductions build. Returns a ``Delayed`` of the total.

    A block's own task (a read from a file, a slice of an array) is inlined into the task that
    sums it when nothing else needs it (:func:`_block_input`): the block is then read on the worker
    that sums it, within that task, with no task, transfer or stored result of its own.

    The keys are named by a fresh id, not by a hash of the arguments (dask's ``pure=True``, which
    pickles the parameters once per block): each pass's parameters differ, so a hash would share
    nothing and cost time every pass.
    """
    from dask.delayed import Delayed
    from dask.highlevelgraph import HighLevelGraph
    from dask.task_spec import Task, TaskRef

    name = f"pyromoe-pass-{uuid.uuid4().hex}"
    nodes = dict(HighLevelGraph.merge(x.__dask_graph__(), y.__dask_graph__()))
    dependents: dict = {}
    for node in nodes.values():
        for key in node.dependencies:
            dependents[key] = dependents.get(key, 0) + 1
    layer = {}
    keys = []
    for i, (xk, yk) in enumerate(zip(block_keys(x), block_keys(y))):
        key = (name, 0, i)
        xb, yb = _block_input(xk, nodes, dependents), _block_input(yk, nodes, dependents)
        layer[key] = Task(key, block_sum, spec, xb, yb)
        keys.append(key)
    fan_in, level = split_every(), 0
    while len(keys) > 1:
        level += 1
        merged = []
        for j in range(0, len(keys), fan_in):
            key = (name, level, j // fan_in)
            refs = [TaskRef(k) for k in keys[j : j + fan_in]]
            layer[key] = Task(key, combine_parts, spec, *refs)
            merged.append(key)
        keys = merged
    needed: set = set()  # the arrays' tasks that remain: what the inlined blocks depend on
    stack = [key for task in layer.values() for key in task.dependencies if key not in layer]
    while stack:
        key = stack.pop()
        if key not in needed:
            needed.add(key)
            stack.extend(nodes[key].dependencies)
    layer.update((key, nodes[key]) for key in needed)
    return Delayed(keys[0], HighLevelGraph.from_collections(name, layer), layer=name)


def _block_input(key, nodes: dict, dependents: dict):
    """The argument that stands for block ``key`` in the task summing it: the block's own task
    (through any aliases), inlined, when no other task depends on it; else a reference to it."""
    from dask.task_spec import Alias, Task, TaskRef

    path = [key]
    while isinstance(nodes.get(path[-1]), Alias):
        path.append(nodes[path[-1]].target)
    node = nodes.get(path[-1])
    alone = dependents.get(key, 0) == 0 and all(dependents.get(k, 0) == 1 for k in path[1:])
    if isinstance(node, Task) and alone:
        return node
    return TaskRef(key)


def block_keys(array) -> list:
    """The keys of ``array``'s blocks in row order (one block per row chunk)."""
    return [key if array.ndim == 1 else key[0] for key in array.__dask_keys__()]

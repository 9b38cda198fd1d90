"""The one chunk policy: how many rows each pass over the data reads at a time.

``chunk_size`` means the same everywhere in pyromoe: the rows per chunk of every pass over the
data (the summary, the two moment passes, every EM and gate-EM pass, the log-likelihood scores),
for every source (:mod:`pyromoe.core.sources`). It bounds the extra memory of a pass to one chunk,
whatever n, and changes the results only by rounding (the sums are added in another order).
:func:`default_chunk_size` (about 4 MiB of float64 rows) is the default of every entry point (an
entry's own ``chunk_size=``, an int >= 1, is checked by its table of rules,
:func:`pyromoe._validation.validate`).

On a Dask worker a block is read in pieces of at most ``chunk_size`` rows and at most
:data:`WORKER_CHUNK_BYTES` (the same function with a smaller budget): worker threads keep freed
memory in their own allocator arenas, so smaller pieces bound what each thread holds.
"""

from __future__ import annotations

__all__ = [
    "CHUNK_BYTES",
    "MAX_CHUNK_ROWS",
    "MIN_CHUNK_ROWS",
    "WORKER_CHUNK_BYTES",
    "default_chunk_size",
]

#: Memory of one chunk's rows of ``x`` and ``y`` in float64, the default target.
CHUNK_BYTES = 1 << 22
#: The budget of one piece of a Dask block on a worker. Measured (benchmarks/dask_cost.py, 4
#: rounds each; n = 1e6, d = 50 on a 2-worker LocalCluster, and 200,000-row blocks of a 2e6 x 20
#: memory map under the threaded scheduler): 1 MiB pieces ran ``initialize`` at 1.31x the
#: in-memory time on the cluster, with 39 / 58 MiB extra on 2 / 8 threads; 2 MiB at 1.21x, with
#: 41 / 73 MiB; 4 MiB at 1.21x, with 47 / 100 MiB (smaller pieces cost more per row).
WORKER_CHUNK_BYTES = 1 << 21
#: Fewest and most rows of a default chunk.
MIN_CHUNK_ROWS = 1024
MAX_CHUNK_ROWS = 65_536


def default_chunk_size(in_features: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk of a pass: ``chunk_bytes`` (4 MiB) of float64 rows of ``x`` and ``y``,
    within ``[MIN_CHUNK_ROWS, MAX_CHUNK_ROWS]``.

    Measured (2e6 x 20 memory map, one thread): 4 MB chunks ran an EM pass 30% faster than 10 MB
    ones and kept the process's extra anonymous memory near zero, where 8-10 MB chunks left about
    100 MiB behind in the allocator's heap.

    Examples
    --------
    >>> [default_chunk_size(d) for d in (1, 7, 100, 1000)]
    [65536, 65536, 5190, 1024]
    """
    rows = int(chunk_bytes) // (8 * (int(in_features) + 1))
    return max(MIN_CHUNK_ROWS, min(MAX_CHUNK_ROWS, rows))

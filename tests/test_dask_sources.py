"""Dask passes read large blocks in pieces, without copies, and sum exactly like in-memory data.

A pass over a Dask array is one graph: a task per block that converts the block to tensors in
pieces of at most ``worker_chunk`` rows (views of the block when it holds the dtype already)
and a tree of combining tasks. These tests pin that a block larger than a piece is never
converted whole, that a float64 piece is the block's own memory, and that the statistics, the
summary and EM equal the in-memory results to 1e-10.
"""

from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

from pyromoe import simulate
from pyromoe.core import blocks
from pyromoe.core.chunks import WORKER_CHUNK_BYTES, default_chunk_size
from pyromoe.core.sources import as_source
from pyromoe.estimators.em import fit_em

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

PARAMETERS = ("experts_weight", "experts_bias", "gate_weight", "gate_bias", "noise")
ROWS, BLOCK_ROWS = 30_000, 12_000  # blocks of 12,000, 12,000 and 6,000 rows


@pytest.fixture(scope="module")
def data():
    return simulate(ROWS, 4, num_experts=2, link="linear", seed=11)


def _dask(data, block_rows=BLOCK_ROWS):
    return (
        da.from_array(data.x.numpy(), chunks=(block_rows, -1)),
        da.from_array(data.y.numpy(), chunks=block_rows),
    )


def _relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _moments(x, y):
    """Gram, cross-products and third-order sums of a chunk: enough to see any lost row."""
    return x.T @ x, x.T @ y, (x**3).sum(0), (y * y).sum(), torch.tensor(float(x.shape[0]))


@pytest.fixture()
def conversions(monkeypatch):
    """Every conversion of a numpy piece to a tensor in a Dask pass: (rows, shares memory)."""
    seen = []
    real = blocks.chunk_tensor

    def spy(block, dtype, device):
        tensor = real(block, dtype, device)
        array = np.asarray(block)
        shares = tensor.data_ptr() == array.__array_interface__["data"][0]
        seen.append((array.shape[0], shares, tensor.dtype))
        return tensor

    monkeypatch.setattr(blocks, "chunk_tensor", spy)
    return seen


def test_large_blocks_are_converted_in_pieces_without_copies(data, conversions):
    """Blocks of 12,000 rows with chunk_size 1,000: no conversion sees more than 1,000 rows,
    every float64 piece is a view of its block (no copy), and the sums equal in-memory."""
    x, y = _dask(data)
    with dask.config.set(scheduler="threads"):
        total = as_source(x, y).reduce(_moments, 1_000)
    expected = as_source(data.x, data.y).reduce(_moments, 1_000)
    rows = [r for r, _, _ in conversions]
    assert max(rows) == 1_000 < BLOCK_ROWS
    assert sum(rows) == 2 * ROWS  # every row of x and of y, once
    assert all(shares and dtype == torch.float64 for _, shares, dtype in conversions)
    assert float(total[-1]) == ROWS
    for got, want in zip(total, expected):
        assert _relative(got, want) < 1e-10


def test_pieces_are_capped_by_the_worker_budget_whatever_the_chunk_size(data, conversions):
    """With the default chunk size (more rows than a block here) a block is still read in pieces
    of at most WORKER_CHUNK_BYTES of float64 rows."""
    d = data.x.shape[1]
    cap = default_chunk_size(d, WORKER_CHUNK_BYTES)
    assert blocks.worker_chunk(default_chunk_size(d), d) == cap
    x, y = _dask(data, block_rows=ROWS)  # one block of all rows
    with dask.config.set(scheduler="threads"):
        as_source(x, y).reduce(_moments, default_chunk_size(d))
    rows = [r for r, _, _ in conversions]
    assert max(rows) == min(cap, ROWS) and sum(rows) == 2 * ROWS


def test_summary_and_em_on_large_blocks_equal_in_memory(data):
    x, y = _dask(data)
    source = as_source(x, y)
    reference = as_source(data.x, data.y)
    with dask.config.set(scheduler="threads"):
        summary = source.summary(1_000)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            start = fit_em(data.x, data.y, 2, n_init=1, seed=4, max_iter=2)
            fit = fit_em(x, y, 2, init=start, max_iter=5, chunk_size=1_000, seed=0)
            expected_fit = fit_em(
                data.x, data.y, 2, init=start, max_iter=5, chunk_size=1_000, seed=0
            )
    expected = reference.summary(1_000)
    for name in ("x_mean", "x_sd", "x_absmax"):
        assert _relative(getattr(summary, name), getattr(expected, name)) < 1e-10, name
    assert summary.y_sd == pytest.approx(expected.y_sd, rel=1e-10)
    for name in PARAMETERS:
        assert _relative(getattr(fit, name), getattr(expected_fit, name)) < 1e-10, name


def test_pieces_follow_the_dtype_of_the_data(data, conversions):
    """float32 blocks stay float32 views; integer blocks become float64 (one copy per piece)."""
    x32 = da.from_array(data.x.numpy().astype(np.float32), chunks=(BLOCK_ROWS, -1))
    y32 = da.from_array(data.y.numpy().astype(np.float32), chunks=BLOCK_ROWS)
    with dask.config.set(scheduler="threads"):
        gram32 = as_source(x32, y32).reduce(lambda a, b: a.T @ a, 2_000)
    assert gram32.dtype == torch.float32
    assert all(shares and dtype == torch.float32 for _, shares, dtype in conversions)
    conversions.clear()
    xi = da.from_array(np.arange(3 * ROWS).reshape(ROWS, 3) % 7, chunks=(BLOCK_ROWS, -1))
    with dask.config.set(scheduler="threads"):
        gram = as_source(xi, data.y.numpy()).reduce(lambda a, b: a.T @ a, 2_000)
    whole = torch.from_numpy((np.arange(3 * ROWS).reshape(ROWS, 3) % 7).astype(np.float64))
    assert torch.equal(gram, whole.T @ whole)
    assert all(dtype == torch.float64 for _, _, dtype in conversions)


def test_a_read_only_memory_map_is_read_in_place_without_warnings(data, tmp_path, conversions):
    """Dask blocks of a read-only memory map become tensors over the mapped pages, and torch's
    warning about non-writable arrays does not reach the user."""
    np.save(tmp_path / "x.npy", data.x.numpy())
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    x = da.from_array(xm, chunks=(BLOCK_ROWS, -1))
    y = da.from_array(data.y.numpy(), chunks=BLOCK_ROWS)
    with dask.config.set(scheduler="threads"), warnings.catch_warnings():
        warnings.simplefilter("error")
        gram = as_source(x, y).reduce(lambda a, b: a.T @ a, 5_000)
    assert _relative(gram, data.x.T @ data.x) < 1e-12
    assert all(shares for _, shares, _ in conversions)
    # torch warns once per process: check the first conversion in a fresh one, warnings as errors
    script = (
        "import numpy as np, torch\n"
        "from pyromoe.core.blocks import chunk_tensor\n"
        f"xm = np.load({str(tmp_path / 'x.npy')!r}, mmap_mode='r')\n"
        "t = chunk_tensor(xm[:100], torch.float64, torch.device('cpu'))\n"
        "assert t.data_ptr() == xm[:100].__array_interface__['data'][0]\n"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error", "-c", script], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-500:]


def _rows(array, start, stop):
    return array[start:stop]


def test_a_block_read_by_its_own_task_is_read_inside_the_task_that_sums_it(data):
    """Blocks made by tasks nothing else needs (here da.from_delayed readers) are inlined: the
    pass graph holds one task per block plus the combining tree, no reader tasks of their own
    (so a worker never ships a block to another), and the sums are unchanged."""
    x_np, y_np = data.x.numpy(), data.y.numpy()
    bounds = [(s, min(s + BLOCK_ROWS, ROWS)) for s in range(0, ROWS, BLOCK_ROWS)]

    def column(array, shape):
        return da.concatenate(
            [
                da.from_delayed(dask.delayed(_rows)(array, s, e), shape=(e - s, *shape), dtype="f8")
                for s, e in bounds
            ]
        )

    x, y = dask.optimize(column(x_np, (4,)), column(y_np, ()))
    spec = blocks.BlockPass(
        _moments,
        (),
        lambda t, p: p if t is None else tuple(a + b for a, b in zip(t, p)),
        1_000,
        torch.float64,
    )
    (graph,) = dask.optimize(blocks.pass_graph(x, y, spec))
    names = {key[0] for key in dict(graph.dask) if isinstance(key, tuple)}
    assert all(name.startswith("pyromoe-pass-") for name in names), names
    tasks = [key for key in dict(graph.dask) if isinstance(key, tuple)]
    assert len(tasks) == len(bounds) + 1  # 3 blocks, one combining task
    with dask.config.set(scheduler="threads"):
        total = graph.compute()
    expected = as_source(data.x, data.y).reduce(_moments, 1_000)
    for got, want in zip(total, expected):
        assert _relative(got, want) < 1e-10

"""One data path for every source: tensors, numpy arrays, memory maps and Dask arrays.

Every source must give the same passes, the same summaries and the same estimates as the data
in memory; EM over chunks must equal EM in one chunk; bad sources fail at the boundary with a
message that says what to do.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import pyromoe
from pyromoe import simulate
from pyromoe.core import blocks, sources
from pyromoe.core.chunks import default_chunk_size
from pyromoe.core.sources import as_source, sample_rows
from pyromoe.estimators.em import fit_em
from pyromoe.estimators.gate import fit_gate

da = pytest.importorskip("dask.array")

PARAMETERS = ("experts_weight", "experts_bias", "gate_weight", "gate_bias", "noise")


@pytest.fixture(scope="module")
def data():
    return simulate(30_000, 4, num_experts=2, link="linear", seed=3)


@pytest.fixture(scope="module")
def on_disk(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("memmap")
    np.save(folder / "x.npy", data.x.numpy())
    np.save(folder / "y.npy", data.y.numpy())
    return (
        np.load(folder / "x.npy", mmap_mode="r"),
        np.load(folder / "y.npy", mmap_mode="r"),
        folder,
    )


def _kinds(data, on_disk):
    x, y = data.x, data.y
    xm, ym, _ = on_disk
    return {
        "tensor": (x, y),
        "ndarray": (x.numpy(), y.numpy()),
        "memmap": (xm, ym),
        "dask": (da.from_array(x.numpy(), chunks=(7_000, 4)), da.from_array(y.numpy(), 7_000)),
        "dask+ndarray y": (da.from_array(x.numpy(), chunks=(5_000, 2)), y.numpy()),
    }


def _relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def _gram(x, y):
    return x.T @ x, (x * y[:, None]).sum(0), torch.tensor(float(x.shape[0]), dtype=x.dtype)


# --------------------------------------------------------------------------------------- passes
def test_every_source_gives_the_same_pass_and_summary(data, on_disk):
    x64 = data.x.to(torch.float64)
    expected_gram = x64.T @ x64
    for kind, (x, y) in _kinds(data, on_disk).items():
        source = as_source(x, y)
        gram, cross, rows = source.reduce(_gram, 1_000)
        assert int(rows) == 30_000, kind
        assert _relative(gram, expected_gram) < 1e-12, kind
        assert _relative(cross, (x64 * data.y[:, None]).sum(0)) < 1e-12, kind
        summary = source.summary()
        assert _relative(summary.x_mean, x64.mean(0)) < 1e-12, kind
        assert _relative(summary.x_sd, x64.std(0)) < 1e-12, kind
        assert summary.y_sd == pytest.approx(float(data.y.std()), rel=1e-12), kind
        rows = torch.tensor([29_999, 3, 17_000])
        xs, ys = source.take(rows)
        assert torch.equal(xs, data.x[rows]) and torch.equal(ys, data.y[rows]), kind


def test_dask_reduction_tree_honours_split_every(data, monkeypatch):
    """Each task of a Dask pass combines dask.config's split_every partial results (dask.array's
    default, 4, when unset), and the sums do not depend on it."""
    import dask

    source = as_source(
        da.from_array(data.x.numpy(), chunks=(1_000, 4)), da.from_array(data.y.numpy(), 1_000)
    )
    widths = []
    real = blocks.combine_parts

    def recording(spec, *parts):
        widths.append(len(parts))
        return real(spec, *parts)

    monkeypatch.setattr(blocks, "combine_parts", recording)
    expected, _, _ = as_source(data.x, data.y).reduce(_gram, 1_000)
    for split, config in ((2, {"split_every": 2}), (5, {"split_every": 5}), (4, {})):
        widths.clear()
        with dask.config.set(config):
            gram, _, rows = source.reduce(_gram, 1_000)
        assert max(widths) == split and int(rows) == 30_000, split
        assert _relative(gram, expected) < 1e-12, split


def test_source_kinds_and_memmap_stays_on_disk(on_disk):
    xm, ym, _ = on_disk
    source = as_source(xm, ym)
    assert source.kind == "memmap" and source.x is xm  # wrapped, not copied
    assert sources.is_out_of_core(xm) and not sources.is_out_of_core(np.asarray(xm[:10]))


def test_memmap_passes_read_one_chunk_at_a_time(tmp_path, monkeypatch):
    """No read of a memory map is larger than a chunk (or than a subsample), so it is never
    loaded whole; chunk_size is the rows of every pass (the summary, the moments, every EM
    pass), and the default is default_chunk_size."""
    big = simulate(300_000, 4, num_experts=2, link="linear", seed=6)
    np.save(tmp_path / "x.npy", big.x.numpy())
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    sizes = []
    real = sources._chunk_tensor

    def recording(block, dtype, device):
        sizes.append(np.shape(block)[0])
        return real(block, dtype, device)

    monkeypatch.setattr(sources, "_chunk_tensor", recording)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pyromoe.initialize(xm, big.y.numpy(), 2, chunk_size=2_000, guard_rows=5_000)
        fit_em(xm, big.y.numpy(), 2, n_init=1, chunk_size=3_000, max_iter=3)
        fit_em(xm, big.y.numpy(), 2, n_init=1, max_iter=1)
    default = default_chunk_size(4)
    assert len(sizes) > 100
    assert max(sizes) == default < 300_000
    pilot, subsample = 1_024, 5_000  # the first rows of the summary; guard and screening rows
    assert set(sizes) <= {2_000, 3_000, default, 300_000 % default, pilot, subsample}


def test_sample_rows_is_uniform_without_replacement():
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(1_000)
    for _ in range(400):
        rows = sample_rows(1_000, 50, generator)  # the small-fraction branch (4 * 50 < 1000)
        assert rows.numel() == 50 and torch.unique(rows).numel() == 50
        assert bool((rows[1:] > rows[:-1]).all())
        counts[rows] += 1
    # each row is picked with probability 0.05: 20 of 400 draws, sd sqrt(400 * .05 * .95) = 4.4
    assert abs(float(counts.mean()) - 20) < 1e-9 and float(counts.std()) < 6.5
    assert 0 < float(counts.min()) and float(counts.max()) < 45


# --------------------------------------------------------------------------------------- EM
@pytest.mark.parametrize("link", ["linear", "tanh"])
def test_chunked_em_equals_one_chunk(link):
    data = simulate(6_000, 3, num_experts=2, link=link, seed=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        whole = fit_em(data.x, data.y, 2, link, n_init=2, seed=1, chunk_size=10**9)
        chunked = fit_em(data.x, data.y, 2, link, n_init=2, seed=1, chunk_size=997)
    assert whole.diagnostics["n_iter"] == chunked.diagnostics["n_iter"]
    for name in PARAMETERS:
        assert _relative(getattr(chunked, name), getattr(whole, name)) < 1e-9, name
    trace = chunked.diagnostics["log_likelihood_trace"]
    assert all(b >= a - 1e-12 for a, b in zip(trace, trace[1:]))


def test_chunked_gate_em_equals_one_chunk():
    data = simulate(6_000, 3, num_experts=3, link="linear", seed=5)
    t = data.truth
    fits = [
        fit_gate(data.x, data.y, t.experts_weight, t.experts_bias, "linear", chunk_size=size)
        for size in (10**9, 1_234)
    ]
    assert fits[0].n_iter == fits[1].n_iter
    assert _relative(fits[1].gate_weight, fits[0].gate_weight) < 1e-9
    assert float(fits[1].noise) == pytest.approx(float(fits[0].noise), rel=1e-10)


def test_em_on_every_source_matches_in_memory(data, on_disk):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = fit_em(data.x, data.y, 2, n_init=1, seed=2, chunk_size=4_000)
        for kind, (x, y) in _kinds(data, on_disk).items():
            fit = fit_em(x, y, 2, n_init=1, seed=2, chunk_size=4_000)
            assert fit.diagnostics["source"] == kind.split("+")[0].replace("ndarray", "tensor")
            for name in PARAMETERS:
                assert _relative(getattr(fit, name), getattr(reference, name)) < 1e-8, (kind, name)


def test_initialize_on_every_source_matches_in_memory_and_recovers(data, on_disk):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = pyromoe.initialize(data.x, data.y, 2, guard_rows=10_000)
        errors = pyromoe.parameter_errors(reference, data.truth)
        assert errors["experts"] < 0.05
        assert reference.diagnostics["guard_rows"] == 5_000  # guard_size(30000, 10000)
        for kind, (x, y) in _kinds(data, on_disk).items():
            fit = pyromoe.initialize(x, y, 2, guard_rows=10_000)
            for name in PARAMETERS:
                assert _relative(getattr(fit, name), getattr(reference, name)) < 1e-6, (kind, name)


def test_tensor_init_on_a_float32_memmap_follows_its_dtype(data, tmp_path):
    np.save(tmp_path / "x.npy", data.x.numpy().astype(np.float32))
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    est = pyromoe.tensor_init(xm, data.y.numpy().astype(np.float32), 2)
    assert est.experts_weight.dtype == torch.float32
    assert pyromoe.parameter_errors(est, data.truth)["experts"] < 0.1


def test_extreme_scale_memmap_is_rescaled_exactly(data, tmp_path):
    np.save(tmp_path / "x.npy", data.x.numpy() * 2.0**600)
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        big = fit_em(xm, data.y.numpy(), 2, n_init=1, seed=0)
        plain = fit_em(data.x, data.y, 2, n_init=1, seed=0)
    assert "input_scaling" in big.diagnostics
    assert _relative(big.experts_weight * 2.0**600, plain.experts_weight) < 1e-9


def test_dask_on_a_local_cluster_matches_in_memory(data):
    distributed = pytest.importorskip("distributed")
    x = da.from_array(data.x.numpy(), chunks=(10_000, 4))
    y = da.from_array(data.y.numpy(), chunks=10_000)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = pyromoe.initialize(data.x, data.y, 2, guard_rows=10_000)
        with (
            distributed.LocalCluster(
                n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
            ) as cluster,
            distributed.Client(cluster),
        ):
            fit = pyromoe.initialize(x, y, 2, guard_rows=10_000)
    for name in PARAMETERS:
        assert _relative(getattr(fit, name), getattr(reference, name)) < 1e-6, name


# --------------------------------------------------------------------------------------- bad sources
def test_dask_with_unknown_chunk_sizes_is_refused(data):
    x = da.from_array(data.x.numpy(), chunks=(7_000, 4))
    x = x[x[:, 0] > 0]
    with pytest.raises(ValueError, match=r"unknown chunk sizes .*compute_chunk_sizes\(\)"):
        pyromoe.initialize(x, data.y.numpy()[:100], 2)


def test_dask_x_and_y_with_different_row_chunks_are_refused(data):
    x = da.from_array(data.x.numpy(), chunks=(7_000, 4))
    y = da.from_array(data.y.numpy(), chunks=5_000)
    with pytest.raises(ValueError, match=r"row chunks differ .*y.rechunk"):
        fit_em(x, y, 2)


def test_mismatched_rows_between_x_and_y_are_refused(on_disk, data):
    xm, ym, _ = on_disk
    with pytest.raises(ValueError, match="same number of rows; got 30000 rows in x and 29999"):
        pyromoe.tensor_init(xm, ym[:-1], 2)
    x = da.from_array(data.x.numpy(), chunks=(7_000, 4))
    with pytest.raises(ValueError, match="same number of rows"):
        fit_em(x, data.y.numpy()[:-1], 2)


def test_non_numeric_sources_are_refused(tmp_path, data):
    words = np.lib.format.open_memmap(tmp_path / "w.npy", mode="w+", dtype="U3", shape=(100, 2))
    del words
    with pytest.raises(TypeError, match=r"x must hold real numbers; got an array of dtype <U3"):
        fit_em(np.load(tmp_path / "w.npy", mmap_mode="r"), data.y.numpy()[:100], 2)
    with pytest.raises(TypeError, match="y must hold real numbers"):
        fit_em(da.from_array(data.x.numpy()[:100]), da.from_array(np.array(["a"] * 100)), 2)


def test_nan_in_a_memmap_is_reported_with_its_row(data, tmp_path):
    x = data.x.numpy().copy()
    x[12_345, 1] = np.nan
    np.save(tmp_path / "x.npy", x)
    xm = np.load(tmp_path / "x.npy", mmap_mode="r")
    with pytest.raises(ValueError, match="NaN or infinite values .first at row 12345"):
        pyromoe.initialize(xm, data.y.numpy(), 2)
    with pytest.raises(ValueError, match="NaN or infinite values .first at row 12345"):
        fit_em(da.from_array(x, chunks=(5_000, 4)), data.y.numpy(), 2)


def test_y_as_dask_with_x_in_memory_is_refused(data):
    with pytest.raises(TypeError, match="y is a Dask array but x is not"):
        fit_em(data.x, da.from_array(data.y.numpy()), 2)


def test_a_missing_device_is_refused_before_any_work(on_disk):
    xm, ym, _ = on_disk
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="device 'cuda' asked for but CUDA is not available"):
        pyromoe.initialize(xm, ym, 2, device="cuda")

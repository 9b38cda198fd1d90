"""Mini-batch SVI / MAP from out-of-core sources (numpy memory maps, Dask arrays) and ``device=``.

The recovery data set is ``simulate(n=20000, in_features=3, seed=0)`` (two linear experts, noise
0.5, no bias). Its fits start from the truth with the experts moved by 0.15 per coordinate, so a
fit that does not learn from the mini-batches stays ~0.26 away (Euclidean, per expert) and fails
the bounds below.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from pyromoe import MixtureOfExperts, parameter_errors, posterior_mean_estimate, simulate
from pyromoe.bayes.nuts import run_nuts
from pyromoe.bayes.pointwise import POINTWISE_CELLS
from pyromoe.bayes.svi import EVALUATION_ROWS, fit_map, fit_svi
from pyromoe.core.sources import MemmapSource, sample_rows

N, D = 20_000, 3
BATCH = 1000
STEPS = 400
SVI = dict(num_steps=STEPS, lr=0.01, subsample_size=BATCH, num_samples=200, progress=False)

#: error bound on each expert's weight vector (Euclidean) after the fit; the start is 0.26 off
EXPERT_BOUND = 0.1


@pytest.fixture(scope="module")
def data():
    return simulate(n=N, in_features=D, seed=0)


@pytest.fixture(scope="module")
def start(data):
    """The truth with every expert weight moved by +0.15 (and the noise by +0.1)."""
    truth = data.truth
    return dataclasses.replace(
        truth,
        experts_weight=truth.experts_weight + 0.15,
        noise=truth.noise + 0.1,
        method="perturbed_truth",
    )


@pytest.fixture(scope="module")
def memmap(data, tmp_path_factory):
    folder = tmp_path_factory.mktemp("memmap")
    np.save(folder / "x.npy", data.x.numpy())
    np.save(folder / "y.npy", data.y.numpy())
    x = np.load(folder / "x.npy", mmap_mode="r")
    y = np.load(folder / "y.npy", mmap_mode="r")
    assert isinstance(x, np.memmap) and isinstance(y, np.memmap)
    return x, y


@pytest.fixture(scope="module")
def model():
    return MixtureOfExperts(D, 2, bias=False)


def _posterior_moments(idata, name="experts.weight"):
    draws = idata.posterior[name]
    return draws.mean(("chain", "draw")).values, draws.std(("chain", "draw")).values


@pytest.fixture(scope="module")
def in_memory_fit(data, model, start):
    return fit_svi(model, data.x, data.y, init=start, seed=0, **SVI)


@pytest.fixture(scope="module")
def memmap_fit(memmap, model, start):
    x, y = memmap
    return fit_svi(model, x, y, init=start, seed=0, **SVI)


# ---------------------------------------------------------------------------------- recovery
def test_the_perturbed_start_is_far_from_the_truth(data, start):
    assert parameter_errors(start, data.truth)["experts"] > 2.5 * EXPERT_BOUND


def _full_log_likelihood(data) -> float:
    return float(data.truth.log_likelihood(data.x, data.y).sum())


def test_fit_svi_on_a_memmap_recovers_the_experts(memmap_fit, data):
    estimate = posterior_mean_estimate(memmap_fit, data.truth.link)
    errors = parameter_errors(estimate, data.truth)
    assert errors["experts"] < EXPERT_BOUND
    assert errors["noise"] < 0.05
    # the mini-batch likelihood is scaled by n / B: the ELBO is that of all n rows (about the
    # log-likelihood at the truth), not of B rows (20 times smaller)
    total = _full_log_likelihood(data)
    assert abs(memmap_fit.attrs["final_elbo"] - total) < 0.03 * abs(total)
    assert memmap_fit.attrs["data_kind"] == "memmap"
    assert memmap_fit.attrs["num_rows"] == N and memmap_fit.attrs["subsample_size"] == BATCH


def test_fit_svi_on_a_memmap_matches_the_in_memory_mini_batch_fit(memmap_fit, in_memory_fit):
    mean, sd = _posterior_moments(memmap_fit)
    mean_mem, sd_mem = _posterior_moments(in_memory_fit)
    assert np.abs(mean - mean_mem).max() < 0.05
    assert np.all((sd > 0.5 * sd_mem) & (sd < 2.0 * sd_mem))


def test_fit_svi_on_a_dask_array_matches_the_in_memory_mini_batch_fit(
    data, model, start, in_memory_fit
):
    dask = pytest.importorskip("dask")
    import dask.array as da

    x = da.from_array(data.x.numpy(), chunks=(5000, D))
    y = da.from_array(data.y.numpy(), chunks=(5000,))
    with dask.config.set(scheduler="threads"):
        idata = fit_svi(model, x, y, init=start, seed=0, **{**SVI, "num_steps": 250})
    assert idata.attrs["data_kind"] == "dask"
    errors = parameter_errors(posterior_mean_estimate(idata, data.truth.link), data.truth)
    assert errors["experts"] < EXPERT_BOUND
    total = _full_log_likelihood(data)
    assert abs(idata.attrs["final_elbo"] - total) < 0.03 * abs(total)
    mean, sd = _posterior_moments(idata)
    mean_mem, sd_mem = _posterior_moments(in_memory_fit)
    assert np.abs(mean - mean_mem).max() < 0.05
    assert np.all((sd > 0.5 * sd_mem) & (sd < 2.0 * sd_mem))


def test_fit_map_on_a_memmap_recovers_the_experts(memmap, model, start, data):
    x, y = memmap
    idata = fit_map(model, x, y, init=start, num_steps=300, lr=0.01, subsample_size=BATCH)
    errors = parameter_errors(posterior_mean_estimate(idata, data.truth.link), data.truth)
    assert errors["experts"] < EXPERT_BOUND
    total = _full_log_likelihood(data)
    assert abs(idata.attrs["final_elbo"] - total) < 0.03 * abs(total)
    assert idata.attrs["rows_per_second"] > 0


# ---------------------------------------------------------------------------------- mechanics
def test_each_step_reads_one_mini_batch_of_distinct_sorted_rows(memmap, model, start, monkeypatch):
    reads = []
    take = MemmapSource.take

    def recording_take(self, rows):
        reads.append(rows.clone())
        return take(self, rows)

    monkeypatch.setattr(MemmapSource, "take", recording_take)
    x, y = memmap
    steps = 5
    fit_svi(
        model, x, y, init=start, num_steps=steps, subsample_size=64, num_samples=5, progress=False
    )
    step_reads = [rows for rows in reads if rows.numel() == 64]
    assert len(step_reads) == steps
    for rows in step_reads:
        assert (rows.diff() > 0).all() and 0 <= int(rows[0]) and int(rows[-1]) < N
    assert not torch.equal(step_reads[0], step_reads[1])
    # nothing else reads more than the evaluation subsample
    assert max(rows.numel() for rows in reads) <= EVALUATION_ROWS


def test_out_of_core_output_is_evaluated_on_a_recorded_subsample(memmap_fit, memmap):
    rows = np.asarray(memmap_fit.attrs["evaluation_rows"])
    assert rows.shape == (EVALUATION_ROWS,) and memmap_fit.attrs["num_evaluation_rows"] == rows.size
    assert (np.diff(rows) > 0).all()
    np.testing.assert_array_equal(memmap_fit.log_likelihood["y"].coords["obs"].values, rows)
    assert memmap_fit.log_likelihood["y"].shape == (1, 200, EVALUATION_ROWS)
    assert memmap_fit.posterior_predictive["y"].shape == (1, 200, EVALUATION_ROWS)
    x, y = memmap
    np.testing.assert_array_equal(memmap_fit.observed_data["y"].values, y[rows])
    np.testing.assert_array_equal(memmap_fit.constant_data["x"].values, x[rows])


def test_rows_per_second_is_reported_for_every_fit(memmap_fit, in_memory_fit, data, model):
    assert memmap_fit.attrs["rows_per_second"] > 0
    assert in_memory_fit.attrs["rows_per_second"] > 0
    full = fit_map(model, data.x[:500], data.y[:500], init=data.truth, num_steps=5)
    seconds = full.attrs["seconds"]
    assert full.attrs["rows_per_second"] == pytest.approx(5 * 500 / seconds)


def test_out_of_core_fits_are_reproducible_from_the_seed(memmap, model, start):
    x, y = memmap
    kwargs = dict(init=start, num_steps=10, subsample_size=100, num_samples=5, progress=False)
    first = fit_svi(model, x, y, seed=3, **kwargs)
    second = fit_svi(model, x, y, seed=3, **kwargs)
    other = fit_svi(model, x, y, seed=4, **kwargs)
    draws = first.posterior["experts.weight"].values
    np.testing.assert_array_equal(draws, second.posterior["experts.weight"].values)
    assert not np.array_equal(draws, other.posterior["experts.weight"].values)


def test_in_memory_data_keep_the_pointwise_budgets_rows(in_memory_fit):
    # N rows x 200 draws is over the budget: POINTWISE_CELLS // 200 rows (all rows count in totals)
    assert in_memory_fit.log_likelihood["y"].shape == (1, 200, POINTWISE_CELLS // 200)
    assert in_memory_fit.attrs["num_rows"] == N and "evaluation_rows" not in in_memory_fit.attrs


def test_sample_rows_gives_distinct_sorted_uniform_rows():
    generator = torch.Generator().manual_seed(0)
    counts = torch.zeros(100)
    for _ in range(2000):
        rows = sample_rows(100, 10, generator)
        assert rows.numel() == 10 and (rows.diff() > 0).all()
        counts += torch.bincount(rows, minlength=100)
    # each row is in a draw with probability 0.1: 200 +- 13.4 times in 2000 draws
    assert float((counts - 200).abs().max()) < 5 * 13.4
    # many rows of few (a permutation), and the same rows from the same seed
    rows = sample_rows(100, 80, torch.Generator().manual_seed(1))
    assert rows.unique().numel() == 80 and (rows.diff() > 0).all()
    assert torch.equal(rows, sample_rows(100, 80, torch.Generator().manual_seed(1)))


def test_the_model_scales_a_given_mini_batch_by_num_rows(data, model):
    from pyro import poutine

    x, y = data.x[:50], data.y[:50]
    conditioned = poutine.condition(model, data=data.truth.site_values(bias=False))
    full = poutine.trace(conditioned).get_trace(x, y)
    scaled = poutine.trace(conditioned).get_trace(x, y, num_rows=1000)
    full.compute_log_prob()
    scaled.compute_log_prob()
    assert scaled.nodes["y"]["value"].shape == (50,)
    assert float(scaled.nodes["y"]["log_prob_sum"]) == pytest.approx(
        20 * float(full.nodes["y"]["log_prob_sum"]), rel=1e-12
    )
    with pytest.raises(ValueError, match="not both"):
        model(x, y, subsample_size=10, num_rows=1000)
    with pytest.raises(ValueError, match="num_rows"):
        model(x, y, num_rows=10)


def test_non_finite_rows_of_an_out_of_core_source_are_named(data, model, tmp_path):
    x = data.x[:2000].numpy().copy()
    x[:, 0] = np.nan
    np.save(tmp_path / "x.npy", x)
    with pytest.raises(
        ValueError, match=r"x contains NaN or infinite values \(first at row \d+, column 0\)"
    ):
        fit_map(
            model,
            np.load(tmp_path / "x.npy", mmap_mode="r"),
            data.y[:2000].numpy(),
            init=data.truth,
            num_steps=3,
            subsample_size=100,
        )


def test_run_nuts_reads_a_small_memmap_into_memory(data, model, tmp_path, quick_nuts):
    np.save(tmp_path / "x.npy", data.x[:200].numpy())
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    y = data.y[:200].numpy()
    idata = quick_nuts(
        model, x, y, data.truth, num_chains=1, num_warmup=10, num_samples=5, device="cpu"
    )
    assert np.isfinite(idata.posterior["experts.weight"].values).all()


# ---------------------------------------------------------------------------------- refusals
@pytest.mark.parametrize("fit", [fit_svi, fit_map])
def test_out_of_core_without_subsample_size_is_refused(memmap, model, data, fit):
    x, y = memmap
    with pytest.raises(ValueError, match="pass subsample_size"):
        fit(model, x, y, init=data.truth, num_steps=1)


def test_dask_without_subsample_size_is_refused(data, model):
    pytest.importorskip("dask")
    import dask.array as da

    x = da.from_array(data.x.numpy(), chunks=(5000, D))
    with pytest.raises(ValueError, match="dask source of 20000 rows.*pass subsample_size"):
        fit_svi(model, x, data.y.numpy(), num_steps=1, progress=False)


@pytest.mark.parametrize("fit", [fit_svi, fit_map, run_nuts])
def test_a_bad_device_string_is_refused_naming_the_device(data, model, fit):
    with pytest.raises(ValueError, match="device 'gpu0'"):
        fit(model, data.x, data.y, device="gpu0")


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("fit", [fit_svi, fit_map, run_nuts])
def test_cuda_without_cuda_is_refused_naming_the_device(data, model, fit):
    with pytest.raises(ValueError, match="device 'cuda' asked for but CUDA is not available"):
        fit(model, data.x, data.y, device="cuda")


def test_a_float32_memmap_fits_in_float32_and_saves_to_netcdf(data, model, tmp_path):
    np.save(tmp_path / "x.npy", data.x[:3000].numpy().astype(np.float32))
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    y = data.y[:3000].numpy().astype(np.float32)
    idata = fit_map(model, x, y, init=data.truth, num_steps=20, subsample_size=200)
    assert idata.posterior["experts.weight"].dtype == np.float32
    assert idata.attrs["num_evaluation_rows"] == 3000  # fewer rows than EVALUATION_ROWS: all
    idata.to_netcdf(tmp_path / "fit.nc")

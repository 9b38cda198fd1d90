"""The estimators on CUDA: ``device="cuda"`` and CUDA tensors passed directly.

Skipped as a whole where ``torch.cuda.is_available()`` is False. Small data (n = 3000, d = 3, two
linear experts, noise 0.5) so that the whole module runs in well under a minute on one GPU.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pyromoe import MixtureOfExperts, parameter_errors, posterior_mean_estimate, simulate
from pyromoe.bayes.nuts import run_nuts
from pyromoe.bayes.svi import fit_map, fit_svi
from pyromoe.estimators.em import fit_em
from pyromoe.estimators.initialize import initialize

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

N, D = 3000, 3

#: error bound on each expert's weight vector (Euclidean); the sampling error at n = 3000 is a
#: few hundredths
EXPERT_BOUND = 0.15


@pytest.fixture(scope="module")
def data():
    return simulate(n=N, in_features=D, seed=0)


@pytest.fixture(scope="module")
def model():
    return MixtureOfExperts(D, 2, bias=False)


def _on_cuda(estimate) -> bool:
    return all(
        getattr(estimate, name).is_cuda
        for name in ("experts_weight", "experts_bias", "gate_weight", "gate_bias", "noise")
    )


def _svi_on_cuda(model, data, x, y, **extra):
    """``fit_svi`` on CUDA from the true parameters, 100 steps, no progress bar."""
    return fit_svi(
        model, x, y, init=data.truth, device="cuda", num_steps=100, progress=False, **extra
    )


def test_initialize_on_cuda(data):
    estimate = initialize(data.x, data.y, 2, device="cuda")
    assert _on_cuda(estimate)
    assert parameter_errors(estimate.to(device="cpu"), data.truth)["experts"] < EXPERT_BOUND


def test_fit_em_on_cuda(data):
    estimate = fit_em(data.x, data.y, 2, device="cuda")
    assert _on_cuda(estimate)
    assert parameter_errors(estimate.to(device="cpu"), data.truth)["experts"] < EXPERT_BOUND


def test_fit_svi_on_cuda(data, model):
    idata = _svi_on_cuda(model, data, data.x, data.y, num_samples=50)
    draws = idata.posterior["experts.weight"].values
    assert draws.shape == (1, 50, 2, D) and np.isfinite(draws).all()
    assert idata.attrs["rows_per_second"] > 0
    assert np.isfinite(idata.log_likelihood["y"].values).all()
    estimate = posterior_mean_estimate(idata, data.truth.link)
    assert parameter_errors(estimate, data.truth)["experts"] < EXPERT_BOUND


def test_fit_svi_on_cuda_with_the_model_s_own_mini_batches(data, model):
    idata = _svi_on_cuda(model, data, data.x, data.y, subsample_size=500, num_samples=50)
    assert np.isfinite(idata.posterior["experts.weight"].values).all()


def test_fit_svi_on_cuda_from_a_memmap_in_mini_batches(data, model, tmp_path):
    np.save(tmp_path / "x.npy", data.x.numpy())
    np.save(tmp_path / "y.npy", data.y.numpy())
    x = np.load(tmp_path / "x.npy", mmap_mode="r")
    y = np.load(tmp_path / "y.npy", mmap_mode="r")
    idata = _svi_on_cuda(model, data, x, y, subsample_size=500, num_samples=50)
    assert np.isfinite(idata.posterior["experts.weight"].values).all()
    assert idata.attrs["data_kind"] == "memmap"


def test_fit_map_on_cuda(data, model):
    idata = fit_map(model, data.x, data.y, init=data.truth, device="cuda", num_steps=100)
    assert np.isfinite(idata.posterior["experts.weight"].values).all()


def test_run_nuts_on_cuda(data, model):
    idata = run_nuts(
        model,
        data.x,
        data.y,
        init=data.truth,
        device="cuda",
        num_warmup=50,
        num_samples=50,
        num_chains=1,
        progress=False,
    )
    for name in ("experts.weight", "gate.weight", "noise"):
        assert np.isfinite(idata.posterior[name].values).all(), name
    assert idata.posterior["experts.weight"].shape == (1, 50, 2, D)


def test_a_cuda_tensor_passed_directly_keeps_the_fit_on_cuda(data, model):
    x, y = data.x.cuda(), data.y.cuda()
    estimate = fit_em(x, y, 2, bias=False)
    assert _on_cuda(estimate)
    idata = fit_svi(model, x, y, init=estimate, num_steps=50, num_samples=20, progress=False)
    assert np.isfinite(idata.posterior["experts.weight"].values).all()
    # the seeded fit left the CUDA generator as it was
    state = torch.cuda.get_rng_state()
    fit_map(model, x, y, init=estimate, num_steps=5)
    assert torch.equal(torch.cuda.get_rng_state(), state)


@pytest.mark.parametrize("k", [2, 3])
def test_fused_potential_and_likelihood_on_cuda_equal_the_cpu(k):
    """The fused potential (its kept buffers made on the data's device) and the row-wise
    log-likelihood and responsibilities give on CUDA what they give on the CPU (float64)."""
    from pyromoe.bayes.potential import fused_potential
    from pyromoe.core import likelihood
    from pyromoe.core.params import Params

    sim = simulate(n=500, in_features=D, num_experts=k, seed=k)
    model = MixtureOfExperts(D, k, bias=True, noise="per_expert")
    x, y = torch.as_tensor(sim.x), torch.as_tensor(sim.y)
    cpu, gpu = fused_potential(model, x, y), fused_potential(model, x.cuda(), y.cuda())
    theta = 0.3 * torch.randn(
        cpu.num_params, generator=torch.Generator().manual_seed(0), dtype=x.dtype
    )
    for _ in range(2):  # the second call runs on the kept buffers
        value, grad = gpu.value_and_grad(theta.cuda())
        assert value.is_cuda and grad.is_cuda
        expected_value, expected_grad = cpu.value_and_grad(theta)
        torch.testing.assert_close(value.cpu(), expected_value, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(grad.cpu(), expected_grad, rtol=1e-10, atol=1e-10)
    params = Params.from_sites(gpu.from_flat(theta), bias=True)
    params = params._replace(noise=params.noise.exp())  # the flat vector holds log noise
    draws = Params(*(value[None].expand(4, *value.shape) for value in params))
    for function in (likelihood.log_likelihood, likelihood.responsibilities):
        on_gpu = function(x.cuda(), y.cuda(), draws.to(device="cuda"), model.link)
        torch.testing.assert_close(on_gpu.cpu(), function(x, y, draws, model.link))

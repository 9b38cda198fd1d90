"""The fused potential equals Pyro's traced log joint, and run_nuts uses it."""

from __future__ import annotations

import pyro.distributions as dist
import pytest
import torch
from pyro.infer.mcmc.util import initialize_model

from pyromoe import MixtureOfExperts, simulate
from pyromoe.bayes.nuts import run_nuts
from pyromoe.bayes.potential import fused_potential, unsupported_prior

LINKS = ["linear", "tanh", "relu", "leaky_relu", "sigmoid"]


def _data(n=60, d=3, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator, dtype=torch.float64)
    y = torch.randn(n, generator=generator, dtype=torch.float64)
    return x, y


def _custom_priors(d, k):
    generator = torch.Generator().manual_seed(5)
    return {
        "experts.weight": dist.Normal(
            torch.randn(k, d, generator=generator, dtype=torch.float64),
            torch.rand(k, d, generator=generator, dtype=torch.float64) + 0.5,
        ),
        "gate.weight": 4.0,
        "noise": dist.HalfNormal(torch.tensor(0.7, dtype=torch.float64)),
    }


def _check_equal(model, x, y, num_points=3):
    """Fused and traced potential agree in value and gradient at random unconstrained points."""
    _, traced, _, _ = initialize_model(model, model_args=(x, y), max_plate_nesting=1)
    fused = fused_potential(model, x, y)
    assert fused is not None
    generator = torch.Generator().manual_seed(1)
    for _ in range(num_points):
        point = {
            name: (torch.randn(shape, generator=generator, dtype=torch.float64)).requires_grad_()
            for name, shape in model.site_shapes.items()
        }
        a, b = traced(point), fused(point)
        grad_a = torch.autograd.grad(a, list(point.values()))
        grad_b = torch.autograd.grad(b, list(point.values()))
        a_value, b_value = float(a.detach()), float(b.detach())
        assert abs(a_value - b_value) <= 1e-10 * max(1.0, abs(a_value))
        for name, ga, gb in zip(point, grad_a, grad_b):
            torch.testing.assert_close(gb, ga, rtol=0, atol=1e-10, msg=name)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("link", LINKS)
def test_fused_equals_traced_default_priors(link, bias):
    x, y = _data()
    _check_equal(MixtureOfExperts(3, 3, link=link, bias=bias), x, y)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("link", LINKS)
def test_fused_equals_traced_custom_priors(link, bias):
    x, y = _data(d=2, seed=3)
    priors = _custom_priors(2, 2)
    if bias:
        priors["experts.bias"] = dist.Normal(torch.tensor(0.5, dtype=torch.float64), 0.3)
        priors["gate.bias"] = dist.Normal(torch.zeros(1, dtype=torch.float64), 3.0).to_event(1)
    _check_equal(MixtureOfExperts(2, 2, link=link, bias=bias, priors=priors), x, y)


def test_flat_round_trip():
    x, y = _data()
    model = MixtureOfExperts(3, 2, link="tanh")
    fused = fused_potential(model, x, y)
    point = {
        name: torch.randn(shape, dtype=torch.float64) for name, shape in model.site_shapes.items()
    }
    flat = fused.to_flat(point)
    assert flat.shape == (fused.num_params,)
    back = fused.from_flat(flat)
    for name in point:
        torch.testing.assert_close(back[name], point[name])
    torch.testing.assert_close(fused.flat(flat), fused(point))


def test_unknown_prior_falls_back_to_traced():
    data = simulate(80, 2, seed=0)
    priors = {"noise": dist.LogNormal(torch.tensor(0.0), torch.tensor(1.0))}
    model = MixtureOfExperts(2, 2, bias=False, priors=priors)
    x = torch.as_tensor(data.x)
    assert unsupported_prior(model, x) == "noise"
    assert fused_potential(model, x, torch.as_tensor(data.y)) is None
    kwargs = dict(init=data.truth, num_chains=1, num_warmup=5, num_samples=5, progress=False)
    idata = run_nuts(model, data.x, data.y, **kwargs)
    assert idata.attrs["potential"] == "traced"
    with pytest.raises(ValueError, match="noise"):
        run_nuts(model, data.x, data.y, potential="fused", **kwargs)
    with pytest.raises(ValueError, match="potential must be"):
        run_nuts(model, data.x, data.y, potential="jax", **kwargs)


def test_run_nuts_fused_gives_sensible_draws():
    data = simulate(300, 2, seed=0, noise=0.5)
    model = MixtureOfExperts(2, 2, bias=False)
    kwargs = dict(init=data.truth, num_chains=2, num_warmup=40, num_samples=40, progress=False)
    idata = run_nuts(model, data.x, data.y, **kwargs)
    assert idata.attrs["potential"] == "fused"
    assert idata.attrs["num_divergences"] <= 2
    noise = float(idata.posterior["noise"].mean())
    assert abs(noise - 0.5) < 0.1
    weights = idata.posterior["experts.weight"].mean(("chain", "draw")).values
    truth = data.truth.experts_weight.numpy()
    assert abs(weights - truth).max() < 0.3
    stats = idata.sample_stats
    assert stats["n_steps"].shape == (2, 40) and (stats["n_steps"] >= 1).all()
    assert all(count > 0 for count in idata.attrs["num_gradient_evaluations"])


def test_fused_and_traced_runs_give_the_same_draws(quick_nuts):
    """Same seed: same Laplace-jittered starts, same random stream, so the same trajectories."""
    data = simulate(200, 2, seed=0, noise=0.5)
    model = MixtureOfExperts(2, 2, bias=True)
    kwargs = dict(num_chains=2, num_warmup=10, num_samples=5)
    fused = quick_nuts(model, data.x, data.y, data.truth, potential="fused", **kwargs)
    traced = quick_nuts(model, data.x, data.y, data.truth, potential="traced", **kwargs)
    assert (fused.attrs["potential"], traced.attrs["potential"]) == ("fused", "traced")
    assert fused.attrs["num_gradient_evaluations"] == traced.attrs["num_gradient_evaluations"]
    for name in model.site_shapes:
        assert abs(fused.posterior[name].values - traced.posterior[name].values).max() < 1e-8
    assert abs(fused.sample_stats["lp"].values - traced.sample_stats["lp"].values).max() < 1e-8


# ------------------------------------------------------------------ the flat potential, every model
def _pyro_potential_and_grad(model, x, y, point):
    """Pyro's potential (minus ``log_density`` of the traced model in unconstrained space) and
    its autograd gradient at ``point`` (site -> unconstrained value)."""
    _, traced, _, _ = initialize_model(model, model_args=(x, y), max_plate_nesting=1)
    point = {name: value.clone().requires_grad_() for name, value in point.items()}
    value = traced(point)
    grads = torch.autograd.grad(value, list(point.values()))
    return float(value.detach()), dict(zip(point, grads))


@pytest.mark.parametrize("gate_features", [None, 2])
@pytest.mark.parametrize("noise", ["shared", "per_expert"])
@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("link", LINKS)
def test_value_and_grad_equal_pyros_log_density_and_autograd(link, k, noise, gate_features):
    """FusedPotential.value_and_grad, the closed form NUTS runs on, equals Pyro's potential and
    its autograd gradient to 1e-10 at random points (float64), for every link, number of
    experts, noise model and gate design."""
    x, y = _data(n=50, d=3 + (gate_features or 0), seed=k)
    model = MixtureOfExperts(3, k, link=link, noise=noise, gate_features=gate_features)
    fused = fused_potential(model, x, y)
    generator = torch.Generator().manual_seed(11)
    for _ in range(2):
        point = {
            name: torch.randn(shape, generator=generator, dtype=torch.float64)
            for name, shape in model.site_shapes.items()
        }
        expected, expected_grads = _pyro_potential_and_grad(model, x, y, point)
        value, grad = fused.value_and_grad(fused.to_flat(point))
        assert abs(float(value) - expected) <= 1e-10 * max(1.0, abs(expected))
        for name, part in fused.from_flat(grad).items():
            torch.testing.assert_close(part, expected_grads[name], rtol=0, atol=1e-10, msg=name)


def test_flat_order_is_pyros_mass_matrix_order():
    """The flat vector lists the sites sorted by name, the order of Pyro's mass-matrix block, so
    that NUTS on the one flat site draws the same momenta as on the sites."""
    model = MixtureOfExperts(3, 2, bias=True)
    x, y = _data()
    assert fused_potential(model, x, y).names == sorted(model.site_shapes)


def test_flat_kernel_follows_pyros_nuts_on_the_sites():
    """RecordingNUTS runs Pyro's NUTS on one flat site with the fused potential; Pyro's own NUTS
    on the model's sites with the traced potential, from the same start and seed, gives the same
    draws (to rounding over a short run)."""
    import pyro
    from pyro.infer import MCMC, NUTS

    from pyromoe.bayes.nuts_kernel import CountedPotential, RecordingNUTS, record_draw

    data = simulate(120, 2, seed=0, noise=0.5)
    model = MixtureOfExperts(2, 2, bias=True)
    x, y = torch.as_tensor(data.x), torch.as_tensor(data.y)
    initial, traced, transforms, _ = initialize_model(model, model_args=(x, y), max_plate_nesting=1)
    runs = []
    for flat in (True, False):
        pyro.set_rng_seed(4)
        if flat:
            potential = CountedPotential(
                model, (x, y), transforms, False, fused_potential(model, x, y)
            )
            kernel, hook = RecordingNUTS(potential), record_draw
        else:
            kernel, hook = NUTS(potential_fn=traced), None
        mcmc = MCMC(
            kernel,
            num_samples=8,
            warmup_steps=8,
            initial_params=initial,
            hook_fn=hook,
            disable_progbar=True,
        )
        mcmc.run()
        runs.append(mcmc.get_samples())
    for name in model.site_shapes:
        torch.testing.assert_close(runs[0][name], runs[1][name], rtol=0, atol=1e-8, msg=name)


@pytest.mark.parametrize("noise", ["shared", "per_expert"])
@pytest.mark.parametrize("k", [2, 3])
def test_value_and_grad_hold_at_extreme_points(k, noise):
    """Far from the data (gate logits in the hundreds, residuals of hundreds of noise sds) the
    closed form (two experts: softplus terms of the log-odds) stays finite and equals Pyro's
    logsumexp-based potential and its autograd gradient to 1e-10 relative."""
    x, y = _data(n=40, d=3, seed=3)
    model = MixtureOfExperts(3, k, noise=noise)
    fused = fused_potential(model, x, y)
    generator = torch.Generator().manual_seed(2)
    for scale, log_noise in ((300.0, 0.0), (1.0, -6.0), (300.0, -6.0)):
        point = {
            name: scale * torch.randn(shape, generator=generator, dtype=torch.float64)
            for name, shape in model.site_shapes.items()
            if name != "noise"
        }
        point["noise"] = torch.full(model.site_shapes["noise"], log_noise, dtype=torch.float64)
        expected, expected_grads = _pyro_potential_and_grad(model, x, y, point)
        value, grad = fused.value_and_grad(fused.to_flat(point))
        assert torch.isfinite(value) and bool(torch.isfinite(grad).all())
        assert abs(float(value) - expected) <= 1e-10 * max(1.0, abs(expected))
        for name, part in fused.from_flat(grad).items():
            scale_of = max(1.0, float(expected_grads[name].abs().max()))
            torch.testing.assert_close(
                part, expected_grads[name], rtol=0, atol=1e-10 * scale_of, msg=name
            )


@pytest.mark.parametrize("k", [1, 2, 3])
def test_kept_buffers_leave_no_trace_between_calls(k):
    """The per-row buffers are reused: a second call at another point leaves the first call's
    value and gradient as they were, gives what a fresh potential gives there, and a pickled
    copy (a worker process's) makes its own buffers and gives the same numbers."""
    import pickle

    x, y = _data(n=30, d=3, seed=k)
    model = MixtureOfExperts(3, k, gate_features=None)
    fused = fused_potential(model, x, y)
    generator = torch.Generator().manual_seed(9)
    first, second = (
        torch.randn(fused.num_params, generator=generator, dtype=torch.float64) for _ in range(2)
    )
    value_1, grad_1 = fused.value_and_grad(first)
    kept_value, kept_grad = value_1.clone(), grad_1.clone()
    value_2, grad_2 = fused.value_and_grad(second)
    assert torch.equal(value_1, kept_value) and torch.equal(grad_1, kept_grad)
    fresh_value, fresh_grad = fused_potential(model, x, y).value_and_grad(second)
    assert torch.equal(value_2, fresh_value) and torch.equal(grad_2, fresh_grad)
    assert "_work" in vars(fused)
    copy = pickle.loads(pickle.dumps(fused))
    assert "_work" not in vars(copy)
    copy_value, copy_grad = copy.value_and_grad(second)
    assert torch.equal(copy_value, value_2) and torch.equal(copy_grad, grad_2)

import math

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine
from pyro.infer import MCMC, NUTS, SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoNormal, init_to_value
from pyro.nn import PyroSample
from scipy.special import expit, logsumexp
from scipy.stats import norm

from pyromoe import MixtureOfExperts, parameter_errors, simulate, sites
from pyromoe.core.links import DEFAULT_LEAKY_SLOPE, LINKS

NUMPY_LINKS = {
    "linear": lambda z: z,
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
    "leaky_relu": lambda z: np.where(z >= 0, z, DEFAULT_LEAKY_SLOPE * z),
    "sigmoid": expit,
}


def hand_log_likelihood(x, y, a, b, w, c, sigma, link):
    """Independent numpy/scipy computation of log p(y_n | x_n), written from the formula."""
    g = NUMPY_LINKS[link]
    logits = np.concatenate([np.zeros((len(x), 1)), x @ w.T + c], axis=1)
    log_gate = logits - logsumexp(logits, axis=1, keepdims=True)
    log_normal = norm.logpdf(y[:, None], loc=g(x @ a.T + b), scale=sigma)
    return logsumexp(log_gate + log_normal, axis=1)


def random_params(k, d, seed):
    rng = np.random.default_rng(seed)
    return dict(
        a=rng.normal(size=(k, d)),
        b=rng.normal(size=k),
        w=rng.normal(size=(k - 1, d)),
        c=rng.normal(size=k - 1),
        sigma=np.float64(0.7),
    )


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("link", sorted(LINKS))
def test_model_log_likelihood_equals_hand_computation(k, link):
    d, n = 3, 40
    rng = np.random.default_rng(k)
    x, y = rng.normal(size=(n, d)), rng.normal(size=n)
    p = random_params(k, d, seed=10 + k)
    expected = hand_log_likelihood(x, y, p["a"], p["b"], p["w"], p["c"], p["sigma"], link)

    model = MixtureOfExperts(d, num_experts=k, link=link)
    values = {
        sites.EXPERTS_WEIGHT: torch.tensor(p["a"]),
        sites.EXPERTS_BIAS: torch.tensor(p["b"]),
        sites.GATE_WEIGHT: torch.tensor(p["w"]),
        sites.GATE_BIAS: torch.tensor(p["c"]),
        sites.NOISE: torch.tensor(p["sigma"]),
    }
    # through the Pyro model: the observed site's log-density
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(x, y)
    site = trace.nodes[sites.OBS]
    pointwise = site["fn"].log_prob(site["value"])
    np.testing.assert_allclose(pointwise.numpy(), expected, rtol=0, atol=1e-10)
    # and through the functional form used for ArviZ and EM
    np.testing.assert_allclose(model.log_likelihood(x, y, values).numpy(), expected, atol=1e-10)


def test_responsibilities_are_bayes_rule_by_hand():
    k, d, n = 3, 2, 25
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, d)), rng.normal(size=n)
    p = random_params(k, d, seed=1)
    model = MixtureOfExperts(d, num_experts=k, link="tanh")
    values = dict(
        zip(sites.PARAMETER_SITES, map(torch.tensor, (p["a"], p["b"], p["w"], p["c"], p["sigma"])))
    )
    logits = np.concatenate([np.zeros((n, 1)), x @ p["w"].T + p["c"]], axis=1)
    joint = (
        np.exp(logits)
        / np.exp(logits).sum(1, keepdims=True)
        * norm.pdf(y[:, None], np.tanh(x @ p["a"].T + p["b"]), p["sigma"])
    )
    expected = joint / joint.sum(1, keepdims=True)
    np.testing.assert_allclose(model.responsibilities(x, y, values).numpy(), expected, atol=1e-12)


def test_batched_parameters_give_batched_log_likelihood():
    data = simulate(30, 3, seed=0)
    model = MixtureOfExperts(3, bias=False)
    draws = Predictive(model, num_samples=5)(data.x)
    params = {name: draws[name].squeeze(1) for name in model.site_shapes}
    batched = model.log_likelihood(data.x, data.y, params)
    assert batched.shape == (5, 30)
    one = {name: value[2] for name, value in params.items()}
    torch.testing.assert_close(batched[2], model.log_likelihood(data.x, data.y, one))


def test_k2_gate_is_sigmoid_of_expert_one():
    model = MixtureOfExperts(2, bias=True)
    x = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    values = {
        sites.EXPERTS_WEIGHT: torch.tensor([[0.0, 0.0], [0.0, 0.0]], dtype=torch.float64),
        sites.EXPERTS_BIAS: torch.tensor([-5.0, 5.0], dtype=torch.float64),
        sites.GATE_WEIGHT: torch.tensor([[0.5, 0.25]], dtype=torch.float64),
        sites.GATE_BIAS: torch.tensor([0.3], dtype=torch.float64),
        sites.NOISE: torch.tensor(1.0, dtype=torch.float64),
    }
    trace = poutine.trace(poutine.condition(model, data=values)).get_trace(x)
    mixture = trace.nodes[sites.OBS]["fn"]
    p1 = mixture.mixture_distribution.probs[0, 1]
    assert float(p1) == pytest.approx(1 / (1 + math.exp(-(0.5 - 0.5 + 0.3))))


@pytest.mark.parametrize("bias", [True, False])
def test_prior_predictive_shapes(bias):
    model = MixtureOfExperts(4, num_experts=3, link="relu", bias=bias)
    x = torch.randn(20, 4)
    draws = Predictive(model, num_samples=6)(x)
    assert draws[sites.OBS].shape == (6, 20)
    assert draws[sites.EXPERTS_WEIGHT].shape[-2:] == (3, 4)
    assert draws[sites.GATE_WEIGHT].shape[-2:] == (2, 4)
    assert (sites.EXPERTS_BIAS in draws) == bias
    assert draws[sites.OBS].dtype == x.dtype


def test_posterior_predictive_from_a_batch_of_draws():
    model = MixtureOfExperts(3, num_experts=2)
    x = torch.randn(15, 3, dtype=torch.float64)
    prior = Predictive(model, num_samples=8, return_sites=list(model.site_shapes))(x)
    posterior_samples = {name: value.squeeze(1) for name, value in prior.items()}
    assert posterior_samples[sites.EXPERTS_WEIGHT].shape == (8, 2, 3)
    for parallel in (False, True):
        draws = Predictive(model, posterior_samples=posterior_samples, parallel=parallel)(x)
        assert draws[sites.OBS].shape == (8, 15)


def test_posterior_predictive_with_guide():
    data = simulate(100, 3, seed=0)
    model = MixtureOfExperts(3)
    guide = AutoNormal(model)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(5):
        svi.step(data.x, data.y)
    draws = Predictive(model, guide=guide, num_samples=12)(data.x)
    assert draws[sites.OBS].shape == (12, 100)
    assert draws[sites.NOISE].min() > 0


def test_subsampled_log_likelihood_is_unbiased_for_full_data():
    data = simulate(400, 3, seed=1)
    model = MixtureOfExperts(3, bias=False)
    values = data.truth.site_values(bias=False)
    conditioned = poutine.condition(model, data=values)

    def obs_log_prob(**kwargs):
        trace = poutine.trace(conditioned).get_trace(data.x, data.y, **kwargs)
        trace.compute_log_prob(site_filter=lambda name, site: name == sites.OBS)
        site = trace.nodes[sites.OBS]
        # Pyro's log_prob_sum already carries the plate's n / subsample_size scale
        return float(site["log_prob_sum"]), site["scale"]

    full, scale = obs_log_prob()
    assert scale == 1.0
    estimates = []
    for _ in range(300):
        value, scale = obs_log_prob(subsample_size=40)
        estimates.append(value)
    assert scale == pytest.approx(10.0)
    estimates = np.array(estimates)
    standard_error = estimates.std(ddof=1) / math.sqrt(len(estimates))
    assert abs(estimates.mean() - full) < 4 * standard_error
    # the whole-data "subsample" reproduces the full value exactly
    assert obs_log_prob(subsample_size=400)[0] == pytest.approx(full, abs=1e-9)


def test_vectorised_particles_agree_with_sequential():
    data = simulate(200, 3, seed=2)
    model = MixtureOfExperts(3)
    guide = AutoDelta(model, init_loc_fn=init_to_value(values=data.truth.site_values()))
    guide(data.x, data.y)
    sequential = Trace_ELBO(num_particles=3).loss(model, guide, data.x, data.y)
    vectorised = Trace_ELBO(num_particles=3, vectorize_particles=True).loss(
        model, guide, data.x, data.y
    )
    assert vectorised == pytest.approx(sequential, rel=1e-10)


def test_svi_autodelta_from_user_init_recovers_experts():
    data = simulate(5000, 3, link="linear", gate="orthogonal", seed=0)
    model = MixtureOfExperts(3, num_experts=2, link="linear")
    start = data.truth.site_values()
    generator = torch.Generator().manual_seed(0)
    start[sites.EXPERTS_WEIGHT] = start[sites.EXPERTS_WEIGHT] + 0.3 * torch.randn(
        2, 3, generator=generator, dtype=torch.float64
    )
    start[sites.GATE_WEIGHT] = torch.zeros(1, 3, dtype=torch.float64)
    guide = AutoDelta(model, init_loc_fn=init_to_value(values=start))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.03}), Trace_ELBO())
    for _ in range(400):
        svi.step(data.x, data.y)
    fitted = guide.median(data.x, data.y)
    error = (fitted[sites.EXPERTS_WEIGHT] - data.truth.experts_weight).norm(dim=1).max()
    assert float(error) < 0.1


def test_svi_subsampled_autonormal_runs_and_improves():
    data = simulate(2000, 3, seed=3)
    model = MixtureOfExperts(3, bias=False)
    guide = AutoNormal(model, init_loc_fn=init_to_value(values=data.truth.site_values(bias=False)))
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.02}), Trace_ELBO())
    losses = [svi.step(data.x, data.y, subsample_size=200) for _ in range(150)]
    assert np.isfinite(losses).all()
    assert np.mean(losses[-20:]) < np.mean(losses[:20])


def test_nuts_on_a_small_problem_stays_near_truth():
    data = simulate(300, 2, seed=4, noise=0.3, gate_norm=2.0)
    model = MixtureOfExperts(2, bias=False)
    kernel = NUTS(model, init_strategy=init_to_value(values=data.truth.site_values(bias=False)))
    mcmc = MCMC(kernel, warmup_steps=100, num_samples=100, disable_progbar=True)
    mcmc.run(data.x, data.y)
    samples = mcmc.get_samples()
    assert samples[sites.EXPERTS_WEIGHT].shape == (100, 2, 2)
    posterior_mean = samples[sites.EXPERTS_WEIGHT].mean(0)
    errors = parameter_errors(
        data.truth.__class__(
            experts_weight=posterior_mean,
            experts_bias=torch.zeros(2, dtype=torch.float64),
            gate_weight=samples[sites.GATE_WEIGHT].mean(0),
            gate_bias=torch.zeros(1, dtype=torch.float64),
            noise=samples[sites.NOISE].mean(),
            link="linear",
        ),
        data.truth,
    )
    # 300 rows, noise 0.3: posterior sd of a weight is ~0.03; 0.2 is a generous bound
    assert errors["experts"] < 0.2
    assert abs(float(samples[sites.NOISE].mean()) - 0.3) < 0.05


def test_user_prior_replaces_default():
    model = MixtureOfExperts(
        2, priors={sites.NOISE: dist.HalfNormal(torch.tensor(0.1)), sites.GATE_WEIGHT: 10.0}
    )
    draws = Predictive(model, num_samples=2000)(torch.randn(3, 2))
    assert float(draws[sites.NOISE].mean()) == pytest.approx(0.1 * math.sqrt(2 / math.pi), rel=0.1)
    assert float(draws[sites.GATE_WEIGHT].std()) == pytest.approx(10.0, rel=0.1)


@pytest.mark.parametrize(
    "attribute, value",
    [
        ("noise", lambda: PyroSample(dist.HalfNormal(torch.tensor(0.1)))),
        ("gate_weight", lambda: PyroSample(lambda self: dist.Normal(0.0, 1.0))),
        ("noise", lambda: dist.HalfNormal(torch.tensor(0.1))),
    ],
)
def test_assigning_a_prior_to_an_attribute_is_refused_with_the_priors_equivalent(attribute, value):
    model = MixtureOfExperts(2, bias=False)
    site = attribute.replace("_", ".")
    with pytest.raises(TypeError, match=rf"priors=\{{'{site}': .*\}}") as raised:
        setattr(model, attribute, value())
    assert "takes its priors only through its priors= argument" in str(raised.value)
    # the model is unchanged: the default HalfNormal(1) noise prior, no PyroSample attribute
    assert not hasattr(model, attribute) or not isinstance(getattr(model, attribute), PyroSample)
    noise_prior = model.prior(sites.NOISE, torch.zeros(()))
    assert isinstance(noise_prior, dist.HalfNormal) and float(noise_prior.scale) == 1.0


def test_other_attributes_can_still_be_set():
    model = MixtureOfExperts(2)
    model.description = "two experts"
    assert model.description == "two experts"


@pytest.mark.parametrize(
    "call, error, message",
    [
        (
            lambda m: m(torch.randn(10)),
            ValueError,
            r"x must be a 2-D array of shape \(n, d\); got shape \(10,\)",
        ),
        (lambda m: m(torch.randn(10, 4)), ValueError, "x must have in_features=3 columns"),
        (
            lambda m: m(torch.randn(10, 3), torch.randn(9)),
            ValueError,
            "x and y must have the same number of rows",
        ),
        (
            lambda m: m(torch.randn(10, 3), torch.randn(10, 2)),
            ValueError,
            r"y must be a 1-D array of shape \(n,\)",
        ),
        (
            lambda m: m(torch.tensor([[0.0, float("nan"), 1.0]])),
            ValueError,
            r"x contains NaN or infinite values \(first at row 0, column 1\)",
        ),
        (
            lambda m: m(torch.randn(2, 3), torch.tensor([1.0, float("inf")])),
            ValueError,
            r"y contains NaN or infinite values \(first at row 1\)",
        ),
        (
            lambda m: m([[1.0, 2.0, 3.0]]),
            TypeError,
            "x must be a torch.Tensor or a numpy array; got list",
        ),
        (
            lambda m: m(torch.randn(10, 3), subsample_size=11),
            ValueError,
            "subsample_size must be at most",
        ),
    ],
)
def test_model_bad_input(call, error, message):
    with pytest.raises(error, match=message):
        call(MixtureOfExperts(3))


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(num_experts=0), ValueError, "num_experts must be >= 1"),
        (dict(in_features=0), ValueError, "in_features must be >= 1; got 0"),
        (dict(link="quadratic"), ValueError, "link must be one of"),
        (
            dict(priors={"experts.scale": 1.0}),
            ValueError,
            "priors has an unknown site 'experts.scale'",
        ),
        (dict(priors={"noise": -1.0}), ValueError, r"priors\['noise'\] must be > 0"),
        (
            dict(priors={"gate.weight": dist.Normal(torch.zeros(3), 1.0)}),
            ValueError,
            r"must have shape \(1, 2\)",
        ),
    ],
)
def test_model_constructor_bad_input(kwargs, error, message):
    args = dict(in_features=2)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        MixtureOfExperts(**args)


def test_numpy_input_is_accepted_and_float64():
    model = MixtureOfExperts(2)
    y = model(np.random.default_rng(0).normal(size=(7, 2)))
    assert y.shape == (7,) and y.dtype == torch.float64

"""Joint EM from random starts or a given start (pyromoe.fit_em, pyromoe.core.em)."""

import warnings

import numpy as np
import pytest
import torch

from pyromoe import MoEEstimate, parameter_errors, simulate
from pyromoe.core.em.loop import ConvergenceWarning
from pyromoe.core.em.starts import SCREEN_MAX_ITER, random_start, screened_start
from pyromoe.core.likelihood import log_likelihood
from pyromoe.estimators.em import fit_em
from pyromoe.estimators.gate import fit_gate


@pytest.fixture(scope="module")
def linear_k2():
    return simulate(20_000, 10, num_experts=2, link="linear", seed=0)


@pytest.fixture(scope="module")
def linear_k2_fit(linear_k2):
    return fit_em(linear_k2.x, linear_k2.y, 2, "linear", n_init=5, seed=0)


def _mean_ll(estimate, data):
    return float(estimate.log_likelihood(data.x, data.y).mean())


# ------------------------------------------------------------------------------------- recovery
def test_fit_em_best_of_5_recovers_linear_experts(linear_k2, linear_k2_fit):
    # Reference (docs/algorithm.md section 4): 0.008 at n = 1e5, so about 0.008 * sqrt(5) = 0.018 at 2e4.
    errors = parameter_errors(linear_k2_fit, linear_k2.truth)
    assert errors["experts"] < 0.05  # measured 0.020
    assert errors["gate"] < 0.15  # measured 0.081
    assert errors["noise"] < 0.02  # measured 0.004
    assert float(linear_k2_fit.experts_bias.abs().max()) < 0.05  # the true intercepts are 0


def test_fit_em_reports_every_start(linear_k2_fit):
    diagnostics = linear_k2_fit.diagnostics
    per_start = diagnostics["log_likelihood_per_start"]
    assert linear_k2_fit.method == "em"
    assert diagnostics["n_init"] == 5 and diagnostics["start_kinds"] == ["random"] * 5
    assert len(per_start) == len(diagnostics["n_iter_per_start"]) == 5
    assert diagnostics["best_start"] == int(np.argmax(per_start))
    assert diagnostics["log_likelihood_trace"][-1] == per_start[diagnostics["best_start"]]
    assert diagnostics["converged"] and all(diagnostics["converged_per_start"])
    assert diagnostics["objective"] == "mean log-likelihood"


def test_fit_em_best_start_objective_is_the_returned_estimates_log_likelihood(
    linear_k2, linear_k2_fit
):
    assert _mean_ll(linear_k2_fit, linear_k2) == pytest.approx(
        linear_k2_fit.diagnostics["log_likelihood_trace"][-1], abs=1e-12
    )


def test_fit_em_best_of_5_recovers_tanh_experts():
    data = simulate(20_000, 10, num_experts=2, link="tanh", seed=0)
    fit = fit_em(data.x, data.y, 2, "tanh", n_init=5, seed=0)
    errors = parameter_errors(fit, data.truth)
    assert errors["experts"] < 0.1  # measured 0.037 (reference 0.016 at n = 1e5)
    assert errors["noise"] < 0.02
    # Gauss-Newton with step halving keeps EM monotone for a nonlinear link too
    assert np.diff(fit.diagnostics["log_likelihood_trace"]).min() >= -1e-12


def test_fit_em_recovers_intercepts(linear_k2):
    data = simulate(20_000, 10, num_experts=2, link="linear", bias=True, seed=3)
    fit = fit_em(data.x, data.y, 2, n_init=2, seed=0)
    errors = parameter_errors(fit, data.truth)
    assert errors["experts"] < 0.05
    assert errors["experts_bias"] < 0.03  # measured 0.008 (true intercepts -0.40, -0.53)
    assert errors["gate_bias"] < 0.1  # measured 0.020


def test_fit_em_from_the_truth_ends_at_least_as_likely_as_the_truth(linear_k2):
    fit = fit_em(linear_k2.x, linear_k2.y, 2, "linear", init=linear_k2.truth)
    diagnostics = fit.diagnostics
    assert diagnostics["n_init"] == 1 and diagnostics["start_kinds"] == ["given"]
    assert diagnostics["best_start"] == 0
    assert _mean_ll(fit, linear_k2) >= _mean_ll(linear_k2.truth, linear_k2)
    assert diagnostics["log_likelihood_trace"][0] == pytest.approx(
        _mean_ll(linear_k2.truth, linear_k2), abs=1e-12
    )
    assert parameter_errors(fit, linear_k2.truth)["experts"] < 0.05


def test_fit_em_with_init_and_extra_random_starts_reports_kinds(linear_k2):
    fit = fit_em(linear_k2.x, linear_k2.y, 2, "linear", init=linear_k2.truth, n_init=3, max_iter=50)
    diagnostics = fit.diagnostics
    assert diagnostics["start_kinds"] == ["given", "random", "random"]
    per_start = diagnostics["log_likelihood_per_start"]
    assert diagnostics["best_start"] == int(np.argmax(per_start))


def test_fit_em_similar_experts_best_start_is_best_and_accurate():
    # k = 3 experts with pairwise cosine 0.8 (docs/algorithm.md section 4): random starts can get stuck
    # (here start 2 ends 0.03 nats/row below the others); the best start must not be.
    data = simulate(
        20_000, 10, num_experts=3, expert_cosine=0.8, gate="orthogonal", gate_norm=2.0, seed=0
    )
    fit = fit_em(data.x, data.y, 3, "linear", n_init=5, seed=0)
    per_start = fit.diagnostics["log_likelihood_per_start"]
    best = fit.diagnostics["best_start"]
    assert all(per_start[best] >= value for value in per_start)
    # EM started at the truth reaches 0.039 on these data; measured 0.039 for the best start
    assert parameter_errors(fit, data.truth)["experts"] < 0.1
    assert _mean_ll(fit, data) >= _mean_ll(data.truth, data)


# ------------------------------------------------------------------------------------- options
def test_fit_em_map_with_tight_prior_shrinks_the_weights(linear_k2):
    ml = fit_em(linear_k2.x, linear_k2.y, 2, n_init=1, seed=0)
    tight = fit_em(linear_k2.x, linear_k2.y, 2, n_init=1, seed=0, prior_scale=0.03)
    assert tight.diagnostics["objective"] == "log posterior / n"
    # the gate's curvature is ~n/4 per weight against a ridge of 1 / 0.03^2 = 1111: measured
    # 1.006 -> 0.584; the experts' is ~n/2 against sigma^2 / s^2 = 278: measured 1.00 -> 0.96
    assert float(tight.gate_weight.norm()) < 0.8 * float(ml.gate_weight.norm())
    assert float(tight.experts_weight.norm(dim=-1).max()) < float(
        ml.experts_weight.norm(dim=-1).max()
    )
    assert np.diff(tight.diagnostics["log_likelihood_trace"]).min() >= -1e-12


def test_fit_em_without_bias_keeps_offsets_at_zero(linear_k2):
    fit = fit_em(linear_k2.x, linear_k2.y, 2, n_init=1, bias=False)
    assert torch.equal(fit.experts_bias, torch.zeros(2, dtype=torch.float64))
    assert torch.equal(fit.gate_bias, torch.zeros(1, dtype=torch.float64))
    assert parameter_errors(fit, linear_k2.truth)["experts"] < 0.05


@pytest.mark.filterwarnings("ignore::pyromoe.core.em.loop.ConvergenceWarning")
def test_fit_em_same_seed_same_fit(linear_k2):
    a = fit_em(linear_k2.x, linear_k2.y, 2, n_init=1, seed=7, max_iter=5)
    b = fit_em(linear_k2.x, linear_k2.y, 2, n_init=1, seed=7, max_iter=5)
    assert torch.equal(a.experts_weight, b.experts_weight)


def test_fit_em_accepts_numpy_float32_and_follows_dtype(linear_k2):
    fit = fit_em(linear_k2.x.float().numpy(), linear_k2.y.float().numpy(), 2, n_init=1)
    assert fit.experts_weight.dtype == torch.float32 and fit.noise.dtype == torch.float32
    assert parameter_errors(fit.to(dtype=torch.float64), linear_k2.truth)["experts"] < 0.05


def test_random_start_is_scaled_to_the_data():
    generator = torch.Generator().manual_seed(0)
    x = 100.0 * torch.randn(5000, 4, generator=generator, dtype=torch.float64)
    y = 3.0 + 10.0 * torch.randn(5000, generator=generator, dtype=torch.float64)
    start = random_start(x, y, 3, "linear", torch.Generator().manual_seed(1))
    assert float(start.noise) == pytest.approx(10.0, rel=0.05)
    # a_i . x has about the spread of y (chi-square with d = 4 degrees of freedom: within 0.1x..3x)
    spread = (x @ start.experts_weight.T).std(dim=0)
    assert bool((spread > 1.0).all() and (spread < 30.0).all())
    assert float((start.gate_weight * 100.0).norm()) < 1.0  # a nearly flat gate


def test_screened_start_is_the_best_of_its_short_fits_and_one_candidate_is_a_plain_draw():
    data = simulate(3000, 4, num_experts=3, expert_cosine=0.8, gate="random", seed=2, bias=True)
    plain = random_start(data.x, data.y, 3, "linear", torch.Generator().manual_seed(5))
    one = screened_start(
        data.x, data.y, 3, "linear", torch.Generator().manual_seed(5), candidates=1
    )
    assert torch.equal(one.experts_weight, plain.experts_weight) and one.diagnostics == {}
    # rows < n: the candidates are screened on a random subsample of that many rows
    start = screened_start(data.x, data.y, 3, "linear", torch.Generator().manual_seed(5), rows=2000)
    values = start.diagnostics["screen_objective_per_candidate"]
    assert len(values) == 4 and start.diagnostics["screen_rows"] == 2000
    assert values[start.diagnostics["screen_best"]] == max(values)

    # the winner is an EM iterate, not a raw draw: far above the raw draw's objective
    def mean_loglik(estimate):
        return float(log_likelihood(data.x, data.y, estimate.params, estimate.link).mean())

    assert mean_loglik(start) > mean_loglik(plain) + 0.1
    assert SCREEN_MAX_ITER == 50


def test_screened_random_starts_find_the_right_basin_on_similar_experts():
    # k = 3, expert cosine 0.8 (benchmarks/random_starts.py's setting): there 8 of 100 plain
    # draws ended in a wrong basin and 0 of 100 screened starts. 10 single starts: with a 5% rate,
    # 2 or more wrong happens with probability 0.09; with 25%, 0.76.
    data = simulate(
        3000,
        5,
        num_experts=3,
        expert_cosine=0.8,
        gate="random",
        gate_norm=2.0,
        seed=11,
        noise=0.5,
        bias=True,
    )
    reference = fit_em(data.x, data.y, 3, init=data.truth)
    best = reference.diagnostics["log_likelihood_per_start"][0]
    wrong = 0
    for seed in range(10):
        fit = fit_em(data.x, data.y, 3, n_init=1, seed=seed)
        assert fit.diagnostics["screen"] == 4
        wrong += fit.diagnostics["log_likelihood_per_start"][0] < best - 5.0 / 3000
    assert wrong <= 1


def test_fit_em_warns_when_the_best_start_does_not_converge(linear_k2):
    with pytest.warns(ConvergenceWarning, match=r"for the best start \(start \d of 2;"):
        fit = fit_em(linear_k2.x, linear_k2.y, 2, n_init=2, max_iter=2)
    assert fit.diagnostics["n_iter_per_start"] == [2, 2]
    assert fit.diagnostics["converged"] is False


def test_fit_em_does_not_warn_when_only_a_worse_start_stops_early(linear_k2):
    # scikit-learn's rule: the start from the truth converges in 7 iterations and is the best; the
    # random start, stopped at max_iter=10 (it needs 13), ends lower and only shows in the diagnostics
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fit = fit_em(
            linear_k2.x, linear_k2.y, 2, init=linear_k2.truth, n_init=2, max_iter=10, screen=1
        )
    assert fit.diagnostics["best_start"] == 0 and fit.diagnostics["converged"]
    assert fit.diagnostics["converged_per_start"] == [True, False]


def test_fit_em_does_not_warn_when_every_start_converges(linear_k2):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)
        fit_em(linear_k2.x, linear_k2.y, 2, init=linear_k2.truth)


# ------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def tiny():
    return simulate(50, 3, seed=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        (dict(num_experts=0), ValueError, "num_experts must be >= 1"),
        (dict(num_experts=2.0), TypeError, "num_experts must be an int"),
        (dict(n_init=0), ValueError, "n_init must be >= 1; got 0"),
        (dict(tol=0.0), ValueError, "tol must be > 0"),
        (dict(max_iter=-3), ValueError, "max_iter must be >= 1; got -3"),
        (dict(prior_scale=-1.0), ValueError, "prior_scale must be > 0"),
        (dict(bias=None), TypeError, "bias must be True or False"),
        (dict(seed="0"), TypeError, "seed must be an int"),
        (dict(link="cubic"), ValueError, "link must be one of"),
        (dict(init="truth"), TypeError, "init must be a pyromoe.MoEEstimate"),
    ],
)
def test_fit_em_rejects_bad_arguments(tiny, kwargs, error, message):
    with pytest.raises(error, match=message):
        fit_em(tiny.x, tiny.y, **kwargs)


def test_fit_em_rejects_init_with_other_num_experts(tiny):
    other = simulate(50, 3, num_experts=3, seed=0).truth
    with pytest.raises(ValueError, match="init must have num_experts=2 and in_features=3"):
        fit_em(tiny.x, tiny.y, 2, init=other)


def test_fit_em_rejects_init_with_other_link(tiny):
    with pytest.raises(ValueError, match="init has link Link\\('linear'\\) but fit_em was asked"):
        fit_em(tiny.x, tiny.y, 2, "tanh", init=tiny.truth)


def test_fit_em_rejects_init_with_nan(tiny):
    truth = tiny.truth
    bad = MoEEstimate(
        experts_weight=torch.full_like(truth.experts_weight, float("nan")),
        experts_bias=truth.experts_bias,
        gate_weight=truth.gate_weight,
        gate_bias=truth.gate_bias,
        noise=truth.noise,
        link=truth.link,
    )
    with pytest.raises(ValueError, match="init.experts_weight contains NaN"):
        fit_em(tiny.x, tiny.y, 2, init=bad)


def test_fit_em_rejects_constant_y(tiny):
    with pytest.raises(ValueError, match="y is constant"):
        fit_em(tiny.x, torch.full((50,), 2.0, dtype=torch.float64), 2)


def test_fit_em_rejects_mismatched_rows(tiny):
    with pytest.raises(ValueError, match="same number of rows"):
        fit_em(tiny.x, tiny.y[:-1], 2)


def test_fit_em_rejects_infinite_x(tiny):
    x = tiny.x.clone()
    x[3, 1] = float("inf")
    with pytest.raises(ValueError, match="x contains NaN or infinite values"):
        fit_em(x, tiny.y, 2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fit_em_runs_on_cuda(linear_k2):
    fit = fit_em(linear_k2.x.cuda(), linear_k2.y.cuda(), 2, n_init=2)
    assert fit.experts_weight.device.type == "cuda"
    assert parameter_errors(fit.to(device="cpu"), linear_k2.truth)["experts"] < 0.05


def _threads_calls():
    from pyromoe import initialize, tensor_init

    data = simulate(5000, 3, num_experts=2, seed=0)  # enough rows for the moment start
    t = data.truth
    return [
        lambda n: fit_em(data.x, data.y, 2, n_init=1, max_iter=5, num_threads=n),
        lambda n: fit_gate(
            data.x, data.y, t.experts_weight, t.experts_bias, "linear", max_iter=5, num_threads=n
        ),
        lambda n: tensor_init(data.x, data.y, 2, num_threads=n),
        lambda n: initialize(data.x, data.y, 2, n_init=1, num_threads=n),
    ]


@pytest.mark.parametrize("index", range(4), ids=["fit_em", "fit_gate", "tensor_init", "initialize"])
@pytest.mark.filterwarnings("ignore::pyromoe.core.em.loop.ConvergenceWarning")
def test_num_threads_applies_to_the_call_only_and_is_checked(index, monkeypatch):
    call = _threads_calls()[index]
    seen = []
    set_threads = torch.set_num_threads
    monkeypatch.setattr(torch, "set_num_threads", lambda n: (seen.append(n), set_threads(n)))
    call(None)
    assert seen == []  # None leaves torch's setting alone
    set_threads(2)
    call(1)
    assert seen == [1, 2] and torch.get_num_threads() == 2  # set for the call, then restored
    with pytest.raises(ValueError, match="num_threads must be >= 1"):
        call(0)
    with pytest.raises(TypeError, match="num_threads must be an int"):
        call(1.5)

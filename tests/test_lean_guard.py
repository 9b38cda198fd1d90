"""initialize's lean guard (issue 26 item 1) and the sums of one EM pass against an independent
computation (issue 26 item 2)."""

import warnings
from dataclasses import replace

import pytest
import torch

import pyromoe
from pyromoe import simulate
from pyromoe.core.em.statistics import pass_statistics
from pyromoe.core.likelihood import component_log_probs, gate_logits
from pyromoe.core.links import get_link
from pyromoe.estimators import initialize as init_module
from pyromoe.estimators.initialize import GUARD_MARGIN, STOP_MIN_ITER, _cannot_win


def _quiet(fn, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


# ------------------------------------------------------------------------------- the stop rule
def _geometric(limit: float, gap: float, rate: float, length: int) -> list[float]:
    """A trace converging linearly: ``limit - gap rate^t``."""
    return [limit - gap * rate**t for t in range(length)]


def test_stop_rule_ends_a_run_converging_below_the_target_at_the_derived_iteration():
    target, gap, rate = -1.0, 0.1, 0.7
    stop = _cannot_win(target)
    # limit = target: value + 2 last r / (1 - r) = limit + gap r^t, so the rule fires at the first
    # t > STOP_MIN_ITER with gap r^t < GUARD_MARGIN (t = 13 for these numbers)
    fired = next(t for t in range(1, 60) if stop(_geometric(target, gap, rate, t + 1)))
    expected = next(
        t for t in range(STOP_MIN_ITER + 1, 60) if gap * rate**t < GUARD_MARGIN * (1 - 1e-12)
    )
    assert fired == expected == 13


def test_stop_rule_never_ends_a_run_heading_above_the_target():
    target = -1.0
    stop = _cannot_win(target)
    trace = _geometric(target + 10 * GUARD_MARGIN, 0.1, 0.7, 60)
    assert not any(stop(trace[: t + 1]) for t in range(60))


def test_stop_rule_waits_on_slow_runs_and_rising_steps():
    stop = _cannot_win(0.0)
    slow = _geometric(-1.0, 0.1, 0.97, 30)  # rate over STOP_MAX_RATE: a plateau, not stopped
    assert not stop(slow)
    speeding = [-1.0 - 0.1 * 0.5**t for t in range(10)][::-1]  # increments growing
    assert not stop([-2.0, *speeding])


# ----------------------------------------------------------------------------------- the guard
@pytest.fixture(scope="module")
def similar():
    # similar experts (cosine 0.8) and more rows than the guard's subsample
    return simulate(30_000, 5, 2, expert_cosine=0.8, gate_norm=2.0, noise=0.5, bias=True, seed=11)


def test_initialize_reaches_the_optimum_of_em_from_the_truth_and_records_its_time(similar):
    est = _quiet(pyromoe.initialize, similar.x, similar.y, 2, seed=0)
    reference = _quiet(pyromoe.fit_em, similar.x, similar.y, 2, init=similar.truth)
    diagnostics = est.diagnostics
    assert diagnostics["initializer"] == "tensor" and diagnostics["refine_winner"] == "tensor"
    assert diagnostics["guard_screen_rows"] == 5_000 < similar.x.shape[0]
    # both runs stop when the objective changes by less than tol = 1e-6 per iteration: with EM's
    # linear rate (about 0.7 here) each is within tol r / (1 - r) < 3e-6 of the optimum
    own = float(est.log_likelihood(similar.x, similar.y).mean())
    best = float(reference.log_likelihood(similar.x, similar.y).mean())
    assert abs(own - best) < 6e-6
    split = diagnostics["time_split"]
    steps = ["summary", "moments", "gate_em", "guard_tensor_em", "guard_random_em", "guard_em"]
    # beyond the guard's rows: Newton steps on all rows (here converged, so no EM after them)
    assert list(split) == [*steps, "newton", "final_em", "total"]
    assert diagnostics["newton_stopped"] == "converged" and split["final_em"] == 0.0
    parts = sum(sum(v) if isinstance(v, list) else v for k, v in split.items() if k != "total")
    assert 0 < parts <= split["total"]
    # the random starts reach the tensor start's optimum here, so each stops once it cannot beat it
    assert diagnostics["guard_random_stopped"] == [True] * init_module.AUTO_RANDOM_STARTS


def test_random_starts_win_the_guard_when_the_moment_start_is_in_the_wrong_place(
    similar, monkeypatch
):
    real = init_module._tensor_init

    def symmetric(*args, **kwargs):
        # both experts equal and a flat gate: EM cannot leave this point (a saddle), so the
        # tensor start's EM ends one regression below the mixture's optimum
        moment = real(*args, **kwargs)
        mean = moment.experts_weight.mean(0, keepdim=True).expand_as(moment.experts_weight)
        return replace(
            moment,
            experts_weight=mean.clone(),
            experts_bias=moment.experts_bias.mean().expand(2).clone(),
            gate_weight=torch.zeros_like(moment.gate_weight),
            gate_bias=torch.zeros_like(moment.gate_bias),
        )

    monkeypatch.setattr(init_module, "_tensor_init", symmetric)
    est = _quiet(pyromoe.initialize, similar.x, similar.y, 2, seed=0)
    scores = est.diagnostics["refine_log_likelihoods"]
    assert est.diagnostics["refine_winner"] == "random" and est.method == "em"
    assert scores["random"] > scores["tensor"] + GUARD_MARGIN
    reference = _quiet(pyromoe.fit_em, similar.x, similar.y, 2, init=similar.truth)
    own = float(est.log_likelihood(similar.x, similar.y).mean())
    assert abs(own - float(reference.log_likelihood(similar.x, similar.y).mean())) < 6e-6


def test_random_runs_race_the_best_so_far_not_only_the_rival():
    """With a rival that any run beats (target -inf), the first random run converges and the
    later ones race it: each is stopped once it cannot beat that run (the old rule, a fixed
    target, ran all three to convergence: checked with EM.fit on the same starts)."""
    from pyromoe.core.em.loop import EM
    from pyromoe.core.links import get_link
    from pyromoe.core.sources import TensorSource
    from pyromoe.estimators.moment_setup import MomentOptions

    data = simulate(3000, 4, 2, noise=0.4, gate_norm=2.0, bias=True, seed=2)
    source = TensorSource(data.x, data.y)
    options = MomentOptions(num_experts=2, chunk_size=4096, seed=0)
    link = get_link("linear")
    runs, best = _quiet(init_module._random_runs, source, source, link, options, -float("inf"))
    assert [run.stopped for run in runs] == [False, True, True]
    assert best == 0 and all(run.objective < runs[0].objective + GUARD_MARGIN for run in runs)
    # the same draws under a fixed -inf target all run on to convergence, and none ends higher
    generator = torch.Generator().manual_seed(init_module.child_seed(0, 1))
    like = torch.empty(0, dtype=source.dtype)
    starts = [
        init_module.start_params(
            init_module.random_start(source, None, 2, link, generator), like, True, False
        )
        for _ in range(3)
    ]
    unraced, _ = _quiet(EM(source, link, chunk_size=4096).fit, starts, stop=_cannot_win(-1e300))
    assert not any(run.stopped for run in unraced)
    assert max(run.objective for run in unraced) < runs[0].objective + GUARD_MARGIN
    assert sum(run.n_iter for run in runs[1:]) < sum(run.n_iter for run in unraced[1:])


def test_beyond_two_experts_random_runs_race_the_rival_only():
    """At k = 3 (where the stop rule misjudged random runs raced against one another) a rival
    that any run beats stops none of them: each runs to convergence, as EM.fit's fixed target."""
    from pyromoe.core.links import get_link
    from pyromoe.core.sources import TensorSource
    from pyromoe.estimators.moment_setup import MomentOptions

    data = simulate(1500, 3, 3, noise=0.3, gate_norm=2.0, bias=True, seed=4)
    source = TensorSource(data.x, data.y)
    options = MomentOptions(num_experts=3, chunk_size=4096, seed=0)
    runs, best = _quiet(
        init_module._random_runs, source, source, get_link("linear"), options, -float("inf")
    )
    assert not any(run.stopped for run in runs)
    assert runs[best].objective == max(run.objective for run in runs)


def test_the_guard_stops_its_gate_em_sooner_than_tensor_init():
    """initialize's guard fits the gate with the moment experts fixed only to
    GUARD_GATE_GAIN_PER_ROW nats per row (joint EM follows on the same rows); tensor_init keeps
    its 0.01 nats. Here the moment experts are poor and the gate EM crawls: 131 iterations
    against 55, and the guard's random start still wins and reaches multi-start EM's optimum."""
    data = simulate(
        2000, 10, 2, noise=0.5, gate="random", seed=5, expert_cosine=0.8, gate_norm=2.0, bias=True
    )
    moment = _quiet(pyromoe.tensor_init, data.x, data.y, 2, seed=0)
    estimate = _quiet(pyromoe.initialize, data.x, data.y, 2, seed=0)
    own, guard = moment.diagnostics["gate_n_iter"], estimate.diagnostics["gate_n_iter"]
    assert own > 100 and guard < own / 2  # 131 and 55 on the reference machine
    assert estimate.diagnostics["refine_winner"] == "random"
    multi = _quiet(pyromoe.fit_em, data.x, data.y, 2, seed=0)
    reached = float(estimate.log_likelihood(data.x, data.y).mean())
    assert reached > float(multi.log_likelihood(data.x, data.y).mean()) - 5e-6


# ------------------------------------------------------------------ one pass's sums, checked
def _explicit_statistics(x, y, params, link):
    """The sums of one pass from the explicit design ``u = (x, 1)``, expert by expert."""
    log_probs = component_log_probs(x, y, params, link)
    resp = torch.softmax(log_probs, dim=-1)
    u = torch.cat([x, torch.ones_like(x[:, :1])], 1)
    z = x @ params.experts_weight.T + params.experts_bias
    k = resp.shape[1]
    if link.is_identity:
        weights = resp
        vectors = torch.stack([(resp[:, i] * y) @ u for i in range(k)])
    else:
        g = link.derivative(z)
        weights = resp * g**2
        vectors = torch.stack([(g[:, i] * resp[:, i] * (y - link(z[:, i]))) @ u for i in range(k)])
    matrices = torch.stack([(u * weights[:, i : i + 1]).T @ u for i in range(k)])
    probs = torch.softmax(gate_logits(x, params.gate_weight, params.gate_bias), -1)[:, 1:]
    free = k - 1
    hessian = torch.zeros(free * u.shape[1], free * u.shape[1], dtype=x.dtype)
    for a in range(free):
        for b in range(free):
            w = probs[:, a] * (float(a == b) - probs[:, b])
            block = (u * w[:, None]).T @ u
            hessian[
                a * u.shape[1] : (a + 1) * u.shape[1], b * u.shape[1] : (b + 1) * u.shape[1]
            ] = block
    gradient = torch.stack([(resp[:, a + 1] - probs[:, a]) @ u for a in range(free)])
    return matrices, vectors, hessian, gradient, torch.logsumexp(log_probs, -1).sum()


@pytest.mark.parametrize("k", [2, 3])
@pytest.mark.parametrize("link_name", ["linear", "tanh"])
def test_pass_statistics_equal_the_explicit_design_to_1e_10(k, link_name):
    data = simulate(3_000, 6, k, link=link_name, bias=True, seed=5)
    link = get_link(link_name)
    params = data.truth.params
    params = params._replace(experts_weight=params.experts_weight * 0.9)  # off the truth
    stats = pass_statistics(data.x, data.y, params, link, True, True)
    matrices, vectors, hessian, gradient, log_lik = _explicit_statistics(
        data.x, data.y, params, link
    )
    scale = float(data.x.shape[0])  # sums over n rows: relative error 1e-10 of their size
    for ours, theirs in [
        (stats.expert_matrix, matrices),
        (stats.expert_vector, vectors),
        (stats.gate_hessian, hessian),
        (stats.gate_gradient, gradient),
    ]:
        assert ours.shape == theirs.shape
        assert float((ours - theirs).abs().max()) < 1e-10 * scale
    assert abs(float(stats.log_likelihood - log_lik)) < 1e-10 * scale

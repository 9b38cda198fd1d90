"""GateGuide: the gate's EM/MAP guide as a Pyro guide (issue 24 item 1).

The reference is :func:`pyromoe.fit_gate` on the same objective: the experts (and, where fixed, the
noise) at an ``initialize`` estimate, MAP with the model's Normal(0, 2.5) gate prior. The gate's
statistical error is of order ``1 / sqrt(n)`` (its posterior sd is at least ``2 / sqrt(n)`` for
k = 2 on standard normal inputs), so every fit is asked to land within a twentieth of that,
``0.1 / sqrt(n)``, of the reference.
"""

from __future__ import annotations

import math

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import SVI, Predictive, Trace_ELBO
from pyro.infer.autoguide import AutoDelta, AutoGuideList, AutoNormal, init_to_value
from pyro.optim import Adam

import pyromoe
from pyromoe import GateGuide, sites
from pyromoe.bayes.model import DEFAULT_PRIOR_SCALES

N = 1000
TOL = 0.1 / math.sqrt(N)
GATE_SCALE = DEFAULT_PRIOR_SCALES[sites.GATE_WEIGHT]
EXPERTS = [sites.EXPERTS_WEIGHT, sites.EXPERTS_BIAS]
EVERY_OTHER_SITE = [*EXPERTS, sites.NOISE]


@pytest.fixture(scope="module")
def problem():
    """Data, an ``initialize`` estimate, and fit_gate's MAP gate with the experts and the noise
    fixed at it, started (like every guide below) from a zero gate."""
    data = pyromoe.simulate(N, 2, seed=0, bias=True)
    estimate = pyromoe.initialize(data.x, data.y, num_experts=2, link="linear", seed=0)
    reference = pyromoe.fit_gate(
        data.x,
        data.y,
        estimate.experts_weight,
        estimate.experts_bias,
        "linear",
        noise=estimate.noise,
        fit_noise=False,
        prior_scale=GATE_SCALE,
        init_gate_weight=torch.zeros(1, 2, dtype=data.x.dtype),
        tol=1e-13,
        max_iter=200,
    )
    start = {name: estimate.site_values()[name] for name in EVERY_OTHER_SITE}
    return data, estimate, reference, start


def _gate_error(values: dict, reference) -> float:
    return max(
        float((values[sites.GATE_WEIGHT] - reference.gate_weight).abs().max()),
        float((values[sites.GATE_BIAS] - reference.gate_bias).abs().max()),
    )


def test_gate_guide_trained_by_plain_svi_reaches_fit_gate(problem):
    data, _, reference, start = problem
    model = pyromoe.MixtureOfExperts(2, 2)
    guide = GateGuide(model, init=start, fixed=EVERY_OTHER_SITE, update="map")
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    losses = [svi.step(data.x, data.y) for _ in range(200)]
    point = guide.median(data.x, data.y)
    assert _gate_error(point, reference) < TOL
    for name in EVERY_OTHER_SITE:  # the fixed sites did not move
        assert torch.equal(point[name], start[name].to(point[name]))
    # the loss is -log p(y, gate | experts, noise): n times fit_gate's objective, less the fixed
    # sites' log prior
    fixed_prior = sum(
        float(model.prior(name, data.x).log_prob(start[name].to(data.x))) for name in start
    )
    objective = reference.log_likelihood_trace[-1] * N + fixed_prior
    assert losses[-1] == pytest.approx(-objective, abs=1e-3)


def test_em_steps_reach_fit_gate_in_fewer_steps_than_autodelta_map(problem):
    data, _, reference, start = problem
    model = pyromoe.MixtureOfExperts(2, 2)
    guide = GateGuide(model, init=start, fixed=EVERY_OTHER_SITE)
    objectives, em_steps = [], None
    for step in range(1, 31):
        objectives.append(guide.em_step(data.x, data.y))
        if _gate_error(guide.median(data.x, data.y), reference) < TOL:
            em_steps = step
            break
    assert em_steps is not None and em_steps <= 10
    # the objective is fit_gate's, never decreasing, from the same zero start
    assert objectives[0] == pytest.approx(reference.log_likelihood_trace[0], abs=1e-12)
    assert all(b >= a - 1e-12 for a, b in zip(objectives, objectives[1:]))

    # AutoDelta MAP on the gate, the other sites conditioned on the same values, same start
    pyro.clear_param_store()
    conditioned = poutine.condition(model, data={k: v.to(data.x) for k, v in start.items()})
    zero_gate = {
        sites.GATE_WEIGHT: torch.zeros(1, 2, dtype=data.x.dtype),
        sites.GATE_BIAS: torch.zeros(1, dtype=data.x.dtype),
    }
    delta = AutoDelta(conditioned, init_loc_fn=init_to_value(values=zero_gate))
    svi = SVI(conditioned, delta, Adam({"lr": 0.05}), Trace_ELBO())
    map_steps = None
    for step in range(1, 4 * em_steps + 1):
        svi.step(data.x, data.y)
        if _gate_error(delta.median(data.x, data.y), reference) < TOL:
            map_steps = step
            break
    assert map_steps is None  # Adam has not reached it in four times the EM steps


def test_em_step_with_gate_covariates_matches_fit_gate_in_float32(problem):
    data, estimate, _, start = problem
    z = torch.randn(N, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = pyromoe.fit_gate(
        data.x,
        data.y,
        estimate.experts_weight,
        estimate.experts_bias,
        "linear",
        z=z,
        noise=estimate.noise,
        fit_noise=False,
        prior_scale=GATE_SCALE,
        init_gate_weight=torch.zeros(1, 3, dtype=torch.float64),
        tol=1e-13,
    )
    model = pyromoe.MixtureOfExperts(2, 2, gate_features=3)
    guide = GateGuide(model, init=start, fixed=EVERY_OTHER_SITE)
    design = torch.cat([data.x, z], dim=1).float()  # the model's design [x | z]
    for _ in range(12):
        guide.em_step(design, data.y.float())
    point = guide.median(design, data.y.float())
    assert point[sites.GATE_WEIGHT].shape == (1, 3)
    assert point[sites.GATE_WEIGHT].dtype == torch.float32  # the data's dtype
    assert _gate_error(point, reference) < TOL


def test_em_steps_between_svi_steps_inside_an_autoguide_list(problem):
    """The gate by EM steps, the noise by AutoDelta beside it in an AutoGuideList: the joint
    point is fit_gate's with the noise fitted too (the noise's HalfNormal(1) prior moves the MAP
    point by O(1/n) only)."""
    data, estimate, _, start = problem
    reference = pyromoe.fit_gate(
        data.x,
        data.y,
        estimate.experts_weight,
        estimate.experts_bias,
        "linear",
        noise=estimate.noise,
        prior_scale=GATE_SCALE,
        init_gate_weight=torch.zeros(1, 2, dtype=data.x.dtype),
        tol=1e-13,
    )
    model = pyromoe.MixtureOfExperts(2, 2)
    gate_guide = GateGuide(model, init=start, fixed=EXPERTS)
    guide = AutoGuideList(model)
    guide.append(gate_guide)
    noise_start = {sites.NOISE: start[sites.NOISE] * 1.2}
    guide.append(
        AutoDelta(
            poutine.block(model, hide=list(gate_guide.point_sites)),
            init_loc_fn=init_to_value(values=noise_start),
        )
    )
    svi = SVI(model, guide, Adam({"lr": 0.02}), Trace_ELBO())
    for _ in range(150):
        svi.step(data.x, data.y)
        gate_guide.em_step(data.x, data.y)  # reads the noise from the list's AutoDelta
    point = guide.median(data.x, data.y)
    assert _gate_error(point, reference) < TOL
    assert float(point[sites.NOISE]) == pytest.approx(float(reference.noise), abs=TOL)
    quantiles = gate_guide.quantiles([0.05, 0.95], data.x, data.y)
    assert torch.equal(quantiles[sites.GATE_WEIGHT][0], point[sites.GATE_WEIGHT])


def test_others_autonormal_is_built_over_the_sites_left(problem):
    data, estimate, _, _ = problem
    model = pyromoe.MixtureOfExperts(2, 2)
    guide = GateGuide(model, init=estimate, fixed=[sites.EXPERTS_WEIGHT], others=AutoNormal)
    draws = guide(data.x, data.y)
    assert sorted(draws) == sorted(model.site_shapes)
    assert isinstance(guide.others, AutoNormal)
    assert sorted(guide.others.median()) == [sites.EXPERTS_BIAS, sites.NOISE]
    # started at the estimate (AutoNormal's loc is the start, in unconstrained space)
    assert float(guide.median(data.x, data.y)[sites.NOISE]) == pytest.approx(
        float(estimate.noise), rel=1e-6
    )


def test_training_leaves_the_start_unchanged(problem):
    data, estimate, _, _ = problem
    before = {name: value.clone() for name, value in estimate.site_values().items()}
    model = pyromoe.MixtureOfExperts(2, 2)
    guide = GateGuide(model, init=estimate, fixed=[sites.NOISE], others=AutoDelta, update="map")
    svi = SVI(model, guide, Adam({"lr": 0.05}), Trace_ELBO())
    for _ in range(3):
        svi.step(data.x, data.y)
    moved = guide.median(data.x, data.y)
    assert not torch.equal(moved[sites.EXPERTS_BIAS], before[sites.EXPERTS_BIAS])
    for name, value in estimate.site_values().items():  # the guide's points are copies
        assert torch.equal(value, before[name]), name


def test_predictive_with_the_gate_guide_draws_from_the_mixture_at_its_point(problem):
    data, estimate, reference, start = problem
    model = pyromoe.MixtureOfExperts(2, 2)
    point = {
        **start,
        sites.GATE_WEIGHT: reference.gate_weight,
        sites.GATE_BIAS: reference.gate_bias,
    }
    guide = GateGuide(model, init=point, fixed=EVERY_OTHER_SITE)
    guide(data.x, data.y)  # set up on the observed data, as after training
    num_samples = 200
    draws = Predictive(model, guide=guide, num_samples=num_samples)(data.x)
    assert draws["y"].shape == (num_samples, N)
    assert torch.equal(draws[sites.GATE_WEIGHT][:, 0], point[sites.GATE_WEIGHT].expand(200, 1, 2))
    # the draws' mean is the mixture's mean E[y | x] at the point, within 4 standard errors
    fitted = pyromoe.MoEEstimate(
        estimate.experts_weight,
        estimate.experts_bias,
        reference.gate_weight,
        reference.gate_bias,
        estimate.noise,
        "linear",
    )
    residual = draws["y"] - fitted.predict(data.x)
    standard_error = float(residual.std()) / math.sqrt(num_samples * N)
    assert abs(float(residual.mean())) < 4 * standard_error


def test_bad_input_names_the_fix(problem):
    _, estimate, _, start = problem
    model = pyromoe.MixtureOfExperts(2, 2)
    with pytest.raises(TypeError, match="GateGuide guides a pyromoe.MixtureOfExperts"):
        GateGuide(lambda x, y: None)
    with pytest.raises(TypeError, match="got MixtureOfExperts"):
        GateGuide(pyromoe.MixtureOfExperts)  # the class, not an instance
    with pytest.raises(ValueError, match="one expert and so no gate"):
        GateGuide(pyromoe.MixtureOfExperts(2, 1))
    with pytest.raises(ValueError, match=r"unknown site 'expert\.weight'.*'experts\.weight'"):
        GateGuide(model, init=estimate, fixed=["expert.weight"])
    with pytest.raises(ValueError, match=r"init has unknown sites \['gate\.weights'\]"):
        GateGuide(model, init={"gate.weights": torch.zeros(1, 2)})
    with pytest.raises(ValueError, match=r"init\['noise'\] must have the site's shape \(\)"):
        GateGuide(model, init={sites.NOISE: torch.ones(2)})
    with pytest.raises(ValueError, match="gate site 'gate.weight', which this guide fits"):
        GateGuide(model, init=estimate, fixed=[sites.GATE_WEIGHT])
    with pytest.raises(ValueError, match="needs a value: pass init="):
        GateGuide(model, fixed=[sites.NOISE])
    with pytest.raises(ValueError, match="update must be 'em'"):
        GateGuide(model, update="newton")
    with pytest.raises(TypeError, match="others must be an AutoGuide class"):
        GateGuide(model, init=estimate, others="normal")
    with pytest.raises(ValueError, match="others has no site to guide"):
        GateGuide(model, init=estimate, fixed=EVERY_OTHER_SITE, others=AutoNormal)
    different = pyromoe.MixtureOfExperts(2, 2, priors={sites.GATE_WEIGHT: 5.0})
    with pytest.raises(ValueError, match=r"one Normal\(0, s\) prior.*update='map'"):
        GateGuide(different)
    GateGuide(different, update="map")  # gradient steps take any prior


def test_misuse_at_run_time_names_the_fix(problem):
    data, estimate, _, start = problem
    model = pyromoe.MixtureOfExperts(2, 2)
    with pytest.raises(ValueError, match="needs a guide built with update='em'"):
        GateGuide(model, init=start, fixed=EVERY_OTHER_SITE, update="map").em_step(data.x, data.y)
    alone = GateGuide(model, init=start, fixed=EXPERTS)  # nothing guides the noise
    with pytest.raises(ValueError, match=r"\['noise'\] have none.*fixed=\['noise'\]"):
        alone.em_step(data.x, data.y)
    with pytest.raises(ValueError, match="needs the observed outputs y"):
        GateGuide(model, init=start, fixed=EVERY_OTHER_SITE).em_step(data.x, None)
    overlapping = GateGuide(model, init=estimate, others=AutoNormal(model))  # not blocked
    with pytest.raises(ValueError, match=r"build it on poutine\.block\(model, hide="):
        overlapping(data.x, data.y)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_the_guide_follows_the_data_to_cuda():
    data = pyromoe.simulate(500, 2, seed=0, bias=True, device="cuda")
    model = pyromoe.MixtureOfExperts(2, 2)
    truth = data.truth.site_values()
    start = {name: truth[name] for name in EVERY_OTHER_SITE}
    em = GateGuide(model, init=start, fixed=EVERY_OTHER_SITE)
    for _ in range(10):
        em.em_step(data.x, data.y)
    svi_guide = GateGuide(model, init=start, fixed=EVERY_OTHER_SITE, update="map")
    SVI(model, svi_guide, Adam({"lr": 0.05}), Trace_ELBO()).step(data.x, data.y)
    for guide in (em, svi_guide):
        for value in guide.median(data.x, data.y).values():
            assert value.device.type == "cuda" and value.dtype == data.x.dtype

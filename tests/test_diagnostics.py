"""ArviZ conversion (groups, dims, coords, ArviZ functions) and label alignment."""

from __future__ import annotations

import itertools
import math

import arviz as az
import matplotlib
import numpy as np
import pytest
import torch

from pyromoe import MixtureOfExperts, simulate, sites
from pyromoe.bayes.to_arviz import GROUPS, to_inference_data
from pyromoe.core.labels import align_labels, permute_draws

matplotlib.use("Agg")

NUM_CHAINS, NUM_DRAWS = 2, 50


@pytest.fixture(scope="module")
def data():
    return simulate(200, 3, num_experts=3, noise=0.3, seed=2, bias=True)


@pytest.fixture(scope="module")
def model():
    return MixtureOfExperts(3, 3, bias=True)


def _draws_around(estimate, scale=0.02, seed=0, chains=NUM_CHAINS, draws=NUM_DRAWS):
    """Fake posterior draws: the estimate plus small Gaussian noise (noise kept positive)."""
    generator = torch.Generator().manual_seed(seed)
    out = {}
    for name, value in estimate.site_values(bias=True).items():
        eps = torch.randn((chains, draws, *value.shape), generator=generator, dtype=value.dtype)
        out[name] = value * (1 + scale * eps) if name == sites.NOISE else value + scale * eps
    return out


@pytest.fixture(scope="module")
def idata(data, model):
    return to_inference_data(model, data.x, data.y, _draws_around(data.truth), seed=0)


def test_inference_data_has_every_group(idata):
    assert set(idata.groups()) == set(GROUPS)
    # ArviZ's conventional names: what az.loo, az.plot_ppc and az.summary look for
    assert {"posterior", "log_likelihood", "posterior_predictive", "observed_data"} <= set(GROUPS)


def test_inference_data_dims_and_coords(idata, data):
    post = idata.posterior
    assert post["experts.weight"].dims == ("chain", "draw", "expert", "feature")
    assert post["experts.bias"].dims == ("chain", "draw", "expert")
    assert post["gate.weight"].dims == ("chain", "draw", "gate", "feature")
    assert post["gate.bias"].dims == ("chain", "draw", "gate")
    assert post["noise"].dims == ("chain", "draw")
    assert post.sizes["chain"] == NUM_CHAINS and post.sizes["draw"] == NUM_DRAWS
    assert post["expert"].values.tolist() == [0, 1, 2]
    assert post["gate"].values.tolist() == [1, 2]  # the experts whose logits the gate rows give
    assert post["feature"].values.tolist() == [0, 1, 2]
    assert idata.log_likelihood["y"].dims == ("chain", "draw", "obs")
    assert idata.posterior_predictive["y"].dims == ("chain", "draw", "obs")
    assert idata.observed_data["y"].dims == ("obs",)
    assert idata.constant_data["x"].dims == ("obs", "feature")
    assert idata.observed_data["obs"].values.tolist() == list(range(200))
    np.testing.assert_array_equal(idata.observed_data["y"].values, data.y.numpy())
    np.testing.assert_array_equal(idata.constant_data["x"].values, data.x.numpy())


def test_feature_names_become_coords(data, model):
    draws = _draws_around(data.truth, chains=1, draws=3)
    idata = to_inference_data(
        model, data.x, data.y, draws, feature_names=["a", "b", "c"], posterior_predictive=False
    )
    assert idata.posterior["feature"].values.tolist() == ["a", "b", "c"]
    assert "posterior_predictive" not in idata.groups()


def test_log_likelihood_group_is_the_models_pointwise_log_likelihood(data, model):
    draws = {
        name: value.expand(1, 2, *value.shape) for name, value in data.truth.site_values().items()
    }
    idata = to_inference_data(model, data.x, data.y, draws, posterior_predictive=False)
    expected = data.truth.log_likelihood(data.x, data.y).numpy()
    np.testing.assert_allclose(idata.log_likelihood["y"].values[0, 1], expected, rtol=1e-12)
    total = idata.sample_stats["log_likelihood_total"].values
    np.testing.assert_allclose(total, expected.sum(), rtol=1e-12)
    assert idata.attrs["chain_mean_log_likelihood"] == pytest.approx([expected.sum()], rel=1e-12)


def test_posterior_predictive_has_the_models_mean_and_variance(data, model):
    # 400 predictive draws per row at the true parameters; standardised row means ~ N(0, 1)
    draws = {
        name: value.expand(4, 100, *value.shape) for name, value in data.truth.site_values().items()
    }
    idata = to_inference_data(model, data.x, data.y, draws, log_likelihood=False, seed=3)
    predicted = torch.as_tensor(idata.posterior_predictive["y"].values).reshape(400, -1)
    gate = data.truth.gate_probabilities(data.x)
    from pyromoe.core.likelihood import expert_means

    means = expert_means(
        data.x, data.truth.experts_weight, data.truth.experts_bias, data.truth.link
    )
    mean = (gate * means).sum(-1)
    variance = (gate * means**2).sum(-1) - mean**2 + data.truth.noise**2
    z = (predicted.mean(0) - mean) / (variance / 400).sqrt()
    # mean of 200 squared N(0, 1): 1 +- sqrt(2/200) = 0.1; allow 4 s.e.
    assert abs(float((z**2).mean()) - 1) < 4 * math.sqrt(2 / 200)
    # row variances / true variances: s.e. of the mean ratio sqrt(2 / (399 * 200)) for Gaussian
    # rows; mixtures have heavier tails (at most ~2x that s.e.), so 10 Gaussian s.e. ~ 5 s.e.
    ratio = predicted.var(0) / variance
    assert abs(float(ratio.mean()) - 1) < 10 * math.sqrt(2 / (399 * 200))


def test_arviz_summary_loo_and_plot_trace_work(idata):
    summary = az.summary(idata)
    assert "experts.weight[0, 1]" in summary.index
    assert "gate.weight[1, 0]" in summary.index
    assert len(summary) == 9 + 3 + 6 + 2 + 1
    loo = az.loo(idata)
    assert np.isfinite(loo.elpd_loo)
    axes = az.plot_trace(idata, var_names=["noise", "gate.bias"])
    assert axes.shape == (2, 2)
    import matplotlib.pyplot as plt

    plt.close("all")


def test_sample_stats_are_kept_and_checked(data, model):
    draws = _draws_around(data.truth, chains=2, draws=5)
    stats = {"diverging": np.zeros((2, 5), dtype=bool), "step_size": np.full((2, 5), 0.1)}
    idata = to_inference_data(model, data.x, data.y, draws, sample_stats=stats)
    assert idata.sample_stats["diverging"].dtype == bool
    with pytest.raises(ValueError, match="sample_stats\\['step_size'\\] must have shape"):
        to_inference_data(
            model, data.x, data.y, draws, sample_stats={"step_size": np.zeros((2, 4))}
        )


# ---------------------------------------------------------------------------------- alignment
def test_permute_draws_is_the_batched_moe_estimate_permute(data):
    for perm in itertools.permutations(range(3)):
        expected = data.truth.permute(perm).site_values()
        batched = permute_draws(data.truth.site_values(), torch.tensor(perm))
        for name, value in expected.items():
            assert torch.allclose(batched[name], value, atol=1e-15), (perm, name)


def test_align_labels_restores_deliberately_permuted_draws(data):
    original = _draws_around(data.truth, scale=0.02, seed=1)
    generator = torch.Generator().manual_seed(5)
    perms = torch.stack(
        [torch.randperm(3, generator=generator) for _ in range(NUM_CHAINS * NUM_DRAWS)]
    ).reshape(NUM_CHAINS, NUM_DRAWS, 3)
    switched = permute_draws(original, perms)
    aligned, info = align_labels(switched, data.truth)
    for name, value in original.items():
        assert torch.allclose(aligned[name], value, atol=1e-12), name
    expected_changed = int((perms != torch.arange(3)).any(-1).sum())
    assert expected_changed > 50  # 5/6 of 100 draws switched on average
    assert info["num_draws_relabelled"] == expected_changed
    assert sum(info["num_draws_relabelled_per_chain"]) == expected_changed


def test_switched_draws_keep_their_likelihood(data, model):
    # relabelling is a symmetry of the model: the pointwise log-likelihood must not change
    original = _draws_around(data.truth, scale=0.05, seed=2, chains=1, draws=6)
    perms = torch.tensor(list(itertools.permutations(range(3))))[None]
    switched = permute_draws(original, perms)
    np.testing.assert_allclose(
        model.log_likelihood(data.x, data.y, switched).numpy(),
        model.log_likelihood(data.x, data.y, original).numpy(),
        rtol=1e-10,
    )


def test_to_inference_data_records_the_relabelling(data, model):
    original = _draws_around(data.truth, seed=3, chains=2, draws=4)
    perms = torch.tensor([[0, 1, 2], [1, 0, 2], [2, 1, 0], [0, 1, 2]]).expand(2, 4, 3)
    idata = to_inference_data(
        model, data.x, data.y, permute_draws(original, perms), align=data.truth
    )
    assert idata.attrs["labels_aligned"] == 1
    assert idata.attrs["num_draws_relabelled"] == 4
    np.testing.assert_allclose(
        idata.posterior["experts.weight"].values, original[sites.EXPERTS_WEIGHT].numpy()
    )


def test_align_labels_beyond_six_experts_uses_the_assignment_solver():
    truth = simulate(10, 9, num_experts=8, seed=0).truth
    draws = {name: value.expand(1, 3, *value.shape) for name, value in truth.site_values().items()}
    perm = torch.tensor([[[7, 6, 5, 4, 3, 2, 1, 0], [1, 0, 2, 3, 4, 5, 6, 7], list(range(8))]])
    aligned, info = align_labels(permute_draws(draws, perm), truth)
    assert info["num_draws_relabelled"] == 2
    assert torch.allclose(aligned[sites.EXPERTS_WEIGHT][0, 0], truth.experts_weight, atol=1e-12)


def test_chain_in_a_wrong_mode_shows_in_the_per_chain_log_likelihood(data, model):
    good = _draws_around(data.truth, seed=4, chains=1, draws=10)
    # a wrong mode: experts swapped but the gate not re-referenced
    wrong = dict(good)
    wrong[sites.EXPERTS_WEIGHT] = good[sites.EXPERTS_WEIGHT].flip(-2)
    draws = {name: torch.cat([good[name], wrong[name]]) for name in good}
    idata = to_inference_data(model, data.x, data.y, draws, posterior_predictive=False)
    gap = idata.attrs["chain_log_likelihood_gap"]
    assert gap[0] == 0.0 and gap[1] > 50  # 200 rows, most assigned to the wrong expert


# ---------------------------------------------------------------------------------- bad input
def test_samples_must_be_a_dict(data, model):
    with pytest.raises(TypeError, match="samples must be a non-empty dict"):
        to_inference_data(model, data.x, data.y, [1, 2, 3])


def test_samples_with_the_wrong_site_shape_name_the_site(data, model):
    draws = _draws_around(data.truth, chains=1, draws=2)
    draws[sites.GATE_WEIGHT] = draws[sites.GATE_WEIGHT][..., :2]
    with pytest.raises(ValueError, match="samples\\['gate.weight'\\] must have shape"):
        to_inference_data(model, data.x, data.y, draws)


def test_samples_without_chain_and_draw_dims_are_refused(data, model):
    draws = dict(data.truth.site_values())
    with pytest.raises(ValueError, match="must have shape \\(chain, draw, "):
        to_inference_data(model, data.x, data.y, draws)


def test_samples_with_inconsistent_chains_are_refused(data, model):
    draws = _draws_around(data.truth, chains=2, draws=3)
    draws[sites.NOISE] = draws[sites.NOISE][:1]
    with pytest.raises(ValueError, match="same \\(chain, draw\\)"):
        to_inference_data(model, data.x, data.y, draws)


def test_samples_missing_a_site_are_refused(data, model):
    draws = _draws_around(data.truth, chains=1, draws=2)
    del draws[sites.NOISE]
    with pytest.raises(ValueError, match="samples lacks the model's sites \\['noise'\\]"):
        to_inference_data(model, data.x, data.y, draws)


def test_model_without_log_likelihood_is_refused(data):
    with pytest.raises(TypeError, match="model must be a pyromoe.MixtureOfExperts"):
        to_inference_data(lambda x, y: None, data.x, data.y, _draws_around(data.truth))


def test_align_labels_needs_expert_weights(data):
    with pytest.raises(ValueError, match="must contain the site 'experts.weight'"):
        align_labels({sites.GATE_WEIGHT: torch.zeros(1, 1, 2, 3)}, data.truth)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_to_inference_data_on_cuda(data, model):
    cuda = data.truth.to(device="cuda")
    draws = _draws_around(cuda, chains=1, draws=4)
    idata = to_inference_data(model, data.x.cuda(), data.y.cuda(), draws, align=cuda)
    assert idata.posterior["experts.weight"].shape == (1, 4, 3, 3)

import math

import pytest
import torch

from pyromoe import parameter_errors, simulate
from pyromoe.core.likelihood import gate_logits


def test_same_seed_same_data_and_other_seed_other_data():
    a = simulate(500, 4, num_experts=3, link="tanh", seed=7)
    b = simulate(500, 4, num_experts=3, link="tanh", seed=7)
    c = simulate(500, 4, num_experts=3, link="tanh", seed=8)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y) and torch.equal(a.labels, b.labels)
    assert torch.equal(a.truth.experts_weight, b.truth.experts_weight)
    assert not torch.equal(a.y, c.y)


def test_float32_draw_equals_float64_draw_rounded():
    a = simulate(100, 3, seed=1)
    b = simulate(100, 3, seed=1, dtype=torch.float32)
    assert b.x.dtype == torch.float32
    assert torch.equal(a.x.float(), b.x)


@pytest.mark.parametrize("gate", ["random", "orthogonal"])
def test_labels_agree_with_gate_probability(gate):
    n = 20000
    data = simulate(n, 5, gate=gate, gate_norm=2.0, seed=3)
    t = data.truth
    p1 = torch.sigmoid(data.x @ t.gate_weight[0] + t.gate_bias[0])
    # labels are Bernoulli(p1) given x: their mean is within 3 standard errors of mean(p1)
    standard_error = math.sqrt(float((p1 * (1 - p1)).sum())) / n
    assert abs(float(data.labels.double().mean() - p1.mean())) < 3 * standard_error


def test_labels_follow_softmax_gate_for_three_experts():
    n = 30000
    data = simulate(n, 6, num_experts=3, gate_norm=1.5, seed=4)
    t = data.truth
    probs = torch.softmax(gate_logits(data.x, t.gate_weight, t.gate_bias), -1)
    for i in range(3):
        p = probs[:, i]
        se = math.sqrt(float((p * (1 - p)).sum())) / n
        assert abs(float((data.labels == i).double().mean() - p.mean())) < 3 * se


def test_orthogonal_setting_is_the_papers():
    data = simulate(10, 8, num_experts=3, gate="orthogonal", seed=2)
    t = data.truth
    torch.testing.assert_close(t.experts_weight.norm(dim=1), torch.ones(3, dtype=torch.float64))
    assert float((t.gate_weight @ t.experts_weight.T).abs().max()) < 1e-12
    assert float(t.experts_bias.abs().max()) == 0.0 and float(t.gate_bias.abs().max()) == 0.0


def test_expert_cosine_sets_pairwise_cosine():
    t = simulate(10, 6, num_experts=3, expert_cosine=0.8, gate="orthogonal", seed=0).truth
    gram = t.experts_weight @ t.experts_weight.T
    expected = torch.full((3, 3), 0.8, dtype=torch.float64).fill_diagonal_(1.0)
    torch.testing.assert_close(gram, expected)
    assert float((t.gate_weight @ t.experts_weight.T).abs().max()) < 1e-12


def test_noise_of_residuals_matches_sigma():
    data = simulate(40000, 3, link="relu", noise=0.3, seed=5)
    t = data.truth
    means = torch.relu(data.x @ t.experts_weight.T)
    resid = data.y - means.gather(1, data.labels[:, None]).squeeze(1)
    # sample std of 4e4 normals is within ~4 * sigma / sqrt(2n) of sigma
    assert abs(float(resid.std()) - 0.3) < 4 * 0.3 / math.sqrt(2 * 40000)


def test_truth_is_the_estimators_container():
    data = simulate(50, 3, seed=0)
    assert type(data.truth).__name__ == "MoEEstimate" and data.truth.method == "truth"
    assert parameter_errors(data.truth, data.truth)["experts"] == 0.0


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(n=0), ValueError, "n must be >= 1; got 0"),
        (dict(in_features=2.5), TypeError, "in_features must be an int"),
        (dict(num_experts=1), ValueError, "num_experts must be >= 2"),
        (dict(noise=0.0), ValueError, "noise must be > 0"),
        (dict(noise=-1.0), ValueError, "noise must be > 0"),
        (dict(link="cubic"), ValueError, "link must be one of"),
        (dict(gate="sparse"), ValueError, "gate must be 'random' or 'orthogonal'"),
        (
            dict(in_features=2, gate="orthogonal"),
            ValueError,
            "gate='orthogonal' needs in_features > 2",
        ),
        (dict(expert_cosine=1.2), ValueError, r"expert_cosine must be in \[0, 1\)"),
    ],
)
def test_simulate_bad_input(kwargs, error, message):
    args = dict(n=100, in_features=4)
    args.update(kwargs)
    with pytest.raises(error, match=message):
        simulate(**args)

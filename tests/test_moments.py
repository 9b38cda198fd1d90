"""Streaming moments, the whitened third moment and the link expectations behind them."""

import math

import pytest
import torch

from pyromoe.core.links import LINKS, centred, gaussian_expectation, transform_constants
from pyromoe.core.moments import (
    ThirdMoment,
    choose_alpha,
    second_moment_tensor,
    second_moments,
    standardize,
    t2_noise_floor,
    whitened_third_moment,
)
from pyromoe.estimators.simulate import simulate

F64 = torch.float64


def _data(n=3000, d=4, seed=0, link="linear"):
    data = simulate(n, d, 2, link, 0.5, seed=seed)
    # shift and stretch x so that centring and whitening do real work
    scale = torch.linspace(0.5, 3.0, d, dtype=F64)
    return data.x * scale + 5.0, data.y


def _dense_s3(z):
    """S3(z) for every row, shape (n, d, d, d): the d^3 formula the streaming code avoids."""
    d = z.shape[1]
    eye = torch.eye(d, dtype=z.dtype)
    zzz = torch.einsum("na,nb,nc->nabc", z, z, z)
    sym = (
        torch.einsum("na,bc->nabc", z, eye)
        + torch.einsum("nb,ac->nabc", z, eye)
        + torch.einsum("nc,ab->nabc", z, eye)
    )
    return zzz - sym


def test_streaming_second_moments_equal_one_chunk_to_1e10():
    x, y = _data()
    c = float(y.mean())
    one = second_moments(x, y, centre=c, beta=0.3, chunk_size=x.shape[0])
    many = second_moments(x, y, centre=c, beta=0.3, chunk_size=257)
    assert one.num_chunks == 1 and many.num_chunks == math.ceil(3000 / 257)
    for name in ("mean", "covariance", "weighted", "weight_mean", "weight_square_mean", "first"):
        torch.testing.assert_close(getattr(many, name), getattr(one, name), atol=1e-10, rtol=0)


def test_second_moments_match_direct_centred_formulas():
    x, y = _data()
    p2 = y * y - 0.5 * y
    m = second_moments(x, y, beta=-0.5, chunk_size=500)
    xc = x - x.mean(0)
    torch.testing.assert_close(m.covariance, xc.T @ xc / len(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(m.weighted, (xc * p2[:, None]).T @ xc / len(x), atol=1e-10, rtol=0)
    torch.testing.assert_close(m.first, (xc * y[:, None]).mean(0), atol=1e-10, rtol=0)
    assert float(m.weight_square_mean) == pytest.approx(float((p2 * p2).mean()), rel=1e-12)


def test_standardized_inputs_have_identity_covariance_and_t2_matches_dense():
    x, y = _data()
    m = second_moments(x, y, chunk_size=700)
    st = standardize(m)
    z = (x - st.mean) @ st.whitening
    torch.testing.assert_close(z.T @ z / len(z), torch.eye(4, dtype=F64), atol=1e-10, rtol=0)
    dense = torch.einsum("n,na,nb->ab", y * y, z, z) / len(z) - (y * y).mean() * torch.eye(
        4, dtype=F64
    )
    torch.testing.assert_close(second_moment_tensor(m, st), dense, atol=1e-10, rtol=0)


def test_whitened_third_moment_equals_dense_d3_formula_and_streams():
    x, y = _data(n=2000, d=4)
    yc = y - y.mean()
    m = second_moments(x, y, centre=float(y.mean()), chunk_size=2000)
    st = standardize(m)
    z = (x - st.mean) @ st.whitening
    gen = torch.Generator().manual_seed(3)
    projection = torch.randn(4, 2, generator=gen, dtype=F64)  # any M, not only a whitening one
    gram = projection.T @ projection
    alpha = -2.5
    dense = torch.einsum("n,nabc->abc", yc**3 + alpha * yc, _dense_s3(z)) / len(z)
    dense_w = torch.einsum("abc,ai,bj,ck->ijk", dense, projection, projection, projection)
    one = whitened_third_moment(x, yc, st.mean, st.whitening @ projection, gram, chunk_size=2000)
    many = whitened_third_moment(
        x, y, st.mean, st.whitening @ projection, gram, centre=float(y.mean()), chunk_size=123
    )
    torch.testing.assert_close(one.tensor(alpha), dense_w, atol=1e-10, rtol=0)
    torch.testing.assert_close(many.tensor(alpha), one.tensor(alpha), atol=1e-10, rtol=0)
    torch.testing.assert_close(many.second_moments, one.second_moments, atol=1e-10, rtol=1e-12)
    # the closed form of |phi(u)|^2 behind the variance estimate, against the explicit tensors
    u = z @ projection
    phi = torch.einsum("nabc,ai,bj,ck->nijk", _dense_s3(z), projection, projection, projection)
    norms = (phi**2).sum((1, 2, 3))
    expected = torch.stack([(yc**6 * norms).mean(), (yc**4 * norms).mean(), (yc**2 * norms).mean()])
    torch.testing.assert_close(one.second_moments, expected, rtol=1e-10, atol=0)
    assert u.shape == (2000, 2)


def test_float32_input_accumulates_close_to_float64():
    x, y = _data(n=20000, d=5)
    m64 = second_moments(x, y, chunk_size=4096)
    m32 = second_moments(x.float(), y.float(), chunk_size=4096)
    assert m32.weighted.dtype == F64  # accumulators stay float64
    rel = (m32.weighted - m64.weighted).norm() / m64.weighted.norm()
    assert float(rel) < 1e-5  # float32 rounding per chunk only, no cancellation from x's mean 5


def test_choose_alpha_minimises_the_noise_to_signal_ratio_on_a_grid():
    data = simulate(20000, 6, 2, "tanh", 0.5, seed=2)
    x, y = data.x, data.y
    m = second_moments(x, y)
    st = standardize(m)
    evals, evecs = torch.linalg.eigh(second_moment_tensor(m, st))
    projection = evecs[:, -2:] * evals[-2:].rsqrt()
    third = whitened_third_moment(
        x, y, st.mean, st.whitening @ projection, projection.T @ projection
    )
    alpha, ratio = choose_alpha(third, float((y * y).mean()))

    def r(a):
        return third.variance(a) / float(third.tensor(a).pow(2).sum())

    assert ratio == pytest.approx(r(alpha), rel=1e-9)
    grid = torch.linspace(-30, 30, 601).tolist()
    assert all(r(alpha) <= r(a) * (1 + 1e-9) for a in grid)
    assert r(alpha) < 0.5 * r(
        0.0
    )  # tanh with alpha = 0 is much noisier (docs/algorithm.md section 2)


def test_choose_alpha_is_the_control_variate_when_b_has_no_signal():
    a = torch.zeros(2, 2, 2, dtype=F64)
    a[0, 0, 0] = 1.0
    third = ThirdMoment(a, torch.zeros_like(a), torch.tensor([2.0, 0.5, 1.0], dtype=F64), 100, 1)
    assert choose_alpha(third, 1.0)[0] == pytest.approx(-0.5)


@pytest.mark.parametrize("name", ["relu", "leaky_relu", "tanh", "sigmoid", "linear"])
def test_gaussian_expectation_matches_fine_riemann_sum(name):
    link = LINKS[name]
    t = torch.linspace(-12, 12, 400_001, dtype=F64)
    density = torch.exp(-t * t / 2) / math.sqrt(2 * math.pi) * (t[1] - t[0])
    he3 = t**3 - 3 * t
    for scale, power in [(0.7, 1), (1.3, 2), (2.0, 3)]:
        numeric = float((centred(link, scale * t) ** power * he3 * density).sum())
        exact = float(gaussian_expectation(link, scale, power, 3))
        assert exact == pytest.approx(numeric, abs=1e-7)


def test_transform_constants_match_closed_forms():
    # docs/algorithm.md section 2: relu beta = -2 sqrt(2/pi), alpha = -3 sigma^2 - 6; leaky(0.1)
    alpha, beta = transform_constants(LINKS["relu"], 0.5)
    assert beta == pytest.approx(-2 * math.sqrt(2 / math.pi), abs=1e-12)
    assert alpha == pytest.approx(-3 * 0.25 - 6, abs=1e-12)
    alpha, beta = transform_constants(LINKS["leaky_relu"], 0.5)
    assert beta == pytest.approx(-2 * 0.9 * math.sqrt(2 / math.pi), abs=1e-12)
    assert alpha == pytest.approx(-3 * 0.25 - 6 * 1.11, abs=1e-12)
    # beta scales with the norm, alpha's link part with its square
    alpha2, beta2 = transform_constants(LINKS["relu"], 0.5, scale=2.0)
    assert beta2 == pytest.approx(2 * -2 * math.sqrt(2 / math.pi)) and alpha2 == pytest.approx(
        -0.75 - 24
    )
    assert transform_constants(LINKS["tanh"], 0.5) == (None, 0.0)


def test_standardize_rejects_a_constant_column():
    x = torch.randn(200, 3, dtype=F64)
    x[:, 1] = 2.0
    m = second_moments(x, x[:, 0])
    with pytest.raises(ValueError, match=r"column\(s\) \[1\] of x are constant"):
        standardize(m)


def test_standardize_rejects_collinear_columns():
    x = torch.randn(200, 3, dtype=F64)
    x[:, 2] = x[:, 0] - x[:, 1]
    m = second_moments(x, x[:, 0])
    with pytest.raises(ValueError, match="linearly dependent"):
        standardize(m)


def test_second_moments_rejects_bad_chunk_size():
    x = torch.randn(10, 2, dtype=F64)
    with pytest.raises(ValueError, match="chunk_size must be an int >= 1"):
        second_moments(x, x[:, 0], chunk_size=0)


def test_t2_noise_floor_is_the_null_block_edge_from_var_p2():
    x, y = _data(n=4000, d=6)
    m = second_moments(x, y, beta=0.2)
    p2 = y * y + 0.2 * y
    edge = 2 * math.sqrt((6 - 2 + 1) * float(p2.var(correction=0)) / 4000)
    assert t2_noise_floor(m, 2, factor=1.0) == pytest.approx(edge, rel=1e-9)
    assert t2_noise_floor(m, 2) == pytest.approx(1.25 * edge, rel=1e-9)

"""The summary pass's Gram of the shifted inputs, and the second-moment pass that takes it.

The summary forms ``sum_n (x_n - shift)(x_n - shift)^T`` (d <= GRAM_MAX_FEATURES) with the pilot
shift the moment passes use; ``second_moments`` on a source whose summary is cached takes that
Gram instead of forming it. Both paths must give the same moments (to 1e-12) on every source
kind, a column-selected source and the rescaled source of extreme-magnitude data; the summary's
largest magnitudes and its NaN / infinity check are unchanged.
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pyromoe import simulate
from pyromoe.core import moments, sources
from pyromoe.core.design import select_columns
from pyromoe.core.links import get_link
from pyromoe.core.moments import second_moments
from pyromoe.core.sources import MemmapSource, TensorSource, as_source
from pyromoe.core.summary import PILOT_ROWS, pilot_shifts
from pyromoe.core.units import exact_scales

da = pytest.importorskip("dask.array")

F64 = torch.float64
FIELDS = ("mean", "covariance", "weighted", "first", "weight_mean", "weight_square_mean")


def _relative(a, b) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


@pytest.fixture(scope="module")
def data():
    """d = 5 with one column of mean 40 and sd 1 (so the pilot shift is not zero)."""
    simulated = simulate(12_000, 5, num_experts=2, link="linear", seed=7)
    x = simulated.x.clone()
    x[:, 2] += 40.0
    return x, simulated.y


def _sources(x, y, folder):
    np.save(folder / "x.npy", x.numpy())
    np.save(folder / "y.npy", y.numpy())
    xm = np.load(folder / "x.npy", mmap_mode="r")
    ym = np.load(folder / "y.npy", mmap_mode="r")
    return {
        "tensor": lambda: as_source(x, y),
        "memmap": lambda: as_source(xm, ym),
        "dask": lambda: as_source(
            da.from_array(x.numpy(), chunks=(3_000, 5)), da.from_array(y.numpy(), 3_000)
        ),
    }


def _direct_moments(x, y, centre, beta):
    """The second moments from the whole data in float64 (independent of the passes)."""
    x, y = x.to(F64), y.to(F64)
    xc = x - x.mean(0)
    yc = y - centre
    p = yc * (yc + beta)
    n = x.shape[0]
    return {
        "mean": x.mean(0),
        "covariance": xc.T @ xc / n,
        "weighted": (xc * p[:, None]).T @ xc / n,
        "first": (yc[:, None] * xc).mean(0),
    }


def test_summary_gram_is_the_gram_of_the_shifted_data(data, tmp_path):
    x, y = data
    shift, _ = pilot_shifts(x[:PILOT_ROWS], y[:PILOT_ROWS])
    assert float(shift[2]) == pytest.approx(float(x[:PILOT_ROWS, 2].mean()), rel=1e-15)
    xs = x - shift
    expected = xs.T @ xs
    for kind, make in _sources(x, y, tmp_path).items():
        summary = make().summary(1_000)
        torch.testing.assert_close(summary.x_shift, shift, rtol=0, atol=0)
        assert _relative(summary.x_gram_shifted, expected) < 1e-12, kind
        assert _relative(summary.x_sd, x.std(0)) < 1e-12, kind
        assert _relative(summary.x_mean, x.mean(0)) < 1e-12, kind


def test_centred_data_have_no_shift_and_the_plain_gram(data):
    x, y = data
    x = x - x.mean(0)
    summary = as_source(x, y).summary(999)
    assert not bool(summary.x_shift.any())
    assert _relative(summary.x_gram_shifted, x.T @ x) < 1e-12


@pytest.mark.parametrize("beta", [0.0, 0.4])
def test_second_moments_with_and_without_the_summary_gram(data, tmp_path, beta, monkeypatch):
    """With the summary cached the pass forms no Gram (spied), and the moments equal those of a
    source without a summary (the pass's own Gram) and the direct float64 formulas."""
    x, y = data
    centre = float(y.mean())
    direct = _direct_moments(x, y, centre, beta)
    flags = []
    spied = moments._second_moment_sums

    def spy(*args):
        flags.append(args[-1])
        return spied(*args)

    monkeypatch.setattr(moments, "_second_moment_sums", spy)
    for kind, make in _sources(x, y, tmp_path).items():
        flags.clear()
        own = second_moments(make(), None, centre=centre, beta=beta, chunk_size=1_100)
        assert flags and all(flags), kind  # its own Gram
        source = make()
        source.summary(1_000)
        flags.clear()
        taken = second_moments(source, None, centre=centre, beta=beta, chunk_size=1_100)
        assert flags and not any(flags), kind  # the summary's Gram
        for name in FIELDS:
            assert _relative(getattr(taken, name), getattr(own, name)) < 1e-12, (kind, name)
        for name, value in direct.items():
            assert _relative(getattr(taken, name), value) < 1e-12, (kind, name)


def test_a_column_source_restricts_the_gram_on_both_axes(data, tmp_path):
    x, y = data
    columns = [4, 2, 0]
    for kind, make in _sources(x, y, tmp_path).items():
        base = make()
        base.summary(1_000)
        selected = select_columns(base, columns)
        summary = selected.cached_summary()  # the base's, restricted: no pass
        full = base.summary()
        index = torch.tensor(columns)
        torch.testing.assert_close(summary.x_shift, full.x_shift[index], rtol=0, atol=0)
        torch.testing.assert_close(
            summary.x_gram_shifted, full.x_gram_shifted[index][:, index], rtol=0, atol=0
        )
        taken = second_moments(selected, None, centre=0.1, chunk_size=1_100)
        own = second_moments(select_columns(make(), columns), None, centre=0.1, chunk_size=1_100)
        direct = _direct_moments(x[:, columns], y, 0.1, 0.0)
        for name in FIELDS:
            assert _relative(getattr(taken, name), getattr(own, name)) < 1e-12, (kind, name)
        for name, value in direct.items():
            assert _relative(getattr(taken, name), value) < 1e-12, (kind, name)


def test_a_column_source_without_a_cached_base_summary_reads_nothing_yet(data):
    x, y = data
    selected = select_columns(as_source(x, y), [0, 1])
    assert selected.cached_summary() is None


def test_rescaled_extreme_data_take_their_own_summary_gram(data, tmp_path):
    x, y = data
    huge = x * 2.0**600
    np.save(tmp_path / "x.npy", huge.numpy())
    base = MemmapSource(np.load(tmp_path / "x.npy", mmap_mode="r"), y.numpy(), torch.device("cpu"))
    units = exact_scales(base, None, get_link("linear"))
    assert units is not None and units.x_scale is not None
    rescaled = base.rescaled(units)
    own = second_moments(base.rescaled(units), None, chunk_size=1_100)
    summary = rescaled.summary(1_000)
    scaled = units.x_to_new(huge)
    xs = scaled - summary.x_shift
    assert _relative(summary.x_gram_shifted, xs.T @ xs) < 1e-12
    taken = second_moments(rescaled, None, chunk_size=1_100)
    direct = _direct_moments(scaled, y, 0.0, 0.0)
    for name in FIELDS:
        assert _relative(getattr(taken, name), getattr(own, name)) < 1e-12, name
    for name, value in direct.items():
        assert _relative(getattr(taken, name), value) < 1e-12, name


def test_float32_gram_is_formed_as_the_moment_pass_forms_it(data):
    x, y = data[0].float(), data[1].float()
    source = as_source(x, y)
    summary = source.summary(1_000)
    shift32 = summary.x_shift.float()
    assert torch.equal(summary.x_shift, shift32.double())  # exact in float32
    xs = (x - shift32).double()
    assert _relative(summary.x_gram_shifted, xs.T @ xs) < 1e-6
    own = second_moments(as_source(x, y), None, chunk_size=1_000)
    taken = second_moments(source, None, chunk_size=1_000)
    for name in FIELDS:  # the same float32 products in the same chunks
        assert _relative(getattr(taken, name), getattr(own, name)) < 1e-12, name


def test_wide_data_form_no_summary_gram_and_the_pass_its_own(data, monkeypatch):
    x, y = data
    monkeypatch.setattr(sources, "GRAM_MAX_FEATURES", 4)
    source = as_source(x, y)
    summary = source.summary(1_000)
    assert summary.x_gram_shifted is None
    assert _relative(summary.x_sd, x.std(0)) < 1e-12
    taken = second_moments(source, None, chunk_size=1_100)
    for name, value in _direct_moments(x, y, 0.0, 0.0).items():
        assert _relative(getattr(taken, name), value) < 1e-12, name


def test_absmax_is_the_largest_magnitude_of_each_column(data):
    x, y = data
    x = x.clone()
    x[17, 0] = -55.0  # a negative value has the largest magnitude
    x[9_001, 3] = 31.0
    summary = TensorSource(x, y).summary(1_000)
    torch.testing.assert_close(summary.x_absmax, x.abs().amax(0), rtol=0, atol=0)
    assert float(summary.x_absmax[0]) == 55.0
    assert summary.y_absmax == float(y.abs().max())


@pytest.mark.parametrize(
    "where, value, name",
    [("x", float("nan"), "x"), ("x", float("-inf"), "x"), ("x", float("inf"), "x"),
     ("y", float("nan"), "y"), ("y", float("-inf"), "y")],
)  # fmt: skip
def test_nan_and_infinity_are_found_with_their_row(data, where, value, name):
    x, y = data[0].numpy().copy(), data[1].numpy().copy()
    row = 5_432
    if where == "x":
        x[row, 3] = value
    else:
        y[row] = value
    source = MemmapSource(x, y, torch.device("cpu"))
    with pytest.raises(
        ValueError, match=rf"^{name} contains NaN or infinite values \(first at row"
    ):
        source.summary(1_000)
    message = f"first at row {row}" + (", column 3)" if where == "x" else ")")
    with pytest.raises(ValueError, match=re.escape(message)):
        MemmapSource(x, y, torch.device("cpu")).summary(777)


def test_squares_that_overflow_are_not_taken_for_bad_values(data):
    """Finite values whose squares overflow: no error, that column's sd not finite (NaN, as
    before the Gram), the others' unchanged."""
    x, y = data
    x = x.clone()
    x[:, 1] *= 1e300
    summary = TensorSource(x, y).summary(1_000)
    assert not bool(torch.isfinite(summary.x_sd[1]))
    others = [0, 2, 3, 4]
    assert _relative(summary.x_sd[others], x[:, others].std(0)) < 1e-12

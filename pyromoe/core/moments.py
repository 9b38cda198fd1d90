"""Streaming score-function moments of the data (docs/algorithm.md sections 2-3), as pure torch functions.

Two passes over the rows of ``x``, each in chunks of ``chunk_size`` rows, on ``x``'s device (``x``
a tensor with ``y`` beside it, or any :class:`~pyromoe.core.sources.Source`: a memory map or a
Dask array is read chunk by chunk, each pass one :meth:`~pyromoe.core.sources.Source.reduce`):

1. :func:`second_moments` accumulates, in ONE pass, the mean and covariance of ``x`` and
   ``E[P2(y) (x - mean)(x - mean)^T]``, ``E[y (x - mean)]``; :func:`standardize` and
   :func:`second_moment_tensor` turn them into the standardiser ``z = (x - mean) W`` and
   ``T2 = E[P2(y) S2(z)]`` with ``S2(z) = z z^T - I``.
2. :func:`whitened_third_moment` accumulates, in ONE pass and never forming a d x d x d tensor,
   the whitened third moment ``T3(M, M, M)`` with ``u = M^T z``, ``G = M^T M``::

       T3(M, M, M) = mean_n P3(y_n) [u_n (x) u_n (x) u_n - sym(u_n (x) G)]

   split as ``A + alpha B`` (``A`` from ``y^3``, ``B`` from ``y``: ``P3(y) = y^3 + alpha y``),
   together with the second moments that estimate its sampling variance, so that
   :func:`choose_alpha` can pick ``alpha`` from the data.

Precision: each chunk's products run in ``x``'s dtype (float32 stays float32 on a GPU), after
subtracting a fixed pilot mean of the first rows (:func:`pyromoe.core.summary.pilot_shifts`, the
summary pass's rule) so that the centring done in float64 afterwards does not cancel digits;
every accumulator across chunks, the powers of ``y`` (``y^6`` enters the variance) and
everything after the passes (centring, whitening, eigen-decompositions) are float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .chunks import default_chunk_size
from .sources import Source, TensorSource
from .summary import PILOT_ROWS, pilot_shifts
from .units import AffineMap

__all__ = [
    "SecondMoments",
    "Standardizer",
    "ThirdMoment",
    "second_moments",
    "standardize",
    "second_moment_tensor",
    "whitened_third_moment",
    "choose_alpha",
    "t2_noise_floor",
]

_F64 = torch.float64


def _check_chunk_size(chunk_size, in_features: int) -> int:
    if chunk_size is None:
        return default_chunk_size(in_features)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(
            f"chunk_size must be an int >= 1 (rows per pass chunk); got {chunk_size!r}"
        )
    return chunk_size


@dataclass(frozen=True)
class SecondMoments:
    """Sums of one pass over the data (float64, on ``x``'s device), already centred.

    Attributes
    ----------
    num_rows : int
    num_chunks : int
    mean : Tensor (d,)
        Mean of ``x``.
    covariance : Tensor (d, d)
        ``E[(x - mean)(x - mean)^T]`` (divided by n).
    weighted : Tensor (d, d)
        ``E[P2(y) (x - mean)(x - mean)^T]``.
    weight_mean : Tensor ()
        ``E[P2(y)]``.
    weight_square_mean : Tensor ()
        ``E[P2(y)^2]`` (sets the sampling-noise floor of T2).
    first : Tensor (d,)
        ``E[(y - centre) (x - mean)]`` (the first-order moment).
    """

    num_rows: int
    num_chunks: int
    mean: torch.Tensor
    covariance: torch.Tensor
    weighted: torch.Tensor
    weight_mean: torch.Tensor
    weight_square_mean: torch.Tensor
    first: torch.Tensor


def second_moments(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    centre: float = 0.0,
    beta: float = 0.0,
    chunk_size: int | None = None,
) -> SecondMoments:
    """One streaming pass: mean and covariance of ``x``, ``E[P2 xc xc^T]`` and ``E[yc xc]``.

    ``yc = y - centre`` and ``P2 = yc^2 + beta yc`` are formed chunk by chunk (float64), so the
    extra memory stays O(chunk_size * d) whatever n.

    When ``x`` is a source whose summary is cached and carries the Gram of the shifted inputs
    (``Summary.x_gram_shifted``, formed in the summary pass for
    ``d <= pyromoe.core.summary.GRAM_MAX_FEATURES``), the pass takes that Gram and its shift and
    forms only the weighted Gram and the products with ``(P2, yc, 1)``; otherwise it forms the
    Gram itself, after the same pilot shift rule. Both give the same moments up to rounding.

    Parameters
    ----------
    x : Tensor (n, d)
    y : Tensor (n,)
    centre : float
        Subtracted from ``y`` first.
    beta : float
        Of ``P2(y) = y^2 + beta y``.
    chunk_size : int, optional
        Rows per chunk of the pass (default :func:`pyromoe.core.chunks.default_chunk_size`):
        bounds the extra memory to O(chunk_size * d) and is a speed knob.

    Returns
    -------
    SecondMoments

    Examples
    --------
    >>> x = torch.randn(100, 3, dtype=torch.float64)
    >>> m = second_moments(x, x[:, 0], chunk_size=32)
    >>> torch.allclose(m.mean, x.mean(0)), m.num_chunks
    (True, 4)
    """
    source = _as_source(x, y)
    n, d = source.shape
    chunk_size = _check_chunk_size(chunk_size, d)
    dtype = source.dtype
    summary = source.cached_summary()
    gram = None if summary is None else summary.x_gram_shifted
    if gram is not None:
        shift = summary.x_shift  # the shift the summary's Gram was formed with
    else:
        # Fixed pilot shift (independent of chunk_size, so that chunked == one-chunk up to
        # rounding); zero unless a column's mean is large against its spread.
        shift, _ = pilot_shifts(*source.head(PILOT_ROWS), dtype)
    use_shift = bool(shift.abs().max() > 0)
    sums = source.reduce(
        _second_moment_sums,
        chunk_size,
        shift.to(dtype) if use_shift else None,
        centre,
        beta,
        gram is None,
    )
    sum_xx, sum_pxx, sums, sum_p, sum_y, num_chunks = sums
    if gram is not None:
        sum_xx = gram.to(sum_pxx.device)
    num_chunks = int(num_chunks)
    sum_px, sum_yx, sum_x = sums
    mean_s = sum_x / n  # mean of x - shift
    covariance = sum_xx / n - torch.outer(mean_s, mean_s)
    weight_mean = sum_p[0] / n
    mean_px = sum_px / n
    weighted = (
        sum_pxx / n
        - torch.outer(mean_px, mean_s)
        - torch.outer(mean_s, mean_px)
        + weight_mean * torch.outer(mean_s, mean_s)
    )
    first = sum_yx / n - (float(sum_y) - n * centre) / n * mean_s
    return SecondMoments(
        num_rows=n,
        num_chunks=num_chunks,
        mean=shift + mean_s,
        covariance=(covariance + covariance.T) / 2,
        weighted=(weighted + weighted.T) / 2,
        weight_mean=weight_mean,
        weight_square_mean=sum_p[1] / n,
        first=first,
    )


def _as_source(x, y) -> Source:
    """``x`` if it is a :class:`~pyromoe.core.sources.Source`, else tensors ``(x, y)`` as one."""
    return x if isinstance(x, Source) else TensorSource(x, y)


def _second_moment_sums(x, y, shift, centre, beta, with_gram=True):
    """One chunk's sums for :func:`second_moments` (float64); without ``with_gram`` the Gram
    ``xs^T xs`` is not formed (a zero in its place: the summary's is used)."""
    dtype = x.dtype
    xs = x - shift if shift is not None else x
    yc = y.to(_F64) - centre
    p = yc * (yc + beta)
    # rows of length n (contiguous): products with a transposed (n, 3) view cost more
    weights = torch.stack([p, yc, torch.ones_like(p)]).to(dtype)
    # two GEMMs (a concatenated one costs an extra 2d-wide copy) and one (3 x d) product
    if beta == 0:  # P2 = yc^2 >= 0: the Gram of |yc| xs with itself, measured faster
        scaled = xs * weights[1].abs()[:, None]
        weighted = scaled.T @ scaled
    else:
        weighted = (xs * weights[0, :, None]).T @ xs
    return (
        (xs.T @ xs).to(_F64) if with_gram else torch.zeros((), dtype=_F64, device=x.device),
        weighted.to(_F64),
        (weights @ xs).to(_F64),
        torch.stack([p.sum(), torch.dot(p, p)]),
        y.to(_F64).sum(),
        torch.ones((), dtype=_F64, device=x.device),
    )


@dataclass(frozen=True)
class Standardizer:
    """The map ``z = (x - mean) @ whitening`` to standardised inputs (mean 0, identity covariance).

    A weight ``a_std`` acting on ``z`` is ``a_user = whitening @ a_std`` on ``x``, with the bias
    shifted by ``- a_user . mean`` (:meth:`to_user`, the map of :mod:`pyromoe.core.units`).

    Attributes
    ----------
    mean : Tensor (d,)
    whitening : Tensor (d, d)
        ``Sigma^{-1/2}`` (symmetric).
    covariance : Tensor (d, d)
    condition_number : float
        Condition number of the covariance of ``x``.
    """

    mean: torch.Tensor
    whitening: torch.Tensor
    covariance: torch.Tensor
    condition_number: float

    def to_user(
        self, weight: torch.Tensor, bias: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Map rows of weights (..., d) and biases (...) on ``z`` to the user's ``x``."""
        if bias is None:
            bias = torch.zeros(weight.shape[:-1], dtype=weight.dtype, device=weight.device)
        units = AffineMap(x_shift=self.mean, x_matrix=self.whitening)
        user = units.to_original({"experts_weight": weight, "experts_bias": bias})
        return user["experts_weight"], user["experts_bias"]


def standardize(moments: SecondMoments) -> Standardizer:
    """The standardiser of the inputs from their mean and covariance.

    Raises
    ------
    ValueError
        If a column of ``x`` is constant or the columns are linearly dependent.
    """
    cov = moments.covariance
    evals, evecs = torch.linalg.eigh(cov)
    top = float(evals[-1])
    if top <= 0 or float(evals[0]) <= 1e-12 * top:
        variances = torch.diagonal(cov)
        constant = torch.nonzero(variances <= 1e-12 * max(top, 1e-300)).flatten().tolist()
        what = (
            f"column(s) {constant} of x are constant"
            if constant
            else "the columns of x are linearly dependent (covariance is singular)"
        )
        raise ValueError(
            f"x must have linearly independent, non-constant columns; {what}. "
            "Drop or combine those columns before fitting."
        )
    whitening = (evecs * evals.rsqrt()) @ evecs.T
    return Standardizer(
        mean=moments.mean,
        whitening=(whitening + whitening.T) / 2,
        covariance=cov,
        condition_number=top / float(evals[0]),
    )


def t2_noise_floor(moments: SecondMoments, num_components: int, factor: float = 1.25) -> float:
    """The |eigenvalue| of ``T2`` that sampling noise alone reaches when only k - 1 are real.

    With k - 1 real components the k-th eigenvalue of ``T2`` is the top one of a pure-noise block
    of size ``d - k + 1`` whose entries have standard deviation ``sqrt(Var(P2) / n)``
    (``Var``, not ``E[P2^2]``: standardising x makes ``E_n[z z^T] = I`` exactly, which removes the
    mean of ``P2``); its top eigenvalue sits near the semicircle edge
    ``2 sqrt((d - k + 1) Var(P2) / n)``. Returned: ``factor`` times that edge.

    Measured (linear, sigma = 0.5): a truly rank-1 T2 (two identical experts, d = 8, n = 1e5) gave
    second eigenvalues of 0.87-1.18 x the edge; genuine pairs with cosine 0.8 (d = 5, n = 2000)
    1.4-1.7 x; tanh k = 3 (d = 10, n = 1e4, orthogonal gate) 1.3-1.9 x; hence ``factor = 1.25``.
    benchmarks/results/moment_map.md checks it on many data sets: at d = 5 the floor is the 95%
    quantile of the k-th eigenvalue on data with one expert fewer (5.00 against 4.97 in units of
    the noise scale, linear, cosine 0.8, n = 2000), and at d = 20 the factor absorbs the null
    block's second-order coupling to the real eigenvalues, which a bare GOE quantile misses.
    """
    n = moments.num_rows
    d = moments.covariance.shape[0]
    variance = max(float(moments.weight_square_mean - moments.weight_mean**2), 0.0)
    return factor * 2.0 * math.sqrt(max(d - int(num_components) + 1, 1) * variance / n)


def second_moment_tensor(moments: SecondMoments, standardizer: Standardizer) -> torch.Tensor:
    """``T2 = E[P2(y) S2(z)] = W^T E[P2 xc xc^T] W - E[P2] I`` on the standardised inputs, (d, d)."""
    w = standardizer.whitening
    t2 = w.T @ moments.weighted @ w
    t2 = t2 - moments.weight_mean * torch.eye(t2.shape[0], dtype=t2.dtype, device=t2.device)
    return (t2 + t2.T) / 2


@dataclass(frozen=True)
class ThirdMoment:
    """The whitened third moment ``T3(alpha) = A + alpha B`` and what estimates its variance.

    Attributes
    ----------
    cubic : Tensor (k, k, k)
        ``A = mean_n y_n^3 phi(u_n)``.
    linear : Tensor (k, k, k)
        ``B = mean_n y_n phi(u_n)``.
    second_moments : Tensor (3,)
        ``mean |y^3 phi|^2``, ``mean <y^3 phi, y phi>``, ``mean |y phi|^2`` (Frobenius over the
        k^3 entries): with ``A``, ``B`` they give the summed variance of the entries of
        ``T3(alpha)`` as a quadratic in alpha.
    num_rows, num_chunks : int
    """

    cubic: torch.Tensor
    linear: torch.Tensor
    second_moments: torch.Tensor
    num_rows: int
    num_chunks: int

    def tensor(self, alpha: float) -> torch.Tensor:
        """``T3(M, M, M)`` for ``P3(y) = y^3 + alpha y``."""
        return self.cubic + alpha * self.linear

    def variance(self, alpha: float) -> float:
        """Estimated summed variance of the entries of :meth:`tensor` (over the sample mean)."""
        saa, sab, sbb = self._centred()
        return float(saa + 2 * alpha * sab + alpha**2 * sbb) / self.num_rows

    def _centred(self) -> tuple[float, float, float]:
        a, b = self.cubic, self.linear
        m = self.second_moments
        saa = float(m[0] - (a * a).sum())
        sab = float(m[1] - (a * b).sum())
        sbb = float(m[2] - (b * b).sum())
        return saa, sab, sbb


def _symmetrised_outer(vector: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """``sym(v (x) G)_abc = v_a G_bc + v_b G_ac + v_c G_ab``."""
    return (
        vector[:, None, None] * gram[None, :, :]
        + vector[None, :, None] * gram[:, None, :]
        + vector[None, None, :] * gram[:, :, None]
    )


def whitened_third_moment(
    x: torch.Tensor,
    y: torch.Tensor,
    mean: torch.Tensor,
    projection: torch.Tensor,
    gram: torch.Tensor,
    *,
    centre: float = 0.0,
    chunk_size: int | None = None,
) -> ThirdMoment:
    """One streaming pass for ``T3(M, M, M)`` split as ``A + alpha B`` (never forms d^3).

    Parameters
    ----------
    x : Tensor (n, d)
        Inputs in the user's coordinates.
    y : Tensor (n,)
        Outputs; ``y - centre`` enters ``P3``.
    mean : Tensor (d,)
        Mean of ``x``.
    projection : Tensor (d, k)
        ``W M``: maps centred ``x`` to ``u = M^T z`` in one product.
    gram : Tensor (k, k)
        ``G = M^T M``.
    centre : float
        Subtracted from ``y`` (chunk by chunk).
    chunk_size : int, optional
        Rows per chunk of the pass (default :func:`pyromoe.core.chunks.default_chunk_size`).

    Returns
    -------
    ThirdMoment

    Examples
    --------
    >>> x = torch.randn(50, 3, dtype=torch.float64)
    >>> eye = torch.eye(3, 2, dtype=torch.float64)
    >>> whitened_third_moment(x, x[:, 0], torch.zeros(3), eye, eye.T @ eye).cubic.shape
    torch.Size([2, 2, 2])
    """
    source = _as_source(x, y)
    n = source.num_rows
    chunk_size = _check_chunk_size(chunk_size, source.in_features)
    k = projection.shape[1]
    device = source.device
    proj_c = projection.to(device=device, dtype=source.dtype)
    offset = (mean.to(_F64) @ projection.to(_F64)).to(device)
    gram = gram.to(device=device, dtype=_F64)
    gram_sq = gram @ gram
    gram_norm2 = float((gram * gram).sum())
    # q = |u|^2, u'Gu, u'G^2u from one product with u (x) u; |phi(u)|^2 = q^3 - 6 q u'Gu
    # + 3 q |G|_F^2 + 6 u'G^2u (phi = u(x)u(x)u - sym(u(x)G); checked against the explicit
    # tensors in the tests). Both matrices contiguous: a product with a transposed view of a
    # tiny matrix took several times as long (torch 2.13, CPU).
    eye = torch.eye(k, dtype=_F64, device=device)
    quadratic_forms = torch.stack([eye.flatten(), gram.flatten(), gram_sq.flatten()])
    sum_uuu, sum_u, sum_sq, num_chunks = source.reduce(
        _third_moment_sums,
        chunk_size,
        proj_c.T.contiguous(),
        offset,
        centre,
        quadratic_forms,
        gram_norm2,
    )
    num_chunks = int(num_chunks)
    sum_uuu = sum_uuu / n
    mean_u = sum_u / n
    cubic = sum_uuu[:k].reshape(k, k, k) - _symmetrised_outer(mean_u[0], gram)
    linear = sum_uuu[k:].reshape(k, k, k) - _symmetrised_outer(mean_u[1], gram)
    return ThirdMoment(
        cubic=cubic,
        linear=linear,
        second_moments=sum_sq / n,
        num_rows=n,
        num_chunks=num_chunks,
    )


def _third_moment_sums(x, y, projection_rows, offset, centre, quadratic_forms, gram_norm2):
    """One chunk's sums for :func:`whitened_third_moment` (float64).

    Everything after the product ``x @ projection`` works on rows of length n (``u`` is (k, n)):
    torch's elementwise kernels and sums over a short last dimension (k) cost many times those
    along a long one, and ``pow`` with tensor exponents many times a product."""
    k = projection_rows.shape[0]
    # u is only k x n: float64 from here on costs nothing next to the product with x
    u = (projection_rows @ x.T).to(_F64) - offset.to(x.device)[:, None]
    yc = y.to(_F64) - centre
    y2 = yc * yc
    y3 = y2 * yc
    powers = torch.stack([y3, yc, y3 * y3, y2 * y2, y2])  # y^3, y, y^6, y^4, y^2
    uu = (u[:, None, :] * u[None, :, :]).reshape(k * k, -1)
    weighted_u = (powers[:2, None, :] * u[None, :, :]).reshape(2 * k, -1)
    q, ugu, ug2u = (quadratic_forms.to(x.device) @ uu).unbind(0)
    phi2 = q * (q * q - 6 * ugu + 3 * gram_norm2) + 6 * ug2u
    return (
        weighted_u @ uu.T,
        powers[:2] @ u.T,
        powers[2:] @ phi2,
        torch.ones((), dtype=_F64, device=x.device),
    )


def choose_alpha(third: ThirdMoment, scale: float) -> tuple[float, float]:
    """The alpha minimising the estimated noise-to-signal ratio of ``T3(alpha) = A + alpha B``.

    The ratio ``R(alpha) = Var(alpha) / |A + alpha B|^2`` (Frobenius norms; ``Var`` the summed
    sampling variance of the entries) is a ratio of two quadratics in alpha, so its stationary
    points solve a quadratic equation; the minimum over those and over ``|alpha| = 1000 scale``
    (the limit ``P3(y) ~ y``) is returned. For the linear link ``B`` has mean zero and this is the
    control-variate choice; for tanh it trades the signal carried by ``B`` against its noise.

    Parameters
    ----------
    third : ThirdMoment
    scale : float
        ``E[y^2]``, the natural unit of alpha.

    Returns
    -------
    (alpha, ratio) : floats

    Examples
    --------
    >>> a = torch.zeros(2, 2, 2); a[0, 0, 0] = 1.0
    >>> t = ThirdMoment(a, torch.zeros(2, 2, 2), torch.tensor([2.0, 0.5, 1.0]), 100, 1)
    >>> round(choose_alpha(t, 1.0)[0], 6)  # control variate: -Cov(A, B) / Var(B)
    -0.5
    """
    saa, sab, sbb = third._centred()
    a, b = third.cubic, third.linear
    p0, p1, p2 = saa, 2 * sab, sbb
    q0, q1, q2 = float((a * a).sum()), 2 * float((a * b).sum()), float((b * b).sum())

    def ratio(alpha: float) -> float:
        signal = q0 + q1 * alpha + q2 * alpha**2
        noise = p0 + p1 * alpha + p2 * alpha**2
        return noise / signal if signal > 0 else math.inf

    big = 1000.0 * max(scale, 1e-12)
    candidates = [0.0, big, -big]
    c2, c1, c0 = p2 * q1 - p1 * q2, 2 * (p2 * q0 - p0 * q2), p1 * q0 - p0 * q1
    if abs(c2) > 1e-300:
        disc = c1 * c1 - 4 * c2 * c0
        if disc >= 0:
            root = math.sqrt(disc)
            candidates += [(-c1 + root) / (2 * c2), (-c1 - root) / (2 * c2)]
    elif abs(c1) > 1e-300:
        candidates.append(-c0 / c1)
    candidates = [c for c in candidates if math.isfinite(c) and abs(c) <= big]
    best = min(candidates, key=ratio)
    return float(best), ratio(best) / third.num_rows

"""The moment step of :func:`pyromoe.tensor_init`: the experts from the tensor moments
(docs/algorithm.md sections 2-3).

Two streaming passes over the data (:mod:`pyromoe.core.moments`) give ``T2 = E[P2(y) S2(z)]`` and
the whitened ``T3``; whitening, the tensor power method and un-whitening
(:mod:`pyromoe.core.tensor`) give the experts' directions, scales and signs on standardised
inputs, mapped back to the user's ``x`` by the standardiser (:mod:`pyromoe.core.units`).
"""

from __future__ import annotations

import math

import torch

from ..core import moments
from ..core.links import Link, gaussian_expectation, transform_constants
from ..core.sources import Source
from ..core.tensor import expert_scales, tensor_power_method, unwhiten, whiten

__all__ = ["moment_experts"]


def _y_moments(source: Source) -> tuple[float, float]:
    """``E[y]`` and ``E[y^2]`` (divided by n) from the source's summary."""
    summary = source.summary()
    n = summary.num_rows
    return summary.y_mean, summary.y_sd**2 * (n - 1) / n + summary.y_mean**2


def _centre_of_y(
    mean: float, second: float, link: Link, center_y: bool | None
) -> tuple[float, bool]:
    """The value subtracted from y before the moments, and whether it is y's mean.

    Bias-free two-expert odd-link model: E[y] = E[h(x) (a_1 - a_0).x] with |h| <= 1/2, so
    E[y]^2 <= |a_1 - a_0|^2 / (2 pi) <= (2 / pi) E[y^2]. A larger mean can only come from an
    intercept; ``center_y=None`` centres exactly then. Centring a bias-free sample by its mean is
    NOT harmless: with a non-orthogonal gate E[y] != 0 and E[(y - c)^2 S2] picks up
    -2 c E[y S2] != 0, a bias that does not shrink with n.
    """
    offset = float(link.odd_offset or 0.0)
    if not link.is_odd:
        return 0.0, False  # relu/leaky: E[y] carries the expert norm, never centred
    if center_y is None:
        second = second - 2 * offset * mean + offset**2
        centred = (mean - offset) ** 2 > (2 / math.pi) * second
    else:
        centred = bool(center_y)
    return (mean, True) if centred else (offset, False)


def moment_experts(
    source: Source, k, link: Link, noise, chunk_size, seed, center_y=None, free_mixing=False
):
    """The moment step on a source: expert weights and biases in user coordinates, noise,
    standardiser, diagnostics (two passes after the source's summary). ``free_mixing``: the
    mixing weights need not be equal (a gate on covariates of its own), see
    :func:`pyromoe.core.tensor.expert_scales`."""
    n, d = source.shape
    mean_y, raw_second = _y_moments(source)
    centre, centred = _centre_of_y(mean_y, raw_second, link, center_y)
    second_y = raw_second - 2 * centre * mean_y + centre**2  # E[(y - c)^2]

    alpha = beta = None
    noise_moment = None
    if not link.is_odd:
        # equal norms r and an orthogonal gate (the case where relu is exact): E[y] = r E[g(t)]
        mean_g = float(gaussian_expectation(link, 1.0, 1, 0))
        mean_g2 = float(gaussian_expectation(link, 1.0, 2, 0))
        r0 = (mean_y - centre) / mean_g
        if not r0 > 0:
            r0 = math.sqrt(second_y / mean_g2)
        noise_moment = math.sqrt(max(second_y - r0**2 * mean_g2, 1e-3 * second_y))
        sigma = noise if noise is not None else noise_moment
        alpha, beta = transform_constants(link, sigma, r0)
    else:
        beta = 0.0
    second = moments.second_moments(source, None, centre=centre, beta=beta, chunk_size=chunk_size)
    standardizer = moments.standardize(second)
    t2 = moments.second_moment_tensor(second, standardizer)
    # Refuse only when the k-th eigenvalue is within sampling noise. The plain semicircle edge
    # 2 sqrt(d E[P2^2] / n) overstated the noise (null eigenvalues at 0.4-0.65 of it at d = 5,
    # n = 2000) and refused good starts; t2_noise_floor uses the null block's size d - k + 1 and
    # Var(P2) (standardising removes E[P2]), which matches the measured null eigenvalues.
    noise_floor = moments.t2_noise_floor(second, k)
    whitening = whiten(t2, k, noise_floor=noise_floor)
    projection = standardizer.whitening @ whitening.projection
    third = moments.whitened_third_moment(
        source, None, second.mean, projection, whitening.gram, centre=centre, chunk_size=chunk_size
    )
    ratio = None
    if link.is_odd and not (link.is_identity and k > 2):
        alpha, ratio = moments.choose_alpha(third, second_y)
    elif link.is_identity:
        alpha = -3.0 * second_y  # exact for k > 2 with an orthogonal gate and equal norms
        ratio = third.variance(alpha) / float(third.tensor(alpha).pow(2).sum())
    else:
        ratio = third.variance(alpha) / float(third.tensor(alpha).pow(2).sum())
    t3 = third.tensor(alpha)
    generator = torch.Generator().manual_seed(int(seed))
    decomposition = tensor_power_method(t3, generator=generator)
    directions = unwhiten(whitening, decomposition.eigenvectors)
    first = standardizer.whitening.T @ second.first  # E[yc z]
    weight_std = expert_scales(
        link,
        directions,
        decomposition.eigenvalues,
        beta=beta,
        first_moment=first,
        free_mixing=free_mixing,
    )
    norms = weight_std.norm(dim=-1)
    if link.is_odd:
        mean_g2 = torch.stack([gaussian_expectation(link, float(r), 2, 0) for r in norms])
        noise_moment = math.sqrt(max(second_y - float(mean_g2.mean()), 1e-3 * second_y))
    # an output offset is an intercept for the linear link only (tanh cannot represent it)
    intercept = centre if (centred and link.is_identity) else 0.0
    bias_std = torch.full((k,), intercept, dtype=torch.float64)
    weight, bias = standardizer.to_user(weight_std, bias_std.to(weight_std.device))
    diagnostics = {
        "t2_eigenvalues": whitening.eigenvalues[: k + 1].tolist(),
        "t2_eigengap": whitening.eigengap,
        "t2_noise_floor": whitening.noise_floor,
        "whitening_condition_number": whitening.condition_number,
        "x_condition_number": standardizer.condition_number,
        "tensor_eigenvalues": decomposition.eigenvalues.tolist(),
        "decomposition_residual": decomposition.residual,
        "alpha": float(alpha),
        "beta": float(beta),
        "t3_noise_to_signal": float(ratio),
        "noise_from_moments": noise_moment,
        "expert_norms_standardised": norms.tolist(),
        "y_centre": centre,
        "y_centred_by_mean": centred,
        "num_chunks": second.num_chunks,
        "passes_over_data": 2,
    }
    return weight, bias, noise_moment, standardizer, diagnostics

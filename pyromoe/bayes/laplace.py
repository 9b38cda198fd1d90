"""Laplace approximation of the posterior at a point estimate: the scale of dispersed starts.

Built from Pyro's own pieces: the potential energy and unconstrained starting point of
:func:`pyro.infer.mcmc.util.initialize_model` (negative log joint density including priors and the
log-Jacobian of each site's transform, exactly what HMC/NUTS sample from) and the Hessian of
:func:`pyro.ops.hessian.hessian`, which differentiates with respect to a list of tensors and
flattens them in list order; that order (site names, sorted) is the layout of ``loc`` and
``covariance``. Unlike :meth:`pyro.infer.autoguide.AutoLaplaceApproximation.laplace_approximation`,
which inverts the Hessian as it is, the curvature is floored (see :func:`laplace_approximation`):
an estimate from moments or EM is close to a mode but need not be one.
"""

from __future__ import annotations

import torch
from pyro.infer.mcmc.util import initialize_model
from pyro.ops.hessian import hessian

from .._validation import as_tensors, check_positive
from ..core.estimate import MoEEstimate
from .init_strategy import check_estimate, check_estimate_fits_model, init_to_moments

__all__ = ["laplace_approximation", "laplace_scales"]


def laplace_approximation(model, x, y, estimate: MoEEstimate, *, min_curvature: float = 0.1):
    """Gaussian (Laplace) approximation of the posterior at ``estimate``, in unconstrained space.

    The Hessian of Pyro's potential energy (negative log joint density including priors and the
    log-Jacobian of the noise's transform) is taken at the estimate. Eigenvalues below
    ``min_curvature`` (an estimate that is not exactly a mode, flat directions) are raised to it, so
    no marginal standard deviation exceeds ``min_curvature ** -0.5``.

    Parameters
    ----------
    model : MixtureOfExperts
    x : Tensor (n, d)
    y : Tensor (n,)
    estimate : MoEEstimate
    min_curvature : float
        Floor on the Hessian's eigenvalues.

    Returns
    -------
    dict
        ``names`` (site order), ``shapes`` (site shapes), ``loc`` (flat unconstrained estimate,
        shape (p,)), ``covariance`` ((p, p)), ``transforms`` (site -> constrained-to-unconstrained
        transform, as Pyro's ``initialize_model`` gives them) and ``unflatten`` (flat vector ->
        ``{site: unconstrained value}``).

    Raises
    ------
    ValueError
        If the estimate does not fit the model (the message names the site).

    Examples
    --------
    >>> from pyromoe import MixtureOfExperts, simulate
    >>> data = simulate(200, 2, seed=0)
    >>> model = MixtureOfExperts(2, 2, bias=False)
    >>> approx = laplace_approximation(model, data.x, data.y, data.truth)
    >>> approx["names"], tuple(approx["covariance"].shape)
    (['experts.weight', 'gate.weight', 'noise'], (7, 7))
    """
    estimate = check_estimate(estimate)
    min_curvature = check_positive(min_curvature, "min_curvature")
    x, y = as_tensors(x, y)
    check_estimate_fits_model(model, x, y, estimate)
    init_params, potential_fn, transforms, _ = initialize_model(
        model,
        model_args=(x, y),
        max_plate_nesting=1,
        init_strategy=init_to_moments(estimate=estimate),
    )
    names = sorted(init_params)
    shapes = {name: tuple(init_params[name].shape) for name in names}
    sizes = [int(torch.Size(shapes[name]).numel()) for name in names]
    values = [init_params[name].detach().requires_grad_() for name in names]
    curvature = hessian(potential_fn(dict(zip(names, values))), values).detach()
    curvature = 0.5 * (curvature + curvature.T)
    eigenvalues, eigenvectors = torch.linalg.eigh(curvature)
    eigenvalues = eigenvalues.clamp(min=min_curvature)
    covariance = (eigenvectors / eigenvalues) @ eigenvectors.T

    def unflatten(theta: torch.Tensor) -> dict[str, torch.Tensor]:
        parts = torch.split(theta, sizes, dim=-1)
        batch = tuple(theta.shape[:-1])
        return {name: part.reshape(batch + shapes[name]) for name, part in zip(names, parts)}

    return {
        "names": names,
        "shapes": shapes,
        "loc": torch.cat([value.detach().reshape(-1) for value in values]),
        "covariance": 0.5 * (covariance + covariance.T),
        "transforms": transforms,
        "unflatten": unflatten,
    }


def laplace_scales(model, x, y, estimate: MoEEstimate, *, min_curvature: float = 0.1):
    """Marginal posterior sds at ``estimate`` (Laplace), per site, in unconstrained space.

    The natural ``jitter`` for :func:`~pyromoe.bayes.init_strategy.init_to_moments`:
    ``init_to_moments(estimate=est, jitter=laplace_scales(model, x, y, est))``. See
    :func:`laplace_approximation`.

    Returns
    -------
    dict of site name -> Tensor of the site's shape

    Examples
    --------
    >>> from pyromoe import MixtureOfExperts, simulate
    >>> data = simulate(500, 3, seed=0)
    >>> scales = laplace_scales(MixtureOfExperts(3, 2, bias=False), data.x, data.y, data.truth)
    >>> scales["experts.weight"].shape
    torch.Size([2, 3])
    """
    approx = laplace_approximation(model, x, y, estimate, min_curvature=min_curvature)
    return approx["unflatten"](approx["covariance"].diagonal().sqrt())

"""The point estimate as a Pyro init strategy (with optional jitter), and the model check it needs.

:func:`init_to_moments` is a sibling of :func:`pyro.infer.autoguide.initialization.init_to_value`:
a callable ``site -> value`` that maps the sample sites of :class:`pyromoe.MixtureOfExperts` (named
in :mod:`pyromoe.core.sites`) to the values of an :class:`pyromoe.MoEEstimate` and defers every other
site to a fallback strategy. It works wherever Pyro takes an init strategy::

    NUTS(model, init_strategy=init_to_moments(estimate=est))
    AutoNormal(model, init_loc_fn=init_to_moments(estimate=est))
    AutoLowRankMultivariateNormal(model, init_loc_fn=init_to_moments(estimate=est))
    AutoDelta(model, init_loc_fn=init_to_moments(estimate=est))

Dispersed starts (docs/algorithm.md section 5): with ``jitter`` each model execution (each MCMC
chain, each autoguide set-up) gets its own draw around the estimate, in the site's unconstrained
space, like :func:`~pyro.infer.autoguide.initialization.init_to_generated`.
:func:`~pyromoe.bayes.laplace.laplace_scales` gives the natural scale for that jitter: the marginal
posterior standard deviations of the Laplace approximation at the estimate.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import replace

import torch
from pyro import poutine
from pyro.infer.autoguide.initialization import InitMessenger, init_to_generated, init_to_median
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to

from .._validation import check_seed
from ..core import likelihood, sites
from ..core.estimate import MoEEstimate

__all__ = [
    "init_to_moments",
    "check_estimate_fits_model",
    "latent_site_shapes",
    "match_noise_model",
]


# ---------------------------------------------------------------------------------------- helpers
def check_estimate(estimate) -> MoEEstimate:
    if not isinstance(estimate, MoEEstimate):
        raise TypeError(
            "estimate must be a pyromoe.MoEEstimate (from tensor_init, fit_em or simulate(...).truth); "
            f"got {type(estimate).__name__}"
        )
    return estimate


def _site_prototype(site: dict) -> torch.Tensor:
    """A tensor with the site's shape, dtype and device, without consuming random numbers if possible."""
    fn = site["fn"]
    try:
        prototype = fn.mean
    except (NotImplementedError, AttributeError):
        prototype = fn.sample()
    shape = fn.batch_shape + fn.event_shape
    return prototype.detach().expand(shape)


def _match_site(site: dict, value: torch.Tensor) -> torch.Tensor:
    """``value`` on the site's device/dtype, broadcast over extra leading batch dims, support-checked."""
    name = site["name"]
    prototype = _site_prototype(site)
    value = value.detach().to(device=prototype.device, dtype=prototype.dtype)
    shape = tuple(prototype.shape)
    # Vectorised particles or plates add leading batch dims; the estimate fills its trailing dims.
    if shape[len(shape) - value.dim() :] != tuple(value.shape) or len(shape) < value.dim():
        hint = (
            " For one noise sd per expert build the model with noise='per_expert'; for a "
            "shared one fit the estimate with noise='shared'."
            if name == sites.NOISE
            else ""
        )
        raise ValueError(
            f"init_to_moments: the estimate's value for site {name!r} has shape "
            f"{tuple(value.shape)} but the model's site has shape {shape}. Build the model with the "
            f"estimate's num_experts and in_features (and bias=True/False as it was fitted).{hint}"
        )
    value = value.expand(shape).clone()
    support = site["fn"].support
    # the check on the unconstrained value also refuses the boundary (noise == 0 -> log 0 = -inf)
    inside = support.check(value).all() and torch.isfinite(biject_to(support).inv(value)).all()
    if not bool(inside):
        raise ValueError(
            f"init_to_moments: the estimate's value for site {name!r} is outside the site's "
            f"support {support} (got {value.flatten()[:4].tolist()}); e.g. a noise of 0. Refit or "
            "replace the estimate's value."
        )
    return value


def _check_jitter(jitter, names) -> dict | float | None:
    """None for no jitter; a float (one scale for every element) or a dict of site -> scale."""
    if jitter is None or jitter is False:
        return None
    if isinstance(jitter, Mapping):
        unknown = sorted(set(jitter) - set(names))
        if unknown:
            raise ValueError(
                f"jitter has scales for unknown sites {unknown}; the estimate's sites are {sorted(names)}"
            )
        scales = {}
        for name, scale in jitter.items():
            scale = torch.as_tensor(scale, dtype=torch.float64).detach()
            if not bool(torch.isfinite(scale).all()) or bool((scale < 0).any()):
                raise ValueError(f"jitter[{name!r}] must hold finite scales >= 0; got {scale}")
            scales[name] = scale
        return scales
    if isinstance(jitter, bool) or not isinstance(jitter, numbers.Real):
        raise TypeError(
            "jitter must be a float >= 0 (a scale in unconstrained space) or a dict of site name -> "
            f"scale (e.g. from laplace_scales); got {type(jitter).__name__}"
        )
    if not (jitter >= 0 and float(jitter) < float("inf")):
        raise ValueError(f"jitter must be a finite number >= 0; got {jitter}")
    return float(jitter) if jitter > 0 else None


def _jittered(site: dict, value: torch.Tensor, scale, generator: torch.Generator) -> torch.Tensor:
    """``value`` moved by ``scale * N(0, 1)`` in the site's unconstrained space."""
    if isinstance(scale, torch.Tensor):
        scale = scale.to(device=value.device, dtype=value.dtype)
        if scale.dim() and tuple(value.shape[value.dim() - scale.dim() :]) != tuple(scale.shape):
            raise ValueError(
                f"jitter scale for site {site['name']!r} has shape {tuple(scale.shape)}; expected "
                f"a scalar or the site's shape {tuple(value.shape)}"
            )
    transform = biject_to(site["fn"].support)
    unconstrained = transform.inv(value)
    noise = torch.randn(unconstrained.shape, generator=generator, dtype=torch.float64)
    noise = noise.to(device=value.device, dtype=value.dtype)
    return transform(unconstrained + scale * noise)


class _JitteredStrategy:
    """One model execution's strategy: fresh jitter draws from a shared generator."""

    def __init__(self, values, scales, generator, fallback):
        self.values, self.scales, self.generator, self.fallback = (
            values,
            scales,
            generator,
            fallback,
        )

    def __call__(self, site):
        name = site["name"]
        if name not in self.values:
            return _fallback(site, self.fallback)
        value = _match_site(site, self.values[name])
        scale = self.scales if not isinstance(self.scales, dict) else self.scales.get(name)
        if scale is None:
            return value
        return _jittered(site, value, scale, self.generator)


class _Generate:
    """Picklable ``generate`` for :func:`init_to_generated`: one :class:`_JitteredStrategy` per call."""

    def __init__(self, values, scales, seed, fallback):
        self.values, self.scales, self.fallback, self.seed = values, scales, fallback, seed
        self.generator = torch.Generator().manual_seed(int(seed))

    def __call__(self):
        return _JitteredStrategy(self.values, self.scales, self.generator, self.fallback)


def _fallback(site, fallback):
    if fallback is not None:
        return fallback(site)
    raise ValueError(
        f"init_to_moments: no value for site {site['name']!r} in the estimate and fallback=None; "
        f"the estimate provides {list(sites.PARAMETER_SITES)}"
    )


# ---------------------------------------------------------------------------------------- public
def init_to_moments(
    site: dict | None = None,
    estimate: MoEEstimate | None = None,
    *,
    fallback: Callable | None = init_to_median,
    jitter: float | Mapping[str, torch.Tensor | float] | None = 0.0,
    seed: int | None = None,
):
    """Initialize the model's parameter sites to a point estimate (a Pyro init strategy).

    Sites named as in :mod:`pyromoe.core.sites` (``experts.weight``, ``experts.bias``, ``gate.weight``,
    ``gate.bias``, ``noise``) take the estimate's values (:meth:`MoEEstimate.site_values`), moved to the
    site's device and dtype; every other site is passed to ``fallback``. Called without ``site`` it
    returns the strategy (a partial of itself, or with ``jitter`` a
    :func:`~pyro.infer.autoguide.initialization.init_to_generated` strategy).

    Parameters
    ----------
    site : dict, optional
        A Pyro sample-site message (Pyro passes it; users leave it out).
    estimate : MoEEstimate
        The point estimate (tensor moments, EM, or the truth of simulated data).
    fallback : callable or None
        Strategy for sites the estimate does not know (default
        :func:`~pyro.infer.autoguide.initialization.init_to_median`); ``None`` makes such a site an error.
    jitter : float or dict of site name -> scale, optional
        ``0`` / ``None`` (default): start exactly at the estimate. A float ``s``: each model execution
        moves every element by ``s * N(0, 1)`` in the site's unconstrained space (log scale for the
        noise). A dict gives per-site scales (scalars or tensors of the site's shape), e.g.
        :func:`~pyromoe.bayes.laplace.laplace_scales`. Each execution of the model (each MCMC
        chain set-up, each autoguide) draws afresh, so chains started from one strategy are dispersed.
    seed : int, optional
        Seed of the private generator used for the jitter, an int in ``[0, 2**63)``. ``None``: a
        fresh seed when the strategy is created (torch's global generator is neither read nor
        advanced); pass a seed for starts you can reproduce.

    Returns
    -------
    callable or Tensor
        The strategy (without ``site``) or the site's initial value (with ``site``).

    Raises
    ------
    TypeError
        If ``estimate`` is not an :class:`MoEEstimate` or ``jitter`` has the wrong type.
    ValueError
        If a value's shape does not fit the model's site (the message names the site), a value lies
        outside the site's support (e.g. ``noise <= 0``), or a site is unknown with ``fallback=None``.

    Examples
    --------
    >>> from pyromoe import MixtureOfExperts, simulate
    >>> from pyro.infer.autoguide import AutoNormal
    >>> data = simulate(200, 3, seed=0)
    >>> model = MixtureOfExperts(3, 2, bias=False)
    >>> guide = AutoNormal(model, init_loc_fn=init_to_moments(estimate=data.truth))
    >>> _ = guide(data.x, data.y)  # the first call sets the guide up at the estimate
    >>> bool(torch.allclose(guide.median()["noise"], data.truth.noise))
    True
    """
    # a seed given is checked; None is drawn (not from the global generator) only for a jitter:
    # a strategy without one, as the fits build and Pyro calls per site, checks no seed
    seed = None if seed is None else check_seed(seed)
    if fallback is not None and not callable(fallback):
        raise TypeError(
            "fallback must be a Pyro init strategy (a callable, e.g. init_to_median) or None; "
            f"got {type(fallback).__name__}"
        )
    if site is None:
        estimate = check_estimate(estimate)
        values = estimate.site_values(bias=True)
        scales = _check_jitter(jitter, values)
        if scales is None:
            return functools.partial(init_to_moments, estimate=estimate, fallback=fallback)
        seed = check_seed(seed) if seed is None else seed
        return init_to_generated(generate=_Generate(values, scales, seed, fallback))

    estimate = check_estimate(estimate)
    values = estimate.site_values(bias=True)
    scales = _check_jitter(jitter, values)
    if scales is None:
        if site["name"] not in values:
            return _fallback(site, fallback)
        return _match_site(site, values[site["name"]])
    seed = check_seed(seed) if seed is None else seed
    return _Generate(values, scales, seed, fallback)()(site)


def check_estimate_fits_model(model, x, y, estimate: MoEEstimate) -> dict[str, tuple[int, ...]]:
    """Check that ``model`` has the estimate's parameter sites with matching shapes.

    Runs the model once (its latent sites at the estimate) and returns ``{site: shape}`` of its latent
    sample sites.

    Raises
    ------
    ValueError
        If the model has none of the sites of :mod:`pyromoe.core.sites`, lacks ``experts.weight`` /
        ``gate.weight`` / ``noise``, or a shape differs (the message names the site).
    """
    check_estimate(estimate)
    latent = latent_site_shapes(model, x, y, init_strategy=init_to_moments(estimate=estimate))
    required = (sites.EXPERTS_WEIGHT, sites.GATE_WEIGHT, sites.NOISE)
    if estimate.num_experts == 1:  # one expert: no gate sites
        required = (sites.EXPERTS_WEIGHT, sites.NOISE)
    missing = [name for name in required if name not in latent]
    if missing:
        raise ValueError(
            f"model must have the sample sites {list(required)} (see pyromoe.core.sites); it lacks "
            f"{missing} and has {sorted(latent)}. Use pyromoe.MixtureOfExperts or name the sites alike."
        )
    return latent


def latent_site_shapes(model, x, y, *, init_strategy=None) -> dict[str, tuple[int, ...]]:
    """``{site: shape}`` of the model's latent sample sites, from one run of the model.

    The run draws from the priors (``init_strategy=None``) or takes the strategy's values; it is
    hidden from any enclosing Pyro handler. The ``obs`` plate's own subsample site is left out.
    """
    if init_strategy is not None:
        model = InitMessenger(init_strategy)(model)
    with poutine.block():
        trace = poutine.trace(model).get_trace(x, y)
    return {
        name: tuple(site["value"].shape)
        for name, site in trace.iter_stochastic_nodes()
        if not site_is_subsample(site)
    }


def match_noise_model(
    model, estimate: MoEEstimate, x=None, y=None
) -> tuple[MoEEstimate, str | None]:
    """``(estimate, note)``: the estimate with the model's noise model, and what was changed.

    A start (or a labelling reference) may come from a fit with the other noise model, e.g.
    :func:`pyromoe.initialize`'s default shared sd for a ``noise="per_expert"`` model. It is
    reconciled, before any work, so that nothing fails after sampling:

    * shared estimate, per-expert model: every expert starts at the shared ``sigma`` (repeated
      ``k`` times);
    * per-expert estimate, shared model: the pooled ``sigma = sqrt(sum_i w_i sigma_i^2)``, with
      ``w_i`` the estimate's mean responsibility of expert ``i`` on ``x``, ``y``
      (``mean_n p(expert i | x_n, y_n)``: the shared-noise M-step of EM given the experts); the
      plain root mean square ``sqrt(mean_i sigma_i^2)`` when no data are given.

    ``note`` (None when nothing changed) says which, with the values; the fits record it in
    ``idata.attrs["init_noise_conversion"]`` and the returned estimate in
    ``diagnostics["noise_conversion"]``.

    Raises
    ------
    ValueError
        When the estimate's number of experts or of inputs differs from the model's (they cannot
        be reconciled); the message names both.
    """
    check_estimate(estimate)
    k, d = getattr(model, "num_experts", None), getattr(model, "in_features", None)
    gate = getattr(model, "gate_features", None)
    for name, mine, theirs in (
        ("num_experts", k, estimate.num_experts),
        ("in_features", d, estimate.in_features),
        ("gate_features", gate if gate is not None else d, estimate.gate_features),
    ):
        if mine is not None and mine != theirs:
            raise ValueError(
                f"the estimate given as init has {name}={theirs} but the model has {name}={mine}; "
                f"an estimate can only start a model of its own shape. Build the model with "
                f"{name}={theirs}, or fit an estimate with {name}={mine} (e.g. "
                f"initialize(x, y, num_experts={k}))"
            )
    wanted = getattr(model, "noise_model", None)
    if wanted is None or wanted == estimate.noise_model:
        return estimate, None
    noise = estimate.noise
    if wanted == "per_expert":
        new = noise.expand(estimate.num_experts).clone()
        note = (
            f"the estimate's shared noise sd {float(noise):.6g} starts each of the "
            f"{estimate.num_experts} experts' noise (repeated)"
        )
    else:
        variances = noise * noise
        if x is not None and y is not None:
            x = torch.as_tensor(x)
            params = estimate.params.like(x)
            with torch.no_grad():
                weights = likelihood.responsibilities(
                    x, torch.as_tensor(y).to(x), params, estimate.link
                )
            weights = weights.mean(0).to(variances)
            how = "responsibility-weighted"
        else:
            weights = torch.full_like(variances, 1.0 / estimate.num_experts)
            how = "root mean square"
        new = (weights * variances).sum().sqrt()
        if not (math.isfinite(float(new)) and float(new) > 0):  # e.g. no data weight: plain rms
            new, how = variances.mean().sqrt(), "root mean square"
        note = (
            f"the estimate's per-expert noise sds {[round(v, 6) for v in noise.tolist()]} start "
            f"the shared noise at their pooled ({how}) sd {float(new):.6g}"
        )
    diagnostics = {**estimate.diagnostics, "noise_conversion": note}
    return replace(estimate, noise=new, diagnostics=diagnostics), note

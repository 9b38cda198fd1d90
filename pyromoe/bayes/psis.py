"""Pareto-smoothed importance sampling (PSIS) of a variational guide's draws against the model.

Yao, Vehtari, Simpson & Gelman (2018), "Yes, but did it work?: Evaluating variational inference"
(ICML): draws ``theta_s`` from a guide ``q`` are importance draws for the posterior, with log
weights

    log w_s = log p(theta_s) + sum_n log p(y_n | x_n, theta_s) - log q(theta_s),

the model's log joint (every prior site and every row) minus the guide's log density, both in the
constrained space the draws live in. The shape ``k`` of a generalised Pareto distribution fitted to
the largest weights (ArviZ's :func:`arviz.psislw`, which also smooths those weights) says whether
the guide is close enough to the posterior for its draws (and any estimate from them) to be
trusted: ``k < 0.5`` good, ``0.5 <= k < 0.7`` usable, ``k >= 0.7`` too far (the importance
estimate's variance is unbounded or its error decays too slowly). Below
:data:`PSIS_KHAT_THRESHOLD`, resampling the draws with the smoothed weights (sampling importance
resampling) corrects them toward the posterior; above it the correction is not to be trusted
either, and only a sampler (:func:`pyromoe.run_nuts`) helps.

:func:`pyromoe.fit_svi` calls :func:`psis_of_guide` on its draws (before relabelling, as the log
joint of a gate with a reference expert is not invariant to relabelling); the pieces are public
for guides fitted by hand: :func:`model_log_joint`, :func:`guide_log_density`,
:func:`importance_log_weights`, :func:`pareto_smoothed_log_weights`, :func:`importance_resample`.
"""

from __future__ import annotations

import math
import time
import warnings
from operator import attrgetter

import numpy as np
import torch
from pyro.infer.autoguide import AutoContinuous, AutoNormal
from torch.distributions import biject_to

from .._validation import child_seed, user_stacklevel
from ..core import likelihood
from ..core.params import Params
from ..core.sources import Source, as_source
from .pointwise import blocks

__all__ = [
    "PSISWarning",
    "PSIS_KHAT_THRESHOLD",
    "guide_log_density",
    "importance_log_weights",
    "importance_resample",
    "model_log_joint",
    "pareto_smoothed_log_weights",
    "psis_of_guide",
]

#: Pareto k-hat above which a guide's draws are not trusted and not resampled (Yao et al. 2018)
PSIS_KHAT_THRESHOLD = 0.7

#: bytes of the (draws, rows, experts) temporaries of one chunk of the log-likelihood pass
_PASS_BYTES = 1 << 25

#: the spawn key of the resampling's seed under the fit's seed (``child_seed(seed, key)``)
RESAMPLE_SEED_KEY = 2


class PSISWarning(UserWarning):
    """A variational fit's draws have Pareto k-hat above :data:`PSIS_KHAT_THRESHOLD` against the
    model (:mod:`pyromoe.bayes.psis`): the guide is too far from the posterior for its intervals
    to be trusted, and importance resampling cannot repair it. Use :func:`pyromoe.run_nuts`."""


def _num_draws(draws: dict[str, torch.Tensor]) -> int:
    return int(next(iter(draws.values())).shape[0])


def _per_draw(term, num_draws: int) -> torch.Tensor:
    """A log-density term summed over everything but the leading draws dimension: ``(S,)``."""
    term = torch.as_tensor(term)
    if term.dim() == 0:
        return term.expand(num_draws)
    return term.reshape(num_draws, -1).sum(-1)


def model_log_joint(model, draws: dict[str, torch.Tensor], x, y=None) -> torch.Tensor:
    """``log p(theta_s) + sum_n log p(y_n | x_n, theta_s)`` per draw, shape ``(S,)``.

    Parameters
    ----------
    model : MixtureOfExperts
    draws : dict of site name -> Tensor (S, *site shape)
        Values of every latent site of the model (constrained, as the model samples them).
    x : Tensor (n, d) or Source
        The fit's data: tensors (with ``y``), or a :class:`~pyromoe.core.sources.Source` read in
        chunks (every row; each chunk holds at most 32 MiB of per-draw, per-row terms).
    y : Tensor (n,), optional
        With tensors ``x``.

    Returns
    -------
    Tensor (S,)
        On the draws' device and dtype.
    """
    source = x if isinstance(x, Source) else as_source(x, y)
    num_draws = _num_draws(draws)
    like = next(iter(draws.values()))
    log_prior = sum(
        _per_draw(model.prior(name, like).log_prob(draws[name]), num_draws)
        for name in model.site_shapes
    )
    params = model.params(draws, like)
    rows = max(1, _PASS_BYTES // (8 * num_draws * (2 * model.num_experts + 2)))

    def chunk_log_likelihood(x_chunk, y_chunk):
        # evaluated in blocks of at most BLOCK_CELLS draws x rows, whose temporaries stay in
        # cache (and reuse the allocator's memory: a 32 MiB chunk's were mapped afresh each time)
        x_chunk, y_chunk = x_chunk.to(like), y_chunk.to(like)
        totals = like.new_zeros(num_draws)
        for drawn, part in blocks(num_draws, x_chunk.shape[0], num_draws):
            block = Params(*(None if value is None else value[drawn] for value in params))
            values = likelihood.log_likelihood(x_chunk[part], y_chunk[part], block, model.link)
            totals[drawn] += values.sum(-1)
        return totals

    return log_prior + source.reduce(chunk_log_likelihood, rows)


def _latent_sites(guide, *args, **kwargs) -> list[tuple[str, dict]]:
    if guide.prototype_trace is None:
        guide(*args, **kwargs)  # sets the guide up (its parameters from its init strategy)
    return list(guide.prototype_trace.iter_stochastic_nodes())


def guide_log_density(guide, draws: dict[str, torch.Tensor], *args, **kwargs) -> torch.Tensor:
    """``log q(theta_s)`` of each draw under an autoguide, in the model's constrained space.

    For :class:`~pyro.infer.autoguide.AutoNormal` (a normal per site in the unconstrained space)
    and every :class:`~pyro.infer.autoguide.AutoContinuous` guide (``AutoMultivariateNormal``,
    ``AutoLowRankMultivariateNormal``, ``AutoDiagonalNormal``, ...: one distribution over the
    concatenated unconstrained sites, :meth:`~pyro.infer.autoguide.AutoContinuous.get_posterior`):
    the unconstrained density at ``u = T^{-1}(theta)`` plus ``log |d u / d theta|``, which is what
    the guide's own trace scores (its auxiliary site plus the ``Delta`` sites' ``log_density``).

    Parameters
    ----------
    guide : AutoNormal or AutoContinuous
        A fitted guide; ``*args, **kwargs`` are the model's arguments (``x, y``), used only to set
        up a guide that has not run yet.
    draws : dict of site name -> Tensor (S, *site shape)

    Returns
    -------
    Tensor (S,)

    Raises
    ------
    TypeError
        For another kind of guide (its density is not known here).
    """
    if not isinstance(guide, (AutoNormal, AutoContinuous)):
        raise TypeError(
            "guide_log_density takes an AutoNormal or an AutoContinuous guide "
            f"(AutoMultivariateNormal, AutoLowRankMultivariateNormal, ...); got "
            f"{type(guide).__name__}"
        )
    num_draws = _num_draws(draws)
    log_density, unconstrained = 0.0, []
    for name, site in _latent_sites(guide, *args, **kwargs):
        value = draws[name]
        transform = biject_to(site["fn"].support)
        u = transform.inv(value)
        log_density = log_density + _per_draw(
            transform.inv.log_abs_det_jacobian(value, u), num_draws
        )
        if isinstance(guide, AutoNormal):
            loc, scale = attrgetter(name)(guide.locs), attrgetter(name)(guide.scales)
            normal = torch.distributions.Normal(loc, scale)
            log_density = log_density + _per_draw(normal.log_prob(u), num_draws)
        else:
            unconstrained.append(u.reshape(num_draws, -1))
    if unconstrained:
        latent = torch.cat(unconstrained, -1)
        log_density = log_density + guide.get_posterior(*args, **kwargs).log_prob(latent)
    return log_density


def importance_log_weights(
    model, guide, draws: dict[str, torch.Tensor], x, y=None, *, guide_args: tuple | None = None
) -> torch.Tensor:
    """``model_log_joint - guide_log_density`` per draw, shape ``(S,)`` (unnormalised).

    ``x`` (and ``y``) as in :func:`model_log_joint`; ``guide_args`` are the model's arguments to
    set up a guide that has not run (default ``(x, y)`` for tensors).

    Examples
    --------
    >>> from pyro.infer import Predictive
    >>> from pyromoe import MixtureOfExperts, fit_svi, simulate, trained_guide
    >>> data = simulate(100, 2, seed=0)
    >>> model = MixtureOfExperts(2, 2)
    >>> idata = fit_svi(model, data.x, data.y, num_steps=20, num_samples=50, progress=False)
    >>> guide = trained_guide(idata)
    >>> draws = Predictive(guide, num_samples=5, return_sites=list(model.site_shapes))(data.x)
    >>> importance_log_weights(model, guide, draws, data.x, data.y).shape
    torch.Size([5])
    """
    if guide_args is None:
        guide_args = () if isinstance(x, Source) else (x, y)
    joint = model_log_joint(model, draws, x, y)
    return joint - guide_log_density(guide, draws, *guide_args)


def pareto_smoothed_log_weights(log_weights: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(smoothed normalised log weights, k-hat)`` of independent draws' log weights.

    :func:`arviz.psislw` with ``reff=1`` (the guide's draws are independent). Log weights holding
    NaN or ``+inf`` give k-hat ``inf`` and the log weights normalised unsmoothed (``-inf``
    weights, draws the model rules out, are kept as zero weights).
    """
    import arviz as az

    values = log_weights.detach().to(device="cpu", dtype=torch.float64)
    if bool(torch.isnan(values).any() or torch.isposinf(values).any()) or bool(
        torch.isneginf(values).all()
    ):
        return log_weights - torch.logsumexp(log_weights, 0), math.inf
    smoothed, khat = az.psislw(values.numpy(), reff=1.0)
    smoothed = torch.as_tensor(np.asarray(smoothed)).to(log_weights)
    return smoothed, float(khat)


def importance_resample(
    draws: dict[str, torch.Tensor], log_weights: torch.Tensor, generator: torch.Generator
) -> dict[str, torch.Tensor]:
    """As many draws as given, drawn with replacement with probabilities ``exp(log_weights)``
    (normalised), from a CPU ``generator``; the same rows of every site."""
    probabilities = torch.softmax(log_weights.detach().to("cpu", torch.float64), 0)
    index = torch.multinomial(
        probabilities, _num_draws(draws), replacement=True, generator=generator
    )
    return {name: value[index.to(value.device)] for name, value in draws.items()}


def _warn(khat: float, guide, resample: bool) -> None:
    advice = (
        "importance_resample=True returned the guide's draws uncorrected (resampling is not "
        "reliable at this k-hat either). "
        if resample
        else ""
    )
    warnings.warn(
        f"the {type(guide).__name__} guide's draws have Pareto k-hat {khat:.2f} > "
        f"{PSIS_KHAT_THRESHOLD} against the model (PSIS, Yao et al. 2018): the guide is too far "
        f"from the posterior for its intervals to be trusted (the noise's and the "
        f"log-likelihood's least of all). {advice}Use pyromoe.run_nuts for intervals you report "
        "(or more draws, num_samples, if there were few).",
        PSISWarning,
        stacklevel=user_stacklevel(),
    )


def psis_of_guide(
    model,
    guide,
    draws: dict[str, torch.Tensor],
    source: Source,
    guide_args: tuple,
    *,
    resample: bool,
    seed: int,
) -> tuple[dict[str, torch.Tensor], dict]:
    """PSIS of a fit's guide draws: ``(draws, attrs)`` for :func:`pyromoe.fit_svi`.

    ``attrs``: ``psis_khat`` (``nan`` for a guide whose density is unknown here), ``psis_ess``
    (effective number of draws of the smoothed weights, ``1 / sum w_s^2``), ``psis_draws``
    (``"guide"``: the guide's draws as drawn; ``"importance_resampled"``: resampled with the
    smoothed weights from ``child_seed(seed, RESAMPLE_SEED_KEY)``, done only with ``resample``
    and k-hat at most :data:`PSIS_KHAT_THRESHOLD`), ``psis_khat_threshold`` and
    ``psis_seconds``. Warns (:class:`PSISWarning`) above the threshold.
    """
    start = time.perf_counter()
    attrs = {"psis_khat": math.nan, "psis_ess": math.nan, "psis_draws": "guide"}
    attrs.update(psis_khat_threshold=PSIS_KHAT_THRESHOLD, psis_seconds=0.0)
    if not callable(getattr(model, "prior", None)):  # a user's model: no log joint here
        return draws, attrs
    if not isinstance(guide, (AutoNormal, AutoContinuous)):
        if resample:
            warnings.warn(
                f"importance_resample=True needs the guide's density, known here for AutoNormal "
                f"and AutoContinuous guides; the {type(guide).__name__} guide's draws are "
                "returned uncorrected",
                PSISWarning,
                stacklevel=user_stacklevel(),
            )
        return draws, attrs
    with torch.no_grad():
        log_weights = importance_log_weights(model, guide, draws, source, guide_args=guide_args)
        smoothed, khat = pareto_smoothed_log_weights(log_weights)
    weights = torch.softmax(smoothed.to(torch.float64), 0)
    attrs.update(psis_khat=khat, psis_ess=float(1.0 / (weights**2).sum()))
    if khat > PSIS_KHAT_THRESHOLD:
        _warn(khat, guide, resample)
    elif resample:
        generator = torch.Generator().manual_seed(child_seed(seed, RESAMPLE_SEED_KEY))
        draws = importance_resample(draws, smoothed, generator)
        attrs["psis_draws"] = "importance_resampled"
    attrs["psis_seconds"] = time.perf_counter() - start
    return draws, attrs

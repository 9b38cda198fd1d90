"""Prior predictive draws of :class:`~pyromoe.bayes.model.MixtureOfExperts` as ArviZ data.

:func:`sample_prior_predictive` draws the parameters from the model's priors (the defaults of
:data:`~pyromoe.bayes.model.DEFAULT_PRIOR_SCALES` or the model's ``priors=``, through
:meth:`MixtureOfExperts.prior`, the one place the model itself reads them) and one ``y`` per draw
(the same predictive draw as the posterior predictive of
:func:`~pyromoe.bayes.to_arviz.to_inference_data`). The groups follow ArviZ's names: ``prior``
(the parameter sites, dims ``chain`` (one chain), ``draw`` and the site's own dims as in the
posterior), ``prior_predictive`` (``y``: chain, draw, obs), ``observed_data`` (``y``, when given)
and ``constant_data`` (``x``), so ``az.plot_ppc(idata, group="prior")`` works.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .._validation import (
    as_tensors,
    check_model,
    check_request_size,
    check_seed,
    count_rule,
    validate,
)
from ..core import likelihood, sites
from ._rng import seeded_rng
from .model import MODEL_ATTR, MixtureOfExperts
from .to_arviz import SITE_DIMS, _from_dict, _numpy, chunk_slices

__all__ = ["sample_prior_predictive", "PREDICTIVE_CHUNK_ELEMENTS"]

#: Largest number of ``(draw, obs, expert)`` elements held at once while drawing ``y``: the draws
#: are taken in chunks of ``PREDICTIVE_CHUNK_ELEMENTS // (n * k)`` (at least one) draws.
PREDICTIVE_CHUNK_ELEMENTS = 2**22


def _prior_model_rule(model, name: str) -> MixtureOfExperts:
    check_model(model)
    if not isinstance(model, MixtureOfExperts):
        raise TypeError(
            f"{name} must be a pyromoe.MixtureOfExperts (its priors are drawn through "
            f".prior(name, x)); got {type(model).__name__}"
        )
    return model


#: how :func:`sample_prior_predictive` checks its arguments, once per call
SAMPLE_PRIOR_PREDICTIVE_RULES = {
    "model": _prior_model_rule,
    "num_samples": count_rule(minimum=1),
    "seed": check_seed,
}


@validate(SAMPLE_PRIOR_PREDICTIVE_RULES)
def sample_prior_predictive(model, x, y=None, *, num_samples: int = 500, seed: int | None = 0):
    """Draw parameters from the model's priors and ``y`` given ``x``; return ArviZ ``InferenceData``.

    Parameters
    ----------
    model : MixtureOfExperts
        The model whose priors are drawn (defaults or its ``priors=`` replacements).
    x : Tensor or ndarray (n, d)
        Inputs, ``d == model.in_features``.
    y : Tensor or ndarray (n,), optional
        Observed outputs, stored as ``observed_data`` (to compare with the prior predictive);
        they do not enter the draws.
    num_samples : int
        Prior draws (>= 1), the ``draw`` dim of the one ``chain``.
    seed : int or None
        Seed of the draws: the parameters are drawn with the global generators seeded from it and
        restored afterwards (:func:`pyromoe.bayes._rng.seeded_rng`), ``y`` with a private
        ``torch.Generator`` seeded from it; same seed, same draws. ``None``: a fresh seed,
        recorded (like any seed) in ``attrs["seed"]``.

    Returns
    -------
    arviz.InferenceData
        ``prior``: the parameter sites (``experts.weight`` with dims chain, draw, expert, feature;
        ...; ``noise``), ``prior_predictive``: ``y`` (chain, draw, obs), ``observed_data``: ``y``
        (only when ``y`` is given), ``constant_data``: ``x`` (obs, feature); ``attrs``:
        ``inference="prior"``, ``seed``, ``num_samples``, ``pyromoe_model`` (the model's
        settings and priors as JSON, :meth:`MixtureOfExperts.settings`).

    Raises
    ------
    TypeError
        ``model`` is not a :class:`~pyromoe.MixtureOfExperts` instance, or ``num_samples`` /
        ``seed`` are not integers.
    ValueError
        ``x`` not of shape (n, model.in_features), ``y`` not of shape (n,), NaN or infinite
        values, ``num_samples < 1``, or draws too large for memory (estimated before any is
        made: :func:`pyromoe._validation.check_request_size`).

    Examples
    --------
    >>> import torch
    >>> from pyromoe import MixtureOfExperts
    >>> model = MixtureOfExperts(3, 2)
    >>> idata = sample_prior_predictive(model, torch.randn(40, 3), num_samples=100, seed=0)
    >>> idata.prior["experts.weight"].dims
    ('chain', 'draw', 'expert', 'feature')
    >>> idata.prior_predictive["y"].shape
    (1, 100, 40)
    """
    x, y = as_tensors(x, y, in_features=model.design_features)
    n, d = x.shape
    k = model.num_experts
    # per draw: the parameter sites, and y for every row twice (the chunks and their concatenation)
    per_draw = sum(math.prod(shape) for shape in model.site_shapes.values()) + 2 * n
    check_request_size(
        "num_samples",
        num_samples,
        per_draw * x.element_size(),
        what=f"the prior draws ({per_draw} values each: the parameters and y for {n} rows)",
        fix="pass fewer num_samples or fewer rows of x",
        device=x.device,
    )

    with torch.no_grad():
        with seeded_rng(seed, x.device):
            draws = {
                name: model.prior(name, x).sample((num_samples,)) for name in model.site_shapes
            }
        generator = torch.Generator(device=x.device).manual_seed(seed)
        chunk = max(1, PREDICTIVE_CHUNK_ELEMENTS // (n * k))
        predicted = []
        for part in chunk_slices(num_samples, chunk):
            params = model.params({name: value[part] for name, value in draws.items()}, x)
            predicted.append(likelihood.sample_mixture(x, params, model.link, generator)[0])
    coords: dict[str, Any] = {
        "obs": np.arange(n),
        "feature": np.arange(d),
        "expert": np.arange(k),
        "gate": np.arange(1, k),
    }
    dims = {name: SITE_DIMS[name] for name in draws if name in SITE_DIMS}
    if sites.NOISE in draws and np.ndim(draws[sites.NOISE]) == 3:
        dims[sites.NOISE] = ["expert"]  # one noise sd per expert
    dims.update({sites.OBS: ["obs"], "x": ["obs", "feature"]})
    groups = {
        "prior": {name: _numpy(value)[None] for name, value in draws.items()},
        "prior_predictive": {sites.OBS: _numpy(torch.cat(predicted))[None]},
        "observed_data": {sites.OBS: _numpy(y)} if y is not None else None,
        "constant_data": {"x": _numpy(x)},
    }
    attrs = {
        "inference": "prior",
        "seed": seed,
        "num_samples": num_samples,
        MODEL_ATTR: model.settings_json(),
    }
    return _from_dict(groups, coords=coords, dims=dims, attrs=attrs)

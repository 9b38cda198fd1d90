"""Predictions at new inputs and per-observation responsibilities from posterior draws.

Both functions read the model's sites from the ``posterior`` group of an InferenceData written by
:func:`pyromoe.bayes.to_arviz.to_inference_data` (so the output of :func:`~pyromoe.run_nuts`,
:func:`~pyromoe.fit_svi` and :func:`~pyromoe.fit_map` alike), turn them into
:class:`~pyromoe.core.params.Params` with :meth:`pyromoe.MixtureOfExperts.params` and compute
everything with :mod:`pyromoe.core.likelihood`, chunk by chunk over the draws or the observations,
so that the memory they use beyond their output is bounded.

:func:`predict` returns ArviZ's ``predictions`` group (dims ``chain``, ``draw``, ``obs`` and
``expert``; ArviZ's ``io_numpyro`` naming) and ``predictions_constant_data`` (``x_new``):

=================  ===========================  ==============================================
variable           dims                         meaning
=================  ===========================  ==============================================
``y``              chain, draw, obs             a posterior predictive draw of y at x_new
``mean``           chain, draw, obs             E[y | x] = sum_i gate_i(x) g(a_i . x + b_i)
``expert_mean``    chain, draw, obs, expert     each expert's mean g(a_i . x + b_i)
``gate``           chain, draw, obs, expert     gate probabilities gate_i(x) (rows sum to 1)
``x_new``          obs, feature                 the inputs (``predictions_constant_data``)
=================  ===========================  ==============================================
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import arviz as az
import numpy as np
import pandas as pd
import torch
import xarray as xr

from .._validation import (
    as_tensor,
    as_tensors,
    check_probability,
    check_request_size,
    check_seed,
    count_rule,
    optional,
    user_stacklevel,
    validate,
)
from ..core import likelihood, sites
from ..core.design import gate_covariates
from ..core.params import Params
from .model import MODEL_ATTR, MixtureOfExperts
from .record import check_model_matches, columns_by_name, recorded_feature_names
from .to_arviz import _arviz_major, _from_dict, chunk_slices

__all__ = [
    "OneDrawWarning",
    "predict",
    "responsibilities",
    "responsibility_columns",
    "hdi_bounds",
    "PREDICTION_VARIABLES",
]

#: the variables of the ``predictions`` group, with their dims after (chain, draw)
PREDICTION_VARIABLES: dict[str, list[str]] = {
    sites.OBS: ["obs"],
    "mean": ["obs"],
    "expert_mean": ["obs", "expert"],
    "gate": ["obs", "expert"],
}

#: numbers per block in :func:`responsibilities` (draws x rows x experts): 32 MiB of float64
RESPONSIBILITY_BLOCK_ELEMENTS = 2**22


class OneDrawWarning(UserWarning):
    """The posterior has one draw (a MAP fit): predictions carry no parameter uncertainty and
    intervals over the draws have zero width."""


# ------------------------------------------------------------------------------------ checks
def _warn_one_draw(num_draws: int, idata, caller: str) -> None:
    """:class:`OneDrawWarning` when ``caller`` has one posterior draw to work with."""
    if num_draws != 1:
        return
    attrs = getattr(idata, "attrs", None)
    inference = attrs.get("inference") if isinstance(attrs, Mapping) else None
    source = f" (idata.attrs['inference'] = {inference!r})" if inference is not None else ""
    warnings.warn(
        f"{caller} uses one posterior draw{source}: its results are those of a single point "
        "estimate, without parameter uncertainty, and intervals over chain and draw (az.hdi) "
        "have zero width. For intervals fit with fit_svi or run_nuts.",
        OneDrawWarning,
        stacklevel=user_stacklevel(),
    )


def _model_rule(model, name: str) -> MixtureOfExperts:
    if isinstance(model, type):
        raise TypeError(
            f"{name} must be a MixtureOfExperts instance, e.g. MixtureOfExperts(in_features=..., "
            f"num_experts=...); got the class {model.__name__}"
        )
    if not isinstance(model, MixtureOfExperts):
        raise TypeError(f"{name} must be a pyromoe.MixtureOfExperts; got {type(model).__name__}")
    return model


def _group(idata, name: str):
    """The group ``name`` of ``idata`` as an xarray Dataset, or None when it has none."""
    if isinstance(idata, az.InferenceData):
        return getattr(idata, name) if name in idata.groups() else None
    children = getattr(idata, "children", None)
    if isinstance(children, Mapping):  # pragma: no cover - arviz >= 1 returns a DataTree
        return children[name].to_dataset() if name in children else None
    raise TypeError(
        "idata must be an arviz.InferenceData (from run_nuts, fit_svi, fit_map or "
        f"to_inference_data); got {type(idata).__name__}"
    )


def _posterior_draws(model: MixtureOfExperts, idata, num_draws: int | None):
    """``({site: array (chain, draw, *site shape)}, chain coords, draw coords, posterior)``:
    the model's sites from ``idata.posterior``, ``num_draws`` evenly spaced draws per chain."""
    posterior = _group(idata, "posterior")
    if posterior is None:
        raise ValueError(
            "idata has no posterior group; pass the InferenceData of run_nuts, fit_svi or fit_map"
        )
    shapes = model.site_shapes
    missing = [name for name in shapes if name not in posterior.data_vars]
    if missing:
        raise ValueError(
            f"idata.posterior lacks the model's sites {missing}; it has "
            f"{sorted(posterior.data_vars)}. Pass the idata of a fit of this model."
        )
    draw_index = np.arange(posterior.sizes.get("draw", 0))
    if num_draws is not None:
        if num_draws < draw_index.size:
            draw_index = np.linspace(0, draw_index.size - 1, num_draws).round().astype(int)
    values = {}
    for name, shape in shapes.items():
        variable = posterior[name]
        if variable.dims[:2] != ("chain", "draw") or tuple(variable.shape[2:]) != tuple(shape):
            raise ValueError(
                f"idata.posterior[{name!r}] must have dims (chain, draw, ...) and shape "
                f"(chain, draw, *{tuple(shape)}) for this model; got dims {variable.dims} and "
                f"shape {tuple(variable.shape)}"
            )
        values[name] = np.asarray(variable.values)[:, draw_index]
    chains = np.asarray(posterior["chain"].values)
    draws = np.asarray(posterior["draw"].values)[draw_index]
    return values, chains, draws, posterior


def _flat_params(model, values: Mapping[str, np.ndarray], like: torch.Tensor) -> Params:
    """The draws as :class:`Params` with one batch dim (chain * draw), on ``like``'s device/dtype."""
    flat = {
        name: torch.as_tensor(value.reshape(-1, *value.shape[2:])) for name, value in values.items()
    }
    return model.params(flat, like)


def _draws(params: Params, part: slice) -> Params:
    return Params(*(None if value is None else value[part] for value in params))


def _check_x_new(x_new, model: MixtureOfExperts) -> torch.Tensor:
    x = as_tensor(x_new, "x_new")
    if x.dim() != 2:
        hint = " (for a single input use x_new.reshape(-1, 1))" if x.dim() == 1 else ""
        raise ValueError(
            f"x_new must be a 2-D array of shape (m, in_features={model.in_features}); got shape "
            f"{tuple(x.shape)}{hint}"
        )
    if x.shape[1] != model.in_features or x.shape[0] < 1:
        raise ValueError(
            f"x_new must have shape (m, in_features={model.in_features}) with m >= 1; got shape "
            f"{tuple(x.shape)}"
        )
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        row, column = torch.nonzero(~finite)[0].tolist()
        raise ValueError(
            f"x_new contains NaN or infinite values (first at row {row}, column {column})"
        )
    return x


def _feature_coords(posterior, d: int, dim: str = "feature") -> np.ndarray:
    if dim in posterior.coords and posterior.sizes.get(dim) == d:
        return np.asarray(posterior[dim].values)
    return np.arange(d)


def hdi_bounds(data: xr.Dataset, hdi_prob: float) -> tuple[xr.Dataset, xr.Dataset]:
    """``(low, high)``: ``arviz.hdi`` of every variable of ``data`` (dims chain, draw, ...) over
    chain and draw, for both arviz APIs (0.x ``hdi_prob=``, dim ``hdi``; 1.x ``prob=``, dim
    ``ci_bound``)."""
    if _arviz_major() >= 1:  # pragma: no cover - needs arviz >= 1 (Python >= 3.12)
        interval, bound = az.hdi(data, prob=hdi_prob), "ci_bound"
    else:
        interval, bound = az.hdi(data, hdi_prob=hdi_prob), "hdi"
    return interval.isel({bound: 0}, drop=True), interval.isel({bound: 1}, drop=True)


# ------------------------------------------------------------------------------------ predict
#: how :func:`predict` checks its arguments, once per call (:func:`pyromoe._validation.validate`)
PREDICT_RULES = {
    "model": _model_rule,
    "seed": check_seed,
    "chunk_draws": count_rule(minimum=1),
    "num_draws": optional(count_rule(minimum=1)),
}


@validate(PREDICT_RULES)
def predict(
    model: MixtureOfExperts,
    idata,
    x_new,
    *,
    z_new=None,
    seed: int | None = 0,
    num_draws: int | None = None,
    chunk_draws: int = 256,
):
    """Posterior predictions at new inputs ``x_new``: draws of y, its mean and the gate.

    For every posterior draw ``theta`` (or ``num_draws`` of them per chain) and every row ``x`` of
    ``x_new``: the gate probabilities ``gate_i(x)``, each expert's mean ``g(a_i . x + b_i)``, the
    mixture mean ``E[y | x, theta] = sum_i gate_i(x) g(a_i . x + b_i)``, and one draw of y (an
    expert drawn from the gate, then its Gaussian noise) from a private ``torch.Generator``
    seeded with ``seed``: the caller's global random state is not touched.

    A MAP fit (:func:`~pyromoe.fit_map`) has one posterior draw: its predictions are the MAP
    point's (``y`` is one draw of the noise around it per row) and intervals over chain and draw
    have zero width, so predict warns (:class:`OneDrawWarning`); for predictive intervals fit with
    :func:`~pyromoe.fit_svi` or :func:`~pyromoe.run_nuts`.

    Parameters
    ----------
    model : MixtureOfExperts
        The model the posterior was fitted with (its sites, link and noise model). When
        ``idata.attrs["pyromoe_model"]`` records the fit's model (every fit writes it), a model
        with another ``num_experts``, ``in_features``, ``link`` (and its parameters), ``bias``
        or ``noise`` is refused; other priors give a ``UserWarning``. An idata without the
        record (older files) is not checked.
    idata : arviz.InferenceData
        With a ``posterior`` group holding the model's sites (dims chain, draw, ...), as from
        :func:`~pyromoe.run_nuts`, :func:`~pyromoe.fit_svi` or :func:`~pyromoe.fit_map`.
    x_new : Tensor, ndarray or DataFrame (m, d)
        New inputs, ``d = model.in_features``; computations run in its floating dtype. A
        DataFrame with string column labels, for a fit that named its features (recorded with
        the model, or string ``feature`` coords of the posterior), is matched by name: its
        columns are put in the fit's order; unknown, missing or repeated names are refused.
        Arrays, tensors and frames with other labels are taken by position.
    z_new : Tensor, ndarray or DataFrame (m, gate_features), optional
        The gate's own covariates at the new rows, for a model built with ``gate_features``
        (required then; a DataFrame is matched by the recorded names like ``x_new``).
    seed : int or None
        Seed of the generator for the draws of y; the same seed (and ``chunk_draws``) gives the
        same draws. ``None``: a fresh seed, recorded in ``attrs["prediction_seed"]``.
    num_draws : int, optional
        Use this many evenly spaced draws of each chain (all of them when None or more).
    chunk_draws : int
        Draws computed together. Memory beyond the returned arrays is bounded by a few tensors of
        ``chunk_draws * m * k`` numbers (the gate, the experts' means, their noise); the returned
        arrays hold ``chains * draws * m * (2k + 2)`` float64 numbers.

    Returns
    -------
    arviz.InferenceData
        Group ``predictions``: ``y``, ``mean`` (chain, draw, obs), ``expert_mean``, ``gate``
        (chain, draw, obs, expert); group ``predictions_constant_data``: ``x_new`` (obs, feature),
        with the ``feature`` coords of ``idata.posterior`` when it has them. ``chain`` and
        ``draw`` keep the posterior's coords (the chosen draws' numbers).
        ``az.hdi(pred.predictions)`` gives intervals of every variable.

    Raises
    ------
    TypeError
        If ``model`` is not a MixtureOfExperts instance or ``idata`` not an InferenceData; bad
        types of ``seed``, ``num_draws``, ``chunk_draws``.
    ValueError
        If ``x_new`` is not of shape (m, model.in_features) or not finite, or a DataFrame whose
        column names are not the fit's features (naming the unknown and missing ones); ``model``
        differs from the model ``idata`` records (naming the setting and both values); ``idata``
        has no posterior group, lacks one of the model's sites or has one of the wrong shape.

    Warns
    -----
    OneDrawWarning
        (a ``UserWarning``) when there is one posterior draw (a MAP fit, or ``num_draws=1`` of
        one chain): no parameter uncertainty, zero-width intervals.
    UserWarning
        When ``model``'s priors differ from the recorded ones.

    Examples
    --------
    >>> from pyromoe import MixtureOfExperts, fit_map, simulate
    >>> data = simulate(200, 2, seed=0)
    >>> model = MixtureOfExperts(2, 2, bias=False)
    >>> idata = fit_map(model, data.x, data.y, init=data.truth, num_steps=20)
    >>> import warnings
    >>> with warnings.catch_warnings(record=True):  # one draw: OneDrawWarning
    ...     pred = predict(model, idata, data.x[:5])
    >>> pred.predictions["gate"].dims
    ('chain', 'draw', 'obs', 'expert')
    >>> pred.predictions["y"].shape
    (1, 1, 5)
    """
    record = check_model_matches(model, idata)
    x, z = _new_design(model, record, _group(idata, "posterior"), x_new, z_new)
    values, chains, draws, posterior = _posterior_draws(model, idata, num_draws)
    params = _flat_params(model, values, x)
    num_chains, num_kept = chains.size, draws.size
    _warn_one_draw(num_chains * num_kept, idata, "predict")
    design = x if z is None else torch.cat([x, z], dim=1)
    m, d = x.shape
    per_draw = 2 * 8 * m * (2 * model.num_experts + 2)  # float64 y, mean, experts, gate; twice
    fix = "pass fewer num_draws (per chain) or fewer rows of x_new"
    check_request_size("num_draws", num_chains * num_kept, per_draw, what="predictions", fix=fix)
    generator = torch.Generator(device=x.device).manual_seed(int(seed))
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in PREDICTION_VARIABLES}
    with torch.no_grad():
        for part in chunk_slices(num_chains * num_kept, chunk_draws):
            chunk = _predict_chunk(model, design, _draws(params, part), generator)
            for name, value in chunk.items():
                parts[name].append(value.cpu())
    k = parts["gate"][0].shape[-1]
    predictions = {
        name: torch.cat(value).reshape(num_chains, num_kept, *value[0].shape[1:]).numpy()
        for name, value in parts.items()
    }
    coords = {
        "chain": chains,
        "draw": draws,
        "obs": np.arange(m),
        "feature": _feature_coords(posterior, d),
        "expert": np.arange(k),
    }
    dims = {**PREDICTION_VARIABLES, "x_new": ["obs", "feature"]}
    attrs = {
        "prediction_seed": seed,
        "num_draws_per_chain": int(num_kept),
        "chunk_draws": chunk_draws,
    }
    inference = getattr(idata, "attrs", {}).get("inference")
    if inference is not None:
        attrs["inference"] = inference
    if record is not None:
        attrs[MODEL_ATTR] = idata.attrs[MODEL_ATTR]
    constant = {"x_new": x.detach().cpu().numpy()}
    if z is not None:
        constant["z_new"] = z.detach().cpu().numpy()
        coords["gate_feature"] = _feature_coords(posterior, z.shape[1], "gate_feature")
        dims["z_new"] = ["obs", "gate_feature"]
    groups = {"predictions": predictions, "predictions_constant_data": constant}
    return _from_dict(groups, coords=coords, dims=dims, attrs=attrs)


def _new_design(model, record, posterior, x_new, z_new):
    """``(x, z)``: the new inputs checked (DataFrames by the recorded names), and the gate's own
    covariates for a model whose gate has them (else None)."""
    names = None if posterior is None else recorded_feature_names(record, posterior)
    gate_features = getattr(model, "gate_features", None)
    if gate_features is None:
        if z_new is not None:
            raise ValueError("z_new is given but the model's gate reads x_new; leave z_new out")
        return _check_x_new(columns_by_name(x_new, names, "x_new"), model), None
    if z_new is None:
        raise ValueError(
            f"the model's gate reads {gate_features} covariate(s) of its own: pass them as "
            f"z_new (m, {gate_features})"
        )
    d = model.in_features
    joined = names is not None and len(names) == d + gate_features
    x = _check_x_new(columns_by_name(x_new, names[:d] if joined else None, "x_new"), model)
    z = columns_by_name(z_new, names[d:] if joined else None, "z_new")
    return x, gate_covariates(z, x, gate_features)


def _predict_chunk(model, x: torch.Tensor, params: Params, generator: torch.Generator) -> dict:
    """The :data:`PREDICTION_VARIABLES` for a chunk of draws (one batch dim S): (S, m[, k])."""
    gate = torch.softmax(likelihood.gate_logits(x, params.gate_weight, params.gate_bias), dim=-1)
    expert_mean = likelihood.expert_means(x, params.experts_weight, params.experts_bias, model.link)
    mean = (gate * expert_mean).sum(-1)
    y, _ = likelihood.draw_from_mixture(gate, expert_mean, params.expert_noise(), generator)
    return {sites.OBS: y, "mean": mean, "expert_mean": expert_mean, "gate": gate}


# ------------------------------------------------------------------------------------ responsibilities
def responsibility_columns(num_experts: int, hdi_prob: float = 0.94) -> list[str]:
    """Columns of :func:`responsibilities`, per expert ``i``: ``mean_expert_i``, then the HDI's
    ends named as ``az.summary`` names them, e.g. ``hdi_3%_expert_i``, ``hdi_97%_expert_i``."""
    alpha = 1 - hdi_prob
    low, high = f"hdi_{100 * alpha / 2:g}%", f"hdi_{100 * (1 - alpha / 2):g}%"
    return [f"{column}_expert_{i}" for i in range(num_experts) for column in ("mean", low, high)]


#: how :func:`responsibilities` checks its arguments, once per call
RESPONSIBILITIES_RULES = {
    "model": _model_rule,
    "hdi_prob": check_probability,
    "chunk_rows": optional(count_rule(minimum=1)),
}


@validate(RESPONSIBILITIES_RULES)
def responsibilities(
    model: MixtureOfExperts,
    idata,
    x=None,
    y=None,
    *,
    hdi_prob: float = 0.94,
    chunk_rows: int | None = None,
    z=None,
) -> pd.DataFrame:
    """Posterior mean and HDI of each observation's responsibilities ``p(expert i | x_n, y_n)``.

    For every posterior draw ``theta``, ``p(expert i | x_n, y_n, theta)`` is
    :func:`pyromoe.core.likelihood.responsibilities`; this function summarises its distribution
    over the draws: the mean (``p(expert i | x_n, y_n)`` averaged over the posterior) and the
    ``hdi_prob`` highest-density interval of ``arviz.hdi``.

    Parameters
    ----------
    model : MixtureOfExperts
        The model the posterior was fitted with, checked against the record in ``idata.attrs``
        as in :func:`predict`.
    idata : arviz.InferenceData
        With a ``posterior`` group holding the model's sites; also the source of ``x``
        (``constant_data["x"]``) and ``y`` (``observed_data["y"]``) when they are not given.
    x : Tensor, ndarray or DataFrame (n, d), optional
        A DataFrame's columns are matched by name as in :func:`predict`.
    y : Tensor, ndarray or Series (n,), optional
        Both or neither: without them the data the posterior was fitted on (for an out-of-core
        fit, its evaluation rows), indexed by the ``obs`` coords of ``constant_data``.
    hdi_prob : float
        Probability mass of the interval, strictly in (0, 1).
    chunk_rows : int, optional
        Observations computed together, with every draw (the interval needs all of them at
        once): memory is bounded by a few arrays of ``draws * chunk_rows * k`` numbers. Default:
        as many rows as keep that product at most :data:`RESPONSIBILITY_BLOCK_ELEMENTS` (2**22).

    Returns
    -------
    pandas.DataFrame
        One row per observation (index ``obs``), three columns per expert ``i``
        (:func:`responsibility_columns`): ``mean_expert_i``, the posterior mean, and the HDI's
        lower and upper ends, named as ``az.summary`` names them (``hdi_3%_expert_i``,
        ``hdi_97%_expert_i`` for ``hdi_prob=0.94``). The means of a row sum to 1.

    Raises
    ------
    TypeError
        As :func:`predict`, and for a ``hdi_prob`` that is no number.
    ValueError
        As :func:`predict` for ``idata``; only one of ``x``, ``y`` given; neither given and
        ``idata`` without ``constant_data`` / ``observed_data``; ``x``, ``y`` of the wrong shapes;
        ``hdi_prob`` outside (0, 1).

    Warns
    -----
    OneDrawWarning
        When the posterior has one draw (a MAP fit): the intervals have zero width.

    Examples
    --------
    >>> from pyromoe import MixtureOfExperts, simulate, to_inference_data
    >>> data = simulate(200, 2, seed=0)
    >>> model = MixtureOfExperts(2, 2, bias=False)
    >>> truth = data.truth.site_values(bias=False)
    >>> draws = {k: v.expand(1, 4, *v.shape) for k, v in truth.items()}  # 4 draws at the truth
    >>> idata = to_inference_data(model, data.x, data.y, draws)
    >>> table = responsibilities(model, idata)
    >>> list(table.columns[:3])
    ['mean_expert_0', 'hdi_3%_expert_0', 'hdi_97%_expert_0']
    >>> table.shape
    (200, 6)
    """
    record = check_model_matches(model, idata)
    values, chains, draws, posterior = _posterior_draws(model, idata, None)
    if (x is None) != (y is None):
        raise ValueError(
            "pass both x and y, or neither (then they come from idata.constant_data['x'] and "
            "idata.observed_data['y'])"
        )
    if x is None:
        constant, observed = _group(idata, "constant_data"), _group(idata, "observed_data")
        if constant is None or "x" not in constant or observed is None or sites.OBS not in observed:
            raise ValueError(
                "idata has no constant_data['x'] / observed_data['y'] to take x and y from; pass "
                "x and y"
            )
        index = pd.Index(np.asarray(constant["obs"].values), name="obs")
        x, y = np.asarray(constant["x"].values), np.asarray(observed[sites.OBS].values)
        z = np.asarray(constant["z"].values) if "z" in constant else None
    else:
        index = pd.RangeIndex(len(x), name="obs")
    if getattr(model, "gate_features", None) is None:
        if z is not None:
            raise ValueError("z is given but the model's gate reads x; leave z out")
        x = columns_by_name(x, recorded_feature_names(record, posterior), "x")
        x, y = as_tensors(x, y, in_features=model.in_features)
    else:  # the gate's own covariates: x and z checked as predict checks them, then joined
        x, z = _new_design(model, record, posterior, x, z)
        x, y = as_tensors(torch.cat([x, z], dim=1), y)
    params = _flat_params(model, values, x)
    num_chains, num_draws = chains.size, draws.size
    _warn_one_draw(num_chains * num_draws, idata, "responsibilities")
    n, k = x.shape[0], params.num_experts
    if chunk_rows is None:
        chunk_rows = max(1, RESPONSIBILITY_BLOCK_ELEMENTS // (num_chains * num_draws * k))
    means, lows, highs = [], [], []
    with torch.no_grad():
        for rows in chunk_slices(n, chunk_rows):
            block = likelihood.responsibilities(x[rows], y[rows], params, model.link)
            block = block.cpu().numpy().reshape(num_chains, num_draws, *block.shape[1:])
            data = xr.Dataset({"r": (("chain", "draw", "obs", "expert"), block)})
            low, high = hdi_bounds(data, hdi_prob)
            means.append(block.mean(axis=(0, 1)))
            lows.append(low["r"].transpose("obs", "expert").values)
            highs.append(high["r"].transpose("obs", "expert").values)
    # (n, k, 3): mean, low, high per expert, in the order of responsibility_columns
    table = np.stack([np.concatenate(part) for part in (means, lows, highs)], axis=-1)
    return pd.DataFrame(
        table.reshape(n, 3 * k), index=index, columns=responsibility_columns(k, hdi_prob)
    )

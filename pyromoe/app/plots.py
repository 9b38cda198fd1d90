"""Figures for a fitted mixture of experts: each function returns a matplotlib Figure (no file I/O).

They read ArviZ data as written by :func:`pyromoe.bayes.to_arviz.to_inference_data` (variables named
by the model's sites, dims ``chain``, ``draw``, ``expert``, ``feature``, ``obs``).
:func:`parameter_summary` is the one table of every scalar parameter (``az.summary`` with the point
values ArviZ cannot know) that both :func:`plot_posterior_vs_truth` and the results' Markdown
(:func:`pyromoe.app.report.parameter_table`) show. The demo's figures about starts
(:func:`plot_random_starts`, :func:`plot_chain_log_likelihoods`) live in :mod:`.demo_plots`.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..core import likelihood, sites
from ..core.estimate import MoEEstimate
from .demo_plots import plot_chain_log_likelihoods, plot_random_starts

__all__ = [
    "parameter_sites",
    "parameter_summary",
    "interval_columns",
    "plot_trace",
    "plot_posterior_vs_truth",
    "plot_random_starts",
    "plot_chain_log_likelihoods",
    "plot_responsibilities",
    "plot_posterior_predictive",
    "plot_predictions",
]


def _pyplot():
    # imported lazily so that importing pyromoe does not load matplotlib; the CLI selects Agg
    import matplotlib.pyplot as plt

    return plt


def parameter_sites(idata) -> list[str]:
    """The model's parameter sites present in ``idata.posterior``, in the model's order."""
    return [name for name in sites.PARAMETER_SITES if name in idata.posterior.data_vars]


def _position_text(dim: str, position: int, value=None) -> str:
    """One index of a label: a feature by its name when it has one, else by position; gate row
    j gives the logit of expert j (expert 0 is the reference), so gate rows are numbered from 1."""
    if dim in ("feature", "gate_feature") and isinstance(value, str):
        return value
    return str(position + 1 if dim == "gate" else position)


def _scalar_label(name: str, dims: Sequence[str], index: tuple[int, ...], coords=None) -> str:
    """``experts.weight[0, 1]`` (or ``experts.weight[0, age]`` with feature names): written as
    ArviZ writes its labels with :func:`_labeller`; ``coords`` maps dims to coordinate values."""
    if not index:
        return name
    coords = coords or {}
    texts = [
        _position_text(d, i, coords[d].values[i] if d in coords else None)
        for d, i in zip(dims, index)
    ]
    return f"{name}[{', '.join(texts)}]"


def _labeller():
    from arviz.labels import BaseLabeller

    class PositionLabeller(BaseLabeller):
        """Experts by position from 0, gate rows from 1, features by name (or position)."""

        def dim_coord_to_str(self, dim, coord_val, coord_idx):
            return _position_text(dim, int(coord_idx), coord_val)

    return PositionLabeller()


def interval_columns(hdi_prob: float = 0.94) -> tuple[str, str]:
    """Names of the interval columns of :func:`parameter_summary`, e.g. ``("94% low", "94% high")``."""
    percent = f"{hdi_prob * 100:g}%"
    return f"{percent} low", f"{percent} high"


def parameter_summary(
    idata, points: Mapping[str, MoEEstimate | Mapping] | None = None, hdi_prob: float = 0.94
) -> pd.DataFrame:
    """``az.summary`` of every scalar parameter, with point values (e.g. truth, start) beside it.

    Parameters
    ----------
    idata : arviz.InferenceData
        With a ``posterior`` group whose variables are the model's sites.
    points : mapping of str to MoEEstimate (or to a mapping of site name to value), optional
        Column name -> point estimate, e.g. ``{"truth": truth, "start": estimate}``; its experts
        must be labelled as in ``idata``. Sites of ``idata`` a mapping lacks are left blank.
    hdi_prob : float, default 0.94
        Probability mass of the highest-density interval.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``parameter`` (``experts.weight[0, 1]``, ``gate.bias[1]``, ``noise``: experts
        by position from 0, gate rows from 1, the expert whose logit they give, features by name
        when the ``feature`` coordinates are strings, else by position from 0). The
        columns: one per point estimate, then ``posterior mean``, ``sd`` and the interval
        (:func:`interval_columns`); with several chains also ArviZ's ``ess_bulk``, ``ess_tail``
        and ``r_hat`` (SVI and MAP draws come as one chain, for which they mean nothing).
    """
    import arviz as az

    names = parameter_sites(idata)
    several = idata.posterior.sizes["chain"] > 1
    with warnings.catch_warnings():
        if idata.posterior.sizes["chain"] * idata.posterior.sizes["draw"] == 1:
            # one draw (a MAP point): its sd is undefined (NaN in the table), say nothing more
            warnings.filterwarnings("ignore", category=RuntimeWarning, module="numpy")
        summary = az.summary(
            idata,
            var_names=names,
            kind="all" if several else "stats",
            hdi_prob=hdi_prob,
            round_to="none",
            labeller=_labeller(),
        )
    hdi_low, hdi_high = (column for column in summary.columns if column.startswith("hdi_"))
    low, high = interval_columns(hdi_prob)
    diagnostics = ["ess_bulk", "ess_tail", "r_hat"] if several else []
    table = summary.rename(columns={"mean": "posterior mean", hdi_low: low, hdi_high: high})
    table = table[["posterior mean", "sd", low, high, *diagnostics]]
    values = {column: {} for column in points or {}}
    for column, estimate in (points or {}).items():
        site_values = estimate if isinstance(estimate, Mapping) else estimate.site_values()
        for name in (name for name in names if name in site_values):
            dims = idata.posterior[name].dims[2:]
            coords = idata.posterior[name].coords
            value = site_values[name]
            value = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value)
            for index in np.ndindex(*value.shape):
                values[column][_scalar_label(name, dims, index, coords)] = float(value[index])
    table = pd.concat([pd.DataFrame(values, index=table.index, dtype=float), table], axis=1)
    table.index.name = "parameter"
    return table


def plot_trace(idata):
    """ArviZ trace plot of every parameter site (one row per site, all chains)."""
    import arviz as az

    axes = az.plot_trace(idata, var_names=parameter_sites(idata), compact=True)
    figure = np.asarray(axes).ravel()[0].figure
    figure.tight_layout()
    return figure


def plot_posterior_vs_truth(
    idata, truth: MoEEstimate | None = None, estimate: MoEEstimate | None = None, hdi_prob=0.94
):
    """Posterior mean and ``hdi_prob`` interval of every scalar parameter, with the truth and the
    point estimate marked (either may be omitted). Experts must already be aligned to the truth's
    labels (see :func:`pyromoe.core.labels.align_labels`).

    The rows are labelled as :func:`parameter_summary` labels them (gate rows from 1). The title
    says what is shown: "Posterior vs truth" only when ``truth`` is given."""
    plt = _pyplot()
    points = {"truth": truth, "start": estimate}
    table = parameter_summary(
        idata, {column: value for column, value in points.items() if value is not None}, hdi_prob
    )
    low, high = interval_columns(hdi_prob)
    positions = np.arange(len(table))[::-1]
    figure, ax = plt.subplots(figsize=(7, 0.3 * len(table) + 1.2))
    ax.hlines(
        positions, table[low], table[high], color="C0", lw=2, label=f"{hdi_prob * 100:g}% HDI"
    )
    ax.plot(table["posterior mean"], positions, "o", color="C0", label="posterior mean")
    for column, marker, colour in (("truth", "x", "k"), ("start", "D", "C3")):
        if column in table:
            ax.plot(
                table[column],
                positions,
                marker,
                color=colour,
                ms=6,
                mfc="none" if marker == "D" else None,
                label=column,
            )
    ax.set_yticks(positions, list(table.index))
    ax.axvline(0, color="0.8", lw=0.8, zorder=0)
    ax.legend(loc="best", fontsize=8)
    ax.set_title(posterior_title(truth is not None, estimate is not None, hdi_prob))
    figure.tight_layout()
    return figure


def posterior_title(truth: bool, start: bool, hdi_prob: float = 0.94) -> str:
    """The title of :func:`plot_posterior_vs_truth`: what the figure shows."""
    if truth:
        return "Posterior vs truth"
    shown = f"Posterior mean and {hdi_prob * 100:g}% HDI"
    return f"{shown}, with the start" if start else shown


def plot_responsibilities(
    x, y, estimate: MoEEstimate, feature_names: Sequence[str] | None = None, z=None
):
    """The data coloured by posterior responsibility, with each expert's fitted predictions.

    One panel per expert, its points coloured by that expert's responsibility
    ``p(expert i | x, y)`` (a continuous colour map from 0 to 1). One input: y against x with
    expert i's curve ``g(a_i x + b_i)`` (the other experts' curves in grey). Several inputs: y
    against expert i's fitted value ``g(a_i . x + b_i)`` (points of the expert lie on the diagonal).
    """
    plt = _pyplot()
    x = torch.as_tensor(x)
    y = torch.as_tensor(y, dtype=x.dtype)
    est = estimate.to(dtype=x.dtype, device=x.device)
    resp = est.responsibilities(x, y, z).cpu().numpy()
    means = likelihood.expert_means(x, est.experts_weight, est.experts_bias, est.link).cpu().numpy()
    xn, yn = x.cpu().numpy(), y.cpu().numpy()
    k = est.num_experts
    one_input = xn.shape[1] == 1
    width = max(4 * k, 6.5)  # one expert (a plain regression): room for the title
    figure, axes = plt.subplots(1, k, figsize=(width, 3.8), squeeze=False, layout="constrained")
    order = np.argsort(xn[:, 0])
    for i, ax in enumerate(axes[0]):
        if one_input:
            points = ax.scatter(
                xn[:, 0], yn, c=resp[:, i], cmap="viridis", vmin=0, vmax=1, s=8, alpha=0.8
            )
            for j in range(k):
                ax.plot(
                    xn[order, 0],
                    means[order, j],
                    color="C3" if j == i else "0.6",
                    lw=2 if j == i else 1,
                    zorder=3 if j == i else 2,
                )
            ax.set_xlabel(feature_names[0] if feature_names else "x")
        else:
            points = ax.scatter(means[:, i], yn, c=resp[:, i], cmap="viridis", vmin=0, vmax=1, s=6)
            low, high = means[:, i].min(), means[:, i].max()
            ax.plot([low, high], [low, high], "k--", lw=1)
            ax.set_xlabel(f"expert {i} fitted value g(a_{i}.x + b_{i})")
        ax.set_ylabel("y")
        ax.set_title(f"expert {i}")
    figure.colorbar(points, ax=axes[0].tolist(), label="responsibility p(expert | x, y)")
    figure.suptitle(
        "Data coloured by each expert's responsibility, with its fit"
        if one_input
        else "y against each expert's fitted value, coloured by responsibility"
    )
    return figure


def plot_posterior_predictive(idata, num_pp_samples: int = 50):
    """ArviZ posterior predictive check of ``y`` (observed density against replicated ones).

    Shows ``num_pp_samples`` replicated data sets, or every draw when there are fewer (a short run
    of 1 chain x 20 draws still gets its plot).
    """
    import arviz as az

    predictive = idata.posterior_predictive
    draws = int(predictive.sizes["chain"] * predictive.sizes["draw"])
    num_pp_samples = max(1, min(int(num_pp_samples), draws))
    ax = az.plot_ppc(idata, var_names=[sites.OBS], num_pp_samples=num_pp_samples)
    ax = np.asarray(ax).ravel()[0]
    ax.set_title("Posterior predictive check")
    return ax.figure


def plot_predictions(
    model,
    idata,
    feature: int | str = 0,
    *,
    x=None,
    y=None,
    num_points: int = 100,
    hdi_prob: float = 0.94,
    ax=None,
):
    """Conditional predictions along one input, the other inputs held at their means.

    As brms's ``conditional_effects`` and bambi's ``plot_predictions``: ``num_points`` inputs
    spanning the range of ``feature`` in the data, every other input at its mean, evaluated by
    :func:`pyromoe.bayes.predict.predict` under every posterior draw. The top panel shows the data
    (y against the feature), the posterior mean and ``hdi_prob`` HDI band of each expert's mean
    ``g(a_i . x + b_i)`` and of the mixture mean ``E[y | x]``; the bottom panel the gate
    probability of each expert with its band.

    Parameters
    ----------
    model : MixtureOfExperts
        The model the posterior was fitted with.
    idata : arviz.InferenceData
        With the model's sites in ``posterior``; ``constant_data["x"]`` and
        ``observed_data["y"]`` give the data when ``x``, ``y`` are not given.
    feature : int or str
        The input on the horizontal axis: its position (0 to d - 1) or its name in the
        ``feature`` coords of ``idata.posterior``.
    x : Tensor, ndarray or DataFrame (n, d), optional
    y : Tensor, ndarray or Series (n,), optional
        Data to show and to take the feature's range and the other inputs' means from (default:
        the fitted data in ``idata``); ``y`` is optional when ``x`` is given.
    num_points : int
        Points of the grid along the feature (>= 2).
    hdi_prob : float
        Probability mass of the bands, in (0, 1).
    ax : sequence of two matplotlib Axes, optional
        The y panel and the gate panel to draw into (default: a new figure).

    Returns
    -------
    matplotlib.figure.Figure

    Raises
    ------
    ValueError
        An unknown feature name (the message lists the choices) or a position out of range; no
        data (neither ``x`` nor ``idata.constant_data``); ``ax`` not two Axes; and the errors of
        :func:`~pyromoe.bayes.predict.predict`.
    TypeError
        ``feature`` neither an int nor a str; a model that is not a MixtureOfExperts.

    Examples
    --------
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> from pyromoe import MixtureOfExperts, fit_map, simulate
    >>> data = simulate(200, 2, seed=0)
    >>> model = MixtureOfExperts(2, 2, bias=False)
    >>> idata = fit_map(model, data.x, data.y, init=data.truth, num_steps=20)
    >>> figure = plot_predictions(model, idata, feature=1)
    >>> len(figure.axes)
    2
    """
    from .._validation import as_tensors, check_count, check_probability
    from ..bayes.model import MixtureOfExperts
    from ..bayes.predict import hdi_bounds, predict

    if isinstance(model, type) or not isinstance(model, MixtureOfExperts):
        shown = model.__name__ if isinstance(model, type) else type(model).__name__
        raise TypeError(f"model must be a pyromoe.MixtureOfExperts instance; got {shown}")
    hdi_prob = check_probability(hdi_prob, "hdi_prob")
    num_points = check_count(num_points, "num_points", minimum=2)
    if not callable(getattr(idata, "groups", None)):
        raise TypeError(f"idata must be an arviz.InferenceData; got {type(idata).__name__}")
    if "posterior" not in idata.groups():
        raise ValueError("idata has no posterior group; pass the InferenceData of a fit")
    d = model.in_features
    names, column = _feature_column(idata.posterior, d, feature)
    if x is None:
        x, y = _fitted_data(idata)
    x, y = as_tensors(x, y, in_features=d)
    xn = x.detach().cpu().numpy().astype(float)
    figure, ax_y, ax_gate = _two_panels(ax)

    grid = np.linspace(xn[:, column].min(), xn[:, column].max(), num_points)
    x_grid = np.repeat(xn.mean(axis=0, keepdims=True), num_points, axis=0)
    x_grid[:, column] = grid
    predictions = predict(model, idata, x_grid).predictions
    variables = predictions[["mean", "expert_mean", "gate"]]
    centre = variables.mean(("chain", "draw"))
    low, high = hdi_bounds(variables, hdi_prob)
    name = names[column] if isinstance(names[column], str) else f"feature {column}"

    if y is not None:
        ax_y.scatter(
            xn[:, column],
            y.detach().cpu().numpy(),
            s=6,
            color="0.6",
            alpha=0.5,
            label="data",
            zorder=0,
        )
    held = " (other inputs at their means)" if d > 1 else ""
    title = f"Posterior mean and {hdi_prob * 100:g}% HDI along {name}{held}"
    return draw_conditional(
        ax_y, ax_gate, grid, (centre, low, high), y_label="y", x_label=name, title=title
    )


def draw_conditional(ax_y, ax_gate, grid, bands, *, y_label: str, x_label: str, title: str):
    """A conditional-predictions figure: each expert's mean and the mixture mean in ``ax_y``, each
    expert's gate probability in ``ax_gate``; ``bands`` is ``(centre, low, high)``, datasets with
    ``mean``, ``expert_mean`` (grid, expert) and ``gate``. Returns the figure, laid out."""
    centre, low, high = bands
    for i in range(centre.sizes["expert"]):
        colour, part = f"C{i}", {"expert": i}
        ax_y.fill_between(
            grid, low["expert_mean"][part], high["expert_mean"][part], color=colour, alpha=0.2, lw=0
        )
        ax_y.plot(
            grid,
            centre["expert_mean"][part],
            color=colour,
            lw=1.5,
            label=f"expert {i} mean g(a_{i}.x + b_{i})",
        )
        ax_gate.fill_between(
            grid, low["gate"][part], high["gate"][part], color=colour, alpha=0.2, lw=0
        )
        ax_gate.plot(grid, centre["gate"][part], color=colour, lw=1.5, label=f"gate_{i}(x)")
    ax_y.fill_between(grid, low["mean"], high["mean"], color="k", alpha=0.15, lw=0)
    ax_y.plot(grid, centre["mean"], color="k", lw=2, label="mixture mean E[y | x]")
    ax_gate.set_ylim(-0.02, 1.02)
    ax_gate.set_ylabel("gate probability")
    ax_y.set_ylabel(y_label)
    ax_y.set_title(title)
    ax_y.legend(fontsize=8)
    ax_gate.set_xlabel(x_label)
    ax_gate.legend(fontsize=8)
    figure = ax_y.figure
    figure.tight_layout()
    return figure


def _feature_column(posterior, d: int, feature) -> tuple[list, int]:
    """The feature names (positions without names) and the column ``feature`` names."""
    names = list(range(d))
    if "feature" in posterior.coords and posterior.sizes["feature"] == d:
        names = [value.item() for value in posterior["feature"].values]
    if isinstance(feature, str):
        if feature not in names:
            raise ValueError(f"feature must be one of the feature names {names}; got {feature!r}")
        return names, names.index(feature)
    if isinstance(feature, (int, np.integer)) and not isinstance(feature, (bool, np.bool_)):
        if not 0 <= int(feature) < d:
            raise ValueError(
                f"feature must be a position 0 to {d - 1} or one of the feature names {names}; "
                f"got {feature}"
            )
        return names, int(feature)
    raise TypeError(
        f"feature must be an int (a position) or a str (one of {names}); got "
        f"{type(feature).__name__}"
    )


def _fitted_data(idata):
    """The fitted ``x`` (``constant_data``) and ``y`` (``observed_data``, or None) of ``idata``."""
    if "constant_data" not in idata.groups() or "x" not in idata.constant_data:
        raise ValueError(
            "plot_predictions needs data: pass x (and y), or an idata with constant_data['x']"
        )
    has_y = "observed_data" in idata.groups() and sites.OBS in idata.observed_data
    return idata.constant_data["x"].values, (
        idata.observed_data[sites.OBS].values if has_y else None
    )


def _two_panels(ax):
    """A new figure with the y and gate panels, or the two Axes given."""
    if ax is None:
        figure, (ax_y, ax_gate) = _pyplot().subplots(2, 1, sharex=True, figsize=(7, 6.5))
        return figure, ax_y, ax_gate
    axes = list(np.asarray(ax, dtype=object).ravel())
    if len(axes) != 2 or not all(hasattr(a, "fill_between") for a in axes):
        raise ValueError("ax must be None or two matplotlib Axes (the y and gate panels)")
    return axes[0].figure, axes[0], axes[1]

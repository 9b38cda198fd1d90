"""Figures for a fitted mixture of experts: each function returns a matplotlib Figure (no file I/O).

They read ArviZ data as written by :func:`pyromoe.bayes.to_arviz.to_inference_data` (variables named
by the model's sites, dims ``chain``, ``draw``, ``expert``, ``feature``, ``obs``).
:func:`parameter_summary` is the one table of every scalar parameter (``az.summary`` with the point
values ArviZ cannot know) that both :func:`plot_posterior_vs_truth` and the results' Markdown
(:func:`pyromoe.app.workflow.parameter_table`) show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from ..core import likelihood, sites
from ..core.estimate import MoEEstimate

__all__ = [
    "parameter_sites",
    "parameter_summary",
    "interval_columns",
    "plot_trace",
    "plot_posterior_vs_truth",
    "plot_random_starts",
    "plot_responsibilities",
    "plot_posterior_predictive",
]


def _pyplot():
    # imported lazily so that importing pyromoe does not load matplotlib; the CLI selects Agg
    import matplotlib.pyplot as plt

    return plt


def parameter_sites(idata) -> list[str]:
    """The model's parameter sites present in ``idata.posterior``, in the model's order."""
    return [name for name in sites.PARAMETER_SITES if name in idata.posterior.data_vars]


def _position_text(dim: str, position: int) -> str:
    # gate row j gives the logit of expert j (expert 0 is the reference): rows are numbered from 1
    return str(position + 1 if dim == "gate" else position)


def _scalar_label(name: str, dims: Sequence[str], index: tuple[int, ...]) -> str:
    """``experts.weight[0, 1]``: written as ArviZ writes its labels (see :func:`_labeller`)."""
    if not index:
        return name
    return f"{name}[{', '.join(_position_text(d, i) for d, i in zip(dims, index))}]"


def _labeller():
    from arviz.labels import BaseLabeller

    class PositionLabeller(BaseLabeller):
        """Label by position, not coordinate value (feature names would make long rows)."""

        def dim_coord_to_str(self, dim, coord_val, coord_idx):
            return _position_text(dim, int(coord_idx))

    return PositionLabeller()


def interval_columns(hdi_prob: float = 0.94) -> tuple[str, str]:
    """Names of the interval columns of :func:`parameter_summary`, e.g. ``("94% low", "94% high")``."""
    percent = f"{hdi_prob * 100:g}%"
    return f"{percent} low", f"{percent} high"


def parameter_summary(
    idata, points: Mapping[str, MoEEstimate] | None = None, hdi_prob: float = 0.94
) -> pd.DataFrame:
    """``az.summary`` of every scalar parameter, with point values (e.g. truth, start) beside it.

    Parameters
    ----------
    idata : arviz.InferenceData
        With a ``posterior`` group whose variables are the model's sites.
    points : mapping of str to MoEEstimate, optional
        Column name -> point estimate, e.g. ``{"truth": truth, "start": estimate}``; its experts
        must be labelled as in ``idata``.
    hdi_prob : float, default 0.94
        Probability mass of the highest-density interval.

    Returns
    -------
    pandas.DataFrame
        Indexed by ``parameter`` (``experts.weight[0, 1]``, ``gate.bias[1]``, ``noise``: experts
        and features by position from 0, gate rows from 1, the expert whose logit they give). The
        columns: one per point estimate, then ``posterior mean``, ``sd`` and the interval
        (:func:`interval_columns`); with several chains also ArviZ's ``ess_bulk``, ``ess_tail``
        and ``r_hat`` (SVI and MAP draws come as one chain, for which they mean nothing).
    """
    import arviz as az

    names = parameter_sites(idata)
    several = idata.posterior.sizes["chain"] > 1
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
        site_values = estimate.site_values()
        for name in names:
            dims = idata.posterior[name].dims[2:]
            value = site_values[name].detach().cpu().numpy()
            for index in np.ndindex(*value.shape):
                values[column][_scalar_label(name, dims, index)] = float(value[index])
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
    labels (see :func:`pyromoe.core.labels.align_labels`)."""
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
    ax.set_title("Posterior vs truth")
    figure.tight_layout()
    return figure


def plot_random_starts(
    random_errors: Sequence[float],
    random_log_likelihoods: Sequence[float],
    tensor_error: float | None,
    tensor_log_likelihood: float | None,
):
    """Each random-start EM fit's expert error against its final log-likelihood, with the tensor
    start -> EM fit marked (when it ran): wrong basins show as low log-likelihood, high error."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(6, 4))
    ax.scatter(
        random_log_likelihoods,
        random_errors,
        color="C0",
        alpha=0.7,
        label=f"random-start EM ({len(random_errors)} fits)",
    )
    if tensor_error is not None and tensor_log_likelihood is not None:
        ax.scatter(
            [tensor_log_likelihood],
            [tensor_error],
            marker="*",
            s=250,
            color="C3",
            edgecolor="k",
            label="tensor start -> EM",
        )
    ax.set_xlabel("final log-likelihood (total)")
    ax.set_ylabel("expert error  max_i ||a_i - a_i*||")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Where each start ended")
    figure.tight_layout()
    return figure


def plot_responsibilities(x, y, estimate: MoEEstimate, feature_names: Sequence[str] | None = None):
    """The data coloured by posterior responsibility, with each expert's fitted predictions.

    One input: y against x with each expert's curve ``g(a_i x + b_i)``. Several inputs: one panel per
    expert, y against that expert's fitted value ``g(a_i . x + b_i)`` (points of the expert lie on
    the diagonal), coloured by the responsibility of that expert.
    """
    plt = _pyplot()
    x = torch.as_tensor(x)
    y = torch.as_tensor(y, dtype=x.dtype)
    est = estimate.to(dtype=x.dtype, device=x.device)
    resp = est.responsibilities(x, y).cpu().numpy()
    means = likelihood.expert_means(x, est.experts_weight, est.experts_bias, est.link).cpu().numpy()
    xn, yn = x.cpu().numpy(), y.cpu().numpy()
    k = est.num_experts
    if xn.shape[1] == 1:
        figure, ax = plt.subplots(figsize=(6, 4))
        hard = resp.argmax(1)
        for i in range(k):
            chosen = hard == i
            ax.scatter(
                xn[chosen, 0],
                yn[chosen],
                s=10,
                color=f"C{i}",
                alpha=0.5,
                label=f"most likely expert {i}",
            )
            order = np.argsort(xn[:, 0])
            ax.plot(xn[order, 0], means[order, i], color=f"C{i}", lw=2)
        ax.set_xlabel(feature_names[0] if feature_names else "x")
        ax.set_ylabel("y")
        ax.legend(fontsize=8)
        ax.set_title("Data by responsibility, with each expert's fit")
    else:
        figure, axes = plt.subplots(1, k, figsize=(4 * k, 3.8), squeeze=False)
        for i, ax in enumerate(axes[0]):
            points = ax.scatter(means[:, i], yn, c=resp[:, i], cmap="viridis", vmin=0, vmax=1, s=6)
            low, high = means[:, i].min(), means[:, i].max()
            ax.plot([low, high], [low, high], "k--", lw=1)
            ax.set_xlabel(f"expert {i} fitted value g(a_{i}.x + b_{i})")
            ax.set_ylabel("y")
            ax.set_title(f"expert {i}")
        figure.colorbar(points, ax=axes[0].tolist(), label="responsibility p(expert | x, y)")
        figure.suptitle("y against each expert's fitted value, coloured by responsibility")
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

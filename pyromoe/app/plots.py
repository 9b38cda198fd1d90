"""Figures for a fitted mixture of experts: each function returns a matplotlib Figure (no file I/O).

They read ArviZ data as written by :func:`pyromoe.bayes.to_arviz.to_inference_data` (variables named by the
model's sites, dims ``chain``, ``draw``, ``expert``, ``feature``, ``obs``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..core import likelihood, sites
from ..core.estimate import MoEEstimate

__all__ = [
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


def _parameter_vars(idata) -> list[str]:
    return [name for name in sites.PARAMETER_SITES if name in idata.posterior.data_vars]


def plot_trace(idata):
    """ArviZ trace plot of every parameter site (one row per site, all chains)."""
    import arviz as az

    axes = az.plot_trace(idata, var_names=_parameter_vars(idata), compact=True)
    figure = np.asarray(axes).ravel()[0].figure
    figure.tight_layout()
    return figure


def _flatten(estimate: MoEEstimate, names: Sequence[str]) -> dict[str, float]:
    values = {}
    for name, tensor in estimate.site_values().items():
        if name not in names:
            continue
        flat = tensor.detach().cpu().reshape(-1).tolist()
        shape = tuple(tensor.shape)
        for index, value in zip(np.ndindex(*shape) if shape else [()], flat):
            label = name + (f"[{','.join(map(str, index))}]" if index else "")
            values[label] = value
    return values


def plot_posterior_vs_truth(
    idata, truth: MoEEstimate | None = None, estimate: MoEEstimate | None = None, hdi_prob=0.94
):
    """Posterior mean and ``hdi_prob`` interval of every scalar parameter, with the truth and the
    point estimate marked (either may be omitted). Experts must already be aligned to the truth's
    labels (see :func:`pyromoe.core.labels.align_labels`)."""
    import arviz as az

    plt = _pyplot()
    names = _parameter_vars(idata)
    hdi = az.hdi(idata.posterior[names], hdi_prob=hdi_prob)
    mean = idata.posterior[names].mean(("chain", "draw"))
    labels, lows, highs, means = [], [], [], []
    for name in names:
        m = np.atleast_1d(mean[name].values).reshape(-1)
        h = hdi[name].values.reshape(-1, 2)
        shape = mean[name].shape
        for i, index in enumerate(np.ndindex(*shape) if shape else [()]):
            labels.append(name + (f"[{','.join(map(str, index))}]" if index else ""))
            means.append(m[i])
            lows.append(h[i, 0])
            highs.append(h[i, 1])
    positions = np.arange(len(labels))[::-1]
    figure, ax = plt.subplots(figsize=(7, 0.3 * len(labels) + 1.2))
    ax.hlines(positions, lows, highs, color="C0", lw=2, label=f"{int(hdi_prob * 100)}% HDI")
    ax.plot(means, positions, "o", color="C0", label="posterior mean")
    for other, marker, colour, text in ((truth, "x", "k", "truth"), (estimate, "D", "C3", "start")):
        if other is not None:
            flat = _flatten(other, names)
            ax.plot(
                [flat.get(lbl, np.nan) for lbl in labels],
                positions,
                marker,
                color=colour,
                ms=6,
                mfc="none" if marker == "D" else None,
                label=text,
            )
    ax.set_yticks(positions, labels)
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

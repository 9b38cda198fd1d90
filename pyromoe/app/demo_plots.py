"""The demo's two figures about starts: where EM fits from each kind of start ended, and each NUTS
chain's log-likelihood under each initialisation. Each function returns a matplotlib Figure (no
file I/O); both are re-exported by :mod:`pyromoe.app.plots`."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

__all__ = ["plot_random_starts", "plot_chain_log_likelihoods", "wrong_mode_chains"]

#: How each kind of EM start is drawn in :func:`plot_random_starts`: marker, colour, size.
_START_STYLE = {
    "plain": ("o", "C0", 40),
    "screened": ("s", "C1", 30),
    "tensor": ("*", "C3", 260),
}


def _pyplot():
    import matplotlib.pyplot as plt

    return plt


def _plain_numbers(axis) -> None:
    """Tick labels as plain numbers: no offset ("-7.6256e2"), no scientific notation."""
    from matplotlib.ticker import FuncFormatter

    axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))


def plot_random_starts(
    fits: Mapping[str, tuple[Sequence[float], Sequence[float | None]]],
    wrong_basin_nats: float | None = None,
):
    """Where each EM fit ended: nats below the best fit's log-likelihood against expert error.

    Parameters
    ----------
    fits : mapping of str to (log-likelihoods, expert errors)
        One entry per kind of start, e.g. ``{"plain": (...), "screened": (...), "tensor":
        (...)}``: each fit's final total log-likelihood and its expert error (None or NaN when
        unknown: such fits are left out). The key is the legend's label, with the number of
        fits; labels whose first word is ``plain``, ``screened`` or ``tensor`` get their own
        markers (circles, squares, a star).
    wrong_basin_nats : float, optional
        Draw the wrong-basin threshold at this many nats below the best fit.

    The horizontal axis is symmetric-log (linear within 0.01 nats of the best, logarithmic
    beyond), so fits that agree to a thousandth of a nat and fits hundreds of nats lower are
    both visible; its tick labels are plain numbers.
    """
    plt = _pyplot()
    known = {
        label: [(ll, err) for ll, err in zip(*values) if err is not None and np.isfinite(err)]
        for label, values in fits.items()
    }
    best = max((ll for points in known.values() for ll, _ in points), default=0.0)
    figure, ax = plt.subplots(figsize=(6.5, 4))
    for i, (label, points) in enumerate(known.items()):
        marker, colour, size = _START_STYLE.get(label.split()[0], ("o", f"C{i + 4}", 40))
        if not points:  # e.g. the moment step could not apply: say so in the legend
            ax.scatter([], [], marker=marker, s=size, color=colour, label=f"{label}: did not run")
            continue
        below = [best - ll for ll, _ in points]
        errors = [err for _, err in points]
        count = f"{len(points)} fit{'s' if len(points) != 1 else ''}"
        ax.scatter(
            below,
            errors,
            marker=marker,
            s=size,
            color=colour,
            alpha=0.75,
            edgecolor="k" if marker == "*" else None,
            zorder=3 if marker == "*" else 2,
            label=f"{label} ({count})",
        )
    if wrong_basin_nats is not None:
        ax.axvline(wrong_basin_nats, color="0.4", ls=":", lw=1, label="wrong-basin threshold")
    ax.set_xscale("symlog", linthresh=0.01)
    farthest = max([best - ll for points in known.values() for ll, _ in points] + [1.0])
    ax.set_xlim(-0.002, 3 * max(farthest, wrong_basin_nats or 0.0))
    ax.set_ylim(bottom=0)
    _plain_numbers(ax.xaxis)
    ax.set_xlabel("nats below the best fit's log-likelihood (symmetric log scale)")
    ax.set_ylabel("expert error  max_i ||a_i - a_i*||")
    ax.legend(fontsize=8)
    ax.set_title("Where each EM fit ended, by kind of start")
    figure.tight_layout()
    return figure


def wrong_mode_chains(chain_log_likelihoods, best: float, wrong_basin_nats: float) -> list[int]:
    """The chains whose mean log-likelihood is more than ``wrong_basin_nats`` below ``best``
    (the rule of :func:`pyromoe.app.runs.nuts_report`)."""
    means = np.asarray(chain_log_likelihoods, dtype=float)
    return [int(c) for c in np.flatnonzero(means < best - wrong_basin_nats)]


def plot_chain_log_likelihoods(runs: Mapping[str, object], wrong_basin_nats: float):
    """Each NUTS chain's total log-likelihood, draw by draw, one panel per run.

    Parameters
    ----------
    runs : mapping of str to arviz.InferenceData
        Label -> a run on the same data and model (e.g. seeded and Pyro's default init), each with
        ``sample_stats["log_likelihood_total"]`` and ``attrs["chain_mean_log_likelihood"]``.
    wrong_basin_nats : float
        A chain is in a wrong mode when its mean is more than this many nats below the best chain
        of all the runs (:func:`wrong_mode_chains`); such chains are drawn dashed in red and
        named in the legend, and the threshold is drawn as a dotted line.
    """
    plt = _pyplot()
    best = max(max(run.attrs["chain_mean_log_likelihood"]) for run in runs.values())
    figure, axes = plt.subplots(
        1, len(runs), figsize=(5.5 * len(runs), 3.8), sharey=True, squeeze=False
    )
    for ax, (label, run) in zip(axes[0], runs.items()):
        totals = np.asarray(run.sample_stats["log_likelihood_total"].values, dtype=float)
        wrong = wrong_mode_chains(run.attrs["chain_mean_log_likelihood"], best, wrong_basin_nats)
        for chain, values in enumerate(totals):
            # red and dashed only for a chain in a wrong mode: the others skip C3 (red)
            colour = f"C{chain + (chain >= 3)}"
            style = dict(color="C3", ls="--", lw=1.2) if chain in wrong else dict(c=colour, lw=0.8)
            note = ": wrong mode" if chain in wrong else ""
            ax.plot(values, label=f"chain {chain}{note}", **style)
        ax.axhline(best - wrong_basin_nats, color="k", ls=":", lw=1)
        ax.set_title(f"{label}\n{len(wrong)} of {len(totals)} chains in a wrong mode", fontsize=10)
        ax.set_xlabel("draw (after warm-up)")
        ax.legend(fontsize=7, loc="best")
    axes[0][0].set_ylabel("total log-likelihood")
    _plain_numbers(axes[0][0].yaxis)
    figure.suptitle(
        f"Per-chain log-likelihood (dotted: {wrong_basin_nats:g} nats below the best chain mean)",
        fontsize=10,
    )
    figure.tight_layout()
    return figure

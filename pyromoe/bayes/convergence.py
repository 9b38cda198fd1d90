"""Did the chains converge? The check :func:`~pyromoe.run_nuts` runs on the mixture's sites.

Three diagnostics, each with a threshold and the chains it names:

- ``r_hat``: ArviZ's rank-normalised split r_hat (Vehtari et al. 2021) of every scalar of the
  mixture's sites (``experts.weight``, ``experts.bias``, ``gate.weight``, ``gate.bias``,
  ``noise``), as the posterior holds them (relabelled to the estimate when ``run_nuts`` aligns);
  fails above :data:`MAX_RHAT`. With three chains or more the chains named are those without
  which r_hat falls back under the threshold (or, failing that, the one whose removal lowers it
  most, when that removes at least half the excess): the chains sitting apart. With two chains
  the chain of lower mean log-likelihood is named.
- ``divergences``: the share of kept draws whose trajectory diverged; fails above
  :data:`MAX_DIVERGENT_FRACTION`; names the chains with divergent draws.
- ``log_likelihood``: a chain whose mean log-likelihood is more than :data:`WRONG_MODE_NATS`
  below the best chain's is stuck in a lower mode.

And one note on efficiency, which does not fail the check: ``tree_depth``, the share of kept
draws whose trajectory stopped at the sampler's ``max_tree_depth`` (``2^max_tree_depth - 1``
gradients each), above :data:`MAX_SATURATED_FRACTION`. The draws stay valid, but the run is slow
and its effective sample size may be low: the posterior has long, narrow directions (in the SBC of
tanh experts, prior draws whose noise swamps the experts' bounded outputs; benchmarks/results/
sbc_tanh_k2.md).

:func:`record_convergence` writes the report into ``idata.attrs["convergence"]`` (a JSON string,
so the InferenceData still saves as NetCDF) and warns :class:`NUTSConvergenceWarning` with the
findings and advice. What the diagnostics showed at k = 3 with similar experts, and which fixes
helped, is in docs/algorithm.md section 5.
"""

from __future__ import annotations

import json
import warnings

import numpy as np

from .._validation import check_positive, user_stacklevel
from ..core import sites

__all__ = [
    "MAX_RHAT",
    "MAX_DIVERGENT_FRACTION",
    "MAX_SATURATED_FRACTION",
    "WRONG_MODE_NATS",
    "NUTSConvergenceWarning",
    "check_convergence",
    "convergence_summary",
    "record_convergence",
]

#: r_hat above this on any scalar of the mixture's sites fails the check (Vehtari et al. 2021)
MAX_RHAT = 1.01
#: a share of divergent kept draws above this fails the check
MAX_DIVERGENT_FRACTION = 0.01
#: a share of kept draws whose trajectory hit ``max_tree_depth`` above this is noted (efficiency)
MAX_SATURATED_FRACTION = 0.01
#: a chain whose mean log-likelihood is more than this many nats below the best chain's is stuck in
#: a lower mode (the rule of ``pyromoe.app.runs.WRONG_BASIN_NATS``)
WRONG_MODE_NATS = 5.0

_MIXTURE_SITES = (
    sites.EXPERTS_WEIGHT,
    sites.EXPERTS_BIAS,
    sites.GATE_WEIGHT,
    sites.GATE_BIAS,
    sites.NOISE,
)

_ADVICE = {
    "r_hat": (
        "the chains disagree: run longer (more num_warmup and num_samples); if a chain sits in "
        "another mode, start from a better estimate (pyromoe.fit_em with more n_init: every "
        "start run to convergence) or fewer experts; try full_mass=True for correlated parameters"
    ),
    "r_hat_mixing": (
        "no chain sits apart (without any one of them r_hat stays above the threshold): the "
        "chains mix slowly rather than disagree; run more draws (num_samples), docs/algorithm.md "
        "section 5"
    ),
    "divergences": (
        "the sampler cannot follow the posterior's curvature there: raise target_accept_prob "
        "(e.g. 0.95), try full_mass=True, or a tighter gate prior (priors={'gate.weight': 1.0})"
    ),
    "log_likelihood": (
        "these chains are stuck in a lower mode: do not pool them; rerun from the estimate with "
        "smaller jitter or more starts, or compare fewer experts (compare_experts)"
    ),
    "tree_depth": (
        "valid draws, but each took 2^max_tree_depth - 1 gradients (the slow part of this run): "
        "the posterior has long, narrow directions, often weakly identified parameters (experts "
        "the noise swamps); check the effective sample size, try full_mass=True or tighter "
        "priors, or raise max_tree_depth if the ESS is low"
    ),
}


class NUTSConvergenceWarning(UserWarning):
    """NUTS chains failed the convergence check of :mod:`pyromoe.bayes.convergence` (r_hat,
    divergent draws or a chain in a lower mode): the posterior draws cannot be trusted as they
    are. ``idata.attrs["convergence"]`` names the chains, the diagnostics and the advice."""


def _rhat_by_site(posterior, names: list[str]) -> dict[str, float]:
    import arviz as az

    rhat = az.rhat(posterior[names])
    return {name: float(np.nanmax(np.asarray(rhat[name].values, dtype=float))) for name in names}


def _chains_apart(posterior, names, worst: float, chain_ll, max_rhat: float) -> tuple[list, list]:
    """(chains named by r_hat, the max r_hat without each chain) for three chains or more."""
    num_chains = posterior.sizes["chain"]
    if num_chains < 3:
        return [int(np.argmin(chain_ll))] if chain_ll is not None else [], []
    labels = posterior["chain"].values
    without = [
        max(_rhat_by_site(posterior.sel(chain=labels[labels != label]), names).values())
        for label in labels
    ]
    named = [c for c, value in enumerate(without) if value <= max_rhat]
    best = int(np.argmin(without))
    if not named and worst - without[best] >= (worst - 1.0) / 2:
        named = [best]
    return named, [round(v, 4) for v in without]


def _sampled_posterior(idata):
    """``idata.posterior``, checked: an InferenceData whose posterior has chain and draw dims."""
    posterior = getattr(idata, "posterior", None) if hasattr(idata, "groups") else None
    if posterior is None:
        raise TypeError(
            "idata must be an arviz.InferenceData with a posterior group (e.g. run_nuts' result); "
            f"got {type(idata).__name__}"
        )
    if not {"chain", "draw"} <= set(posterior.sizes) or not posterior.data_vars:
        raise ValueError(
            "idata.posterior must hold draws with chain and draw dims (a sampler's result); got "
            f"dims {sorted(posterior.sizes)} and variables {sorted(posterior.data_vars)}"
        )
    return posterior


def _tree_depth_note(idata, max_tree_depth) -> tuple[float | None, list]:
    """(share of kept draws at ``max_tree_depth``, the efficiency notes): None and no note when
    the depth or the per-draw tree depths are unknown."""
    depth = getattr(idata, "sample_stats", {}).get("tree_depth")
    if max_tree_depth is None or depth is None:
        return None, []
    saturated = np.asarray(depth.values) >= int(max_tree_depth)  # (chain, draw)
    fraction = float(saturated.mean())
    notes = []
    if fraction > MAX_SATURATED_FRACTION:
        chains = [c for c, row in enumerate(saturated) if row.any()]
        notes.append({"diagnostic": "tree_depth", "chains": chains, "value": round(fraction, 4)})
        notes[-1].update(
            max_tree_depth=int(max_tree_depth),
            threshold=MAX_SATURATED_FRACTION,
            advice=_ADVICE["tree_depth"],
        )
    return fraction, notes


def check_convergence(
    idata,
    *,
    max_rhat: float = MAX_RHAT,
    max_divergent_fraction: float = MAX_DIVERGENT_FRACTION,
    wrong_mode_nats: float = WRONG_MODE_NATS,
    max_tree_depth: int | None = None,
) -> dict:
    """The convergence report of a sampled ``idata`` (posterior with chain and draw dims).

    Parameters
    ----------
    idata : arviz.InferenceData
        With ``posterior`` holding the mixture's sites; ``sample_stats["diverging"]`` and
        ``attrs["chain_mean_log_likelihood"]`` are used when present.
    max_rhat, max_divergent_fraction, wrong_mode_nats : float
        The thresholds (defaults :data:`MAX_RHAT`, :data:`MAX_DIVERGENT_FRACTION`,
        :data:`WRONG_MODE_NATS`).
    max_tree_depth : int, optional
        The sampler's ``max_tree_depth`` (default ``idata.attrs["max_tree_depth"]``, which
        ``run_nuts`` records): with ``sample_stats["tree_depth"]``, the share of draws that hit
        it, noted (not failed) above :data:`MAX_SATURATED_FRACTION`.

    Returns
    -------
    dict
        ``converged`` (bool), ``max_rhat``, ``worst_site``, ``rhat_by_site``,
        ``rhat_without_chain`` (per chain, three chains or more), ``divergent_fraction``,
        ``divergences_per_chain``, ``chain_log_likelihood_gap`` (nats below the best chain),
        ``thresholds`` and ``findings``: one dict per failed diagnostic with ``diagnostic``
        (``"r_hat"``, ``"divergences"``, ``"log_likelihood"``), ``chains`` (0-based), ``value``,
        ``threshold`` and ``advice``; ``tree_depth_saturated`` (the share of draws at
        ``max_tree_depth``, None when unknown) and ``notes``: the efficiency note of the same
        form (``"tree_depth"``), which leaves ``converged`` as it is.

    Examples
    --------
    >>> import arviz as az, numpy as np
    >>> draws = np.random.default_rng(0).normal(size=(4, 200))
    >>> check_convergence(az.from_dict(posterior={"noise": draws}))["converged"]
    True
    """
    posterior = _sampled_posterior(idata)
    max_rhat = check_positive(max_rhat, "max_rhat")
    max_divergent_fraction = check_positive(max_divergent_fraction, "max_divergent_fraction")
    wrong_mode_nats = check_positive(wrong_mode_nats, "wrong_mode_nats")
    if max_tree_depth is None:
        max_tree_depth = idata.attrs.get("max_tree_depth")
    else:
        max_tree_depth = check_positive(max_tree_depth, "max_tree_depth", integer=True)
    names = [name for name in _MIXTURE_SITES if name in posterior.data_vars]
    names = names or list(posterior.data_vars)
    num_chains, num_draws = posterior.sizes["chain"], posterior.sizes["draw"]
    chain_ll = idata.attrs.get("chain_mean_log_likelihood")
    chain_ll = None if chain_ll is None else np.asarray(chain_ll, dtype=float)
    findings = []
    rhat = _rhat_by_site(posterior, names) if num_chains > 1 else {}
    worst_site = max(rhat, key=rhat.get) if rhat else None
    worst = rhat[worst_site] if rhat else float("nan")
    without: list = []
    if rhat and worst > max_rhat:
        named, without = _chains_apart(posterior, names, worst, chain_ll, max_rhat)
        findings.append({"diagnostic": "r_hat", "chains": named, "value": round(worst, 4)})
        advice = _ADVICE["r_hat_mixing" if without and not named else "r_hat"]
        findings[-1].update(site=worst_site, threshold=max_rhat, advice=advice)
    diverging = getattr(idata, "sample_stats", {}).get("diverging")
    per_chain = [0] * num_chains
    if diverging is not None:
        per_chain = np.asarray(diverging.values, dtype=bool).sum(axis=1).tolist()
    fraction = sum(per_chain) / (num_chains * num_draws)
    if fraction > max_divergent_fraction:
        chains = [c for c, count in enumerate(per_chain) if count > 0]
        findings.append({"diagnostic": "divergences", "chains": chains, "value": fraction})
        findings[-1].update(threshold=max_divergent_fraction, advice=_ADVICE["divergences"])
    gap = [] if chain_ll is None else (chain_ll.max() - chain_ll).tolist()
    stuck = [c for c, value in enumerate(gap) if value > wrong_mode_nats]
    if stuck:
        value = [round(gap[c], 2) for c in stuck]
        findings.append({"diagnostic": "log_likelihood", "chains": stuck, "value": value})
        findings[-1].update(threshold=wrong_mode_nats, advice=_ADVICE["log_likelihood"])
    saturated, notes = _tree_depth_note(idata, max_tree_depth)
    return {
        "converged": not findings,
        "max_rhat": worst,
        "worst_site": worst_site,
        "rhat_by_site": rhat,
        "rhat_without_chain": without,
        "divergent_fraction": fraction,
        "divergences_per_chain": per_chain,
        "chain_log_likelihood_gap": [round(v, 3) for v in gap],
        "tree_depth_saturated": saturated,
        "thresholds": {
            "max_rhat": max_rhat,
            "max_divergent_fraction": max_divergent_fraction,
            "wrong_mode_nats": wrong_mode_nats,
            "max_saturated_fraction": MAX_SATURATED_FRACTION,
        },
        "findings": findings,
        "notes": notes,
    }


def describe(report: dict, key: str = "findings") -> str:
    """One line per finding of a :func:`check_convergence` report ("" when it converged), or per
    efficiency note (``key="notes"``)."""
    lines = []
    for finding in report.get(key, []):
        value = finding["value"]
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        where = f" on {finding['site']}" if "site" in finding else ""
        if "max_tree_depth" in finding:
            where = f" {finding['max_tree_depth']} reached in a share"
        lines.append(
            f"{finding['diagnostic']}{where} {shown} (threshold {finding['threshold']}), "
            f"chains {finding['chains']}: {finding['advice']}"
        )
    return "\n".join(lines)


def convergence_summary(idata) -> str:
    """One paragraph for a report: the check recorded in ``idata.attrs["convergence"]`` (or run
    now when absent), "passed" with its numbers, or "FAILED" with each finding and its advice."""
    recorded = idata.attrs.get("convergence")
    report = json.loads(recorded) if recorded else check_convergence(idata)
    numbers = (
        f"max r_hat {report['max_rhat']:.3f} on the mixture's sites, "
        f"{100 * report['divergent_fraction']:.1f}% divergent draws"
    )
    notes = "\n".join(f"- {line}" for line in describe(report, "notes").splitlines())
    notes = f"\n\nEfficiency:\n\n{notes}\n" if notes else ""
    if report["converged"]:
        return f"Convergence check passed: {numbers}.{notes}"
    findings = "\n".join(f"- {line}" for line in describe(report).splitlines())
    return f"Convergence check FAILED ({numbers}):\n\n{findings}\n{notes}"


def record_convergence(idata, **thresholds) -> dict:
    """Run :func:`check_convergence` on ``idata``, write its report as JSON into
    ``idata.attrs["convergence"]`` and warn :class:`NUTSConvergenceWarning` when it failed.
    Returns the report."""
    report = check_convergence(idata, **thresholds)
    idata.attrs["convergence"] = json.dumps(report)
    if not report["converged"]:
        warnings.warn(
            "NUTS did not converge on the mixture's sites (idata.attrs['convergence']):\n"
            + describe(report),
            NUTSConvergenceWarning,
            stacklevel=user_stacklevel(),
        )
    return report

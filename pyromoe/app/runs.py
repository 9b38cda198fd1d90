"""What the demo and the fit runs share: their argument checks, and the chain diagnostics and
posterior summaries they report (relabelling, r_hat, chains in a wrong mode, the posterior mean)."""

from __future__ import annotations

import numpy as np
import torch

from .._validation import check_device, check_num_experts, check_seed
from ..bayes.convergence import check_convergence
from ..core import sites
from ..core.estimate import MoEEstimate
from ..core.links import check_link
from .plots import parameter_sites

__all__ = [
    "WRONG_BASIN_NATS",
    "relabel",
    "nuts_report",
    "posterior_mean_estimate",
]

#: A start (or chain) whose total log-likelihood is this many nats below the best is in a wrong
#: basin. Chains/starts in wrong modes sit 26-840 nats lower (docs/algorithm.md section 5); two starts in
#: the same basin differ by far less than 1 nat after EM converges.
WRONG_BASIN_NATS = 5.0


def relabel(idata, estimate: MoEEstimate):
    """A copy of ``idata`` with every draw's experts relabelled to ``estimate``.

    Only the posterior changes: the log-likelihood and the predictions do not depend on labels.
    """
    from ..core.labels import align_labels

    names = parameter_sites(idata)
    draws = {n: torch.as_tensor(idata.posterior[n].values) for n in names}
    aligned, info = align_labels(draws, estimate)
    out = idata.copy()
    for n in names:
        out.posterior[n] = (idata.posterior[n].dims, aligned[n].cpu().numpy())
    out.posterior.attrs["num_draws_relabelled"] = info["num_draws_relabelled"]
    return out


def _max_rhat(idata, names) -> float:
    import arviz as az

    rhat = az.rhat(idata, var_names=names)
    return float(np.nanmax([np.nanmax(np.asarray(rhat[v].values, dtype=float)) for v in names]))


def nuts_report(idata, reference: MoEEstimate, best_log_likelihood: float | None = None) -> dict:
    """Max r_hat of the draws as sampled and after relabelling to ``reference``, divergences, chains
    in a wrong mode (mean log-likelihood over :data:`WRONG_BASIN_NATS` below the best chain, or below
    ``best_log_likelihood`` when given, e.g. the best chain of another run on the same data), and
    ``convergence``: :func:`~pyromoe.bayes.convergence.check_convergence` of the relabelled draws."""
    import arviz as az

    names = parameter_sites(idata)
    aligned = relabel(idata, reference)
    chain_ll = np.asarray(idata.attrs["chain_mean_log_likelihood"], dtype=float)
    best = (
        chain_ll.max() if best_log_likelihood is None else max(best_log_likelihood, chain_ll.max())
    )
    ess = az.ess(aligned, var_names=names)
    return {
        "max_rhat_raw": _max_rhat(idata, names),
        "max_rhat_aligned": _max_rhat(aligned, names),
        "min_ess_bulk_aligned": float(np.nanmin([np.nanmin(ess[n].values) for n in names])),
        "divergences": int(np.asarray(idata.sample_stats["diverging"].values).sum()),
        "chain_mean_log_likelihood": chain_ll.tolist(),
        "chains_in_wrong_mode": int((chain_ll < best - WRONG_BASIN_NATS).sum()),
        "seconds": float(idata.attrs.get("seconds", float("nan"))),
        "convergence": check_convergence(aligned),
    }


def posterior_mean_estimate(idata, link, method: str = "posterior mean") -> MoEEstimate:
    """The posterior mean of every site as an :class:`MoEEstimate` (zeros for absent bias sites;
    one expert has no gate sites: a gate of zero rows)."""
    post = idata.posterior
    mean = {n: torch.as_tensor(post[n].mean(("chain", "draw")).values) for n in post.data_vars}
    k, d = mean[sites.EXPERTS_WEIGHT].shape
    zeros = torch.zeros(k, dtype=mean[sites.EXPERTS_WEIGHT].dtype)
    no_gate = torch.zeros(k - 1, d, dtype=zeros.dtype)
    return MoEEstimate(
        experts_weight=mean[sites.EXPERTS_WEIGHT],
        experts_bias=mean.get(sites.EXPERTS_BIAS, zeros),
        gate_weight=mean.get(sites.GATE_WEIGHT, no_gate),
        gate_bias=mean.get(sites.GATE_BIAS, zeros[1:]),
        noise=mean[sites.NOISE],
        link=link,
        method=method,
    )


def check_run_arguments(*, num_experts, link, seed, device, overwrite, min_experts=2) -> None:
    """The checks shared by :func:`run_demo` and :func:`run_fit`, before any work."""
    check_num_experts(num_experts, minimum=min_experts)
    check_link(link)
    check_seed(seed)
    check_device(device)
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False; got {overwrite!r}")

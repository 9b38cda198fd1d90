"""NUTS, seeded, every chain started at a point estimate, returned as ArviZ data.

:func:`run_nuts` samples with Pyro's :class:`~pyro.infer.NUTS` on the model's potential energy
(by default the fused log joint of :mod:`pyromoe.bayes.potential`, else the potential of the traced
model from :func:`pyro.infer.mcmc.util.initialize_model`), the chains started at draws from the
Laplace approximation at the estimate (:func:`pyromoe.bayes.laplace.laplace_approximation`). It runs
with the global random generators seeded from ``seed`` and restored afterwards
(:func:`pyromoe.bayes._rng.seeded_rng`). Its kernel and per-draw statistics (step size, leapfrog
steps, tree depth, ``lp``, ``energy``, ``acceptance_rate``) are in :mod:`pyromoe.bayes.nuts_kernel`;
divergences and the chains' acceptance rates come from :meth:`pyro.infer.MCMC.diagnostics`.
"""

from __future__ import annotations

import math
import multiprocessing
import time
import warnings
from collections.abc import Callable

import torch
from pyro.infer import MCMC
from pyro.infer.autoguide.initialization import init_to_uniform
from pyro.infer.mcmc.util import initialize_model

from .._validation import check_flag, child_seed, count_rule, one_of, validate
from ..core.estimate import MoEEstimate
from ..core.threads import torch_threads
from ._fitting import (
    fit_model_data,
    fit_rules,
    inference_data,
    prepare_init,
    strategy_for,
)
from ._rng import seeded_rng
from .convergence import record_convergence
from .laplace import laplace_approximation
from .model import MixtureOfExperts
from .nuts_kernel import CountedPotential, RecordingNUTS, record_draw
from .pointwise import pointwise_rule
from .potential import FusedPotential, fused_potential, unsupported_prior
from .user_model import UserModel, model_or_mixture_rule

__all__ = ["run_nuts"]


def _choose_potential(potential: str, model, x, y) -> FusedPotential | None:
    """The fused potential for ``potential="auto"`` / ``"fused"`` when the model has one, else None
    (``potential`` checked by :data:`RUN_NUTS_RULES`)."""
    if potential == "traced":
        return None
    known = isinstance(model, MixtureOfExperts)
    fused = fused_potential(model, x, y) if known else None
    if fused is None and potential == "fused":
        if known:
            reason = f"the prior of {unsupported_prior(model, x)!r} is not one it knows"
        elif isinstance(model, UserModel):
            reason = "got a model of your own around one (its log joint is Pyro's to trace)"
        else:
            reason = f"got a {type(model).__name__}, not a MixtureOfExperts"
        raise ValueError(
            "potential='fused' needs a MixtureOfExperts with Normal priors (HalfCauchy or "
            f"HalfNormal on the noise); {reason}. Use potential='auto' or 'traced'."
        )
    return fused


def _chain_starts(model, x, y, estimate, num_chains, jitter, seed):
    """Per-chain unconstrained starts: the estimate plus Laplace (or fixed-scale) Gaussian jitter."""
    approx = laplace_approximation(model, x, y, estimate)
    loc = approx["loc"]
    generator = torch.Generator().manual_seed(child_seed(seed, 1))
    eps = torch.randn(num_chains, loc.numel(), generator=generator, dtype=torch.float64)
    eps = eps.to(device=loc.device, dtype=loc.dtype)
    if jitter is True:
        factor = torch.linalg.cholesky(approx["covariance"])
        starts = loc + eps @ factor.T
    elif jitter is False or jitter == 0:
        starts = loc.expand(num_chains, -1)
    else:
        starts = loc + float(jitter) * eps
    return approx["unflatten"](starts)


def _nuts_sample_stats(mcmc: MCMC, num_chains: int, num_samples: int) -> tuple[dict, dict]:
    """(``sample_stats`` arrays (chain, draw), per-chain attrs) from ``mcmc.diagnostics()``."""
    diagnostics = mcmc.diagnostics()
    chains = [f"chain {chain}" for chain in range(num_chains)]
    diverging = torch.zeros(num_chains, num_samples, dtype=torch.bool)
    for chain, key in enumerate(chains):
        index = [i for i in diagnostics["divergences"][key] if 0 <= i < num_samples]
        diverging[chain, index] = True
    stats = {"diverging": diverging.numpy()}
    for name in RecordingNUTS.STATS:
        stats[name] = torch.tensor(
            [diagnostics["draw_stats"][key][name] for key in chains], dtype=torch.float64
        ).numpy()
    attrs = {
        "num_divergences": int(diverging.sum()),
        "num_gradient_evaluations": [
            diagnostics["num_gradient_evaluations"][key] for key in chains
        ],
        "acceptance_rate": [float(diagnostics["acceptance rate"][key]) for key in chains],
    }
    return stats, attrs


def _jitter_rule(jitter, name: str) -> bool | float:
    if isinstance(jitter, bool):
        return jitter
    if not isinstance(jitter, (int, float)) or not (jitter >= 0 and math.isfinite(jitter)):
        raise ValueError(f"{name} must be True, False or a finite float >= 0; got {jitter!r}")
    return jitter


def _mp_context_rule(mp_context, name: str) -> str | None:
    methods = multiprocessing.get_all_start_methods()
    if mp_context is not None and mp_context not in methods:
        raise ValueError(f"{name} must be None or one of {methods}; got {mp_context!r}")
    return mp_context


def _sample(model, x, y, init, fused, checked: dict, jitter, mp_context) -> tuple[MCMC, float]:
    """``(mcmc, seconds)``: the chains run from their starts (seeded, warnings Pyro gives on
    purpose silenced, the requested threads)."""
    num_chains, seed = checked["num_chains"], checked["seed"]
    with (
        seeded_rng(seed, x.device),
        warnings.catch_warnings(),
        torch_threads(checked["num_threads"]),
    ):
        # Pyro warns when it falls back to sequential chains (fewer CPUs than chains): documented.
        warnings.filterwarnings("ignore", message=".*Chains will be drawn sequentially.*")
        # Pyro's jit_compile uses torch.jit.trace, deprecated in recent torch; nothing to act on
        warnings.filterwarnings("ignore", message=".*torch.jit.trace.* is deprecated.*")
        strategy, _ = strategy_for(init, model, x, y)
        starts = None
        if isinstance(init, MoEEstimate):
            starts = _chain_starts(model, x, y, init, num_chains, jitter, seed)
            if num_chains == 1:
                starts = {name: value[0] for name, value in starts.items()}
        initial_params, _, transforms, _ = initialize_model(
            model,
            model_args=(x, y),
            max_plate_nesting=1,
            num_chains=num_chains,
            init_strategy=strategy if strategy is not None else init_to_uniform,
            initial_params=starts,
        )
        kernel = RecordingNUTS(
            CountedPotential(model, (x, y), transforms, checked["jit_compile"], fused=fused),
            target_accept_prob=checked["target_accept_prob"],
            max_tree_depth=checked["max_tree_depth"],
            full_mass=checked["full_mass"],
        )
        mcmc = MCMC(
            kernel,
            num_samples=checked["num_samples"],
            warmup_steps=checked["num_warmup"],
            num_chains=num_chains,
            initial_params=initial_params,
            hook_fn=record_draw,
            disable_progbar=not checked["progress"],
            mp_context=mp_context,
            transforms=transforms,
        )
        start = time.perf_counter()
        mcmc.run()
        return mcmc, time.perf_counter() - start


#: how :func:`run_nuts` checks its arguments, once per call (:func:`pyromoe._validation.validate`)
RUN_NUTS_RULES = fit_rules(
    "seed",
    "num_threads",
    "progress",
    "jit_compile",
    "align",
    "posterior_predictive",
    "num_chains",
    "num_warmup",
    "target_accept_prob",
    "max_tree_depth",
    num_samples=count_rule(minimum=4),
    jitter=_jitter_rule,
    mp_context=_mp_context_rule,
    full_mass=check_flag,
    potential=one_of("auto", "fused", "traced"),
    pointwise=pointwise_rule,
    model=model_or_mixture_rule,
)


@validate(RUN_NUTS_RULES)
def run_nuts(
    model,
    x,
    y,
    init: MoEEstimate | Callable | None = None,
    *,
    num_chains: int = 4,
    num_warmup: int = 500,
    num_samples: int = 500,
    seed: int = 0,
    jitter: bool | float = True,
    progress: bool = True,
    jit_compile: bool = True,
    target_accept_prob: float = 0.8,
    max_tree_depth: int = 10,
    full_mass: bool = False,
    align: bool = True,
    posterior_predictive: bool = True,
    pointwise: str | int = "auto",
    mp_context: str | None = None,
    num_threads: int | None = 1,
    potential: str = "auto",
    device: str | torch.device | None = None,
    feature_names: list[str] | None = None,
    z=None,
):
    """NUTS with every chain started at ``init`` (jittered), returned as ArviZ ``InferenceData``.

    Chains run in worker processes when Pyro allows it (``num_chains <= cpu_count - 1``) and one
    after the other otherwise (any machine, including 2 cores).

    Parameters
    ----------
    model : MixtureOfExperts or a Pyro model around one
        A bare mixture, or a model function or ``PyroModule`` of your own that calls exactly one
        ``MixtureOfExperts`` as ``mixture(x, y)`` (its sites under any names, e.g. a
        ``pyro.contrib.autoname.scope`` prefix, beside sites of its own): it is called as
        ``model(x, y)``. The estimate seeds the mixture's sites, ``init_to_median`` the others;
        the draws are relabelled on the mixture's sites, which the output names as a bare
        mixture's (:mod:`pyromoe.bayes.user_model`; the model's own sites pass through to
        ``posterior``). Such a model takes no ``z`` and the traced potential only.
    x : Tensor or ndarray (n, d)
        Or a numpy memory map / ``dask.array.Array``: NUTS evaluates the likelihood of every row
        at every leapfrog step, so such data are read into memory (on ``device``) once.
    y : Tensor or ndarray (n,)
    init : MoEEstimate, callable or None
        ``MoEEstimate``: seeded start. ``None``: Pyro's default (``init_to_uniform``). A callable:
        any Pyro init strategy (no jitter added).
        An estimate is reconciled with the model's noise model as in
        :func:`~pyromoe.fit_map`.
    num_chains : int
        Chains (>= 1).
    num_warmup, num_samples : int
        Warm-up iterations (>= 0) and kept draws per chain (>= 4: Pyro's split r_hat, computed
        with the sampler's statistics, needs 4 draws per chain).
    seed : int or None
        Seeds the run's random numbers (the global generators are restored afterwards; worker
        processes seed theirs from it as Pyro does); the jitter uses its own generator seeded
        from it. ``None``: a fresh seed, recorded (like any seed) in ``attrs["seed"]``.
    jitter : bool or float
        Dispersed starts, needed for a meaningful r_hat (only with an estimate). ``True``: each
        chain starts at a draw from the Laplace approximation at the estimate
        (:func:`pyromoe.bayes.laplace.laplace_approximation`, in unconstrained space). A float
        ``s``: the estimate plus ``s * N(0, 1)`` per unconstrained coordinate. ``False`` / ``0``: every chain
        starts exactly at the estimate.
    progress : bool
        Pyro's progress bars.
    jit_compile : bool
        Compile the traced potential with the PyTorch JIT (``initialize_model(jit_compile=...)``).
        The fused potential always runs eagerly: measured on 2 CPU cores, ``torch.jit.trace`` of
        it was no faster per gradient and ``torch.compile`` took 10-40 s to compile, more than it
        saved in a run (benchmarks/README.md, NUTS speed).
    target_accept_prob, max_tree_depth
        NUTS settings: a probability strictly in (0, 1) and an int >= 1.
    full_mass : bool
        Adapt a dense mass matrix (one block of every site, Pyro's ``full_mass``) instead of a
        diagonal one: for correlated posteriors (docs/algorithm.md section 5, k = 3 posteriors).
    align : bool
        Relabel every draw to the estimate (when ``init`` is one).
    posterior_predictive : bool
        Add the posterior predictive group.
    pointwise : "auto", "all" or int
        The rows the pointwise groups keep, as in :func:`~pyromoe.fit_map`
        (:mod:`pyromoe.bayes.pointwise`): by default every row up to ``POINTWISE_CELLS`` draws x
        rows (chains x draws), beyond it a seeded random subsample in float32.
    mp_context : str, optional
        Multiprocessing context for parallel chains (``"spawn"`` is used for CUDA tensors).
    num_threads : int or None
        torch intra-op threads while sampling (restored afterwards); ``None`` leaves them alone.
        The default 1 suits the small per-gradient tensors of NUTS: on a busy 2-core machine two
        threads made each gradient ~10x slower (50 s vs 3.7 s for 100 iterations at n = 300).
    potential : {"auto", "fused", "traced"}
        The potential energy NUTS differentiates. ``"fused"``: the model's log joint as one torch
        expression (:mod:`pyromoe.bayes.potential`; equal to the traced one to rounding, cheaper
        per gradient, see benchmarks/nuts_speed.py); it knows Normal priors and HalfCauchy /
        HalfNormal on the noise, and raises ``ValueError`` for another prior. ``"traced"``:
        Pyro's potential of the traced model (any prior). ``"auto"``: fused when every prior is
        one it knows, traced otherwise. Recorded in ``attrs["potential"]``.
    device : str or torch.device, optional
        Where to sample. ``None``: ``x``'s device (a tensor), else the CPU; the data (and an
        estimate given as ``init``) are moved there. Chains of CUDA data in worker processes use
        the ``"spawn"`` context.
    z : Tensor, ndarray, DataFrame or dask.array.Array (n, gate_features), optional
        The gate's own covariates, for a model built with ``gate_features`` (or pass the joined
        design ``[x | z]`` as ``x``); ``feature_names`` then name the joined columns.
    feature_names : list of str, optional
        As in :func:`~pyromoe.fit_map`.

    Returns
    -------
    arviz.InferenceData
        ``sample_stats`` (chain, draw), with ArviZ's names: ``diverging``, ``step_size``,
        ``n_steps`` (leapfrog steps), ``tree_depth``, ``lp`` (log joint density in unconstrained
        space, minus the potential energy), ``energy`` (the Hamiltonian, potential plus kinetic
        energy, at the start of the draw's trajectory after the momentum is resampled, so
        ``az.bfmi(idata)`` and ``az.plot_energy(idata)`` work), ``acceptance_rate`` (the draw's
        mean acceptance probability over its trajectory, what the step size is adapted to),
        ``log_likelihood_total``; ``attrs``: ``potential`` (``"fused"`` or ``"traced"``),
        ``num_divergences``, ``num_gradient_evaluations`` (per chain, warmup included: a cost
        measure that does not depend on machine load), ``acceptance_rate`` (per chain: Pyro's
        share of draws that moved), ``chain_mean_log_likelihood``, ``seconds``,
        ``max_tree_depth`` and ``target_accept_prob`` (the sampler's settings), the relabelling
        record, ``convergence`` (JSON: :func:`pyromoe.bayes.convergence.check_convergence` on the
        mixture's sites: r_hat, divergent share, chains in a lower mode, which chains, advice;
        and, as a note that does not fail it, the share of draws that hit ``max_tree_depth``).

    Warns
    -----
    NUTSConvergenceWarning
        When that check fails (r_hat > 1.01, over 1% divergent draws, or a chain's mean
        log-likelihood over 5 nats below the best chain's).

    Raises
    ------
    ValueError
        ``num_chains < 1``, ``target_accept_prob`` outside (0, 1), ``max_tree_depth < 1``, a
        ``device`` that does not exist and other invalid arguments (all checked before any
        work), an estimate that does not fit the model (names the site), a model without the
        expected sites, a model of your own that calls no ``MixtureOfExperts`` or more than one.
    TypeError
        If ``model`` is not a model instance (e.g. the class itself), or arguments of the wrong type.

    Examples
    --------
    >>> from pyromoe import MixtureOfExperts, simulate
    >>> data = simulate(100, 2, seed=0)
    >>> model = MixtureOfExperts(2, 2, bias=False)
    >>> idata = run_nuts(model, data.x, data.y, init=data.truth, num_chains=1, num_warmup=10,
    ...                  num_samples=10, progress=False)
    >>> idata.posterior["experts.weight"].dims
    ('chain', 'draw', 'expert', 'feature')
    """
    model, source, feature_names = fit_model_data(
        model, x, y, z, device, feature_names=feature_names
    )
    checked = dict(seed=seed, num_threads=num_threads, progress=progress, jit_compile=jit_compile)
    checked.update(num_chains=num_chains, num_warmup=num_warmup, num_samples=num_samples)
    checked.update(target_accept_prob=target_accept_prob, max_tree_depth=max_tree_depth)
    checked["full_mass"] = full_mass
    tensors = source.tensors()
    x, y = tensors if tensors is not None else source.take(torch.arange(source.num_rows))
    init, init_attrs = prepare_init(model, init, x, y)
    fused = _choose_potential(potential, model, x, y)
    if mp_context is None and x.is_cuda and num_chains > 1:
        mp_context = "spawn"
    mcmc, seconds = _sample(model, x, y, init, fused, checked, jitter, mp_context)
    stats, chain_attrs = _nuts_sample_stats(mcmc, num_chains, num_samples)
    attrs = {
        "inference": "nuts",
        "potential": "traced" if fused is None else "fused",
        "jitter": str(jitter) if isinstance(init, MoEEstimate) else "none",
        **chain_attrs,
        "seconds": seconds,
        "num_chains": num_chains,
        "num_warmup": checked["num_warmup"],
        "num_samples": num_samples,
        "max_tree_depth": checked["max_tree_depth"],
        "target_accept_prob": checked["target_accept_prob"],
        "parallel_chains": int(1 < num_chains <= max(multiprocessing.cpu_count() - 1, 1)),
        **init_attrs,
    }
    idata = inference_data(
        model,
        x,
        y,
        mcmc.get_samples(group_by_chain=True),
        init,
        align,
        seed,
        attrs,
        sample_stats=stats,
        posterior_predictive=posterior_predictive,
        pointwise=pointwise,
        feature_names=feature_names,
    )
    record_convergence(idata)  # attrs['convergence'], NUTSConvergenceWarning when it failed
    return idata

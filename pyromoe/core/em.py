"""Joint EM over all parameters of a mixture of experts: the baseline that random starts feed.

This is what mixtools / flexmix users run today (docs/algorithm.md section 4): EM from random starts,
keeping the start with the best final log-likelihood. It can get stuck in a local optimum (similar
experts, docs/algorithm.md section 4), which is what the tensor start of :mod:`pyromoe.estimators.initialize` avoids;
started from that estimate (``init=``), it is the refinement step.

One EM iteration (scikit-learn conventions: ``tol``, ``max_iter``, ``converged``, ``n_iter``):

* E-step: responsibilities from :func:`pyromoe.core.likelihood.component_log_probs` (shared with
  :mod:`pyromoe.core.gate`).
* M-step, experts: weighted least squares per expert with weights ``r_ni`` (closed form, linear link;
  an intercept column when ``bias``), or Gauss-Newton steps with step halving for a nonlinear link
  (using ``Link.derivative``) so that each expert's weighted squared error never rises.
  By default one Gauss-Newton step and one gate Newton step per EM iteration (a generalised EM
  step): measured at d = 10, n = 2e4, three steps of each took the same number of EM iterations
  (to within a few) and 20-50% more time.
* M-step, gate: :func:`pyromoe.core.gate.gate_m_step` (damped Newton on the weighted (multinomial)
  logistic regression; one implementation with gate EM).
* M-step, noise: ``noise^2 = mean_n sum_i r_ni (y_n - g(a_i . x_n + b_i))^2``.

Each part maximises its own term of the EM objective given the rest, so the mean log-likelihood (or
log posterior / n for MAP) never decreases. Full-batch on ``x``'s device and dtype.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass

import torch

from .._validation import (
    as_tensor,
    as_tensors,
    check_enough_rows,
    check_flag,
    check_num_experts,
    check_positive,
    check_seed,
    exact_scales,
    num_parameters,
    rescale_estimate,
)
from .estimate import MoEEstimate
from .gate import (
    ConvergenceWarning,
    _check_prior_scale,
    _collapse,
    _feature_scale,
    _noise_floor,
    _solve_spd,
    _warn_collapse,
    gate_m_step,
    log_prior,
)
from .likelihood import component_log_probs, expert_means
from .links import Link, get_link
from .params import Params

__all__ = ["fit_em", "random_start"]


@dataclass
class _Parameters:
    experts_weight: torch.Tensor  # (k, d)
    experts_bias: torch.Tensor  # (k,)
    gate_weight: torch.Tensor  # (k - 1, d)
    gate_bias: torch.Tensor  # (k - 1,)
    noise: torch.Tensor  # ()


def random_start(
    x: torch.Tensor,
    y: torch.Tensor,
    num_experts: int,
    link: str | Link,
    generator: torch.Generator,
    *,
    bias: bool = True,
) -> MoEEstimate:
    """A random starting point for EM, scaled to the data.

    Expert weights ``a_ij ~ N(0, var(y) / d) / sd(x_j)`` (so ``a_i . x`` has about the spread of
    ``y``); gate weights ``N(0, 0.1^2 / d) / sd(x_j)`` (a nearly flat gate, so the first E-step is
    driven by the experts); offsets centre each linear predictor at the mean of ``x`` (plus the mean
    of ``y`` for a linear link) when ``bias``, else zero; noise ``sd(y)``. Draws come from
    ``generator`` (CPU, float64) and are then moved to ``x``'s device and dtype, so a seed gives the
    same start on any device.

    Parameters
    ----------
    x : Tensor (n, d)
    y : Tensor (n,)
    num_experts : int
    link : str or Link
    generator : torch.Generator
        CPU generator.
    bias : bool
        Whether the model has offsets.

    Returns
    -------
    MoEEstimate (method ``"random"``)

    Examples
    --------
    >>> x, y = torch.randn(100, 3), torch.randn(100)
    >>> random_start(x, y, 2, "linear", torch.Generator().manual_seed(0)).experts_weight.shape
    torch.Size([2, 3])
    """
    n, d = x.shape
    k = num_experts
    link = get_link(link)
    scale = _feature_scale(x)
    y_sd = y.std().clamp_min(_noise_floor(y))
    x_mean = x.mean(dim=0)

    def normal(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64).to(x)

    experts_weight = normal(k, d) * (y_sd / d**0.5) / scale
    gate_weight = normal(k - 1, d) * (0.1 / d**0.5) / scale
    if bias:
        experts_bias = -(experts_weight @ x_mean)
        if link.name == "linear":
            experts_bias = experts_bias + y.mean()
        gate_bias = -(gate_weight @ x_mean)
    else:
        experts_bias = x.new_zeros(k)
        gate_bias = x.new_zeros(k - 1)
    return MoEEstimate(
        experts_weight=experts_weight,
        experts_bias=experts_bias,
        gate_weight=gate_weight,
        gate_bias=gate_bias,
        noise=y_sd,
        link=link,
        method="random",
    )


def _experts_m_step_linear(
    design: torch.Tensor,
    y: torch.Tensor,
    resp: torch.Tensor,
    ridge: float,
) -> torch.Tensor:
    """Weighted least squares per expert (closed form). Returns coefficients (k, width)."""
    k = resp.shape[1]
    gram = torch.stack([(design * resp[:, i : i + 1]).T @ design for i in range(k)])
    rhs = (resp * y[:, None]).T @ design  # (k, width)
    gram.diagonal(dim1=-2, dim2=-1).add_(ridge)
    return _solve_spd(gram, rhs)


def _experts_m_step_gauss_newton(
    design: torch.Tensor,
    y: torch.Tensor,
    resp: torch.Tensor,
    coefficients: torch.Tensor,
    link: Link,
    ridge: float,
    steps: int,
) -> torch.Tensor:
    """Gauss-Newton steps per expert on ``sum_n r_ni (y_n - g(z_ni))^2 + ridge ||theta_i||^2``.

    Each step is halved until that weighted error does not rise (a generalised M-step).
    """
    k = resp.shape[1]
    new = coefficients.clone()
    for i in range(k):
        weight = resp[:, i]
        theta = coefficients[i]

        def loss(t, weight=weight):
            z = design @ t
            return float((weight * (y - link(z)).pow(2)).sum() + ridge * t.pow(2).sum()), z

        value, z = loss(theta)
        for _ in range(steps):
            residual = y - link(z)
            jacobian = design * link.derivative(z)[:, None]
            gram = (jacobian * weight[:, None]).T @ jacobian
            gram.diagonal().add_(ridge)
            gradient = jacobian.T @ (weight * residual) - ridge * theta
            step = _solve_spd(gram, gradient)
            size, accepted = 1.0, False
            for _ in range(30):
                candidate = theta + size * step
                new_value, new_z = loss(candidate)
                if new_value <= value:
                    accepted = new_value < value
                    theta, value, z = candidate, new_value, new_z
                    break
                size *= 0.5
            if not accepted:
                break
        new[i] = theta
    return new


def _run_em(
    x: torch.Tensor,
    design: torch.Tensor,
    y: torch.Tensor,
    start: _Parameters,
    link: Link,
    *,
    bias: bool,
    prior_scale: float | None,
    tol: float,
    max_iter: int,
    newton_steps: int,
    gauss_newton_steps: int,
) -> tuple[_Parameters, list[float], bool, int, tuple[list[float], list[int]]]:
    """EM from one start.

    Returns the parameters, the objective trace, converged, n_iter, and (effective rows per
    expert, collapsing experts) at the end (:func:`pyromoe.core.gate._collapse`).
    """
    n, d = x.shape
    floor = _noise_floor(y)
    p = _Parameters(**vars(start))

    def e_step(p: _Parameters) -> tuple[torch.Tensor, float]:
        log_probs = component_log_probs(
            x,
            y,
            Params(p.experts_weight, p.experts_bias, p.gate_weight, p.gate_bias, p.noise),
            link,
        )
        prior = log_prior(
            prior_scale,
            p.experts_weight,
            p.experts_bias if bias else None,
            p.gate_weight,
            p.gate_bias if bias else None,
        )
        return log_probs, float(torch.logsumexp(log_probs, dim=-1).sum() + prior) / n

    log_probs, value = e_step(p)
    trace = [value]
    converged, n_iter = False, 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is returned)
        resp = torch.softmax(log_probs, dim=-1)
        # experts: MAP ridge sigma^2 / s^2 because the squared error is scaled by 1 / sigma^2
        ridge = 0.0 if prior_scale is None else float(p.noise) ** 2 / prior_scale**2
        coefficients = (
            torch.cat([p.experts_weight, p.experts_bias[:, None]], dim=-1)
            if bias
            else p.experts_weight
        )
        if link.name == "linear":
            coefficients = _experts_m_step_linear(design, y, resp, ridge)
        else:
            coefficients = _experts_m_step_gauss_newton(
                design, y, resp, coefficients, link, ridge, gauss_newton_steps
            )
        p.experts_weight = coefficients[:, :d]
        if bias:
            p.experts_bias = coefficients[:, d]
        p.gate_weight, p.gate_bias = gate_m_step(
            x,
            resp,
            p.gate_weight,
            p.gate_bias,
            fit_bias=bias,
            prior_scale=prior_scale,
            max_steps=newton_steps,
            tol=0.1 * tol,
        )
        means = expert_means(x, p.experts_weight, p.experts_bias, link)
        variance = (resp * (y[:, None] - means).pow(2)).sum() / n
        p.noise = variance.sqrt().clamp_min(floor)
        log_probs, value = e_step(p)
        trace.append(value)
        if abs(trace[-1] - trace[-2]) < tol:
            converged = True
            break
    collapse = _collapse(torch.softmax(log_probs, dim=-1), p.noise, floor, d)
    return p, trace, converged, n_iter, collapse


def _check_init(init, k: int, d: int, link: Link, x: torch.Tensor) -> MoEEstimate:
    if not isinstance(init, MoEEstimate):
        raise TypeError(
            f"init must be a pyromoe.MoEEstimate (e.g. from tensor_init); got {type(init).__name__}"
        )
    if (init.num_experts, init.in_features) != (k, d):
        raise ValueError(
            f"init must have num_experts={k} and in_features={d} to match the fit; got "
            f"num_experts={init.num_experts}, in_features={init.in_features}"
        )
    if (init.link.name, init.link.negative_slope) != (link.name, link.negative_slope):
        raise ValueError(
            f"init has link {init.link!r} but fit_em was asked for link {link!r}; pass "
            "link=init.link"
        )
    init = init.to(device=x.device, dtype=x.dtype)
    for name in ("experts_weight", "experts_bias", "gate_weight", "gate_bias", "noise"):
        if not bool(torch.isfinite(getattr(init, name)).all()):
            raise ValueError(f"init.{name} contains NaN or infinite values")
    if not float(init.noise) > 0:
        raise ValueError(f"init.noise must be > 0; got {float(init.noise)}")
    return init


def fit_em(
    x,
    y,
    num_experts: int = 2,
    link: str | Link = "linear",
    *,
    init: MoEEstimate | None = None,
    n_init: int | None = None,
    bias: bool = True,
    tol: float = 1e-6,
    max_iter: int = 200,
    prior_scale: float | None = None,
    seed: int = 0,
    newton_steps: int = 1,
    gauss_newton_steps: int = 1,
) -> MoEEstimate:
    """Joint EM over all parameters (experts, offsets, gate, noise), best of several starts.

    Parameters
    ----------
    x : Tensor or ndarray (n, d)
        Inputs.
    y : Tensor or ndarray (n,)
        Outputs.
    num_experts : int
        Number of experts ``k >= 2``.
    link : str or Link
        Expert link (must match ``init.link`` when ``init`` is given).
    init : MoEEstimate, optional
        A starting point (e.g. :func:`pyromoe.tensor_init`); the first start.
    n_init : int, optional
        Total number of starts. Default: 5 random starts without ``init``; only the given start
        with ``init`` (``n_init > 1`` then adds ``n_init - 1`` random starts). Random starts are
        drawn by :func:`random_start` from a ``torch.Generator`` seeded with ``seed``.
    bias : bool
        Fit expert intercepts and gate offsets; with ``False`` they are fixed at 0 (an ``init``'s
        offsets are then ignored).
    tol : float
        A start has converged when its objective (mean log-likelihood per row, or log posterior / n
        for MAP) changes by less than ``tol`` in one iteration.
    max_iter : int
        Maximum EM iterations per start.
    prior_scale : float, optional
        ``s`` of ``Normal(0, s^2)`` priors on every expert and gate weight and offset: MAP EM (ridge
        terms in each M-step; the noise stays maximum likelihood). ``None``: maximum likelihood.
        (On data of extreme magnitude, rescaled as in the Notes, the priors apply to the
        rescaled problem.)
    seed : int or None
        Seed of the random starts; ``None`` draws a fresh one. Recorded in
        ``diagnostics["seed"]``.
    newton_steps : int
        Maximum Newton steps of each gate M-step.
    gauss_newton_steps : int
        Maximum Gauss-Newton steps per expert in each M-step (nonlinear links; linear experts are
        solved exactly).

    Returns
    -------
    MoEEstimate
        ``method="em"``; ``diagnostics`` holds ``n_init``, ``start_kinds`` (``"given"`` /
        ``"random"``), ``log_likelihood_per_start`` (final objective of each start),
        ``best_start``, ``converged`` and ``n_iter`` of the best start, ``log_likelihood_trace`` of
        the best start, ``converged_per_start``, ``n_iter_per_start``, ``seconds_per_start``,
        ``objective`` (``"mean log-likelihood"`` or ``"log posterior / n"``), ``seed``,
        ``effective_rows`` (per expert, best start) and ``collapsed_experts``.

    Raises
    ------
    ValueError, TypeError
        For malformed inputs or an ``init`` that does not match ``num_experts``, ``x`` or ``link``;
        for fewer rows than free parameters + 1 (:func:`pyromoe._validation.num_parameters`) or
        more experts than rows.

    Warns
    -----
    ConvergenceWarning
        When a start reached ``max_iter`` before converging (the message says which).
    CollapseWarning
        When the best start ends with an expert holding fewer than ``d + 1`` effective rows or the
        noise at its floor (``1e-3 sd(y)``).
    UserWarning
        Under :data:`pyromoe._validation.ROWS_PER_PARAMETER_WARN` rows per free parameter.

    Notes
    -----
    Columns of ``x`` (and ``y`` for the linear, relu and leaky links) of extreme magnitude (beyond
    ``1e77`` or under ``1e-77`` in float64, where the Gram matrices overflow) are divided by
    exact powers of two before fitting and the estimate is mapped back
    (``diagnostics["input_scaling"]``); ordinary data are not touched.

    Full-batch: every iteration works on all of ``x`` at once (memory O(n k d) on ``x``'s device),
    which is fine up to a few million rows; there is no chunked variant yet. Starts run one after
    another. The chosen start is the one with the highest final objective; starts that ended lower
    (a local optimum, docs/algorithm.md section 4) show in ``log_likelihood_per_start``.

    Examples
    --------
    >>> from pyromoe import simulate
    >>> data = simulate(2000, 3, seed=0)
    >>> fit = fit_em(data.x, data.y, 2, n_init=2)
    >>> fit.method, len(fit.diagnostics["log_likelihood_per_start"])
    ('em', 2)
    """
    x, y = as_tensors(x, y, min_rows=2)
    n, d = x.shape
    k = check_num_experts(num_experts)
    link = get_link(link)
    bias = check_flag(bias, "bias")
    tol = check_positive(tol, "tol")
    max_iter = check_positive(max_iter, "max_iter", integer=True)
    prior_scale = _check_prior_scale(prior_scale)
    seed = check_seed(seed)
    newton_steps = check_positive(newton_steps, "newton_steps", integer=True)
    gauss_newton_steps = check_positive(gauss_newton_steps, "gauss_newton_steps", integer=True)
    if n_init is None:
        n_init = 1 if init is not None else 5
    n_init = check_positive(n_init, "n_init", integer=True)
    if init is not None:
        init = _check_init(init, k, d, link, x)
    if float(y.std()) == 0.0:
        raise ValueError(
            f"y is constant (every value is {float(y[0]):g}); a mixture of experts needs varying y"
        )
    x_scale, y_scale = exact_scales(x, y, link)
    if x_scale is not None or y_scale != 1.0:
        # extreme magnitudes: fit on data divided by exact powers of two, map the estimate back
        xs = torch.ones_like(x[0]) if x_scale is None else x_scale
        fit = fit_em(
            x / xs,
            y / y_scale,
            k,
            link,
            init=None if init is None else rescale_estimate(init, x_scale, y_scale, to_user=False),
            n_init=n_init,
            bias=bias,
            tol=tol,
            max_iter=max_iter,
            prior_scale=prior_scale,
            seed=seed,
            newton_steps=newton_steps,
            gauss_newton_steps=gauss_newton_steps,
        )
        return rescale_estimate(fit, x_scale, y_scale, to_user=True)
    check_enough_rows(
        n,
        num_parameters(d, k, bias),
        k,
        model=f"a mixture of {k} experts on {d} input(s){' with biases' if bias else ''}",
    )

    starts, kinds = [], []
    if init is not None:
        starts.append(init)
        kinds.append("given")
    generator = torch.Generator().manual_seed(seed)
    while len(starts) < n_init:
        starts.append(random_start(x, y, k, link, generator, bias=bias))
        kinds.append("random")

    design = torch.cat([x, torch.ones_like(x[:, :1])], dim=-1) if bias else x
    results = []
    for start in starts:
        params = _Parameters(
            experts_weight=start.experts_weight,
            experts_bias=start.experts_bias if bias else x.new_zeros(k),
            gate_weight=start.gate_weight,
            gate_bias=start.gate_bias if bias else x.new_zeros(k - 1),
            noise=as_tensor(start.noise, "noise", like=x),
        )
        began = time.perf_counter()
        results.append(
            (
                *_run_em(
                    x,
                    design,
                    y,
                    params,
                    link,
                    bias=bias,
                    prior_scale=prior_scale,
                    tol=tol,
                    max_iter=max_iter,
                    newton_steps=newton_steps,
                    gauss_newton_steps=gauss_newton_steps,
                ),
                time.perf_counter() - began,
            )
        )

    finals = [trace[-1] for _, trace, _, _, _, _ in results]
    best = max(range(len(results)), key=lambda i: finals[i])
    not_converged = [i for i, r in enumerate(results) if not r[2]]
    if not_converged:
        warnings.warn(
            f"EM did not converge in max_iter={max_iter} iterations for start(s) {not_converged} "
            f"of {len(results)} (best start: {best}); increase max_iter or tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    params, trace, converged, n_iter, (effective_rows, collapsed), _ = results[best]
    _warn_collapse(collapsed, effective_rows, d)
    diagnostics = {
        "n_init": len(results),
        "start_kinds": kinds,
        "log_likelihood_per_start": finals,
        "best_start": best,
        "converged": converged,
        "n_iter": n_iter,
        "log_likelihood_trace": trace,
        "converged_per_start": [r[2] for r in results],
        "n_iter_per_start": [r[3] for r in results],
        "seconds_per_start": [r[5] for r in results],
        "objective": "mean log-likelihood" if prior_scale is None else "log posterior / n",
        "seed": seed,
        "effective_rows": effective_rows,
        "collapsed_experts": collapsed,
    }
    return MoEEstimate(
        experts_weight=params.experts_weight,
        experts_bias=params.experts_bias,
        gate_weight=params.gate_weight,
        gate_bias=params.gate_bias,
        noise=params.noise.reshape(()),
        link=link,
        method="em",
        diagnostics=diagnostics,
    )

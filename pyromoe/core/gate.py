"""EM for the gate with the experts fixed (docs/algorithm.md section 4).

With the experts known (from the tensor step, or the truth in a test), the gate of a mixture of experts
is learnt by EM: the E-step computes responsibilities ``r_ni = p(expert i | x_n, y_n)`` with the one
likelihood implementation (:func:`pyromoe.core.likelihood.component_log_probs`); the M-step is a weighted
logistic (k = 2) or multinomial logistic (k > 2, expert 0 the reference) regression of ``r`` on ``x``,
which is concave, solved by damped Newton (IRLS) steps (one per EM iteration by default: a
generalised EM step; measured to need the same number of EM iterations as three steps, at
25-40% less time); the noise has a closed-form update.

:func:`gate_m_step` is the gate M-step shared with the joint EM of :mod:`pyromoe.core.em` (one
implementation). Everything here is pure torch on ``x``'s device and dtype, full-batch.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field, replace

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
)
from .likelihood import component_log_probs, expert_means, gate_logits
from .links import Link, get_link
from .params import Params

__all__ = [
    "CollapseWarning",
    "ConvergenceWarning",
    "GateFit",
    "fit_gate",
    "gate_m_step",
    "log_prior",
]


class ConvergenceWarning(UserWarning):
    """An EM run stopped at ``max_iter`` before its objective changed by less than ``tol``."""


class CollapseWarning(UserWarning):
    """An EM fit ended with an expert holding fewer than ``d + 1`` effective rows, or with the
    noise at its floor: the expert is collapsing onto a few points (too many experts)."""


@dataclass(frozen=True)
class GateFit:
    """Result of :func:`fit_gate`.

    Attributes
    ----------
    gate_weight : Tensor (k - 1, d)
        Gate weights (expert 0 is the reference, logit 0).
    gate_bias : Tensor (k - 1,)
        Gate offsets (the initial value, zeros by default, when ``fit_bias=False``).
    noise : Tensor ()
        Noise standard deviation.
    log_likelihood_trace : list of float
        The objective at the start and after every EM iteration: the mean per-row log-likelihood, or
        for MAP (``prior_scale`` given) the log posterior divided by ``n``. Non-decreasing up to
        rounding.
    converged : bool
        Whether the objective changed by less than ``tol`` before ``max_iter`` iterations.
    n_iter : int
        Number of EM iterations run.
    seed : int or None
        The seed used (drawn afresh when ``fit_gate`` got ``seed=None``).
    effective_rows : list of float
        Sum of each expert's responsibilities at the end.
    collapsed_experts : list of int
        Experts with fewer than ``d + 1`` effective rows (or, with the noise at its floor, the
        one with the fewest); a :class:`CollapseWarning` named them.
    """

    gate_weight: torch.Tensor
    gate_bias: torch.Tensor
    noise: torch.Tensor
    log_likelihood_trace: list[float]
    converged: bool
    n_iter: int
    seed: int | None = None
    effective_rows: list[float] = field(default_factory=list)
    collapsed_experts: list[int] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- helpers
def _accept_slack(value: float, dtype: torch.dtype) -> float:
    """How far an objective may drop from rounding alone (a few ulps of its magnitude)."""
    return 8 * torch.finfo(dtype).eps * max(1.0, abs(value))


def _normal_log_density_sum(value: torch.Tensor, scale: float) -> torch.Tensor:
    """Sum of ``log Normal(value | 0, scale^2)`` over all entries."""
    return -0.5 * (value / scale).pow(2).sum() - value.numel() * (
        math.log(scale) + 0.5 * math.log(2 * math.pi)
    )


def log_prior(prior_scale: float | None, *tensors: torch.Tensor | None) -> torch.Tensor | float:
    """Log density of independent ``Normal(0, prior_scale^2)`` priors on every entry of ``tensors``.

    ``prior_scale=None`` (maximum likelihood) gives 0; ``None`` tensors are skipped.

    Examples
    --------
    >>> round(float(log_prior(1.0, torch.zeros(2))), 4)
    -1.8379
    """
    if prior_scale is None:
        return 0.0
    return sum(_normal_log_density_sum(t, prior_scale) for t in tensors if t is not None)


def _solve_spd(matrix: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """Solve ``matrix @ out = rhs`` for a (batch of) symmetric positive semi-definite ``matrix``.

    A jitter relative to the diagonal keeps a singular system (an expert with no responsibility, a
    saturated gate, a dead relu) solvable; the solution then moves nowhere along the null space.
    """
    size = matrix.shape[-1]
    eye = torch.eye(size, dtype=matrix.dtype, device=matrix.device)
    scale = matrix.diagonal(dim1=-2, dim2=-1).abs().mean(-1).clamp_min(1.0)[..., None, None]
    jitter = 1e3 * torch.finfo(matrix.dtype).eps
    for _ in range(6):
        factor, info = torch.linalg.cholesky_ex(matrix + jitter * scale * eye)
        if not bool(info.any()):
            return torch.cholesky_solve(rhs.unsqueeze(-1), factor).squeeze(-1)
        jitter *= 100
    return torch.linalg.lstsq(matrix + jitter * scale * eye, rhs.unsqueeze(-1)).solution.squeeze(-1)


def _gate_log_probs(
    x: torch.Tensor, gate_weight: torch.Tensor, gate_bias: torch.Tensor | None
) -> torch.Tensor:
    return torch.log_softmax(gate_logits(x, gate_weight, gate_bias), dim=-1)


def _negative_hessian(design: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """Negative Hessian of the multinomial log-likelihood, blocks ``X^T diag(p_a (d_ab - p_b)) X``.

    ``probs`` (n, k - 1) are the free experts' gate probabilities; the result is
    ((k - 1) width, (k - 1) width). Two matrix products whatever k (fewer passes than block by block).
    """
    free, width = probs.shape[1], design.shape[1]
    if free == 1:
        weight = probs[:, 0] * (1 - probs[:, 0])
        return (design * weight[:, None]).T @ design
    scaled = (probs[:, :, None] * design[:, None, :]).reshape(-1, free * width)
    hessian = -(scaled.T @ scaled)  # - sum_n p_a p_b x x^T
    diagonal = (scaled.T @ design).reshape(free, width, width)  # sum_n p_a x x^T
    blocks = hessian.view(free, width, free, width)
    for a in range(free):
        blocks[a, :, a, :] += diagonal[a]
    return hessian


def gate_m_step(
    x: torch.Tensor,
    responsibilities: torch.Tensor,
    gate_weight: torch.Tensor,
    gate_bias: torch.Tensor,
    *,
    fit_bias: bool = True,
    prior_scale: float | None = None,
    max_steps: int = 5,
    tol: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate M-step: weighted (multinomial) logistic regression by damped Newton steps.

    Maximises ``Q(w, c) = sum_n sum_i r_ni log gate_i(x_n) + log prior(w, c)`` over the gate weights
    ``w`` (and offsets ``c`` when ``fit_bias``), expert 0 the reference. ``Q`` is concave; each Newton
    step is halved until ``Q`` does not drop, so the step never lowers the EM objective (a generalised
    M-step when ``max_steps`` is small). Stops early when the Newton decrement is negligible.

    Parameters
    ----------
    x : Tensor (n, d)
    responsibilities : Tensor (n, k)
        Soft labels ``r_ni`` (rows sum to 1).
    gate_weight : Tensor (k - 1, d)
        Starting gate weights.
    gate_bias : Tensor (k - 1,)
        Starting gate offsets (kept fixed unless ``fit_bias``).
    fit_bias : bool
        Whether to update the offsets.
    prior_scale : float, optional
        Scale ``s`` of a ``Normal(0, s^2)`` prior on every gate weight and offset (MAP: a ridge term
        ``1 / s^2`` in the Newton system). ``None``: maximum likelihood.
    max_steps : int
        Maximum number of Newton steps.
    tol : float
        Stop when a Newton step would raise ``Q / n`` by less than this (EM passes a fraction of its
        own tolerance: solving the M-step more exactly than EM converges buys nothing).

    Returns
    -------
    (gate_weight, gate_bias) : tuple of Tensor, shapes (k - 1, d) and (k - 1,)

    Examples
    --------
    >>> x = torch.randn(200, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    >>> r1 = torch.sigmoid(3 * x[:, 0])
    >>> w, c = gate_m_step(x, torch.stack([1 - r1, r1], -1), torch.zeros(1, 2, dtype=torch.float64),
    ...                    torch.zeros(1, dtype=torch.float64), max_steps=20)
    >>> [round(v) for v in w[0].tolist()]
    [3, 0]
    """
    n, d = x.shape
    free = gate_weight.shape[0]
    width = d + 1 if fit_bias else d
    design = torch.cat([x, torch.ones_like(x[:, :1])], dim=-1) if fit_bias else x
    theta = (
        torch.cat([gate_weight, gate_bias[:, None]], dim=-1) if fit_bias else gate_weight.clone()
    )
    offset = None if fit_bias else gate_bias
    ridge = 0.0 if prior_scale is None else 1.0 / prior_scale**2
    target = responsibilities[:, 1:]

    def split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return (t[:, :d], t[:, d]) if fit_bias else (t, offset)

    def objective(t: torch.Tensor) -> tuple[float, torch.Tensor]:
        log_gate = _gate_log_probs(x, *split(t))
        value = (responsibilities * log_gate).sum() - 0.5 * ridge * t.pow(2).sum()
        return float(value), log_gate

    value, log_gate = objective(theta)
    for _ in range(max_steps):
        probs = log_gate[:, 1:].exp()
        gradient = (target - probs).T @ design - ridge * theta  # (k-1, width)
        # negative Hessian: blocks X^T diag(p_a (delta_ab - p_b)) X, a, b over the free experts
        hessian = _negative_hessian(design, probs)
        hessian.diagonal().add_(ridge)
        step = _solve_spd(hessian, gradient.reshape(-1))
        decrement = float(gradient.reshape(-1) @ step)  # Newton decrement squared: ~2 x the gain
        if decrement <= 2 * max(_accept_slack(value, x.dtype), tol * n):
            break
        step = step.reshape(free, width)
        size, accepted = 1.0, False
        for _ in range(40):
            candidate = theta + size * step
            new_value, new_log_gate = objective(candidate)
            if new_value >= value:
                gain = new_value - value
                theta, value, log_gate, accepted = candidate, new_value, new_log_gate, True
                break
            size *= 0.5
        # a full step gaining less than the threshold: Newton converges quadratically, so the next
        # step would gain far less; skip computing its Hessian
        if not accepted or (size == 1.0 and gain <= max(_accept_slack(value, x.dtype), tol * n)):
            break
    return split(theta)


def _check_matrix(value, name: str, shape: tuple[int, ...], like: torch.Tensor, meaning: str):
    tensor = as_tensor(value, name, like=like)
    if tuple(tensor.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({meaning}); got {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contains NaN or infinite values")
    return tensor


def _check_prior_scale(prior_scale) -> float | None:
    return None if prior_scale is None else check_positive(prior_scale, "prior_scale")


def _feature_scale(x: torch.Tensor) -> torch.Tensor:
    """Per-column standard deviation, 1 for constant columns (so random starts are scale-free)."""
    scale = x.std(dim=0) if x.shape[0] > 1 else torch.ones_like(x[0])
    return torch.where(scale > 0, scale, torch.ones_like(scale))


#: The noise floor of EM, relative to the spread of y (:func:`_noise_floor`).
NOISE_FLOOR = 1e-3


def _noise_floor(y: torch.Tensor) -> float:
    """Smallest noise EM may reach: ``NOISE_FLOOR * sd(y)``, relative to y's scale.

    Keeps the likelihood finite (and the fit away from a spike) when one expert fits a few rows
    exactly; a fit that reaches it is reported as collapsing (:class:`CollapseWarning`).
    """
    spread = float(y.std()) if y.shape[0] > 1 else 0.0
    if not spread > 0:
        spread = max(float(y.abs().max()), torch.finfo(y.dtype).tiny)
    return NOISE_FLOOR * spread


def _collapse(resp: torch.Tensor, noise, floor: float, d: int) -> tuple[list[float], list[int]]:
    """Effective rows per expert and the experts collapsing onto a few points (see GateFit)."""
    effective = resp.sum(dim=0).tolist()
    collapsed = [i for i, rows in enumerate(effective) if rows < d + 1]
    if not collapsed and float(noise) <= floor * (1 + 1e-9):
        collapsed = [min(range(len(effective)), key=effective.__getitem__)]
    return effective, collapsed


def _warn_collapse(collapsed, effective_rows, d: int, stacklevel: int = 3) -> None:
    """One :class:`CollapseWarning` naming the collapsing experts (nothing when there are none)."""
    if not collapsed:
        return
    parts = []
    for i in collapsed:
        rows = effective_rows[i]
        shown = f"{rows:.1f}" if float(f"{rows:.1f}") < d + 1 else f"{rows:.3f}"
        if rows < d + 1:
            parts.append(f"expert {i} holds {shown} effective rows (< d + 1 = {d + 1})")
        else:
            parts.append(f"expert {i} holds {shown} effective rows and the noise hit its floor")
    subject = "it is" if len(parts) == 1 else "they are"
    warnings.warn(
        f"{'; '.join(parts)}: {subject} collapsing onto a few points; use fewer experts",
        CollapseWarning,
        stacklevel=stacklevel,
    )


def fit_gate(
    x,
    y,
    experts_weight,
    experts_bias,
    link: str | Link,
    *,
    noise=None,
    init_gate_weight=None,
    init_gate_bias=None,
    fit_bias: bool = True,
    fit_noise: bool = True,
    prior_scale: float | None = None,
    tol: float = 1e-6,
    max_iter: int = 100,
    seed: int = 0,
    newton_steps: int = 1,
) -> GateFit:
    """Fit the gate (and the noise) by EM with the experts fixed (docs/algorithm.md section 4).

    E-step: responsibilities from :func:`pyromoe.core.likelihood.component_log_probs`. M-step:
    :func:`gate_m_step` (weighted logistic / multinomial logistic regression, damped Newton) and, if
    ``fit_noise``, ``noise^2 = mean_n sum_i r_ni (y_n - g(a_i . x_n + b_i))^2``. The objective (mean
    log-likelihood, or log posterior / n for MAP) never decreases. Works full-batch on ``x``'s
    device and dtype (memory O(n k d)); no loops over rows.

    Parameters
    ----------
    x : Tensor or ndarray (n, d)
        Inputs.
    y : Tensor or ndarray (n,)
        Outputs.
    experts_weight : Tensor or ndarray (k, d)
        Fixed expert weights.
    experts_bias : Tensor or ndarray (k,), or None
        Fixed expert intercepts (``None``: zeros).
    link : str or Link
        Expert link.
    noise : float or 0-d Tensor, optional
        Starting noise standard deviation (the fixed one when ``fit_noise=False``). Default: the
        root-mean-square residual of each row's best-fitting expert (biased low when experts overlap;
        EM corrects it).
    init_gate_weight : Tensor or ndarray (k - 1, d), optional
        Starting gate weights. Default: random, ``N(0, 0.25 / d)`` per weight divided by the column's
        standard deviation, from a ``torch.Generator`` seeded with ``seed``.
    init_gate_bias : Tensor or ndarray (k - 1,), optional
        Starting gate offsets (default zeros).
    fit_bias : bool
        Whether to fit the gate offsets (otherwise they stay at ``init_gate_bias``).
    fit_noise : bool
        Whether to update the noise.
    prior_scale : float, optional
        ``s`` of a ``Normal(0, s^2)`` prior on every gate weight and offset: MAP instead of ML, and
        the trace holds the log posterior / n. ``None``: maximum likelihood.
    tol : float
        Stop when the objective (per row) changes by less than ``tol``.
    max_iter : int
        Maximum number of EM iterations.
    seed : int or None
        Seed of the random starting gate (``None``: a fresh one, recorded in ``GateFit.seed``).
    newton_steps : int
        Maximum Newton steps per M-step (default 1: each EM iteration takes one damped Newton step,
        which still never lowers the objective; more steps rarely save an EM iteration).

    Returns
    -------
    GateFit

    Raises
    ------
    ValueError, TypeError
        For malformed inputs (shapes, NaN, non-positive ``noise``/``tol``/``max_iter``...), and for
        fewer rows than the gate's free parameters + 1 (``(k - 1)(d + 1)`` and the noise) or
        ``k > n``.

    Warns
    -----
    ConvergenceWarning
        When ``max_iter`` is reached before convergence.
    CollapseWarning
        When an expert ends with fewer than ``d + 1`` effective rows or the noise at its floor
        (``1e-3 sd(y)``).
    UserWarning
        Under :data:`pyromoe._validation.ROWS_PER_PARAMETER_WARN` rows per free parameter.

    Notes
    -----
    Columns of ``x`` (and ``y``) of extreme magnitude (beyond ``1e77`` or under ``1e-77`` in
    float64) are divided by exact powers of two before fitting and the fit is mapped back.

    Examples
    --------
    >>> from pyromoe import simulate
    >>> data = simulate(5000, 3, seed=0)
    >>> t = data.truth
    >>> fit = fit_gate(data.x, data.y, t.experts_weight, t.experts_bias, "linear")
    >>> fit.converged, fit.gate_weight.shape
    (True, torch.Size([1, 3]))
    """
    x, y = as_tensors(x, y, min_rows=2)
    n, d = x.shape
    experts_weight = as_tensor(experts_weight, "experts_weight", like=x)
    if experts_weight.dim() != 2 or experts_weight.shape[1] != d:
        raise ValueError(
            f"experts_weight must have shape (k, d) = (num_experts, {d}) to match x; "
            f"got {tuple(experts_weight.shape)}"
        )
    k = experts_weight.shape[0]
    if k < 2:
        raise ValueError(f"experts_weight must have at least 2 rows (one per expert); got {k}")
    check_num_experts(k)
    if not bool(torch.isfinite(experts_weight).all()):
        raise ValueError("experts_weight contains NaN or infinite values")
    if experts_bias is None:
        experts_bias = torch.zeros(k, dtype=x.dtype, device=x.device)
    else:
        experts_bias = _check_matrix(experts_bias, "experts_bias", (k,), x, "one per expert")
    link = get_link(link)
    fit_bias = check_flag(fit_bias, "fit_bias")
    fit_noise = check_flag(fit_noise, "fit_noise")
    prior_scale = _check_prior_scale(prior_scale)
    tol = check_positive(tol, "tol")
    max_iter = check_positive(max_iter, "max_iter", integer=True)
    newton_steps = check_positive(newton_steps, "newton_steps", integer=True)
    seed = check_seed(seed)

    if init_gate_weight is None:
        generator = torch.Generator().manual_seed(seed)
        raw = torch.randn(k - 1, d, generator=generator, dtype=torch.float64)
        gate_weight = raw.to(x) * (0.5 / math.sqrt(d)) / _feature_scale(x)
    else:
        gate_weight = _check_matrix(
            init_gate_weight, "init_gate_weight", (k - 1, d), x, "num_experts - 1 rows, d columns"
        )
    if init_gate_bias is None:
        gate_bias = torch.zeros(k - 1, dtype=x.dtype, device=x.device)
    else:
        gate_bias = _check_matrix(
            init_gate_bias, "init_gate_bias", (k - 1,), x, "one per non-reference expert"
        )

    if noise is not None:
        if isinstance(noise, torch.Tensor) or hasattr(noise, "__array__"):
            shape = tuple(getattr(noise, "shape", ()))
            if math.prod(shape) != 1:
                raise ValueError(f"noise must be a positive scalar; got shape {shape}")
            noise = noise.item() if hasattr(noise, "item") else float(noise)
        noise = torch.tensor(check_positive(noise, "noise"), dtype=x.dtype, device=x.device)

    x_scale, y_scale = exact_scales(x, y, link)
    if x_scale is not None or y_scale != 1.0:
        # extreme magnitudes: fit on data divided by exact powers of two, map the gate back
        xs = torch.ones_like(x[0]) if x_scale is None else x_scale
        fit = fit_gate(
            x / xs,
            y / y_scale,
            experts_weight * xs / y_scale,
            experts_bias / y_scale,
            link,
            noise=None if noise is None else noise / y_scale,
            init_gate_weight=None if init_gate_weight is None else gate_weight * xs,
            init_gate_bias=None if init_gate_bias is None else gate_bias,
            fit_bias=fit_bias,
            fit_noise=fit_noise,
            prior_scale=prior_scale,
            tol=tol,
            max_iter=max_iter,
            seed=seed,
            newton_steps=newton_steps,
        )
        return replace(fit, gate_weight=fit.gate_weight / xs, noise=fit.noise * y_scale)
    parameters = (k - 1) * (d + 1 if fit_bias else d) + (1 if fit_noise else 0)
    check_enough_rows(n, parameters, k, model=f"the gate of {k} experts on {d} input(s)")

    floor = _noise_floor(y)
    if noise is None:
        means = expert_means(x, experts_weight, experts_bias, link)
        best_residual = (y[:, None] - means).pow(2).min(dim=-1).values.mean().sqrt()
        noise = best_residual.clamp_min(floor)

    def objective(log_probs: torch.Tensor, gate_weight, gate_bias) -> float:
        value = torch.logsumexp(log_probs, dim=-1).sum() + log_prior(
            prior_scale, gate_weight, gate_bias
        )
        return float(value) / n

    def e_step(gate_weight, gate_bias, noise):
        return component_log_probs(
            x, y, Params(experts_weight, experts_bias, gate_weight, gate_bias, noise), link
        )

    log_probs = e_step(gate_weight, gate_bias, noise)
    trace = [objective(log_probs, gate_weight, gate_bias)]
    means = expert_means(x, experts_weight, experts_bias, link) if fit_noise else None
    converged, n_iter = False, 0
    for n_iter in range(1, max_iter + 1):  # noqa: B007 (n_iter is returned)
        resp = torch.softmax(log_probs, dim=-1)
        gate_weight, gate_bias = gate_m_step(
            x,
            resp,
            gate_weight,
            gate_bias,
            fit_bias=fit_bias,
            prior_scale=prior_scale,
            max_steps=newton_steps,
            tol=0.1 * tol,
        )
        if fit_noise:
            variance = (resp * (y[:, None] - means).pow(2)).sum() / n
            noise = variance.sqrt().clamp_min(floor)
        log_probs = e_step(gate_weight, gate_bias, noise)
        trace.append(objective(log_probs, gate_weight, gate_bias))
        if abs(trace[-1] - trace[-2]) < tol:
            converged = True
            break
    if not converged:
        warnings.warn(
            f"gate EM did not converge in max_iter={max_iter} iterations (last change of the "
            f"objective {trace[-1] - trace[-2]:.3g} >= tol={tol:g}); increase max_iter or tol",
            ConvergenceWarning,
            stacklevel=2,
        )
    effective_rows, collapsed = _collapse(torch.softmax(log_probs, dim=-1), noise, floor, d)
    _warn_collapse(collapsed, effective_rows, d)
    return GateFit(
        gate_weight=gate_weight,
        gate_bias=gate_bias,
        noise=noise.reshape(()),
        log_likelihood_trace=trace,
        converged=converged,
        n_iter=n_iter,
        seed=seed,
        effective_rows=effective_rows,
        collapsed_experts=collapsed,
    )

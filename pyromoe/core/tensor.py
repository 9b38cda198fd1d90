"""Whitening, the robust symmetric tensor power method and un-whitening (docs/algorithm.md section 3).

Pure torch functions on small tensors (d x d, k x k x k); no Pyro, no data passes here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .likelihood import linear_predictors, log_probs_from_predictors
from .links import Link, gaussian_expectation
from .params import Params

__all__ = [
    "scale_statistics",
    "expert_scales",
    "Whitening",
    "whiten",
    "tensor_power_method",
    "TensorDecomposition",
    "unwhiten",
    "decomposition_residual",
]


@dataclass(frozen=True)
class Whitening:
    """Whitening of ``T2`` from its top-k eigenpairs: ``M^T T2 M = diag(signs)``.

    Attributes
    ----------
    projection : Tensor (d, k)
        ``M = U diag(|l|)^{-1/2}``.
    eigenvalues : Tensor (d,)
        All eigenvalues of ``T2``, sorted by absolute value, largest first.
    signs : Tensor (k,)
        Signs of the k kept eigenvalues (all +1 for odd links; ReLU's can differ).
    noise_floor : float
        The largest eigenvalue that sampling noise alone would give (see :func:`whiten`).
    """

    projection: torch.Tensor
    eigenvalues: torch.Tensor
    signs: torch.Tensor
    noise_floor: float

    @property
    def num_components(self) -> int:
        return self.projection.shape[1]

    @property
    def condition_number(self) -> float:
        """``|l_1| / |l_k|``: the whitening's condition number squared (large = fragile)."""
        top = self.eigenvalues[: self.num_components].abs()
        return float(top[0] / top[-1])

    @property
    def eigengap(self) -> float:
        """``(|l_k| - |l_{k+1}|) / |l_1|`` (1 when d = k): how clearly k components stand out."""
        k = self.num_components
        values = self.eigenvalues.abs()
        nxt = float(values[k]) if values.shape[0] > k else 0.0
        return (float(values[k - 1]) - nxt) / float(values[0])

    @property
    def gram(self) -> torch.Tensor:
        """``G = M^T M`` (k, k)."""
        return self.projection.T @ self.projection


def whiten(t2: torch.Tensor, num_components: int, *, noise_floor: float = 0.0) -> Whitening:
    """Whitening matrix from the ``num_components`` eigenpairs of ``t2`` largest in absolute value.

    Parameters
    ----------
    t2 : Tensor (d, d)
        Symmetric second moment on standardised inputs.
    num_components : int
        ``k``.
    noise_floor : float
        Eigenvalues of absolute value at or below this count as zero. A sensible value is the
        top eigenvalue of the sampling noise of ``t2``, about ``2 sqrt(d E[P2(y)^2] / n)``.

    Returns
    -------
    Whitening

    Raises
    ------
    ValueError
        "the data look like fewer than k experts" when fewer than ``k`` eigenvalues are clearly
        non-zero, or when ``k > d``.

    Examples
    --------
    >>> t2 = torch.diag(torch.tensor([4.0, 1.0, 0.0], dtype=torch.float64))
    >>> w = whiten(t2, 2)
    >>> torch.allclose(w.projection.T @ t2 @ w.projection, torch.eye(2, dtype=torch.float64))
    True
    """
    d = t2.shape[0]
    k = int(num_components)
    if k > d:
        raise ValueError(
            f"num_components={k} exceeds the dimension {d} of T2: the moment method needs k <= d"
        )
    evals, evecs = torch.linalg.eigh((t2 + t2.T) / 2)
    order = torch.argsort(evals.abs(), descending=True)
    evals, evecs = evals[order], evecs[:, order]
    kept = evals[:k]
    top = float(evals[0].abs())
    threshold = max(float(noise_floor), 1e-10 * top)
    clear = int((evals.abs() > threshold).sum())
    if top <= 0 or clear < k:
        raise ValueError(
            f"the data look like fewer than {k} experts: T2 has only {clear} clearly non-zero "
            f"eigenvalue(s) (|eigenvalues| {[round(v, 4) for v in evals[: k + 1].tolist()]} "
            f"against a sampling-noise floor of {threshold:.3g}). Use fewer experts, more rows, "
            "or a likelihood fit (pyromoe.fit_em) instead."
        )
    projection = evecs[:, :k] * kept.abs().rsqrt()
    return Whitening(
        projection=projection,
        eigenvalues=evals,
        signs=torch.sign(kept),
        noise_floor=threshold,
    )


@dataclass(frozen=True)
class TensorDecomposition:
    """``T ~ sum_i eigenvalues[i] eigenvectors[:, i]^(x)3`` from the tensor power method.

    Attributes
    ----------
    eigenvalues : Tensor (k,)
        ``lambda_i = T(v_i, v_i, v_i) > 0``.
    eigenvectors : Tensor (k, k)
        Unit columns ``v_i``.
    residual : float
        ``||T - sum lambda_i v_i^(x)3||_F / ||T||_F``.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residual: float


def _apply(tensor: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``T(I, v, v)`` for a batch of vectors ``v`` (..., k): one matrix product (no einsum overhead)."""
    k = tensor.shape[0]
    outer = (v.unsqueeze(-1) * v.unsqueeze(-2)).reshape(*v.shape[:-1], k * k)
    return outer @ tensor.reshape(k, k * k).T


def tensor_power_method(
    tensor: torch.Tensor,
    num_components: int | None = None,
    *,
    num_restarts: int = 20,
    num_iterations: int = 50,
    generator: torch.Generator | None = None,
) -> TensorDecomposition:
    """Robust symmetric tensor power method (Anandkumar, Ge, Hsu, Kakade, Telgarsky 2014, Alg. 1).

    For each component: ``num_restarts`` random unit starts (drawn from ``generator``), each run
    ``num_iterations`` steps of ``v <- T(I, v, v) / ||T(I, v, v)||``; the start with the largest
    ``T(v, v, v)`` is run ``num_iterations`` more steps, kept, and deflated from ``T``.

    Parameters
    ----------
    tensor : Tensor (k, k, k)
        Symmetric (whitened) tensor.
    num_components : int, optional
        Components to extract (default k).
    num_restarts, num_iterations : int
    generator : torch.Generator, optional
        Source of the random starts (on the CPU); default a generator seeded with 0.

    Returns
    -------
    TensorDecomposition

    Examples
    --------
    >>> e = torch.eye(2, dtype=torch.float64)
    >>> t = 3 * torch.einsum("ia,ib,ic->abc", e, e, e)
    >>> out = tensor_power_method(t)
    >>> [round(v, 6) for v in out.eigenvalues.tolist()]
    [3.0, 3.0]
    """
    k = tensor.shape[0]
    m = k if num_components is None else int(num_components)
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    work = tensor.clone()
    values, vectors = [], []
    for _ in range(m):
        starts = torch.randn(num_restarts, k, generator=generator, dtype=torch.float64)
        v = (starts / starts.norm(dim=-1, keepdim=True)).to(
            device=tensor.device, dtype=tensor.dtype
        )
        for _ in range(num_iterations):
            v = _apply(work, v)
            v = v / v.norm(dim=-1, keepdim=True).clamp_min(1e-300)
        scores = (_apply(work, v) * v).sum(-1)
        best = v[int(torch.argmax(scores))]
        for _ in range(num_iterations):
            nxt = _apply(work, best)
            norm = nxt.norm()
            if norm <= 1e-300:
                break
            best = nxt / norm
        value = float((_apply(work, best) * best).sum())
        values.append(value)
        vectors.append(best)
        work = work - value * torch.einsum("a,b,c->abc", best, best, best)
    eigenvalues = torch.tensor(values, dtype=tensor.dtype, device=tensor.device)
    eigenvectors = torch.stack(vectors, 1)
    return TensorDecomposition(
        eigenvalues=eigenvalues,
        eigenvectors=eigenvectors,
        residual=decomposition_residual(tensor, eigenvalues, eigenvectors),
    )


def decomposition_residual(
    tensor: torch.Tensor, eigenvalues: torch.Tensor, eigenvectors: torch.Tensor
) -> float:
    """``||T - sum_i lambda_i v_i^(x)3||_F / ||T||_F`` (0 for an exact orthogonal decomposition)."""
    approx = torch.einsum("i,ai,bi,ci->abc", eigenvalues, eigenvectors, eigenvectors, eigenvectors)
    norm = float(tensor.norm())
    return float((tensor - approx).norm()) / norm if norm > 0 else math.inf


def unwhiten(whitening: Whitening, vectors: torch.Tensor) -> torch.Tensor:
    """Map whitened vectors (columns of ``vectors``, (k, m)) back: ``pinv(M^T) v``, rows (m, d).

    With ``M = U diag(|l|)^{-1/2}``, ``pinv(M^T) = U diag(|l|)^{1/2}``; for the linear link with
    k = 2 this returns the experts exactly (docs/algorithm.md section 3).
    """
    return (torch.linalg.pinv(whitening.projection.T) @ vectors).T


_SCALE_GRID = torch.logspace(-3, math.log10(20.0), 2000, dtype=torch.float64)


def _first_crossing(values: torch.Tensor, target: float) -> float:
    """Smallest grid scale r with ``values(r) >= target`` (linear interpolation); argmax if none."""
    above = torch.nonzero(values >= target).flatten()
    if above.numel() == 0:
        return float(_SCALE_GRID[int(torch.argmax(values))])
    j = int(above[0])
    if j == 0:
        return float(_SCALE_GRID[0])
    r0, r1 = float(_SCALE_GRID[j - 1]), float(_SCALE_GRID[j])
    v0, v1 = float(values[j - 1]), float(values[j])
    return r0 + (target - v0) * (r1 - r0) / (v1 - v0) if v1 != v0 else r1


def expert_scales(
    link: Link,
    directions: torch.Tensor,
    eigenvalues: torch.Tensor,
    *,
    beta: float = 0.0,
    first_moment: torch.Tensor | None = None,
    free_mixing: bool = False,
) -> torch.Tensor:
    """Expert weights on the standardised inputs from the un-whitened tensor components.

    With ``T2 = sum_i kappa2(a_i) u_i u_i^T`` and ``T3 = sum_i kappa3(a_i) u_i^(x)3`` (unit
    ``u_i``, per-norm constants from :func:`pyromoe.core.links.gaussian_expectation`, mixing weight
    ``1/k``), the un-whitened component is ``d_i = sign(kappa3) sqrt(|kappa2|) u_i``:

    - linear: ``a_i = d_i`` for k = 2 (``kappa2 = |a|^2``: exact with the paper's odd gate,
      whose mixing weights are 1/2) and ``a_i = d_i lambda_i / 3`` for k > 2 or with
      ``free_mixing`` (``kappa2 = 2 p_i |a|^2``, ``kappa3 = 6 p_i |a|^3``: exact from lambda
      whatever the mixing weights ``p_i``, e.g. a gate on covariates independent of ``x``,
      docs/algorithm.md section 7);
    - relu / leaky_relu: ``kappa3 > 0`` gives the sign; ``|a_i|`` solves the 1-D equation
      ``|kappa2(r)| = |d_i|^2`` (smallest root) with the ``beta`` used in ``P2``;
    - tanh / sigmoid (``kappa2`` is not monotone in the norm): signed scales from the first-order
      moment ``E[y z] = sum_i kappa1(a_i) u_i``: a least-squares fit of its coefficients on the
      directions, each inverted through the monotone 1-D function ``kappa1``.

    Parameters
    ----------
    link : Link
    directions : Tensor (k, d)
        Un-whitened components ``d_i`` (rows), from :func:`unwhiten`.
    eigenvalues : Tensor (k,)
        Tensor eigenvalues ``lambda_i``.
    beta : float
        The ``beta`` of ``P2(y) = y^2 + beta y``.
    first_moment : Tensor (d,), optional
        ``E[y z]`` (centred ``y``, standardised ``z``); needed for tanh and sigmoid.
    free_mixing : bool
        The mixing weights need not be equal (linear link: scales from ``lambda`` for any k).

    Returns
    -------
    Tensor (k, d)
    """
    k = directions.shape[0]
    if link.is_identity:
        if k == 2 and not free_mixing:
            return directions
        return directions * (eigenvalues / 3).unsqueeze(-1)
    norms = directions.norm(dim=-1).clamp_min(1e-300)
    units = directions / norms.unsqueeze(-1)
    grid = _SCALE_GRID
    if not link.is_odd:
        kappa2 = (
            gaussian_expectation(link, grid, 2, 2) + beta * gaussian_expectation(link, grid, 1, 2)
        ) / k
        scales = [_first_crossing(kappa2.abs(), float(n) ** 2) for n in norms]
        return units * torch.tensor(scales, dtype=units.dtype, device=units.device).unsqueeze(-1)
    if first_moment is None:
        raise ValueError(f"first_moment is needed to fix the scales of the {link.name} link")
    coef = torch.linalg.lstsq(units.T, first_moment.reshape(-1, 1).to(units.dtype)).solution
    kappa1 = gaussian_expectation(link, grid, 1, 1) / k
    signed = [
        math.copysign(_first_crossing(kappa1, abs(float(c))), float(c)) for c in coef.flatten()
    ]
    return units * torch.tensor(signed, dtype=units.dtype, device=units.device).unsqueeze(-1)


def scale_statistics(x, y, params: Params, link: Link) -> torch.Tensor:
    """One chunk's Gauss-Newton sums (a pass of :meth:`pyromoe.core.sources.Source.reduce`,
    docs/algorithm.md section 3) for each expert's scale ``s_i`` of its linear predictor
    ``eta_ni = a_i . x_n + b_i`` at ``s = 1``: ``(sum_n r_ni J_ni (y_n - g(eta_ni)),
    sum_n r_ni J_ni^2)`` with ``J = g'(eta) eta`` and ``r`` the responsibilities; (2, k) float64."""
    predictors, logits = linear_predictors(x, params)
    log_probs = log_probs_from_predictors(y, predictors, logits, params, link)
    r = torch.softmax(log_probs, dim=-1)
    jacobian = link.derivative(predictors) * predictors
    residual = y.unsqueeze(-1) - link(predictors)
    gradient = (r * jacobian * residual).sum(0)
    curvature = (r * jacobian * jacobian).sum(0)
    return torch.stack([gradient, curvature]).to(torch.float64)

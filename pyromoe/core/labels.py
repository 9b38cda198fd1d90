"""Expert labels: one criterion to match experts, one way to relabel them.

The mixture is unchanged when its experts are permuted (label switching). Every comparison in
pyromoe (an estimate against the truth, posterior draws against a point estimate) matches experts by
the permutation minimising the summed squared distance of the expert weights, solved as an
assignment problem by :func:`scipy.optimize.linear_sum_assignment` (Hungarian matching), and
relabels with :func:`permute_draws`, which also re-references the gate so that the new expert 0
keeps logit 0 (docs/algorithm.md, section 5).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

from . import sites

__all__ = [
    "align_labels",
    "best_permutation",
    "best_permutations",
    "check_samples",
    "permute_draws",
]


def best_permutations(weights: torch.Tensor, reference: torch.Tensor) -> torch.LongTensor:
    """Per draw, the permutation ``perm`` minimising ``sum_i ||weights[perm[i]] - reference[i]||^2``.

    Parameters
    ----------
    weights : Tensor (..., k, d)
        Expert weights of a batch of draws (or of one estimate).
    reference : Tensor (k, d)
        The labelling to match.

    Returns
    -------
    LongTensor (..., k), on ``weights``' device.

    Examples
    --------
    >>> reference = torch.eye(3)
    >>> best_permutations(reference[[2, 0, 1]], reference).tolist()
    [1, 2, 0]
    """
    from scipy.optimize import linear_sum_assignment

    k = reference.shape[-2]
    reference = reference.to(device=weights.device, dtype=torch.float64)
    # cost[..., i, j]: reference expert i matched to the draw's expert j
    cost = torch.cdist(reference, weights.to(torch.float64)) ** 2
    flat = cost.reshape(-1, k, k).cpu().numpy()
    columns = np.stack([linear_sum_assignment(matrix)[1] for matrix in flat])
    return torch.as_tensor(columns, device=weights.device).reshape(cost.shape[:-1])


def best_permutation(experts_weight: torch.Tensor, reference_weight: torch.Tensor) -> list[int]:
    """The relabelling of one estimate's experts that best matches ``reference_weight``.

    The single-draw form of :func:`best_permutations`: ``experts_weight[perm[i]]`` is matched to
    ``reference_weight[i]``.
    """
    return best_permutations(experts_weight, reference_weight).tolist()


def permute_draws(params: Mapping[str, torch.Tensor], permutation: torch.Tensor) -> dict:
    """Relabel the experts of a batch of draws: new expert ``j`` is old expert ``permutation[..., j]``.

    The batched form of :meth:`pyromoe.MoEEstimate.permute`: expert weights and biases are gathered,
    and the gate is re-referenced so that the new expert 0 has logit 0 (the model is unchanged).

    Parameters
    ----------
    params : dict of site -> Tensor
        ``experts.weight`` (..., k, d), ``gate.weight`` (..., k-1, d), optionally ``experts.bias``
        (..., k) and ``gate.bias`` (..., k-1), and ``noise`` (...) or per expert (..., k); other
        sites are passed through.
    permutation : LongTensor (..., k)
        One permutation per draw (same leading dims as the draws).

    Returns
    -------
    dict of site -> Tensor, same shapes.
    """
    out = dict(params)
    perm = permutation.to(params[sites.EXPERTS_WEIGHT].device).long()
    weight = params[sites.EXPERTS_WEIGHT]
    out[sites.EXPERTS_WEIGHT] = torch.take_along_dim(weight, perm[..., None], dim=-2)
    if sites.EXPERTS_BIAS in params:
        out[sites.EXPERTS_BIAS] = torch.take_along_dim(params[sites.EXPERTS_BIAS], perm, dim=-1)
    if sites.GATE_WEIGHT not in params:  # one expert: no gate
        return out
    gate_weight = params[sites.GATE_WEIGHT]
    full = torch.cat(
        [gate_weight.new_zeros(*gate_weight.shape[:-2], 1, gate_weight.shape[-1]), gate_weight],
        dim=-2,
    )
    full = torch.take_along_dim(full, perm[..., None], dim=-2)
    out[sites.GATE_WEIGHT] = (full - full[..., :1, :])[..., 1:, :]
    if sites.GATE_BIAS in params:
        gate_bias = params[sites.GATE_BIAS]
        full = torch.cat([gate_bias.new_zeros(*gate_bias.shape[:-1], 1), gate_bias], dim=-1)
        full = torch.take_along_dim(full, perm, dim=-1)
        out[sites.GATE_BIAS] = (full - full[..., :1])[..., 1:]
    noise = params.get(sites.NOISE)
    if noise is not None and torch.as_tensor(noise).dim() == weight.dim() - 1:
        # one noise sd per expert: (..., k), relabelled with the experts
        out[sites.NOISE] = torch.take_along_dim(torch.as_tensor(noise), perm, dim=-1)
    return out


def _to_tensor(value, name: str, like: torch.Tensor) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach().to(device=like.device, dtype=like.dtype)
    try:
        return torch.as_tensor(np.asarray(value), device=like.device, dtype=like.dtype)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"samples[{name!r}] must be a tensor or array of shape (chain, draw, ...); "
            f"got {type(value).__name__}"
        ) from error


def check_samples(samples, like: torch.Tensor, site_shapes: Mapping | None) -> dict:
    """Posterior draws ``{site: array (chain, draw, ...)}`` as tensors on ``like``'s device/dtype.

    Raises
    ------
    TypeError, ValueError
        If ``samples`` is not a non-empty mapping of arrays with common (chain, draw) dims, or a
        site's shape does not match ``site_shapes``.
    """
    if not isinstance(samples, Mapping) or not samples:
        raise TypeError(
            "samples must be a non-empty dict of site name -> array of shape (chain, draw, ...); "
            f"got {type(samples).__name__}"
        )
    out, lead = {}, None
    for name, value in samples.items():
        value = _to_tensor(value, name, like)
        if value.dim() < 2:
            raise ValueError(
                f"samples[{name!r}] must have shape (chain, draw, ...); got {tuple(value.shape)}"
            )
        if lead is None:
            lead = tuple(value.shape[:2])
        elif tuple(value.shape[:2]) != lead:
            raise ValueError(
                f"every site in samples must have the same (chain, draw) = {lead}; "
                f"samples[{name!r}] has {tuple(value.shape[:2])}"
            )
        if site_shapes is not None and name in site_shapes:
            if tuple(value.shape[2:]) != tuple(site_shapes[name]):
                raise ValueError(
                    f"samples[{name!r}] must have shape (chain, draw, *{tuple(site_shapes[name])}) "
                    f"for this model; got {tuple(value.shape)}"
                )
        out[name] = value
    if site_shapes is not None:
        missing = [name for name in site_shapes if name not in out]
        if missing:
            raise ValueError(f"samples lacks the model's sites {missing}")
    return out


def align_labels(
    samples: Mapping[str, Any], estimate
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Relabel the experts of every draw to match ``estimate`` (undo label switching).

    For each draw the permutation of experts minimising the summed squared distance of the
    experts' coefficients (weights, and intercepts when the draws have them) to the estimate's is
    found (:func:`best_permutations`), and the draw is relabelled with :func:`permute_draws`
    (gate re-referenced). The intercepts count: experts with similar slopes are often told apart
    by their levels (e.g. two species' body mass at the same flipper length), where weights alone
    swap ordinary draws.

    Parameters
    ----------
    samples : dict of site -> array (chain, draw, ...)
        Posterior draws with at least ``experts.weight`` and ``gate.weight``.
    estimate : MoEEstimate
        The reference labelling.

    Returns
    -------
    aligned : dict of site -> Tensor
        The relabelled draws (same shapes, on ``experts.weight``'s device and dtype).
    info : dict
        ``num_draws_relabelled`` (int), ``num_draws_relabelled_per_chain`` (list of int),
        ``permutations`` (LongTensor (chain, draw, k)).

    Raises
    ------
    ValueError
        If the sites are missing or their shapes do not match the estimate's.

    Examples
    --------
    >>> from pyromoe import simulate
    >>> truth = simulate(10, 3, seed=0).truth
    >>> draws = {name: value.expand(2, 5, *value.shape) for name, value in
    ...          truth.permute([1, 0]).site_values().items()}
    >>> aligned, info = align_labels(draws, truth)
    >>> info["num_draws_relabelled"]
    10
    """
    # what an estimate offers, checked by its attributes: labels stays below core/estimate.py
    if not all(
        hasattr(estimate, name) for name in ("num_experts", "experts_weight", "site_values")
    ):
        raise TypeError(f"estimate must be a pyromoe.MoEEstimate; got {type(estimate).__name__}")
    # one expert has no gate and no labels to switch
    needed = (sites.EXPERTS_WEIGHT,) + ((sites.GATE_WEIGHT,) if estimate.num_experts > 1 else ())
    for name in needed:
        if not isinstance(samples, Mapping) or name not in samples:
            raise ValueError(f"samples must contain the site {name!r} to align labels")
    weight = samples[sites.EXPERTS_WEIGHT]
    like = weight if isinstance(weight, torch.Tensor) else torch.as_tensor(np.asarray(weight))
    if not like.is_floating_point():
        like = like.double()
    shapes = {
        name: tuple(value.shape)
        for name, value in estimate.site_values(bias=True).items()
        if name in samples
    }
    tensors = check_samples(samples, like, shapes)
    reference = estimate.experts_weight.to(device=like.device, dtype=like.dtype)
    draws = tensors[sites.EXPERTS_WEIGHT]
    if sites.EXPERTS_BIAS in tensors:  # each expert's whole coefficients: weights and intercept
        bias = estimate.experts_bias.to(device=like.device, dtype=like.dtype)
        reference = torch.cat([reference, bias[:, None]], dim=-1)
        draws = torch.cat([draws, tensors[sites.EXPERTS_BIAS][..., None]], dim=-1)
    if estimate.num_experts == 1:
        perms = torch.zeros(*tensors[sites.EXPERTS_WEIGHT].shape[:-2], 1, dtype=torch.long)
    else:
        perms = best_permutations(draws, reference)
    identity = torch.arange(estimate.num_experts, device=perms.device)
    changed = (perms != identity).any(-1)  # (chain, draw)
    aligned = permute_draws(tensors, perms)
    info = {
        "num_draws_relabelled": int(changed.sum()),
        "num_draws_relabelled_per_chain": changed.sum(-1).tolist(),
        "permutations": perms,
    }
    return aligned, info

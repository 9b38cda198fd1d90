"""The NUTS kernel of :func:`pyromoe.run_nuts` and the per-draw statistics it records.

Pyro's :class:`~pyro.infer.NUTS` is used through its public interface only: the potential energy
comes in through ``NUTS(potential_fn=...)`` (:class:`CountedPotential`, which counts and records
its evaluations), :meth:`~pyro.infer.mcmc.HMC.setup`, :meth:`~pyro.infer.mcmc.HMC.sample` and
:meth:`~pyro.infer.mcmc.HMC.diagnostics` are the methods MCMC calls (Pyro sends ``diagnostics()``
back from worker processes), the step size and the inverse mass matrix are the kernel's public
``step_size`` and ``inverse_mass_matrix``, and :func:`record_draw` is MCMC's ``hook_fn``.

Pyro has no public per-draw energy or acceptance probability (only the chain's share of moved
draws, ``diagnostics()["acceptance rate"]``). So :func:`trajectory_statistics` computes them from
what the kernel's own potential sees: NUTS evaluates the potential and its gradient once per
leapfrog step, at every position of the trajectory, and the velocity Verlet step fixes the momentum
at each position from the positions either side of a step (``M (z' - z) / eps`` is the half-step
momentum), so the Hamiltonian of every state of the trajectory follows from the positions, the
gradients, the step size and the mass matrix. This assumes what NUTS is (Hoffman & Gelman 2014,
velocity Verlet, trees doubled 1, 2, 4, ... leapfrog steps at a time), not how Pyro codes it; if a
Pyro release integrates differently the positions stop matching and the draw's statistics are NaN
with a :class:`RuntimeWarning` (``tests/test_prior.py`` pins the values against Pyro's).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import NamedTuple

import torch
from pyro.infer import NUTS
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.infer.mcmc.util import initialize_model

__all__ = [
    "CountedPotential",
    "Evaluation",
    "RecordingNUTS",
    "record_draw",
    "trajectory_statistics",
]

#: how far (relative to the step) a predicted leapfrog position may be from the evaluated one
_POSITION_TOLERANCE = 1e-6


class Evaluation(NamedTuple):
    """One evaluation of the potential: the unconstrained position (site -> tensor), the
    potential energy there, and its gradient (site -> tensor; filled in when autograd computes
    it, empty for an evaluation without one)."""

    position: dict
    potential: torch.Tensor
    grads: dict


class CountedPotential:
    """The model's potential energy, counting its evaluations (and recording them on request).

    The potential is the fused one of :mod:`pyromoe.bayes.potential` when ``fused`` is given
    (a :class:`~pyromoe.bayes.potential.FusedPotential`), else ``initialize_model``'s
    ``potential_fn`` on the traced model (``jit_compile`` as asked). NUTS evaluates it with its
    gradient once per leapfrog step, and in warmup also to search for a step size, so
    :attr:`count` is the sampler's cost in gradient evaluations. While :attr:`evaluations` is a
    list, each call appends an :class:`Evaluation`, its gradient caught by a tensor hook when
    Pyro differentiates (no extra work). The traced potential is built where it is first used and
    not pickled: Pyro wraps the model in closures that pickle cannot carry, so each spawned worker
    process builds its own, as Pyro's ``NUTS(model)`` does in ``setup``. The fused one is plain
    tensors and pickles as it is.
    """

    def __init__(self, model, model_args: tuple, transforms: dict, jit_compile: bool, fused=None):
        self.model, self.model_args = model, model_args
        self.transforms, self.jit_compile = transforms, jit_compile
        self.fused = fused
        self.count = 0
        self.evaluations: list[Evaluation] | None = None
        self._potential_fn: Callable | None = None

    @property
    def path(self) -> str:
        """``"fused"`` or ``"traced"``: which potential runs (``attrs["potential"]``)."""
        return "traced" if self.fused is None else "fused"

    def __getstate__(self):
        return {**self.__dict__, "_potential_fn": None, "evaluations": None}

    def energy(self, params: dict) -> torch.Tensor:
        """The potential energy at unconstrained ``params``, not counted."""
        if self._potential_fn is None:
            if self.fused is not None:
                self._potential_fn = self.fused
            else:
                # tracing the model samples its priors: keep those draws off the chain's random
                # stream, so that both potentials give the same draws from the same seed
                device = self.model_args[0].device
                with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
                    _, self._potential_fn, _, _ = initialize_model(
                        self.model,
                        model_args=self.model_args,
                        transforms=self.transforms,
                        max_plate_nesting=1,
                        jit_compile=self.jit_compile,
                        skip_jit_warnings=True,
                        init_strategy=init_to_feasible,
                    )
        return self._potential_fn(params)

    def energy_and_grads(self, params: dict) -> Evaluation:
        """The potential energy and its gradient at ``params``, not counted."""
        position = {name: value.detach().requires_grad_(True) for name, value in params.items()}
        with torch.enable_grad():
            potential = self.energy(position)
            grads = torch.autograd.grad(potential, list(position.values()))
        position = {name: value.detach() for name, value in position.items()}
        return Evaluation(position, potential.detach(), dict(zip(position, grads)))

    def __call__(self, params: dict) -> torch.Tensor:
        self.count += 1
        if self.evaluations is None:
            return self.energy(params)
        grads: dict[str, torch.Tensor] = {}
        position = {name: value.detach() for name, value in params.items()}
        try:
            potential = self.energy(params)
        except Exception:
            # Pyro may handle the error (a NaN leaf); the trajectory still has this position
            self.evaluations.append(Evaluation(position, torch.tensor(math.nan), grads))
            raise
        for name, value in params.items():
            if value.requires_grad:
                value.register_hook(_keep_grad(grads, name))
        self.evaluations.append(Evaluation(position, potential.detach(), grads))
        return potential


def _keep_grad(grads: dict, name: str) -> Callable:
    def hook(grad: torch.Tensor) -> None:
        grads[name] = grad.detach()

    return hook


# ------------------------------------------------------------------------------------ trajectory
class _Metric:
    """The kinetic energy's metric: the inverse mass matrix by blocks of sites, as the kernel's
    public ``inverse_mass_matrix`` gives it (``{site names: (size,) diagonal or (size, size)}``),
    with positions, momenta and gradients flattened in its site order."""

    def __init__(self, inverse_mass: dict):
        self.names = [name for block in inverse_mass for name in block]
        self.blocks = [matrix.detach() for matrix in inverse_mass.values()]
        self.sizes = [matrix.shape[0] for matrix in self.blocks]

    def flat(self, values: dict) -> torch.Tensor:
        return torch.cat([values[name].reshape(-1) for name in self.names])

    def _by_block(self, vector: torch.Tensor, diagonal: Callable, dense: Callable) -> torch.Tensor:
        parts = torch.split(vector, self.sizes)
        return torch.cat(
            [
                diagonal(block, part) if block.dim() == 1 else dense(block, part)
                for block, part in zip(self.blocks, parts)
            ]
        )

    def velocity(self, momentum: torch.Tensor) -> torch.Tensor:
        """``M^-1 r``."""
        return self._by_block(momentum, torch.mul, torch.mv)

    def momentum(self, velocity: torch.Tensor) -> torch.Tensor:
        """``M v``."""
        return self._by_block(
            velocity,
            lambda block, part: part / block,
            lambda block, part: torch.linalg.solve(block, part),
        )

    def kinetic(self, momentum: torch.Tensor) -> torch.Tensor:
        """``0.5 r^T M^-1 r``."""
        return 0.5 * torch.dot(momentum, self.velocity(momentum))


def trajectory_statistics(
    start: Evaluation, leaves: list[Evaluation], step_size: float, inverse_mass: dict
) -> tuple[float, float]:
    """``(energy, acceptance)`` of one NUTS transition from the positions its leapfrog steps
    evaluated.

    ``start`` is the transition's start (its potential and gradient), ``leaves`` the evaluations
    of its leapfrog steps in the order NUTS made them. The first step fixes the orientation
    ("forward" is towards it); its half-step momentum ``M (z_1 - z_0) / eps`` gives the start's
    fresh momentum ``r_0 = M (z_1 - z_0) / eps + eps / 2 * g_0`` and ``energy = U_0 + K(r_0)``,
    the Hamiltonian at the start of the trajectory (what ``az.bfmi`` needs). Each later tree
    doubling extends one end of the trajectory: the one whose next leapfrog position is the
    doubling's first position; along it every step's momentum is fixed by the same relation.
    ``acceptance`` is the mean over the steps of ``min(1, exp(energy - H_i))`` (NaN ``H_i``: 0),
    the acceptance statistic NUTS adapts its step size to. Both are NaN, with a
    :class:`RuntimeWarning`, when the positions do not follow a leapfrog trajectory.
    """
    metric, eps = _Metric(inverse_mass), float(step_size)
    z0, g0 = metric.flat(start.position), metric.flat(start.grads)
    points = [_flat_evaluation(leaf, metric) for leaf in leaves]
    if not points:
        return math.nan, math.nan
    r0 = metric.momentum((points[0][0] - z0) / eps) + 0.5 * eps * g0
    energy = start.potential + metric.kinetic(r0)
    # the ends of the trajectory by direction (-1 left, +1 right): position, forward momentum,
    # gradient; the first step goes right from the start
    ends = {-1: (z0, r0, g0)}
    direction, previous = 1, ends[-1]
    hamiltonians = []
    for index, (z, potential, grads) in enumerate(points):
        if index > 0 and ((index + 1) & index) == 0:  # the first step of doubling 1, 2, 3, ...
            direction = _extended_end(ends, z, eps, metric)
            if direction == 0:
                warnings.warn(
                    "pyromoe could not follow this NUTS trajectory (has Pyro's integrator "
                    "changed?): the draw's energy and acceptance_rate are NaN",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return math.nan, math.nan
            previous = ends[direction]
        momentum = (
            metric.momentum(direction * (z - previous[0]) / eps) - direction * 0.5 * eps * grads
        )
        previous = ends[direction] = (z, momentum, grads)
        hamiltonians.append(potential + metric.kinetic(momentum))
    hamiltonians = torch.stack(hamiltonians)
    hamiltonians = torch.where(torch.isnan(hamiltonians), math.inf, hamiltonians)
    acceptance = torch.exp(energy - hamiltonians).clamp(max=1.0).mean()
    return float(energy), float(acceptance)


def _flat_evaluation(evaluation: Evaluation, metric: _Metric) -> tuple:
    """``(position, potential, gradient)`` flat; a NaN gradient where the potential failed."""
    position = metric.flat(evaluation.position)
    if not evaluation.grads:
        return position, evaluation.potential, torch.full_like(position, math.nan)
    return position, evaluation.potential, metric.flat(evaluation.grads)


def _extended_end(ends: dict, z: torch.Tensor, eps: float, metric: _Metric) -> int:
    """The end (+1 right, -1 left) whose next leapfrog position is ``z``; 0 if neither is."""
    distances = {}
    for direction, (position, momentum, grads) in ends.items():
        step = direction * eps * metric.velocity(momentum - direction * 0.5 * eps * grads)
        distances[direction] = (float((position + step - z).norm()), float(step.norm()))
    best = min(distances, key=lambda direction: distances[direction][0])
    distance, step = distances[best]
    return best if distance <= _POSITION_TOLERANCE * step else 0


# ------------------------------------------------------------------------------------ kernel
class RecordingNUTS(NUTS):
    """NUTS on a :class:`CountedPotential` that returns per-draw statistics with its diagnostics.

    :meth:`sample` records the potential's evaluations during the transition; :func:`record_draw`,
    MCMC's ``hook_fn``, calls :meth:`record_draw` after every iteration with the kernel of the
    process running the chain. ``n_steps`` counts the potential's evaluations in the draw (its
    leapfrog steps); ``tree_depth`` is ``ceil(log2(n_steps + 1))``; ``lp`` is minus the potential
    energy at the draw (log joint density in unconstrained space, as ArviZ's ``lp``).
    ``energy`` is the Hamiltonian at the start of the draw's trajectory, right after the momentum
    is resampled, and ``acceptance_rate`` the draw's mean Metropolis acceptance probability over
    the trajectory (what NUTS adapts the step size to), both from
    :func:`trajectory_statistics`. The Hamiltonian is conserved along the trajectory up to the
    integrator's error, so this is the energy of the draw's level set that Stan, PyMC and NumPyro
    report (they take it at the selected point, which differs by that error) and what
    ``az.bfmi`` / ``az.plot_energy`` need.
    """

    STATS = ("step_size", "n_steps", "tree_depth", "lp", "energy", "acceptance_rate")

    def __init__(self, potential: CountedPotential, **kwargs):
        super().__init__(potential_fn=potential, **kwargs)
        self.potential = potential

    def setup(self, warmup_steps, *args, **kwargs):
        self.draw_stats: dict[str, list] = {name: [] for name in self.STATS}
        self.count_at_setup = self.potential.count
        self.state: Evaluation | None = None
        super().setup(warmup_steps, *args, **kwargs)
        self.count_at_last_draw = self.potential.count

    def sample(self, params):
        start = self.state if self.state is not None and _same(self.state, params) else None
        self.potential.evaluations = evaluations = []
        try:
            state = super().sample(params)
        finally:
            self.potential.evaluations = None
        # the leading evaluations at the start are Pyro recomputing it, not leapfrog steps
        leaves = evaluations
        while leaves and _same(leaves[0], params):
            start, leaves = leaves[0], leaves[1:]
        self.transition = (params, start, leaves)
        self.state = next((leaf for leaf in reversed(leaves) if _same(leaf, state)), None)
        if self.state is None and start is not None and _same(start, state):
            self.state = start
        return state

    def record_draw(self, params: dict, stage: str) -> None:
        count = self.potential.count
        n_steps, self.count_at_last_draw = count - self.count_at_last_draw, count
        if not stage.lower().startswith("sample"):
            return
        start_params, start, leaves = self.transition
        with torch.no_grad():
            if start is None or not start.grads:
                start = self.potential.energy_and_grads(start_params)
            lp = -float(self.potential.energy(params))
            energy, acceptance = trajectory_statistics(
                start, leaves, self.step_size, self.inverse_mass_matrix
            )
        stats = self.draw_stats
        stats["step_size"].append(float(self.step_size))
        stats["n_steps"].append(n_steps)
        stats["tree_depth"].append(math.ceil(math.log2(n_steps + 1)))
        stats["lp"].append(lp)
        stats["energy"].append(energy)
        stats["acceptance_rate"].append(acceptance)

    def diagnostics(self):
        out = super().diagnostics()
        out["draw_stats"] = self.draw_stats
        out["num_gradient_evaluations"] = self.potential.count - self.count_at_setup  # warmup too
        return out


def _same(evaluation: Evaluation, params: dict) -> bool:
    """Whether ``evaluation`` was made at exactly ``params``."""
    return all(torch.equal(evaluation.position[name], value) for name, value in params.items())


def record_draw(kernel, params, stage, i) -> None:
    """MCMC ``hook_fn`` (picklable for worker processes): hand the draw to the kernel."""
    kernel.record_draw(params, stage)

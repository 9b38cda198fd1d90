"""The NUTS kernel of :func:`pyromoe.run_nuts` and the per-draw statistics it records.

Pyro's :class:`~pyro.infer.NUTS` is used through its public interface only: the potential energy
comes in through ``NUTS(potential_fn=...)`` (:class:`CountedPotential`, which counts and records
its evaluations), :meth:`~pyro.infer.mcmc.HMC.setup`, :meth:`~pyro.infer.mcmc.HMC.sample` and
:meth:`~pyro.infer.mcmc.HMC.diagnostics` are the methods MCMC calls (Pyro sends ``diagnostics()``
back from worker processes), the step size and the inverse mass matrix are the kernel's public
``step_size`` and ``inverse_mass_matrix``, and :func:`record_draw` is MCMC's ``hook_fn``.
MCMC gives and reads positions by site; inside, :class:`RecordingNUTS` runs Pyro's NUTS on one
flat site (:class:`FlatSites`, the sites in Pyro's mass-matrix order), so Pyro's per-step loops
over sites run once, with the same momentum draws and so the same trajectories.

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
from contextlib import contextmanager

import torch
from pyro.infer import NUTS
from pyro.infer.autoguide.initialization import init_to_feasible
from pyro.infer.mcmc.util import initialize_model

from .potential import with_gradient

__all__ = [
    "CountedPotential",
    "Evaluation",
    "RecordingNUTS",
    "record_draw",
    "trajectory_statistics",
]

#: how far (relative to the step) a predicted leapfrog position may be from the evaluated one
_POSITION_TOLERANCE = 1e-6


#: the one site Pyro's NUTS sees: every site of the model in one flat vector (:class:`FlatSites`)
FLAT = "_flat"


class FlatSites:
    """The model's sites as one flat vector, in Pyro's order (sorted names).

    Pyro's NUTS loops over the sites of a position in Python at every leapfrog step (the
    integrator, the mass matrix, the U-turn check); given one site it does each once. Its diagonal
    (or dense) mass matrix is one block over the sites in sorted order either way, and its momentum
    is drawn for that block as one vector, so a flat position in the same order gives the same
    trajectories.
    """

    def __init__(self, shapes: dict):
        self.names = sorted(shapes)
        self.shapes = {name: tuple(shapes[name]) for name in self.names}
        self.sizes = [math.prod(self.shapes[name]) for name in self.names]

    def flat(self, params: dict) -> torch.Tensor:
        """The sites' values as one vector (leading batch dimensions, e.g. chains, kept)."""
        parts = []
        for name in self.names:
            value = params[name]
            parts.append(value.reshape(value.shape[: value.dim() - len(self.shapes[name])] + (-1,)))
        return torch.cat(parts, dim=-1)

    def unflat(self, flat: torch.Tensor) -> dict:
        parts = torch.split(flat, self.sizes)
        return {name: part.reshape(self.shapes[name]) for name, part in zip(self.names, parts)}


class Evaluation:
    """One evaluation of the potential: the flat unconstrained position, the potential energy
    there, and its gradient (flat; ``None`` until autograd computes it, and for an evaluation
    without one)."""

    __slots__ = ("position", "potential", "grad")

    def __init__(self, position: torch.Tensor, potential: torch.Tensor, grad=None):
        self.position, self.potential, self.grad = position, potential, grad


class CountedPotential:
    """The model's potential energy on :data:`FLAT`, counting its evaluations (and recording them
    on request).

    The potential is the fused one of :mod:`pyromoe.bayes.potential` when ``fused`` is given
    (a :class:`~pyromoe.bayes.potential.FusedPotential`, which computes its gradient with its
    value: the autograd graph is one node), else ``initialize_model``'s ``potential_fn`` on the
    traced model (``jit_compile`` as asked) of the flat vector's sites. NUTS evaluates it with
    its gradient once per leapfrog step, and in warmup also to search for a step size, so
    :attr:`count` is the sampler's cost in gradient evaluations. While :attr:`evaluations` is a
    list, each call appends an :class:`Evaluation` (the traced potential's gradient caught by a
    tensor hook when Pyro differentiates: no extra work). The traced potential is built where it
    is first used and not pickled: Pyro wraps the model in closures that pickle cannot carry, so
    each spawned worker process builds its own, as Pyro's ``NUTS(model)`` does in ``setup``. The
    fused one is plain tensors and pickles as it is.
    """

    def __init__(self, model, model_args: tuple, transforms: dict, jit_compile: bool, fused=None):
        self.model, self.model_args = model, model_args
        self.transforms, self.jit_compile = transforms, jit_compile
        self.fused = fused
        self.sites = FlatSites(model.site_shapes)
        if fused is not None and list(fused.names) != self.sites.names:
            raise ValueError("the fused potential's flat order must be the sorted site names")
        self.count = 0
        self.evaluations: list[Evaluation] | None = None
        self._potential_fn: Callable | None = None

    @property
    def path(self) -> str:
        """``"fused"`` or ``"traced"``: which potential runs (``attrs["potential"]``)."""
        return "traced" if self.fused is None else "fused"

    def __getstate__(self):
        return {**self.__dict__, "_potential_fn": None, "evaluations": None}

    def _traced(self) -> Callable:
        if self._potential_fn is None:
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
        return self._potential_fn

    def energy(self, theta: torch.Tensor) -> torch.Tensor:
        """The potential energy at the flat unconstrained ``theta``, not counted."""
        if self.fused is not None:
            return self.fused.flat(theta)
        return self._traced()(self.sites.unflat(theta))

    def energy_and_grad(self, theta: torch.Tensor) -> Evaluation:
        """The potential energy and its gradient at ``theta``, not counted."""
        theta = theta.detach()
        if self.fused is not None:
            return Evaluation(theta, *self.fused.value_and_grad(theta))
        position = theta.clone().requires_grad_(True)
        with torch.enable_grad():
            potential = self.energy(position)
            (grad,) = torch.autograd.grad(potential, [position])
        return Evaluation(theta, potential.detach(), grad)

    def __call__(self, params: dict) -> torch.Tensor:
        self.count += 1
        theta = params[FLAT]
        if self.fused is not None:
            value, grad = self.fused.value_and_grad(theta)
            if self.evaluations is not None:
                self.evaluations.append(Evaluation(theta.detach(), value, grad))
            return with_gradient(theta, value, grad)
        if self.evaluations is None:
            return self.energy(theta)
        position = theta.detach()
        try:
            potential = self.energy(theta)
        except Exception:
            # Pyro may handle the error (a NaN leaf); the trajectory still has this position
            self.evaluations.append(Evaluation(position, torch.tensor(math.nan), None))
            raise
        evaluation = Evaluation(position, potential.detach())
        self.evaluations.append(evaluation)
        if theta.requires_grad:
            theta.register_hook(_keep_grad(evaluation))
        return potential


def _keep_grad(evaluation: Evaluation) -> Callable:
    def hook(grad: torch.Tensor) -> None:
        evaluation.grad = grad.detach()

    return hook


# ------------------------------------------------------------------------------------ trajectory
class _Metric:
    """The kinetic energy's metric: the inverse mass matrix by blocks, as the kernel's public
    ``inverse_mass_matrix`` gives it (``{site names: (size,) diagonal or (size, size)}``; one
    block over :data:`FLAT` for :class:`RecordingNUTS`), on flat vectors or rows of them."""

    def __init__(self, inverse_mass: dict):
        self.blocks = [matrix.detach() for matrix in inverse_mass.values()]
        self.sizes = [matrix.shape[0] for matrix in self.blocks]

    def _by_block(self, vector: torch.Tensor, diagonal: Callable, dense: Callable) -> torch.Tensor:
        if len(self.blocks) == 1:
            block = self.blocks[0]
            return diagonal(block, vector) if block.dim() == 1 else dense(block, vector)
        parts = torch.split(vector, self.sizes, dim=-1)
        return torch.cat(
            [
                diagonal(block, part) if block.dim() == 1 else dense(block, part)
                for block, part in zip(self.blocks, parts)
            ],
            dim=-1,
        )

    def velocity(self, momentum: torch.Tensor) -> torch.Tensor:
        """``M^-1 r`` (per row)."""
        return self._by_block(momentum, torch.mul, lambda block, part: part @ block.T)

    def momentum(self, velocity: torch.Tensor) -> torch.Tensor:
        """``M v`` (per row)."""
        return self._by_block(
            velocity,
            lambda block, part: part / block,
            lambda block, part: torch.linalg.solve(block, part.unsqueeze(-1)).squeeze(-1),
        )

    def kinetic(self, momentum: torch.Tensor) -> torch.Tensor:
        """``0.5 r^T M^-1 r`` (per row)."""
        return 0.5 * (momentum * self.velocity(momentum)).sum(-1)


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
    doubling's first position; along it every step's momentum is fixed by the same relation
    (one batched expression per doubling). ``acceptance`` is the mean over the steps of
    ``min(1, exp(energy - H_i))`` (NaN ``H_i``: 0), the acceptance statistic NUTS adapts its step
    size to. Both are NaN, with a :class:`RuntimeWarning`, when the positions do not follow a
    leapfrog trajectory.
    """
    if not leaves:
        return math.nan, math.nan
    metric, eps = _Metric(inverse_mass), float(step_size)
    z0, g0 = start.position, start.grad
    positions = torch.stack([leaf.position for leaf in leaves])
    potentials = torch.stack([torch.as_tensor(leaf.potential).to(z0) for leaf in leaves])
    nan = torch.full_like(z0, math.nan)  # the gradient where the potential failed
    grads = torch.stack([nan if leaf.grad is None else leaf.grad for leaf in leaves])
    r0 = metric.momentum((positions[0] - z0) / eps) + 0.5 * eps * g0
    energy = start.potential + metric.kinetic(r0)
    # the ends of the trajectory by direction (-1 left, +1 right): position, forward momentum,
    # gradient; the first step goes right from the start
    ends = {-1: (z0, r0, g0)}
    hamiltonians = []
    first, direction = 0, 1
    while first < len(leaves):  # doubling j: leaves 2^j - 1 to 2^(j+1) - 2
        last = min(2 * first + 1, len(leaves))
        if first > 0:
            direction = _extended_end(ends, positions[first], eps, metric)
            if direction == 0:
                warnings.warn(
                    "pyromoe could not follow this NUTS trajectory (has Pyro's integrator "
                    "changed?): the draw's energy and acceptance_rate are NaN",
                    RuntimeWarning,
                    stacklevel=2,
                )
                return math.nan, math.nan
        end = z0 if first == 0 else ends[direction][0]  # the first step leaves the start
        previous = torch.cat([end[None], positions[first : last - 1]])
        steps = direction * (positions[first:last] - previous) / eps
        momenta = metric.momentum(steps) - direction * 0.5 * eps * grads[first:last]
        ends[direction] = (positions[last - 1], momenta[-1], grads[last - 1])
        hamiltonians.append(potentials[first:last] + metric.kinetic(momenta))
        first = last
    hamiltonians = torch.cat(hamiltonians)
    hamiltonians = torch.where(torch.isnan(hamiltonians), math.inf, hamiltonians)
    acceptance = torch.exp(energy - hamiltonians).clamp(max=1.0).mean()
    return float(energy), float(acceptance)


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
        if not isinstance(kwargs.get("full_mass", False), bool):
            raise ValueError("RecordingNUTS takes full_mass=True or False (one block of all sites)")
        super().__init__(potential_fn=potential, **kwargs)
        self.potential = potential
        self.sites = potential.sites
        self._inside = False

    # MCMC gives and reads positions by site; Pyro's NUTS inside works on the flat one
    @property
    def initial_params(self):
        params = self._initial_params
        if params and not self._inside:
            return self.sites.unflat(params[FLAT])
        return params

    @initial_params.setter
    def initial_params(self, params):
        if params and FLAT not in params:
            params = {FLAT: self.sites.flat(params)}
        self._initial_params = params

    @contextmanager
    def _flat(self):
        self._inside = True
        try:
            yield
        finally:
            self._inside = False

    def setup(self, warmup_steps, *args, **kwargs):
        self.draw_stats: dict[str, list] = {name: [] for name in self.STATS}
        self.count_at_setup = self.potential.count
        self.state: Evaluation | None = None
        with self._flat():
            super().setup(warmup_steps, *args, **kwargs)
        self.count_at_last_draw = self.potential.count

    def sample(self, params):
        theta = self.sites.flat(params)
        start = self.state if self.state is not None and _at(self.state, theta) else None
        self.potential.evaluations = evaluations = []
        try:
            with self._flat():
                state = super().sample({FLAT: theta})[FLAT]
        finally:
            self.potential.evaluations = None
        # the leading evaluations at the start are Pyro recomputing it, not leapfrog steps
        leaves = evaluations
        while leaves and _at(leaves[0], theta):
            start, leaves = leaves[0], leaves[1:]
        self.transition = (theta, start, leaves)
        self.state = next((leaf for leaf in reversed(leaves) if _at(leaf, state)), None)
        if self.state is None and start is not None and _at(start, state):
            self.state = start
        return self.sites.unflat(state)

    def record_draw(self, params: dict, stage: str) -> None:
        count = self.potential.count
        n_steps, self.count_at_last_draw = count - self.count_at_last_draw, count
        if not stage.lower().startswith("sample"):
            return
        theta, start, leaves = self.transition
        with torch.no_grad():
            if start is None or start.grad is None:
                start = self.potential.energy_and_grad(theta)
            state = self.state
            if state is None:  # not among the evaluations (cannot happen with Pyro's NUTS)
                state = self.potential.energy_and_grad(self.sites.flat(params))
            energy, acceptance = trajectory_statistics(
                start, leaves, self.step_size, self.inverse_mass_matrix
            )
        stats = self.draw_stats
        stats["step_size"].append(float(self.step_size))
        stats["n_steps"].append(n_steps)
        stats["tree_depth"].append(math.ceil(math.log2(n_steps + 1)))
        stats["lp"].append(-float(state.potential))
        stats["energy"].append(energy)
        stats["acceptance_rate"].append(acceptance)

    def diagnostics(self):
        out = super().diagnostics()
        out["draw_stats"] = self.draw_stats
        out["num_gradient_evaluations"] = self.potential.count - self.count_at_setup  # warmup too
        return out


def _at(evaluation: Evaluation, theta: torch.Tensor) -> bool:
    """Whether ``evaluation`` was made at exactly ``theta``."""
    return torch.equal(evaluation.position, theta)


def record_draw(kernel, params, stage, i) -> None:
    """MCMC ``hook_fn`` (picklable for worker processes): hand the draw to the kernel."""
    kernel.record_draw(params, stage)

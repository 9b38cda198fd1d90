"""Checked values: counts, rates, probabilities, flags, seeds, devices, models, and how much
data and memory a request needs.

Each check takes the value and the argument's name, and returns the value in its canonical form
(an int, a float, a bool, a ``torch.device``); errors are ``TypeError`` / ``ValueError`` naming
the argument, the value received and the fix. A check with that ``(value, name)`` signature is a
rule of :func:`pyromoe._validation.rules.validate` as it is.
"""

from __future__ import annotations

import numbers
import os
import secrets
import warnings

import numpy as np
import torch

__all__ = [
    "FALLBACK_MEMORY_BOUND",
    "NOISE_MODELS",
    "PHYSICAL_MEMORY_SHARE",
    "ROWS_PER_PARAMETER_WARN",
    "SEED_BOUND",
    "SUPPORTED_DEVICES",
    "SmallDataWarning",
    "available_devices",
    "check_count",
    "check_device",
    "check_enough_rows",
    "check_flag",
    "check_model",
    "check_noise_model",
    "check_num_experts",
    "check_positive",
    "check_probability",
    "check_request_size",
    "check_seed",
    "child_seed",
    "memory_bound",
    "num_parameters",
]

#: Rule of thumb for point estimates (:func:`check_enough_rows`): below this many rows per free
#: parameter a ``UserWarning`` says the estimate will be noisy. Ten observations per parameter is
#: the usual regression heuristic; EM of a mixture needs at least that, since each expert sees only
#: its share of the rows. Fewer than ``parameters + 1`` rows (or more experts than rows) is refused.
ROWS_PER_PARAMETER_WARN = 10


class SmallDataWarning(UserWarning):
    """Fewer than :data:`ROWS_PER_PARAMETER_WARN` rows per free parameter of a point estimate."""


#: Seeds are ints in ``[0, SEED_BOUND)`` (what ``torch.Generator.manual_seed`` takes as a signed
#: 64-bit value).
SEED_BOUND = 2**63


def check_num_experts(num_experts, minimum: int = 2) -> int:
    """Check that ``num_experts`` is an integer >= ``minimum`` and return it.

    ``minimum=1`` where one expert (a plain regression, the baseline of a comparison) makes
    sense: the model, EM and the inference wrappers; the moment start needs two.
    """
    if isinstance(num_experts, bool) or not isinstance(num_experts, numbers.Integral):
        raise TypeError(
            f"num_experts must be an int >= {minimum}; got {type(num_experts).__name__}"
        )
    if num_experts < minimum:
        why = (
            "a mixture needs at least two experts"
            if minimum == 2
            else "one expert is a plain regression"
        )
        raise ValueError(f"num_experts must be >= {minimum} ({why}); got {num_experts}")
    return int(num_experts)


#: The noise models: one sigma for every expert, or one per expert.
NOISE_MODELS = ("shared", "per_expert")


def check_noise_model(noise_model, name: str = "noise") -> str:
    """Check a noise model name (``"shared"`` or ``"per_expert"``) and return it."""
    if not isinstance(noise_model, str) or noise_model not in NOISE_MODELS:
        raise ValueError(
            f"{name} must be 'shared' (one noise sd) or 'per_expert' (one per expert); got "
            f"{noise_model!r}"
        )
    return noise_model


def check_positive(value, name: str, *, integer: bool = False):
    """Check that ``value`` is a finite number > 0 (a rate, scale or tolerance) and return it.

    With ``integer`` it is a count >= 1: :func:`check_count` with ``minimum=1``.
    """
    if integer:
        return check_count(value, name, minimum=1)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number > 0; got {type(value).__name__} {value!r}")
    if not (value > 0 and np.isfinite(float(value))):
        raise ValueError(f"{name} must be > 0 and finite; got {value}. Pass a positive number.")
    return float(value)


def check_count(value, name: str, minimum: int = 0) -> int:
    """Check that ``value`` is an int (or numpy integer, not bool) >= ``minimum`` and return it.

    The one check for counts: ``num_samples``, ``num_warmup``, ``num_chains``, ``num_steps``,
    ``n_init``, ``max_iter``, ``random_starts``, ``chunk_size``, ``max_tree_depth``...
    """
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(
            f"{name} must be an int >= {minimum}; got {type(value).__name__} {value!r}. "
            f"Pass a whole number, e.g. {name}={max(minimum, 1)}."
        )
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}; got {value}. Pass {name} >= {minimum}.")
    return int(value)


def check_probability(value, name: str) -> float:
    """Check that ``value`` is a number strictly between 0 and 1 and return it."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number in (0, 1); got {type(value).__name__} {value!r}")
    if not 0 < value < 1:
        raise ValueError(
            f"{name} must be strictly between 0 and 1; got {value}. Pass e.g. {name}=0.8."
        )
    return float(value)


def check_flag(value, name: str) -> bool:
    """Check that ``value`` is True or False (numpy bools accepted) and return it."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False; got {type(value).__name__} {value!r}")
    return bool(value)


def check_seed(seed, name: str = "seed") -> int:
    """Check a seed and return it as an int; ``None`` draws a fresh one.

    Accepts an int or numpy integer (not a bool) in ``[0, 2**63)``. ``None`` means fresh entropy:
    a seed is drawn with :func:`secrets.randbits` (63 bits) and returned, so the caller can record
    it (``diagnostics["seed"]`` of an estimate, ``idata.attrs["seed"]``) and the run can be
    reproduced by passing it back.
    """
    if seed is None:
        return secrets.randbits(63)
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise TypeError(
            f"{name} must be an int in [0, 2**63) or None (a fresh random seed); got "
            f"{type(seed).__name__} {seed!r}. Pass e.g. {name}=0."
        )
    seed = int(seed)
    if not 0 <= seed < SEED_BOUND:
        raise ValueError(
            f"{name} must be in [0, 2**63); got {seed}. Pass a seed in that range, e.g. "
            f"{name}={abs(seed) % SEED_BOUND}."
        )
    return seed


def child_seed(seed: int, *key: int) -> int:
    """A seed in ``[0, 2**63)`` derived from a checked ``seed`` for one purpose, named by ``key``.

    The one way to derive seeds from a seed: no arithmetic on ``seed`` (adding one to the largest
    documented seed, ``2**63 - 1``, leaves the range). ``child_seed(seed, i)`` is the seed of
    ``numpy.random.SeedSequence(seed).spawn(n)[i]`` (its spawn key ``(i,)``); longer keys name
    grandchildren (``child_seed(seed, 2, r)`` is child ``r`` of child 2). Different keys give
    independent streams; the same ``(seed, key)`` always gives the same seed.

    Parameters
    ----------
    seed : int
        A seed checked by :func:`check_seed` (an int in ``[0, 2**63)``).
    *key : int
        The child's spawn key: one or more ints >= 0 (at least one).

    Returns
    -------
    int
        A seed in ``[0, 2**63)``, valid wherever ``seed`` is.

    Examples
    --------
    >>> child_seed(2**63 - 1, 1) < 2**63
    True
    >>> child_seed(0, 1) == child_seed(0, 1) != child_seed(0, 2)
    True
    """
    if not key:
        raise ValueError("child_seed needs a key, e.g. child_seed(seed, 1)")
    sequence = np.random.SeedSequence(int(seed), spawn_key=tuple(int(part) for part in key))
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def check_device(device: str | torch.device) -> torch.device:
    """Check that ``device`` names a torch device that exists on this machine; return it.

    Raises
    ------
    TypeError
        For anything but a str or ``torch.device``.
    ValueError
        For a string torch cannot parse (``"gpu0"``), CUDA when ``torch.cuda.is_available()`` is
        False or the index is beyond the devices present, MPS when it is not available, and any
        other device type (``"meta"``, ``"xla"``, ``"xpu"``...): pyromoe computes on ``cpu``,
        ``cuda`` and ``mps`` only (the message lists :func:`available_devices`).
    """
    if isinstance(device, torch.device):
        parsed = device
    elif isinstance(device, str):
        try:
            parsed = torch.device(device)
        except (RuntimeError, ValueError):
            raise ValueError(
                f"device {device!r} is not a torch device string; use 'cpu', 'cuda' or 'cuda:0'"
            ) from None
    else:
        raise TypeError(
            "device must be a str or torch.device (e.g. 'cpu', 'cuda', 'cuda:0'); got "
            f"{type(device).__name__} {device!r}"
        )
    shown = str(device)
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {shown!r} asked for but CUDA is not available on this machine "
                "(torch.cuda.is_available() is False); use device='cpu'"
            )
        count = torch.cuda.device_count()
        if parsed.index is not None and parsed.index >= count:
            raise ValueError(
                f"device {shown!r} asked for but this machine has {count} CUDA device(s) "
                f"(cuda:0 to cuda:{count - 1}); use device='cuda:0'"
            )
    elif parsed.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(
                f"device {shown!r} asked for but MPS is not available on this machine "
                "(torch.backends.mps.is_available() is False); use device='cpu'"
            )
    elif parsed.type != "cpu":
        raise ValueError(
            f"device={shown!r} is not supported: pyromoe computes on {SUPPORTED_DEVICES}; "
            f"available on this machine: {', '.join(map(repr, available_devices()))}. Pass e.g. "
            "device='cpu'."
        )
    return parsed


#: The device types pyromoe computes on, in words (:func:`check_device`).
SUPPORTED_DEVICES = "'cpu', 'cuda' or 'cuda:N' (when CUDA is available) and 'mps' (when available)"
_DEVICE_TYPES = ("cpu", "cuda", "mps")


def available_devices() -> list[str]:
    """The devices :func:`check_device` accepts on this machine: ``"cpu"``, then ``"cuda:0"`` ...
    ``"cuda:N"`` when CUDA is available, then ``"mps"`` when it is available."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def check_model(model) -> None:
    """Check that ``model`` is a model instance (a :class:`pyromoe.MixtureOfExperts`, or alike)."""
    if isinstance(model, type):
        raise TypeError(
            f"model must be an instance, e.g. {model.__name__}(in_features=..., "
            f"num_experts=...); got the class {model.__name__}"
        )
    if not callable(model) or not callable(getattr(model, "log_likelihood", None)):
        raise TypeError(
            "model must be a pyromoe.MixtureOfExperts (a Pyro model with .log_likelihood(x, y, "
            f"params) and .link); got {type(model).__name__}"
        )


# ------------------------------------------------------------------------ how much data
def num_parameters(in_features: int, num_experts: int, bias: bool = True) -> int:
    """Number of free scalar parameters of :class:`pyromoe.MixtureOfExperts`.

    ``k d`` expert weights, ``(k - 1) d`` gate weights, the noise, and with ``bias`` ``k`` expert
    intercepts and ``k - 1`` gate offsets.
    """
    k, d = num_experts, in_features
    return k * d + (k - 1) * d + 1 + ((2 * k - 1) if bias else 0)


def check_enough_rows(
    n: int, parameters: int, num_experts: int, *, model: str, stacklevel: int = 3
) -> None:
    """Refuse a point estimate that can only interpolate; warn when the data are thin.

    ``model`` describes what is fitted (e.g. ``"2 experts on 3 inputs"``) for the messages.

    Raises
    ------
    ValueError
        ``num_experts > n``, or ``n < parameters + 1`` (the fit would interpolate the data and
        drive the noise to 0).

    Warns
    -----
    SmallDataWarning
        (a ``UserWarning``) when ``n < ROWS_PER_PARAMETER_WARN * parameters``.
    """
    fix = "use more rows, fewer experts or fewer inputs"
    if num_experts > n:
        raise ValueError(
            f"num_experts={num_experts} exceeds the number of rows n={n} (x has {n} rows): some "
            f"experts would have no data; {fix}"
        )
    if n < parameters + 1:
        raise ValueError(
            f"x has n={n} rows but {model} has {parameters} free parameters: a point estimate "
            f"needs n >= {parameters + 1} rows (with fewer it interpolates the data and the "
            f"noise collapses to 0); {fix}"
        )
    if n < ROWS_PER_PARAMETER_WARN * parameters:
        warnings.warn(
            f"x has n={n} rows for the {parameters} free parameters of {model} "
            f"({n / parameters:.1f} rows per parameter, under the rule of thumb of "
            f"{ROWS_PER_PARAMETER_WARN}): the estimate will be noisy; {fix}",
            SmallDataWarning,
            stacklevel=stacklevel,
        )


# ------------------------------------------------------------------------ how much memory
#: Without psutil, the share of physical memory one request may take (:func:`memory_bound`).
PHYSICAL_MEMORY_SHARE = 0.25
#: The bound when neither psutil nor ``os.sysconf`` can tell the memory (8 GiB).
FALLBACK_MEMORY_BOUND = 8 * 2**30


def _format_bytes(size: float) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def memory_bound(device: torch.device | None = None) -> tuple[int, str]:
    """The most bytes one request may allocate, and where that bound comes from (for messages).

    The host's available memory (``psutil.virtual_memory().available`` when psutil is installed,
    else :data:`PHYSICAL_MEMORY_SHARE` of the physical memory from ``os.sysconf``, else
    :data:`FALLBACK_MEMORY_BOUND`); on a CUDA ``device`` also at most its free memory
    (``torch.cuda.mem_get_info``), since the draws are made there before they come to the host.
    """
    try:
        import psutil

        bound, where = int(psutil.virtual_memory().available), "the memory available on this host"
    except ImportError:
        try:
            physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            bound = int(PHYSICAL_MEMORY_SHARE * physical)
            where = f"{PHYSICAL_MEMORY_SHARE:.0%} of this host's physical memory"
        except (AttributeError, ValueError, OSError):
            bound, where = FALLBACK_MEMORY_BOUND, "the fixed bound without psutil"
    if device is not None and torch.device(device).type == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        if free < bound:
            bound, where = int(free), f"the free memory of {device}"
    return bound, where


def check_request_size(
    name: str, value: int, per_unit: int, *, what: str, fix: str, device=None
) -> None:
    """Refuse a request of ``value`` units (``name``, e.g. ``num_samples``) of ``per_unit`` bytes
    each when it exceeds :func:`memory_bound`, before anything is allocated.

    Parameters
    ----------
    name, value : str, int
        The argument and its checked value.
    per_unit : int
        Estimated bytes held per unit (e.g. per draw: its parameters and ``y`` for every row, times
        the copies kept at once).
    what : str
        What is allocated, for the message (``"prior draws of y for 40 rows"``).
    fix : str
        How to ask for less (``"pass fewer num_samples or fewer rows of x"``).
    device : torch.device, optional
        Where the arrays are made (a CUDA device's free memory bounds them too).

    Raises
    ------
    ValueError
        Naming ``name``, the estimated size, the bound, the largest value that fits, and ``fix``.

    Examples
    --------
    >>> check_request_size("num_samples", 500, 8 * 1000, what="draws", fix="pass fewer")
    """
    needed = float(value) * float(per_unit)
    bound, where = memory_bound(device)
    if needed > bound:
        largest = max(0, bound // max(1, int(per_unit)))
        raise ValueError(
            f"{name}={value} needs about {_format_bytes(needed)} for {what}, more than "
            f"{_format_bytes(bound)} ({where}); {fix} ({name} <= {largest} fits)"
        )

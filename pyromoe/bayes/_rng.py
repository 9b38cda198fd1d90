"""Seeded randomness that leaves the caller's global random state as it was.

Pyro draws from the global generators (torch, and for some utilities ``random`` and ``numpy``), so
its wrappers cannot be handed a ``torch.Generator``. :func:`seeded_rng` gives them the same effect:
inside the block the global generators are seeded from ``seed`` (what ``pyro.set_rng_seed`` does),
and on leaving it every one of them is back in the state it had before, so a user's own stream of
random numbers is not reset by a fit.
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

__all__ = ["seeded_rng"]


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device | str | None = None):
    """Seed torch, ``random`` and ``numpy.random`` from ``seed`` in the block; restore them after.

    Parameters
    ----------
    seed : int
        A checked seed in ``[0, 2**63)``; numpy's global generator takes ``seed % 2**32``.
    device : torch.device or str, optional
        The device of the data. A CUDA device's generator is seeded and restored as well (torch's
        CPU generator always is); other CUDA devices are left alone.

    Examples
    --------
    >>> _ = torch.manual_seed(1); expected = torch.rand(())
    >>> _ = torch.manual_seed(1)
    >>> with seeded_rng(0):
    ...     _ = torch.randn(3)
    >>> bool(torch.rand(()) == expected)
    True
    """
    device = torch.device("cpu" if device is None else device)
    devices: list[int] = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    random_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        with torch.random.fork_rng(devices=devices, device_type="cuda"):
            torch.default_generator.manual_seed(seed)
            for index in devices:
                with torch.cuda.device(index):
                    torch.cuda.manual_seed(seed)
            random.seed(seed)
            np.random.seed(seed % 2**32)
            yield
    finally:
        random.setstate(random_state)
        np.random.set_state(numpy_state)

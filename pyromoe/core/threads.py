"""torch's intra-op thread count for the duration of one call: the ``num_threads`` parameter.

Every fitting entry point (``fit_em``, ``fit_gate``, ``tensor_init``, ``initialize``, and the
Bayesian ``fit_map``, ``fit_svi``, ``run_nuts``) takes ``num_threads: int | None`` and documents it
as: torch threads for the call (None: leave torch's setting; 1 is fastest for small data on a
shared machine).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from .._validation import check_count


def check_num_threads(num_threads, name: str = "num_threads") -> int | None:
    """``None`` or an int >= 1 (:func:`pyromoe._validation.check_count`)."""
    return None if num_threads is None else check_count(num_threads, name, minimum=1)


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op threads (restored afterwards); ``None`` changes nothing."""
    if num_threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)

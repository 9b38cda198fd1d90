"""Shared test set-up.

Thread policy: the whole suite runs torch single-threaded (set here, at import, for the pytest
process; ``run.py test`` also exports ``OMP_NUM_THREADS=1`` so the notebook kernels nbmake starts
do the same). The test data are small and the machines shared, where one thread is fastest; the
library's own ``num_threads`` parameters (``fit_em``, ``fit_gate``, ``tensor_init``,
``initialize``, ``fit_map``, ``fit_svi``, ``run_nuts``) set threads per call.
"""

import os

import pyro
import pytest
import torch

os.environ.setdefault("OMP_NUM_THREADS", "1")  # for subprocesses the tests start (CLI tests)
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_pyro_state():
    """Each test starts with an empty param store, a fixed seed and one torch thread."""
    if torch.get_num_threads() != 1:  # a test that set threads without restoring them
        torch.set_num_threads(1)
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()

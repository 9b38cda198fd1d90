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


@pytest.fixture(scope="session")
def quick_nuts():
    """``run_nuts`` for a short test run: ``quick_nuts(model, x, y, init, num_chains=..,
    num_warmup=.., num_samples=.., **overrides)``.

    Each test gives its own chains, warmup and draws; the defaults are what a test rarely wants
    from a sampler run: no progress bar and no posterior predictive (``overrides`` may set either,
    or any other ``run_nuts`` argument).
    """
    from pyromoe import run_nuts

    def run(model, x, y, init, *, num_chains, num_warmup, num_samples, **overrides):
        options = {"progress": False, "posterior_predictive": False, **overrides}
        return run_nuts(
            model,
            x,
            y,
            init=init,
            num_chains=num_chains,
            num_warmup=num_warmup,
            num_samples=num_samples,
            **options,
        )

    return run

"""The layers: `import pyromoe` is light, and the estimators need neither Pyro, ArviZ nor matplotlib."""

from __future__ import annotations

import subprocess
import sys

import pytest

import pyromoe

BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked in this test")
sys.meta_path.insert(0, Block())
"""


def _run(code: str, blocked=()) -> subprocess.CompletedProcess:
    script = BLOCKER.format(blocked=set(blocked)) + code
    return subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )


def test_help_imports_no_torch():
    result = _run(
        "from pyromoe.app.cli import main\n"
        "try:\n    main(['fit', '--help'])\nexcept SystemExit as stop:\n    assert stop.code == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'pyro', 'arviz', 'matplotlib', 'numpy', 'pandas', 'scipy'))\n"
        "print('heavy:', heavy)\n",
        blocked=("torch",),
    )
    assert result.returncode == 0, result.stderr
    assert "--target" in result.stdout and "heavy: []" in result.stdout


def test_estimators_run_without_pyro_arviz_or_matplotlib():
    result = _run(
        "import pyromoe\n"
        "data = pyromoe.simulate(3000, 3, num_experts=2, seed=0)\n"
        "moment = pyromoe.tensor_init(data.x, data.y, 2, seed=0)\n"
        "gate = pyromoe.fit_gate(data.x, data.y, moment.experts_weight, moment.experts_bias, 'linear')\n"
        "em = pyromoe.fit_em(data.x, data.y, 2, n_init=2, seed=0)\n"
        "auto = pyromoe.initialize(data.x, data.y, 2, seed=0)\n"
        "error = pyromoe.parameter_errors(auto, data.truth)['experts']\n"
        "print('error', error, auto.diagnostics['initializer'])\n",
        blocked=("pyro", "arviz", "matplotlib"),
    )
    assert result.returncode == 0, result.stderr
    assert float(result.stdout.split()[1]) < 0.2


def test_public_names_resolve_lazily_and_completely():
    for name in pyromoe.__all__:
        assert getattr(pyromoe, name) is not None
    with pytest.raises(AttributeError, match="has no attribute 'nothing_here'"):
        pyromoe.nothing_here  # noqa: B018

"""The layers: `import pyromoe` is light, the estimators need neither Pyro, ArviZ nor matplotlib, and
no module imports a later layer (docs/architecture.md)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

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


# ------------------------------------------------------------------------------ the import rule
PACKAGE = Path(pyromoe.__file__).parent

#: each layer -> the layers its modules may import (their own included); the package root
#: (``__init__``, ``__main__``: the public API above them all) may import anything and is not checked
MAY_IMPORT = {
    "_version": {"_version"},
    "_validation": {"_version", "_validation"},
    "core": {"_version", "_validation", "core"},
    "spec": {"_version", "_validation", "core", "spec"},
    "estimators": {"_version", "_validation", "core", "spec", "estimators"},
    "bayes": {"_version", "_validation", "core", "spec", "estimators", "bayes"},
    "app": {"_version", "_validation", "core", "spec", "estimators", "bayes", "app", "datasets"},
    "datasets": {"_version", "datasets"},
}
#: names of the package root that are no layer: none (the version is `pyromoe._version`)
ROOT_CONSTANTS: set[str] = set()


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _layer(module: str) -> str:
    """``pyromoe.core.em`` -> ``core``; ``pyromoe`` and ``pyromoe.__main__`` -> ``pyromoe``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] != "__main__" else "pyromoe"


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool) -> list[str]:
    """The pyromoe modules an import statement names, relative imports resolved."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names if alias.name.split(".")[0] == "pyromoe"]
    if node.level:
        base = module.split(".")
        base = base if is_package else base[:-1]
        base = base[: len(base) - node.level + 1]
        target = ".".join([*base, node.module] if node.module else base)
    else:
        target = node.module or ""
    if target.split(".")[0] != "pyromoe":
        return []
    if target != "pyromoe":
        return [target]
    # `from .. import x` in a subpackage: x is a subpackage, or a name of the package root
    return [f"pyromoe.{alias.name}" for alias in node.names if alias.name not in ROOT_CONSTANTS]


def _layer_violations(module: str, source: str, is_package: bool = False) -> list[str]:
    layer = _layer(module)
    if layer == "pyromoe":
        return []
    tree = ast.parse(source)
    found = []
    for node in ast.walk(tree):  # imports inside functions too: a lazy import is no way around
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        allowed = MAY_IMPORT[layer]
        for target in _imported(node, module, is_package):
            if _layer(target) not in allowed:
                found.append(f"{module} (line {node.lineno}, layer {layer}) imports {target}")
    return found


def test_no_module_imports_a_later_layer():
    modules = sorted(PACKAGE.rglob("*.py"))
    assert len(modules) > 20  # the walk found the package
    violations = [
        violation
        for path in modules
        for violation in _layer_violations(
            _module_name(path), path.read_text(encoding="utf-8"), path.name == "__init__.py"
        )
    ]
    assert violations == []


def _runtime_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """Every import statement that runs (those under ``if TYPE_CHECKING:`` do not)."""
    typing_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test).endswith("TYPE_CHECKING")
        for statement in block.body
        for node in ast.walk(statement)
    }
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, (ast.Import, ast.ImportFrom)) and id(node) not in typing_only
    ]


def test_no_import_circle():
    """No module imports itself back through others (lazy imports inside functions included):
    the modules form a strict order, as the flow of the data does."""
    paths = {_module_name(path): path for path in PACKAGE.rglob("*.py")}
    graph = {}
    for module, path in paths.items():
        targets = set()
        for node in _runtime_imports(ast.parse(path.read_text(encoding="utf-8"))):
            for target in _imported(node, module, path.name == "__init__.py"):
                names = [alias.name for alias in getattr(node, "names", [])]
                submodules = {f"{target}.{name}" for name in names} & set(paths)
                targets |= submodules or ({target} & set(paths))
        graph[module] = targets - {module, "pyromoe"}

    def circle_from(start: str) -> list[str] | None:
        path, seen = [start], set()

        def walk(module: str) -> list[str] | None:
            for target in sorted(graph[module]):
                if target == start:
                    return [*path, start]
                if target not in seen:
                    seen.add(target)
                    path.append(target)
                    if found := walk(target):
                        return found
                    path.pop()
            return None

        return walk(start)

    circles = [found for module in sorted(graph) if (found := circle_from(module))]
    assert circles == []


@pytest.mark.parametrize(
    "module, source, allowed",
    [
        ("pyromoe.core.em", "from ..bayes import model", False),
        ("pyromoe.core.em", "def f():\n    from ..estimators.initialize import initialize", False),
        ("pyromoe.core.em", "from .. import app", False),
        ("pyromoe.core.em", "import pyromoe.bayes.nuts", False),
        ("pyromoe.estimators.initialize", "from ..core.em import fit_em", True),
        ("pyromoe.bayes.svi", "from ..datasets import load_mcycle", False),
        ("pyromoe.datasets", "from ..app.table import parse_table", False),
        ("pyromoe.datasets", "import pandas as pd", True),
        ("pyromoe._validation", "from .core.links import get_link", False),
        ("pyromoe._validation", "def f():\n    from .core.links import get_link", False),
        ("pyromoe.core.em.loop", "from ...estimators.em import fit_em", False),
        ("pyromoe.core.em.starts", "from ..links import check_link", True),
        ("pyromoe.app.results", "def f():\n    from .. import __version__", False),
        ("pyromoe.app.results", "from .._version import __version__", True),
        ("pyromoe.app.cli", "from .fitting import run_fit", True),
        ("pyromoe", "from .bayes.nuts import run_nuts", True),
        ("pyromoe.core.links", "from .. import sites", False),
    ],
)
def test_layer_rule_checker_tells_upward_imports_apart(module, source, allowed):
    is_package = module in ("pyromoe", "pyromoe.datasets")
    assert (_layer_violations(module, source, is_package) == []) is allowed

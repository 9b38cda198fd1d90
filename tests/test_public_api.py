"""What the tutorials and the README show is public: they import only `pyromoe`, its public names
(`pyromoe.__all__`) and its public modules, so moving a private module cannot break them."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest

import pyromoe

ROOT = Path(__file__).resolve().parent.parent
PUBLIC_MODULES = {f"pyromoe.{name}" for name in pyromoe._MODULES}


def _examples() -> list[tuple[str, str]]:
    """(where, code) of every tutorial code cell and every ```python block of the README."""
    found = []
    for path in sorted((ROOT / "tutorials").glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        for number, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                source = "".join(cell["source"])
                # IPython magics and shell lines are not Python
                source = "\n".join(
                    line for line in source.splitlines() if not line.lstrip().startswith(("%", "!"))
                )
                found.append((f"{path.name} cell {number}", source))
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for number, block in enumerate(re.findall(r"```python\n(.*?)```", readme, re.S)):
        found.append((f"README.md python block {number}", block))
    return found


def _private_uses(code: str) -> list[str]:
    """The non-public pyromoe names an example imports or reaches as ``pyromoe.x``."""
    bad = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top = alias.name.split(".")[0]
                if (
                    top == "pyromoe"
                    and alias.name != "pyromoe"
                    and alias.name not in PUBLIC_MODULES
                ):
                    bad.append(f"import {alias.name}")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "pyromoe":
            if node.module == "pyromoe":
                bad += [
                    f"from pyromoe import {a.name}"
                    for a in node.names
                    if a.name not in pyromoe.__all__
                ]
            elif node.module not in PUBLIC_MODULES:
                bad.append(f"from {node.module} import ...")
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name)
            and node.value.id == "pyromoe"
            and node.attr not in pyromoe.__all__
            and not node.attr.startswith("__")
        ):
            bad.append(f"pyromoe.{node.attr}")
    return bad


def test_the_examples_were_found():
    places = [where for where, _ in _examples()]
    assert sum("ipynb" in where for where in places) >= 10
    assert sum("README" in where for where in places) >= 1


@pytest.mark.parametrize("where, code", _examples(), ids=[w for w, _ in _examples()])
def test_examples_use_only_public_names(where, code):
    assert _private_uses(code) == [], where


@pytest.mark.parametrize(
    "code, bad",
    [
        ("import pyromoe\npyromoe.initialize", []),
        ("from pyromoe import plots, relabel", []),
        ("from pyromoe.app.demo import compare_starts", ["from pyromoe.app.demo import ..."]),
        ("import pyromoe.core.em", ["import pyromoe.core.em"]),
        ("import pyromoe\npyromoe.core.em.fit_em", ["pyromoe.core"]),
        ("from pyromoe import _EXPORTS", ["from pyromoe import _EXPORTS"]),
    ],
)
def test_the_checker_tells_private_uses(code, bad):
    assert _private_uses(code) == bad


def test_every_public_name_resolves_and_the_version_comes_from_the_metadata():
    from importlib.metadata import version

    for name in pyromoe.__all__:
        assert getattr(pyromoe, name) is not None, name
    assert pyromoe.__version__ == version("pyromoe")

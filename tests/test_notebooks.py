"""The tutorials' stored outputs come from the current code: each notebook carries the stamp that
tutorials/execute.py writes (the pyromoe version and a SHA-256 of the package source)."""

import importlib.util
import json
from pathlib import Path

import nbformat
import pytest

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
RERUN = "re-run python tutorials/execute.py"


def _executor():
    spec = importlib.util.spec_from_file_location("tutorials_execute", TUTORIALS / "execute.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


execute = _executor()


def test_there_are_tutorials():
    assert len(NOTEBOOKS) >= 4


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_tutorial_outputs_come_from_the_current_source(path):
    stamp = json.loads(path.read_text())["metadata"].get(execute.STAMP_KEY)
    assert stamp is not None, f"{path.name} has no execution stamp: {RERUN}"
    current = execute.current_stamp()
    assert stamp["version"] == current["version"], (
        f"{path.name} was executed with pyromoe {stamp['version']}, the source is "
        f"{current['version']}: {RERUN}"
    )
    assert stamp["source_sha256"] == current["source_sha256"], (
        f"{path.name} was executed on other pyromoe source than the current one: {RERUN}"
    )


def test_source_hash_follows_content_only(tmp_path):
    package = tmp_path / "pkg"
    (package / "sub").mkdir(parents=True)
    (package / "a.py").write_text("x = 1\n")
    (package / "sub" / "b.py").write_text("y = 2\n")
    (package / "notes.txt").write_text("not source")
    first = execute.source_sha256(package)
    assert len(first) == 64
    (package / "notes.txt").write_text("changed")  # not a .py file: same hash
    assert execute.source_sha256(package) == first
    (package / "sub" / "b.py").write_text("y = 3\n")
    assert execute.source_sha256(package) != first


def test_executor_runs_a_notebook_in_place_and_stamps_it(tmp_path):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("import os\nprint(os.environ['OMP_NUM_THREADS'])")]
    path = tmp_path / "tiny.ipynb"
    nbformat.write(notebook, path)
    execute.execute_notebook(path, timeout=60)
    result = nbformat.read(path, as_version=4)
    assert result.cells[0].outputs[0]["text"] == "1\n"
    assert result.metadata[execute.STAMP_KEY] == execute.current_stamp()
    assert [p.name for p in tmp_path.iterdir()] == ["tiny.ipynb"]  # no temporary file left


def test_executor_leaves_a_failing_notebook_unchanged(tmp_path, capsys):
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell("raise ValueError('boom')")]
    path = tmp_path / "broken.ipynb"
    nbformat.write(notebook, path)
    before = path.read_bytes()
    assert execute.main([str(path)]) == 1
    assert path.read_bytes() == before
    assert "FAILED broken.ipynb" in capsys.readouterr().err

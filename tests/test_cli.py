import subprocess
import sys

from pyromoe.cli import main


def test_help_lists_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "pyromoe.cli", "--help"], capture_output=True, text=True, check=True
    )
    assert "demo" in result.stdout


def test_demo_quick_runs_and_prints_a_parameter_table(capsys):
    assert main(["demo", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "expert 0: weight" in out and "expert 1: weight" in out

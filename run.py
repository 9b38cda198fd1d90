#!/usr/bin/env python3
"""Set-up and entry point for a fresh clone: `python3 run.py demo` or `python3 run.py test`.

Creates `.venv/` on first use, installs torch 2.13.0 (on these machines a local CPU build; install
torch yourself first if you want another build) and then `pip install -e ".[test]"`, and runs
the demo or the whole test suite (unit tests, slow statistical checks and the tutorial notebooks).
Extra arguments are passed on: `python3 run.py demo --quick`, `python3 run.py test -m "not slow"`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
TORCH = "torch==2.13.0"


def _stamp() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode()).hexdigest()


def ensure_environment() -> None:
    marker = VENV / ".pyromoe-installed"
    if marker.exists() and marker.read_text() == _stamp():
        return
    if not PYTHON.exists():
        print(f"[run.py] creating {VENV}", flush=True)
        venv.create(VENV, with_pip=True)
    pip = [str(PYTHON), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    print(f"[run.py] installing {TORCH}", flush=True)
    subprocess.run([*pip, TORCH], check=True)
    print("[run.py] installing pyromoe with its test extras", flush=True)
    subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
    marker.write_text(_stamp())


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("demo", "test"):
        print(__doc__)
        return 2
    ensure_environment()
    command, rest = argv[0], argv[1:]
    env = dict(os.environ, MPLBACKEND="Agg")
    if command == "demo":
        return subprocess.run([str(BIN / "pyromoe"), "demo", *rest], cwd=ROOT, env=env).returncode
    # one thread policy for the tests: torch runs single-threaded (tests/conftest.py sets it for
    # the pytest process; OMP_NUM_THREADS covers the notebook kernels nbmake starts, which inherit
    # this environment). The data are small and the machines shared: one thread is fastest.
    env["OMP_NUM_THREADS"] = "1"
    # a notebook cell may run NUTS for a few minutes on a slow 2-core machine: 600 s per cell
    tests = [str(PYTHON), "-m", "pytest", "--nbmake", "--nbmake-timeout=600"]
    # one pytest-xdist worker per core (each single-threaded, see above), work stealing so the
    # long statistical checks and notebooks spread over the workers; "-n 0" in the extra
    # arguments runs everything in this one process instead
    if not any(arg.startswith(("-n", "--numprocesses")) for arg in rest):
        tests += ["-n", str(max(1, min(os.cpu_count() or 1, 8))), "--dist", "worksteal"]
    # the notebooks (minutes each) first, so the workers share them while the short tests fill in
    tests += ["tutorials", "tests", *rest]
    return subprocess.run(tests, cwd=ROOT, env=env).returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Execute the tutorials in place and stamp each with the code it ran on.

    .venv/bin/python tutorials/execute.py                 # every tutorials/*.ipynb
    .venv/bin/python tutorials/execute.py 02_why_initialization_matters.ipynb

Each notebook runs top to bottom with nbclient in a fresh ``python3`` kernel started in
``tutorials/`` with ``OMP_NUM_THREADS=1`` (one torch thread: small problems on shared cores) and
matplotlib's inline backend (the figures are kept as outputs; ``MPLBACKEND=Agg`` would drop them).
On success the notebook's metadata gets a stamp, ``metadata["pyromoe"]``: the pyromoe version and
:func:`source_sha256` of the package source it ran on, and the notebook is written back atomically
(a temporary file beside it, then ``os.replace``). A notebook whose execution fails is left as it
was and the script exits with status 1, naming it.

``tests/test_notebooks.py`` compares every tutorial's stamp with the current source, so a notebook
whose outputs came from other code fails the tests until this script is run again.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path

TUTORIALS = Path(__file__).resolve().parent
ROOT = TUTORIALS.parent
PACKAGE = ROOT / "pyromoe"
STAMP_KEY = "pyromoe"
#: matplotlib's backend for the kernel: inline, so that figures become outputs
KERNEL_BACKEND = "module://matplotlib_inline.backend_inline"
CELL_TIMEOUT_S = 900


def source_sha256(package: Path = PACKAGE) -> str:
    """SHA-256 of the package source: every ``*.py`` file under ``package``, sorted by relative
    path, each file's content hashed and the digests hashed in that order (content only: no
    modification times, so a fresh clone gives the same value)."""
    total = hashlib.sha256()
    files = sorted(package.rglob("*.py"), key=lambda path: path.relative_to(package).as_posix())
    for path in files:
        total.update(hashlib.sha256(path.read_bytes()).digest())
    return total.hexdigest()


def package_version() -> str:
    sys.path.insert(0, str(ROOT))
    try:
        from pyromoe._version import __version__
    finally:
        sys.path.pop(0)
    return __version__


def current_stamp() -> dict[str, str]:
    """What a notebook executed now would be stamped with."""
    return {"version": package_version(), "source_sha256": source_sha256()}


def write_notebook_atomic(notebook, path: Path) -> None:
    """Write ``notebook`` (an nbformat node) to ``path`` via a temporary file and ``os.replace``."""
    import nbformat

    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            nbformat.write(notebook, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def execute_notebook(path: Path, timeout: int = CELL_TIMEOUT_S) -> float:
    """Run ``path`` in place and stamp it; returns the seconds it took."""
    import nbformat
    from nbclient import NotebookClient

    env = {**os.environ, "OMP_NUM_THREADS": "1", "MPLBACKEND": KERNEL_BACKEND}
    stamp = current_stamp()  # before running: the code the outputs come from
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        record_timing=False,  # no per-cell timestamps: a re-run changes only what the code printed
        resources={"metadata": {"path": str(path.parent)}},
    )
    start = time.perf_counter()
    client.execute(env=env)  # the kernel's environment; this process's is left alone
    seconds = time.perf_counter() - start
    if stamp != current_stamp():  # stamped with the code it started on: the test will say so
        print(f"  warning: the pyromoe source changed while {path.name} ran", file=sys.stderr)
    notebook.metadata[STAMP_KEY] = stamp
    write_notebook_atomic(notebook, path)
    return seconds


def main(argv: list[str]) -> int:
    names = argv or sorted(p.name for p in TUTORIALS.glob("*.ipynb"))
    paths = [Path(name) if Path(name).exists() else TUTORIALS / name for name in names]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        print(f"no such notebook: {', '.join(missing)}", file=sys.stderr)
        return 2
    links = [str(p) for p in paths if p.is_symlink()]
    if links:  # os.replace would put a file where the link was: never act on a link
        print(
            f"refusing symbolic links (name the notebook itself): {', '.join(links)}",
            file=sys.stderr,
        )
        return 2
    failed = []
    for path in paths:
        print(f"executing {path.name} ...", flush=True)
        try:
            seconds = execute_notebook(path)
        except Exception as error:  # report every notebook, then fail
            failed.append(path.name)
            print(f"FAILED {path.name}: {type(error).__name__}: {error}", file=sys.stderr)
            continue
        print(f"  {path.name}: {seconds:.0f} s, stamped", flush=True)
    if failed:
        print(f"failed (left unchanged): {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""Atomic files: a crash, an exception or Ctrl-C never leaves a partial file at the requested path.

:func:`atomic_path` yields a temporary sibling and renames it onto the path only when the block
succeeded; :func:`write_text_atomic`, :func:`save_figure_atomic` and :func:`write_netcdf_atomic` are
built on it. :class:`Interrupted` turns SIGTERM and SIGHUP into a ``KeyboardInterrupt`` while results
are written, so every signal takes Ctrl-C's clean-up path. Results folders are :mod:`.results`.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

__all__ = [
    "atomic_path",
    "write_text_atomic",
    "save_figure_atomic",
    "write_netcdf_atomic",
    "Interrupted",
]


def _sibling(path: Path, tag: str) -> Path:
    """A fresh hidden name next to ``path`` (same folder, hence same file system: rename is atomic).

    The extension is kept so that writers choosing a format from it (matplotlib, NetCDF) still do.
    """
    return path.with_name(f".{path.stem}.{tag}-{secrets.token_hex(4)}{path.suffix}")


def _fsync_directory(directory: Path) -> None:
    # Makes a rename durable on POSIX; not possible (nor needed) everywhere, so best effort.
    with contextlib.suppress(OSError, AttributeError):
        descriptor = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def _make_parents(directory: Path) -> list[Path]:
    """mkdir -p ``directory``; return the folders created, deepest last."""
    created: list[Path] = []
    for folder in reversed([directory, *directory.parents]):
        if not folder.exists():
            folder.mkdir()
            created.append(folder)
    return created


def _remove_empty(folders: list[Path]) -> None:
    for folder in reversed(folders):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only succeeds if still empty: never removes anything else


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; move it onto ``path`` only if the block succeeds.

    Write the file (any format, any writer) to the yielded path. When the block ends without an
    exception the file replaces ``path`` in one ``os.replace`` (atomic on POSIX and Windows on one
    file system); on any exception, ``KeyboardInterrupt`` included, the temporary file is removed and
    ``path`` is left as it was. Missing parent folders are created (and removed again on failure).

    Parameters
    ----------
    path : str or os.PathLike
        The final file path. Its extension is kept on the temporary name.

    Yields
    ------
    pathlib.Path
        A hidden path in the same folder, ``.<stem>.tmp-<random><suffix>``.

    Raises
    ------
    ValueError
        If ``path`` is an existing folder.
    RuntimeError
        If the block did not create the temporary file.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "numbers.txt"
    >>> with atomic_path(target) as tmp:
    ...     _ = tmp.write_text("1 2 3")
    >>> target.read_text()
    '1 2 3'
    """
    path = _named(path)
    if path.is_dir():
        raise ValueError(f"cannot write file '{path}': a folder of that name exists")
    created = _make_parents(path.parent)
    temporary = _sibling(path, "tmp")
    try:
        yield temporary
        if not temporary.exists():
            raise RuntimeError(
                f"nothing was written to the temporary file for '{path}'; write to the path "
                "yielded by atomic_path, not to the final path"
            )
        os.replace(temporary, path)
    except OSError as error:
        with contextlib.suppress(OSError):
            temporary.unlink()
        _remove_empty(created)
        raise _naming(error, path, temporary) from error
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        _remove_empty(created)
        raise
    _fsync_directory(path.parent)


def _naming(error: OSError, path: Path, temporary: Path) -> OSError:
    """``error`` as an OSError that names ``path`` (never the hidden temporary file)."""
    number = error.errno if isinstance(error.errno, int) else None
    text = str(error).replace(str(temporary), str(path))
    if str(path) not in text:
        text = f"could not write '{path}': {os.strerror(number) if number else text}"
    elif text == str(error):
        return error
    if number is None:
        return type(error)(text)
    return type(error)(number, text.replace(f"[Errno {number}] ", "", 1))


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically and return ``path``: the file holds either the old or
    the new text.

    The new contents are written and flushed to disk under a temporary name in the same folder,
    then renamed onto ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; parent folders are created.
    text : str
        The full contents.
    encoding : str, default "utf-8"

    Raises
    ------
    TypeError
        If ``text`` is not a str.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "summary.md"
    >>> write_text_atomic(target, "# Summary\\n").read_text()
    '# Summary\\n'
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str; got {type(text).__name__}")
    path = Path(path)
    with atomic_path(path) as temporary:
        # O_EXCL: never follow or reuse someone else's file; 0o666 lets the umask decide permissions
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(descriptor, "w", encoding=encoding, newline="") as stream:
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
    return path


def save_figure_atomic(figure, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Save a matplotlib figure to ``path`` atomically (see :func:`atomic_path`); return ``path``.

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        Any object with a matplotlib-style ``savefig(fname, format=..., **kwargs)`` method.
    path : str or os.PathLike
        Destination, e.g. ``"trace.png"``; the format comes from its extension unless ``format`` is
        passed.
    **savefig_kwargs
        Passed to ``figure.savefig`` (e.g. ``dpi=150``, ``bbox_inches="tight"``).

    Raises
    ------
    TypeError
        If ``figure`` has no ``savefig`` method.
    ValueError
        If ``path`` has no extension and no ``format`` is given.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> import matplotlib
    >>> matplotlib.use("Agg")
    >>> import matplotlib.pyplot as plt
    >>> figure, axes = plt.subplots()
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "line.png"
    >>> save_figure_atomic(figure, target).stat().st_size > 0
    True
    >>> plt.close(figure)
    """
    if not callable(getattr(figure, "savefig", None)):
        raise TypeError(
            f"figure must be a matplotlib Figure (with a savefig method); got "
            f"{type(figure).__name__}. For an Axes pass axes.figure"
        )
    path = Path(path)
    if "format" not in savefig_kwargs:
        if not path.suffix:
            raise ValueError(
                f"cannot tell the image format of '{path}'; give it an extension such as .png "
                "or pass format='png'"
            )
        savefig_kwargs["format"] = path.suffix.lstrip(".").lower()
    with atomic_path(path) as temporary:
        figure.savefig(temporary, **savefig_kwargs)
    return path


class Interrupted(KeyboardInterrupt):
    """Raised in the main thread when SIGTERM or SIGHUP arrives while pyromoe writes results.

    It subclasses ``KeyboardInterrupt`` so that a termination request takes the same clean-up path
    as Ctrl-C: staging folders and temporary files are removed and nothing partial is left.

    Attributes
    ----------
    signum : int
        The signal received.
    """

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"interrupted by {signal.Signals(signum).name}")


@contextlib.contextmanager
def _termination_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM/SIGHUP (and Python's SIGINT) into one :class:`Interrupted`/KeyboardInterrupt.

    Only the first signal raises; later ones arrive while the clean-up runs and are ignored until
    the block exits, so a second Ctrl-C or a repeated ``kill`` cannot cut the clean-up short.
    Outside the main thread (where Python cannot install handlers) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    fired = False

    def handler(signum, frame):
        nonlocal fired
        if fired:
            return
        fired = True
        if signum == signal.SIGINT:
            raise KeyboardInterrupt
        raise Interrupted(signum)

    names = ["SIGTERM", "SIGHUP"]
    if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
        names.append("SIGINT")  # leave a custom SIGINT handler (e.g. a notebook's) alone
    previous = {}
    for name in names:
        number = getattr(signal, name, None)
        if number is not None:
            previous[number] = signal.signal(number, handler)
    try:
        yield
    finally:
        for number, old in previous.items():
            signal.signal(number, old)


_ERRNO_IN_TEXT = re.compile(r"errno\s*=\s*(\d+)")


def _write_isolated(write: Callable[[Path], object], path: Path, name: Path) -> None:
    """Run ``write(path)`` in a forked child where fork is safe (Linux), else in this process.

    HDF5 (behind NetCDF) can leave its objects in a state that crashes the interpreter when they
    are freed after a failed write (a full disk, a file-size limit): h5py raises, and the process
    then segfaults at exit. In a child the crash cannot reach the caller; the child reports the
    error through a pipe and leaves with ``os._exit`` (no finalisers). The caller gets an
    ``OSError`` naming ``name`` (the final path), with the errno when one can be read.
    """
    if not sys.platform.startswith("linux"):
        write(path)
        return
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: write, report, leave without running any finaliser
        code = 0
        try:
            os.close(read_end)
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 2)  # HDF5's own tracebacks: the error goes through the pipe
            write(path)
        except BaseException as error:  # noqa: BLE001 - everything is reported to the parent
            code = 1
            number = getattr(error, "errno", None)
            if not isinstance(number, int):
                found = _ERRNO_IN_TEXT.search(str(error))
                number = int(found.group(1)) if found else 0
            text = f"{number}\n{type(error).__name__}: {error}".encode(errors="replace")
            with contextlib.suppress(OSError):
                os.write(write_end, text[:8000])
        os._exit(code)
    os.close(write_end)
    try:
        chunks = []
        while chunk := os.read(read_end, 8192):
            chunks.append(chunk)
        _, status = os.waitpid(pid, 0)
    except BaseException:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        raise
    finally:
        os.close(read_end)
    if os.waitstatus_to_exitcode(status) == 0:
        return
    report = b"".join(chunks).decode(errors="replace")
    number_text, _, message = report.partition("\n")
    number = int(number_text) if number_text.isdigit() else 0
    if not message:
        message = f"the writer process ended with status {os.waitstatus_to_exitcode(status)}"
    if number:
        raise OSError(number, f"could not write '{name}': {os.strerror(number)}")
    raise OSError(f"could not write '{name}': {message}")


def write_netcdf_atomic(idata, path: str | os.PathLike) -> Path:
    """Write ArviZ ``InferenceData`` to ``path`` as NetCDF, atomically; return ``path``.

    The file is written and closed under a temporary name (in a child process on Linux, see
    below), then renamed onto ``path``. A failed write (full disk, file-size limit, no permission)
    raises ``OSError`` and leaves neither a partial file nor a temporary one; the HDF5 library's
    state after such a failure cannot crash this process.

    Parameters
    ----------
    idata : arviz.InferenceData
    path : str or os.PathLike
        Destination, e.g. ``"inference_data.nc"``.

    Raises
    ------
    TypeError
        If ``idata`` has no ``to_netcdf`` method.
    OSError
        If the file cannot be written.
    """
    if not callable(getattr(idata, "to_netcdf", None)):
        raise TypeError(f"idata must be an arviz.InferenceData; got {type(idata).__name__}")
    path = Path(path)
    with atomic_path(path) as temporary:
        _write_isolated(lambda target: idata.to_netcdf(str(target)), temporary, path)
    return path


def _named(path: str | os.PathLike) -> Path:
    """``path`` as a Path with a real last component ('.' and '..' have none to rename)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = Path(path)
    if not str(path).strip():
        raise ValueError("path must name a folder; got an empty string")
    return Path(os.path.abspath(path)) if path.name in ("", ".", "..") else path

"""Reading a user's table and writing results so that a failed run leaves nothing half-written.

Two halves, both I/O only (no maths, no standardisation; those live in the maths modules):

* :func:`read_table` turns a CSV file into ``x`` (n, d) and ``y`` (n,) float64 arrays, with errors that
  name the file, the column and the row, and say how to fix the problem.
* :func:`results_directory`, :func:`atomic_path`, :func:`write_text_atomic` and
  :func:`save_figure_atomic` write outputs into a temporary sibling and rename it into place only when
  everything succeeded, so a crash, an exception or Ctrl-C never leaves a partial file or folder at the
  requested path.

Row numbers in error messages are given both ways: ``data row r`` counts data rows from 1 (the header
is not a data row) and ``file line l`` is the 1-based line of the file (blank lines skipped by the
reader still count as lines).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import secrets
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

import numpy as np

__all__ = [
    "Table",
    "read_table",
    "parse_table",
    "MISSING_VALUE_MARKERS",
    "RESULTS_MARKER",
    "results_directory",
    "atomic_path",
    "write_text_atomic",
    "save_figure_atomic",
]

#: Cell contents (after stripping spaces, compared case-insensitively) read as a missing value.
MISSING_VALUE_MARKERS: frozenset[str] = frozenset(
    {"", "na", "nan", "n/a", "null", "none", "?", "."}
)

#: Name of the empty file :func:`results_directory` leaves in every folder it creates; a folder that
#: holds it is a previous pyromoe result and may be replaced without ``overwrite=True``.
RESULTS_MARKER = ".pyromoe-results"

_DELIMITER_CANDIDATES = (",", "\t", ";")


class Table(NamedTuple):
    """A numeric table read from a file: unpacks as ``x, y, feature_names, target_name``.

    Attributes
    ----------
    x : numpy.ndarray, shape (n, d), float64
        Input columns, in the order of ``feature_names``.
    y : numpy.ndarray, shape (n,), float64
        The target column.
    feature_names : tuple of str, length d
    target_name : str
    """

    x: np.ndarray
    y: np.ndarray
    feature_names: tuple[str, ...]
    target_name: str


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def read_table(
    path: str | os.PathLike,
    target: str,
    features: Sequence[str] | None = None,
    *,
    min_rows: int = 1,
    min_rows_reason: str | None = None,
    delimiter: str | None = None,
) -> Table:
    """Read a CSV file with a header line into inputs ``x`` and target ``y``.

    Parameters
    ----------
    path : str or os.PathLike
        A text file, UTF-8 (a byte-order mark is accepted), whose first non-blank line names the
        columns. Blank lines are skipped; spaces around names and values are ignored.
    target : str
        Name of the column to predict.
    features : sequence of str, optional
        Names of the input columns, in the order wanted. Default: every column except ``target``, in
        file order (so every other column must then be numeric).
    min_rows : int, default 1
        Fewest data rows accepted (e.g. the number of model parameters).
    min_rows_reason : str, optional
        Why ``min_rows`` rows are needed; quoted in the error message.
    delimiter : str, optional
        Field separator. Default: whichever of ``,``, tab and ``;`` occurs most often in the header
        line (``,`` when none does).

    Returns
    -------
    Table
        ``(x, y, feature_names, target_name)`` with ``x`` of shape (n, d) and ``y`` of shape (n,),
        both float64.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the path is a folder, the file is empty or not UTF-8 text, has no data rows, repeats a
        column name, a row has the wrong number of fields, ``target`` or a feature is not a column
        (the message lists the columns), ``target`` is also a feature, a feature is listed twice,
        a used cell is missing (empty, ``NA``, ``NaN``, ...) or not a finite number (the message
        names the column, the data row and the file line), or there are fewer than ``min_rows``
        data rows.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "data.csv"
    >>> _ = path.write_text("a,b,y\\n1,2,3\\n4,5,6\\n")
    >>> x, y, names, target = read_table(path, target="y")
    >>> x.shape, y.tolist(), names
    ((2, 2), [3.0, 6.0], ('a', 'b'))
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"data file '{path}' not found (looked for {path.absolute()}); check the path and the "
            "current working directory"
        )
    if path.is_dir():
        raise ValueError(f"data file '{path}' is a folder; pass the path of a CSV file inside it")
    try:
        with open(path, encoding="utf-8-sig", newline="") as stream:
            return parse_table(
                stream,
                target,
                features,
                source=str(path),
                min_rows=min_rows,
                min_rows_reason=min_rows_reason,
                delimiter=delimiter,
            )
    except UnicodeDecodeError as error:
        raise ValueError(
            f"data file '{path}' is not UTF-8 text ({error.reason} at byte {error.start}); "
            "save it as UTF-8 CSV (spreadsheet programs offer 'CSV UTF-8')"
        ) from None


def parse_table(
    stream: TextIO | str,
    target: str,
    features: Sequence[str] | None = None,
    *,
    source: str = "<table>",
    min_rows: int = 1,
    min_rows_reason: str | None = None,
    delimiter: str | None = None,
) -> Table:
    """Parse CSV text (an open text stream or a string) like :func:`read_table`.

    ``source`` names the table in error messages; the other parameters, the return value and the
    errors are those of :func:`read_table`.

    Examples
    --------
    >>> parse_table("t,y\\n0,1\\n1,3\\n", target="y").x.ravel().tolist()
    [0.0, 1.0]
    """
    _check_min_rows_argument(min_rows)
    if not isinstance(target, str):
        raise TypeError(f"target must be a column name (str); got {type(target).__name__}")
    if isinstance(features, str):
        raise TypeError(
            f"features must be a sequence of column names, e.g. ['{features}']; got the string "
            f"'{features}'"
        )
    if isinstance(stream, str):
        stream = io.StringIO(stream)

    header, rows, lines = _read_records(stream, source, delimiter)
    columns = _column_index(header, source)
    feature_names = _select_features(columns, target, features, source)

    if len(rows) < min_rows:
        why = f" ({min_rows_reason})" if min_rows_reason else ""
        raise ValueError(
            f"{source} has {len(rows)} data row{'s' if len(rows) != 1 else ''}; at least "
            f"{min_rows} are needed{why}. Use more data or a smaller model"
        )

    used = [*feature_names, target]
    values = _to_float_columns(rows, lines, [columns[name] for name in used], used, source)
    x = np.ascontiguousarray(values[:, :-1])
    y = np.ascontiguousarray(values[:, -1])
    return Table(x=x, y=y, feature_names=tuple(feature_names), target_name=target)


def _check_min_rows_argument(min_rows: int) -> None:
    if isinstance(min_rows, bool) or not isinstance(min_rows, (int, np.integer)) or min_rows < 1:
        raise ValueError(f"min_rows must be a positive integer; got {min_rows!r}")


def _read_records(
    stream: TextIO, source: str, delimiter: str | None
) -> tuple[list[str], list[list[str]], list[int]]:
    """Return the header fields, the data records and each record's file line."""
    text = stream.read()
    if not text.strip():
        raise ValueError(
            f"{source} is empty; expected a header line naming the columns, then one line per "
            "observation, e.g. 'x1,x2,y'"
        )
    if delimiter is None:
        first_line = next(line for line in text.splitlines() if line.strip())
        counts = [first_line.count(candidate) for candidate in _DELIMITER_CANDIDATES]
        delimiter = _DELIMITER_CANDIDATES[int(np.argmax(counts))] if max(counts) > 0 else ","
    elif not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ValueError(f"delimiter must be a single character such as ','; got {delimiter!r}")

    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter, skipinitialspace=True)
    header: list[str] | None = None
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        for record in reader:
            if not record or all(not field.strip() for field in record):
                continue  # blank line
            if header is None:
                header = [field.strip() for field in record]
                continue
            if len(record) != len(header):
                raise ValueError(
                    f"{source}: data row {len(rows) + 1} (file line {reader.line_num}) has "
                    f"{len(record)} field{'s' if len(record) != 1 else ''} but the header has "
                    f"{len(header)} ({', '.join(header)}); check for a missing or extra "
                    f"'{delimiter}' or an unquoted '{delimiter}' inside a value"
                )
            rows.append(record)
            lines.append(reader.line_num)
    except csv.Error as error:
        raise ValueError(
            f"{source}: malformed CSV at file line {reader.line_num}: {error}"
        ) from None
    assert header is not None  # the text is not blank, so some record is non-blank
    if not rows:
        raise ValueError(
            f"{source} has a header line ({', '.join(header)}) but no data rows; add one line per "
            "observation"
        )
    return header, rows, lines


def _column_index(header: list[str], source: str) -> dict[str, int]:
    for position, name in enumerate(header):
        if not name:
            raise ValueError(
                f"{source}: column {position + 1} of the header has no name; name every column"
            )
    seen: dict[str, int] = {}
    for position, name in enumerate(header):
        if name in seen:
            raise ValueError(
                f"{source}: column name '{name}' appears twice in the header (columns "
                f"{seen[name] + 1} and {position + 1}); rename one of them"
            )
        seen[name] = position
    return seen


def _select_features(
    columns: dict[str, int], target: str, features: Sequence[str] | None, source: str
) -> list[str]:
    available = ", ".join(f"'{name}'" for name in columns)
    if target not in columns:
        raise ValueError(
            f"target column '{target}' not found in {source}; available columns: {available}"
        )
    if features is None:
        selected = [name for name in columns if name != target]
        if not selected:
            raise ValueError(
                f"{source} has only the target column '{target}'; add at least one input column"
            )
        return selected
    selected = [str(name) for name in features]
    if not selected:
        raise ValueError(
            "features must name at least one input column; pass None to use every column except "
            f"the target. Available columns: {available}"
        )
    unknown = [name for name in selected if name not in columns]
    if unknown:
        listed = ", ".join(f"'{name}'" for name in unknown)
        raise ValueError(
            f"feature column{'s' if len(unknown) > 1 else ''} {listed} not found in {source}; "
            f"available columns: {available}"
        )
    if target in selected:
        raise ValueError(
            f"target column '{target}' is also listed among the features; a column cannot "
            "predict itself, remove it from the features"
        )
    repeated = sorted({name for name in selected if selected.count(name) > 1})
    if repeated:
        listed = ", ".join(f"'{name}'" for name in repeated)
        raise ValueError(f"feature column {listed} is listed more than once; list each column once")
    return selected


def _to_float_columns(
    rows: list[list[str]],
    lines: list[int],
    positions: list[int],
    names: list[str],
    source: str,
) -> np.ndarray:
    """Convert the chosen columns to float64, reporting the first bad cell in file order."""
    cells = np.array(rows, dtype=str)[:, positions]
    with contextlib.suppress(ValueError):
        values = cells.astype(np.float64)  # accepts surrounding spaces
        if np.isfinite(values).all():
            return values  # the common case: no cell-level diagnosis needed
    cells = np.char.strip(cells)
    missing = np.isin(np.char.lower(cells), list(MISSING_VALUE_MARKERS))
    filled = np.where(missing, "0", cells)
    try:
        values = filled.astype(np.float64)
    except ValueError:
        # Only on this error path do we visit cells one by one, to find the one that is wrong.
        values = _parse_cells(filled)
    first_missing = _first_true(missing)
    first_bad = _first_true(~np.isfinite(values))

    candidates = [cell for cell in (first_missing, first_bad) if cell is not None]
    if candidates:
        row, column = min(candidates)
        where = f"column '{names[column]}', data row {row + 1} (file line {lines[row]})"
        if (row, column) == first_missing:
            raise ValueError(
                f"{source}: missing value in {where}; drop or impute incomplete rows before fitting"
            )
        text = str(cells[row, column])
        problem = "is not finite" if _parses(text) else "is not a number"
        raise ValueError(
            f"{source}: {where} holds '{text}', which {problem}; "
            "every input and target value must be numeric (encode categories as numbers or "
            "leave that column out of the features)"
        )
    return values


def _parses(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_cells(cells: np.ndarray) -> np.ndarray:
    """float() of each cell, NaN where it fails (reported by the caller as not a number)."""
    return np.vectorize(lambda text: float(text) if _parses(text) else np.nan, otypes=[np.float64])(
        cells
    )


def _first_true(mask: np.ndarray) -> tuple[int, int] | None:
    """(row, column) of the first True in row-major order, or None."""
    flat = np.flatnonzero(mask)
    if flat.size == 0:
        return None
    row, column = np.unravel_index(flat[0], mask.shape)
    return int(row), int(column)


# --------------------------------------------------------------------------------------------------
# Atomic writing
# --------------------------------------------------------------------------------------------------


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
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        _remove_empty(created)
        raise
    _fsync_directory(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str, *, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically: the file holds either the old or the new text.

    The new contents are written and flushed to disk under a temporary name in the same folder,
    then renamed onto ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file; parent folders are created.
    text : str
        The full contents.
    encoding : str, default "utf-8"

    Returns
    -------
    pathlib.Path
        ``path``.

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
    """Save a matplotlib figure to ``path`` atomically (see :func:`atomic_path`).

    Parameters
    ----------
    figure : matplotlib.figure.Figure
        Any object with a matplotlib-style ``savefig(fname, format=..., **kwargs)`` method.
    path : str or os.PathLike
        Destination, e.g. ``"trace.png"``; the format comes from its extension unless ``format`` is
        passed.
    **savefig_kwargs
        Passed to ``figure.savefig`` (e.g. ``dpi=150``, ``bbox_inches="tight"``).

    Returns
    -------
    pathlib.Path
        ``path``.

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


@contextlib.contextmanager
def results_directory(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Build a results folder under a temporary name; put it at ``path`` only if the block succeeds.

    Write every output into the yielded folder. On success it is renamed to ``path``; on any
    exception (``KeyboardInterrupt`` included) it is deleted and ``path`` is left exactly as it was,
    so a failed or interrupted run leaves no partial output.

    What happens to an existing ``path`` (checked on entry, before any work is done):

    * missing, or an empty folder: the new folder takes its place;
    * a folder made by an earlier call (it holds the marker file :data:`RESULTS_MARKER`): replaced
      at the end;
    * any other non-empty folder: ``FileExistsError`` unless ``overwrite=True`` (so a mistyped
      ``--out`` never wipes a user's own folder);
    * a file: ``FileExistsError``.

    Replacing is as atomic as a portable rename allows: the old folder is first renamed to a hidden
    sibling ``.<name>.old-<random>``, the new one renamed into place, then the old one deleted. If
    the second rename fails the old folder is put back; if the process is killed between the two
    renames, the old results survive under the hidden name. A killed process (SIGKILL, power loss)
    can leave a hidden ``.<name>.partial-<random>`` sibling, never a partial folder at ``path``.

    Parameters
    ----------
    path : str or os.PathLike
        The results folder to create. Missing parent folders are created (and removed again if the
        block fails).
    overwrite : bool, default False
        Allow replacing an existing non-empty folder that pyromoe did not create.

    Yields
    ------
    pathlib.Path
        The temporary folder to write into (same parent as ``path``).

    Raises
    ------
    FileExistsError
        If ``path`` is a file, or a non-empty folder not made by pyromoe and ``overwrite`` is False.

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "results"
    >>> with results_directory(out) as folder:
    ...     _ = (folder / "summary.md").write_text("# Summary")
    >>> sorted(p.name for p in out.iterdir())
    ['.pyromoe-results', 'summary.md']
    """
    path = _named(path)
    _check_replaceable(path, overwrite)

    created = _make_parents(path.parent)
    staging = _sibling(path, "partial")
    try:
        staging.mkdir()  # mode 0o777 minus the umask, like any folder the user makes
        (staging / RESULTS_MARKER).touch()
        yield staging
        _swap_into_place(staging, path, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        _remove_empty(created)
        raise
    _fsync_directory(path.parent)


def _named(path: str | os.PathLike) -> Path:
    """``path`` as a Path with a real last component ('.' and '..' have none to rename)."""
    path = Path(path)
    return Path(os.path.abspath(path)) if path.name in ("", ".", "..") else path


def _check_replaceable(path: Path, overwrite: bool) -> None:
    if path.exists() and not path.is_dir():
        raise FileExistsError(
            f"cannot create results folder '{path}': a file of that name exists; choose another "
            "output path or remove the file"
        )
    if path.is_dir() and any(path.iterdir()) and not (path / RESULTS_MARKER).exists():
        if not overwrite:
            raise FileExistsError(
                f"results folder '{path}' already exists and holds files pyromoe did not write; "
                "choose another output path, empty it, or pass overwrite=True to replace it"
            )


def _swap_into_place(staging: Path, path: Path, overwrite: bool) -> None:
    _check_replaceable(path, overwrite)  # again: the folder may have been filled meanwhile
    if not path.exists():
        os.replace(staging, path)
        return
    if path.is_dir() and not any(path.iterdir()):
        path.rmdir()
        os.replace(staging, path)
        return
    backup = _sibling(path, "old")
    os.replace(path, backup)
    try:
        os.replace(staging, path)
    except BaseException:
        os.replace(backup, path)
        raise
    shutil.rmtree(backup, ignore_errors=True)

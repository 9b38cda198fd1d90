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
import hashlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple, TextIO

import numpy as np
import pandas as pd

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
    "write_netcdf_atomic",
    "Interrupted",
]

#: Cell contents (after stripping spaces, compared case-insensitively) read as a missing value.
MISSING_VALUE_MARKERS: frozenset[str] = frozenset(
    {"", "na", "nan", "n/a", "null", "none", "?", "."}
)

#: Name of the file :func:`results_directory` leaves in every folder it creates: a JSON record of the
#: size and SHA-256 of every file pyromoe wrote there. Only a folder whose files all still match it,
#: and that holds nothing else, may be replaced, with ``overwrite=True``.
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
        columns. Blank lines are skipped; spaces around names and values are ignored. pandas
        splits the fields (quoting as in Python's ``csv`` module); each value is then read as
        ``float`` reads it, correctly rounded.
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
        column name, a quoted value is not closed (or text follows its closing quote, as in
        ``"1" ,2``), a row has the wrong number of fields, ``target`` or a feature is not a column
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

    header, cells, lines = _read_records(stream, source, delimiter)
    columns = _column_index(header, source)
    feature_names = _select_features(columns, target, features, source)

    if len(cells) < min_rows:
        why = f" ({min_rows_reason})" if min_rows_reason else ""
        raise ValueError(
            f"{source} has {len(cells)} data row{'s' if len(cells) != 1 else ''}; at least "
            f"{min_rows} are needed{why}. Use more data or a smaller model"
        )

    used = [*feature_names, target]
    values = _to_float_columns(cells[[columns[name] for name in used]], lines, used, source)
    x = np.ascontiguousarray(values[:, :-1])
    y = np.ascontiguousarray(values[:, -1])
    return Table(x=x, y=y, feature_names=tuple(feature_names), target_name=target)


def _check_min_rows_argument(min_rows: int) -> None:
    if isinstance(min_rows, bool) or not isinstance(min_rows, (int, np.integer)) or min_rows < 1:
        raise ValueError(f"min_rows must be a positive integer; got {min_rows!r}")


def _read_records(
    stream: TextIO, source: str, delimiter: str | None
) -> tuple[list[str], pd.DataFrame, np.ndarray]:
    """Return the header names, the data cells and the file line of each data row.

    The cells are stripped strings in a frame whose columns ``0 .. len(header) - 1`` follow the
    header, one row per data row; blank lines are left out but count in the file lines.
    """
    text = stream.read()
    if not text.strip():
        raise _empty(source)
    # One line ending for pandas' python engine; a lone "\r" (old Mac files) still ends a line.
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if delimiter is None:
        first_line = text.lstrip().split("\n", 1)[0]
        counts = [first_line.count(candidate) for candidate in _DELIMITER_CANDIDATES]
        delimiter = _DELIMITER_CANDIDATES[int(np.argmax(counts))] if max(counts) > 0 else ","
    elif not isinstance(delimiter, str) or len(delimiter) != 1:
        raise ValueError(f"delimiter must be a single character such as ','; got {delimiter!r}")

    width = _header_width(text, delimiter, source)
    cells, fields, line_ends = _split_records(text, delimiter, width, source)
    records = np.flatnonzero(fields)
    if records.size == 0:  # only lines such as ',,'
        raise _empty(source)
    header = [str(name) for name in cells.iloc[records[0], : fields[records[0]]]]
    rows, lines = records[1:], line_ends[records[1:]]
    if rows.size == 0:
        raise ValueError(
            f"{source} has a header line ({', '.join(header)}) but no data rows; add one line per "
            "observation"
        )
    wrong = np.flatnonzero(fields[rows] != len(header))
    if wrong.size:
        row = int(wrong[0])
        count = int(fields[rows[row]])
        raise ValueError(
            f"{source}: data row {row + 1} (file line {lines[row]}) has "
            f"{count} field{'s' if count != 1 else ''} but the header has "
            f"{len(header)} ({', '.join(header)}); check for a missing or extra "
            f"'{delimiter}' or an unquoted '{delimiter}' inside a value"
        )
    return header, cells.iloc[rows, : len(header)], lines


def _empty(source: str) -> ValueError:
    return ValueError(
        f"{source} is empty; expected a header line naming the columns, then one line per "
        "observation, e.g. 'x1,x2,y'"
    )


def _header_width(text: str, delimiter: str, source: str) -> int:
    """The most fields in a record up to the header (the first non-blank one), read as pandas will.

    A frame this wide holds the header, and pandas never takes a first record wider than the frame
    for an index column.
    """
    width = 1
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True, strict=True)
    try:
        for record in reader:
            width = max(width, len(record))
            if "".join(record).strip():
                break
    except csv.Error:
        raise _malformed(text, delimiter, source) from None
    return width


#: Stands in for the fields of a record wider than the frame (see :func:`_split_records`).
_TOO_WIDE = "\0pyromoe: more fields than the frame has columns\0"


def _split_records(
    text: str, delimiter: str, width: int, source: str
) -> tuple[pd.DataFrame, np.ndarray, np.ndarray]:
    """Split ``text`` (lines ending in ``"\\n"``) into records with pandas, in ``width`` columns.

    Returns
    -------
    cells : pandas.DataFrame
        One row per record, blank lines included: the fields as stripped strings, ``None`` past
        the end of a short record. A record with more than ``width`` fields holds a marker.
    fields : numpy.ndarray of int
        Each record's number of fields; 0 for a blank line (every field empty or spaces).
    line_ends : numpy.ndarray of int
        The 1-based file line on which each record ends (a quoted field may hold line breaks).
    """
    wide: list[tuple[int, int, bool]] = []  # (fields, line breaks, blank) of each wider record

    def too_wide(record: list[str]) -> list[str]:
        breaks = sum(field.count("\n") for field in record)
        wide.append((len(record), breaks, not "".join(record).strip()))
        return [_TOO_WIDE] * width

    # The python engine pads a short record with None (the C engine pads with "", which hides a
    # missing field) and hands a long one to on_bad_lines. na_filter=False: every cell a string.
    try:
        frame = pd.read_csv(
            io.StringIO(text),
            sep=delimiter,
            header=None,
            names=range(width),
            dtype=object,
            na_filter=False,
            skipinitialspace=True,
            skip_blank_lines=False,
            engine="python",
            on_bad_lines=too_wide,
        )
    except pd.errors.ParserError:
        raise _malformed(text, delimiter, source) from None
    cells = frame.apply(lambda column: column.str.strip())
    present = cells.notna()
    fields = present.sum(axis=1).to_numpy(copy=True)
    fields[(~present | cells.eq("")).all(axis=1).to_numpy()] = 0
    is_wide = cells[0].eq(_TOO_WIDE).to_numpy()
    if wide:
        counts, _, blank = zip(*wide)
        fields[is_wide] = np.where(blank, 0, counts)

    # Each record takes one line plus the line breaks inside its quoted fields. pandas skips, with
    # no word, a line the csv module refuses (strict quoting): then the lines do not add up.
    n_lines = text.count("\n") + (not text.endswith("\n"))
    breaks = np.zeros(len(frame), dtype=np.int64)
    if len(frame) != n_lines:
        breaks = frame.apply(lambda column: column.str.count("\n")).fillna(0).sum(axis=1)
        breaks = breaks.to_numpy(dtype=np.int64, copy=True)
        breaks[is_wide] = [count for _, count, _ in wide]
        if len(frame) + breaks.sum() != n_lines:
            raise _malformed(text, delimiter, source)
    line_ends = np.arange(1, len(frame) + 1) + np.cumsum(breaks)
    return cells, fields, line_ends


def _malformed(text: str, delimiter: str, source: str) -> ValueError:
    """The error for a quoting mistake: pandas reads CSV as Python's ``csv`` module does (strict)."""
    reader = csv.reader(io.StringIO(text), delimiter=delimiter, skipinitialspace=True, strict=True)
    try:
        for _ in reader:
            pass
    except csv.Error as error:
        return ValueError(
            f"{source}: malformed CSV at file line {reader.line_num}: {error}; a quoted value must "
            "be closed by '\"' right before the next delimiter or the end of the line (write a "
            "'\"' inside a quoted value as '\"\"')"
        )
    return ValueError(f"{source}: malformed CSV; check the quotes ('\"') in the file")


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
    cells: pd.DataFrame, lines: np.ndarray, names: list[str], source: str
) -> np.ndarray:
    """Convert the chosen columns to float64, reporting the first bad cell in file order.

    Numbers are read as Python's ``float`` reads them (correctly rounded, so ``0.1`` in the file is
    ``float("0.1")``); pandas only finds the bad cells, one vectorised pass per column.
    """
    texts = cells.to_numpy(dtype=object)
    with contextlib.suppress(ValueError):
        values = texts.astype(np.float64)
        if np.isfinite(values).all():
            return values  # the common case: no cell-level diagnosis needed
    missing = cells.apply(lambda column: column.str.lower().isin(MISSING_VALUE_MARKERS))
    numbers = cells.mask(missing, "0").apply(pd.to_numeric, errors="coerce")
    missing = missing.to_numpy()
    suspects = missing | ~np.isfinite(numbers.to_numpy(dtype=np.float64))
    for flat in np.flatnonzero(suspects):  # row-major: file order
        row, column = divmod(int(flat), texts.shape[1])
        where = f"column '{names[column]}', data row {row + 1} (file line {lines[row]})"
        if missing[row, column]:
            raise ValueError(
                f"{source}: missing value in {where}; drop or impute incomplete rows before fitting"
            )
        text = texts[row, column]
        try:
            value = float(text)
        except ValueError:
            problem = "is not a number"
        else:
            if np.isfinite(value):
                continue  # pandas refused what float() reads, such as '1_000': a number after all
            problem = "is not finite"
        raise ValueError(
            f"{source}: {where} holds '{text}', which {problem}; "
            "every input and target value must be numeric (encode categories as numbers or "
            "leave that column out of the features)"
        )
    return texts.astype(np.float64)


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
    """Write ArviZ ``InferenceData`` to ``path`` as NetCDF, atomically.

    The file is written and closed under a temporary name (in a child process on Linux, see
    below), then renamed onto ``path``. A failed write (full disk, file-size limit, no permission)
    raises ``OSError`` and leaves neither a partial file nor a temporary one; the HDF5 library's
    state after such a failure cannot crash this process.

    Parameters
    ----------
    idata : arviz.InferenceData
    path : str or os.PathLike
        Destination, e.g. ``"inference_data.nc"``.

    Returns
    -------
    pathlib.Path
        ``path``.

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


#: Version of the marker's record. Format 2 lists every file with its size and SHA-256; older
#: markers (pyromoe 0.1's empty file, then a bare list of names) record no contents.
_MARKER_FORMAT = 2
_HASH_BLOCK = 1 << 20
#: First bytes of the lock file :func:`results_directory` holds next to its target while it runs.
_LOCK_SIGNATURE = "pyromoe results lock"


def _entries(folder: Path) -> set[str]:
    """Every file, folder and link below ``folder`` (links not followed), relative POSIX paths."""
    found: set[str] = set()
    for root, folders, files in os.walk(folder, followlinks=False):
        for name in [*folders, *files]:
            found.add((Path(root) / name).relative_to(folder).as_posix())
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(_HASH_BLOCK):
            digest.update(block)
    return digest.hexdigest()


def _write_marker(folder: Path) -> None:
    """The marker: proof that pyromoe wrote ``folder``, with the size and SHA-256 of every file."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        writer = version("pyromoe")
    except PackageNotFoundError:  # a source tree that was never installed
        writer = "unknown"
    files: dict[str, dict[str, object]] = {}
    folders: list[str] = []
    for name in sorted(_entries(folder) - {RESULTS_MARKER}):
        entry = folder / name
        if entry.is_symlink():
            raise RuntimeError(f"a results folder may not hold links; '{name}' is one")
        if entry.is_dir():
            folders.append(name)
        else:
            files[name] = {"size": entry.stat().st_size, "sha256": _sha256(entry)}
    record = {"pyromoe": writer, "format": _MARKER_FORMAT, "files": files, "folders": folders}
    write_text_atomic(folder / RESULTS_MARKER, json.dumps(record, indent=1) + "\n")


class _Marker(NamedTuple):
    """What a folder's marker says pyromoe wrote there."""

    files: dict[str, tuple[int, str]]  # relative path -> (size in bytes, SHA-256)
    folders: frozenset[str]


def _read_marker(folder: Path) -> _Marker | str | None:
    """The marker of ``folder``: None without one; a :class:`_Marker` when it records every file's
    contents; otherwise the reason it cannot be trusted (a str)."""
    marker = folder / RESULTS_MARKER
    if marker.is_symlink():
        return "its marker is a link"
    if not marker.exists():
        return None
    try:
        record = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return "its marker is empty or unreadable (pyromoe 0.1 wrote empty markers)"
    files = record.get("files") if isinstance(record, dict) else None
    folders = record.get("folders", []) if isinstance(record, dict) else None
    if not isinstance(files, dict) or not isinstance(folders, list):
        return "its marker lists no file contents (an older pyromoe wrote it)"
    checked: dict[str, tuple[int, str]] = {}
    for name, facts in files.items():
        size = facts.get("size") if isinstance(facts, dict) else None
        digest = facts.get("sha256") if isinstance(facts, dict) else None
        if not (isinstance(size, int) and isinstance(digest, str) and len(digest) == 64):
            return f"its marker records no size and SHA-256 for '{name}'"
        checked[str(name)] = (size, digest)
    return _Marker(checked, frozenset(str(name) for name in folders))


def _unchanged(entry: Path, size: int, digest: str) -> bool:
    """Whether ``entry`` is a plain file with exactly this size and SHA-256."""
    if entry.is_symlink() or not entry.is_file():
        return False
    return entry.stat().st_size == size and _sha256(entry) == digest


def _differences(folder: Path, marker: _Marker) -> tuple[list[str], list[str]]:
    """(files pyromoe wrote that changed or went missing, entries it did not write)."""
    changed = [
        name
        for name, (size, digest) in sorted(marker.files.items())
        if not _unchanged(folder / name, size, digest)
    ]
    changed += sorted(
        name
        for name in marker.folders
        if (folder / name).is_symlink() or not (folder / name).is_dir()
    )
    listed = set(marker.files) | marker.folders | {RESULTS_MARKER}
    return changed, sorted(_entries(folder) - listed)


def _quoted(names: Sequence[str]) -> str:
    more = ", ..." if len(names) > 5 else ""
    return ", ".join(f"'{name}'" for name in names[:5]) + more


@contextlib.contextmanager
def _exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` (a lock file beside it) or fail at once.

    Two runs writing one results folder: the second is refused before it does any work. The lock
    file ``.<name>.pyromoe-lock`` is removed on every exit path; after a SIGKILL it is left behind
    (the kernel releases the lock itself) and the next run reuses and removes it. Without
    ``fcntl`` (Windows) no lock is taken.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    lock = path.with_name(f".{path.name}.pyromoe-lock")
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    while True:
        try:
            descriptor = os.open(lock, flags, 0o666)
        except OSError as error:
            raise FileExistsError(
                f"cannot lock results folder '{path}': '{lock.name}' beside it cannot be opened "
                f"({os.strerror(error.errno) if error.errno else error}); remove it if it is "
                "yours, or choose another output path"
            ) from error
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            owner = os.pread(descriptor, 200, 0).decode(errors="replace").strip()
            os.close(descriptor)
            raise FileExistsError(
                f"results folder '{path}' is being written by another pyromoe run "
                f"({owner.removeprefix(_LOCK_SIGNATURE).strip() or 'process unknown'}); wait for "
                "it to finish, or choose another output path"
            ) from None
        try:  # the previous holder may have removed the file between our open and our lock
            same = os.stat(lock, follow_symlinks=False).st_ino == os.fstat(descriptor).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(descriptor)
    text = os.pread(descriptor, 200, 0).decode(errors="replace")
    if text and not text.startswith(_LOCK_SIGNATURE):
        os.close(descriptor)
        raise FileExistsError(
            f"cannot lock results folder '{path}': '{lock}' exists and pyromoe did not write it; "
            "pyromoe never changes it. Move it away or choose another output path"
        )
    try:
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, f"{_LOCK_SIGNATURE} process {os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(descriptor)


@contextlib.contextmanager
def results_directory(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Sequence[str | os.PathLike] = (),
) -> Iterator[Path]:
    """Build a results folder under a temporary name; put it at ``path`` only if the block succeeds.

    Write every output into the yielded folder. On success it is renamed to ``path``; on any
    exception (``KeyboardInterrupt`` included) it is deleted and ``path`` is left exactly as it was,
    so a failed or interrupted run leaves no partial output. While the block runs, SIGTERM and
    SIGHUP (``kill``, ``timeout``, job schedulers, a closed terminal) raise :class:`Interrupted`, a
    ``KeyboardInterrupt``, so they take the same clean-up path as Ctrl-C. Only SIGKILL (or a power
    cut) can leave the hidden staging folder ``.<name>.partial-<random>`` or the lock file
    ``.<name>.pyromoe-lock`` next to ``path``; never a partial folder at ``path`` itself.

    Every check is made on entry, before the block runs (and again, under the lock, just before
    the final rename). The rule for an existing ``path``: **pyromoe never deletes or changes what
    it did not write.**

    * missing, or an empty folder: the new folder takes its place;
    * a folder pyromoe wrote: it holds the marker :data:`RESULTS_MARKER`, a JSON record of the size
      and SHA-256 of every file pyromoe put there. It is replaced, only with ``overwrite=True``,
      only if every recorded file is unchanged and nothing else is there; otherwise the changed
      and foreign files are named and nothing is touched. A marker without contents (pyromoe 0.1's
      empty marker, an edited marker) is never trusted: remove such a folder yourself;
    * a symbolic link (even to a pyromoe folder, even dangling), any other folder, a file, the
      current working folder or one above it, a folder holding one of ``inputs`` or one above such
      a folder: refused.

    While the block runs an exclusive lock (``fcntl.flock`` on ``.<name>.pyromoe-lock`` beside
    ``path``) makes a second run on the same ``path`` fail at once. Replacing renames the old folder
    to a hidden sibling, renames the new one into place, then deletes from the old one exactly the
    files the marker records, each checked against its SHA-256 once more.

    Parameters
    ----------
    path : str or os.PathLike
        The results folder to create. Missing parent folders are created (and removed again if the
        block fails).
    overwrite : bool, default False
        Allow replacing earlier, unchanged pyromoe results at ``path``.
    inputs : sequence of path-like, optional
        The run's input files: ``path`` may not be the folder holding one of them, nor above it.

    Yields
    ------
    pathlib.Path
        The temporary folder to write into (same parent as ``path``).

    Raises
    ------
    FileExistsError
        If ``path`` is a file, a folder pyromoe did not write, earlier results without
        ``overwrite=True``, earlier results that were changed, or is being written by another run.
    ValueError
        If ``path`` is a symbolic link, the working folder, holds an input file, or lies above
        either; or a parent of ``path`` is a file.
    OSError
        If the staging folder cannot be created (e.g. ``PermissionError`` in a read-only folder).

    Examples
    --------
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp()) / "results"
    >>> with results_directory(out) as folder:
    ...     _ = (folder / "summary.md").write_text("# Summary")
    >>> sorted(p.name for p in out.iterdir())
    ['.pyromoe-results', 'summary.md']
    """
    if not isinstance(overwrite, bool):
        raise TypeError(f"overwrite must be True or False; got {overwrite!r}")
    path = _named(path)
    inputs = [Path(p) for p in ([inputs] if isinstance(inputs, (str, os.PathLike)) else inputs)]
    _check_replaceable(path, overwrite, inputs)

    with _termination_as_interrupt():
        created = _make_parents(path.parent)
        staging = _sibling(path, "partial")
        try:
            with _exclusive_lock(path):
                _check_replaceable(path, overwrite, inputs)  # another run may have just finished
                staging.mkdir()  # mode 0o777 minus the umask, like any folder the user makes
                yield staging
                _write_marker(staging)
                _swap_into_place(staging, path, overwrite, inputs)
        except OSError as error:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(created)
            text = str(error)
            if str(staging) not in text:
                raise
            # name the folder the user asked for, not the hidden staging folder that is gone now
            number = error.errno if isinstance(error.errno, int) else None
            text = text.replace(str(staging), str(path))
            if number is not None:
                text = text.replace(f"[Errno {number}] ", "", 1)
                raise OSError(number, text) from error
            raise OSError(text) from error
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            _remove_empty(created)
            raise
    _fsync_directory(path.parent)


def _named(path: str | os.PathLike) -> Path:
    """``path`` as a Path with a real last component ('.' and '..' have none to rename)."""
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike; got {type(path).__name__}")
    path = Path(path)
    if not str(path).strip():
        raise ValueError("path must name a folder; got an empty string")
    return Path(os.path.abspath(path)) if path.name in ("", ".", "..") else path


def _is_same_or_above(folder: Path, other: Path) -> bool:
    """Whether ``folder`` is ``other`` or one of its ancestors (after resolving links)."""
    folder, other = folder.resolve(), other.resolve()
    return folder == other or folder in other.parents


def _check_replaceable(path: Path, overwrite: bool, inputs: Sequence[Path] = ()) -> _Marker | None:
    """Refuse ``path`` unless the results may go there; return the marker of earlier results."""
    for parent in path.absolute().parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(
                f"cannot create results folder '{path}': '{parent}' is a file, not a folder; "
                "choose another output path"
            )
    if path.is_symlink():
        raise ValueError(
            f"results folder '{path}' is a symbolic link (to '{os.readlink(path)}'); pyromoe "
            "never writes through nor replaces a link. Give the folder itself as the output path, "
            "or choose another one"
        )
    if path.exists() and not path.is_dir():
        raise FileExistsError(
            f"cannot create results folder '{path}': a file of that name exists; choose another "
            "output path or remove the file"
        )
    if _is_same_or_above(path, Path.cwd()):
        raise ValueError(
            f"results folder '{path}' is the current working folder or contains it; replacing it "
            "would delete your files. Choose a new folder, e.g. --out results"
        )
    for source in inputs:
        if _is_same_or_above(path, source.absolute().parent):
            raise ValueError(
                f"results folder '{path}' holds the input file '{source}' (or a folder above it); "
                "replacing it would delete your data. Choose a new folder, e.g. --out results"
            )
    if not path.is_dir() or not any(path.iterdir()):
        return None
    marker = _read_marker(path)
    if marker is None:
        raise FileExistsError(
            f"results folder '{path}' already exists and holds files pyromoe did not write; "
            "pyromoe never deletes those. Choose another output path, or move the files away "
            "yourself"
        )
    if isinstance(marker, str):
        raise FileExistsError(
            f"results folder '{path}' looks like earlier pyromoe results, but {marker}, so "
            "pyromoe cannot tell its own files from yours and will not delete any. Check the "
            f"folder and remove it yourself if nothing in it is yours (e.g. rm -r '{path}'), or "
            "choose another output path"
        )
    if not overwrite:
        raise FileExistsError(
            f"results folder '{path}' holds the results of an earlier pyromoe run; pass "
            "overwrite=True (--overwrite on the command line) to replace them, or choose another "
            "output path"
        )
    changed, foreign = _differences(path, marker)
    if changed or foreign:
        found = []
        if changed:
            found.append(f"files changed since pyromoe wrote them ({_quoted(changed)})")
        if foreign:
            found.append(f"files pyromoe did not write ({_quoted(foreign)})")
        raise FileExistsError(
            f"results folder '{path}' holds earlier pyromoe results but also "
            f"{' and '.join(found)}; pyromoe never deletes those. Move them away or choose "
            "another output path"
        )
    return marker


def _swap_into_place(staging: Path, path: Path, overwrite: bool, inputs: Sequence[Path]) -> None:
    marker = _check_replaceable(path, overwrite, inputs)  # again: it may have changed meanwhile
    if not path.exists():
        os.replace(staging, path)
        return
    if marker is None:  # an empty folder
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
    _delete_written(backup, marker, path)


def _delete_written(folder: Path, marker: _Marker, path: Path) -> None:
    """Delete from ``folder`` exactly what ``marker`` records, each file checked once more.

    A file that changed in the instant since the last check is kept: the folder is then renamed to
    a visible ``<name>.kept-<random>`` beside ``path`` and a warning names it.
    """
    for name, (size, digest) in marker.files.items():
        entry = folder / name
        if _unchanged(entry, size, digest):
            entry.unlink()
    with contextlib.suppress(OSError):
        (folder / RESULTS_MARKER).unlink()
    for name in sorted(marker.folders, key=lambda name: name.count("/"), reverse=True):
        with contextlib.suppress(OSError):
            (folder / name).rmdir()
    try:
        folder.rmdir()
    except OSError:
        kept = path.with_name(f"{path.name}.kept-{secrets.token_hex(4)}")
        os.replace(folder, kept)
        warnings.warn(
            f"files changed in '{path}' while it was being replaced; pyromoe kept them in '{kept}'",
            RuntimeWarning,
            stacklevel=3,
        )

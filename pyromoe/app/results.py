"""Results folders: built under a temporary name, keyed by content, never replacing a user's file.

:func:`results_directory` is the one way pyromoe writes a folder of results (the command line, the
demo, saved fits). Its marker :data:`RESULTS_MARKER` records the size and SHA-256 of every file
pyromoe wrote, so earlier results are replaced only while every one of those files is unchanged and
nothing else is there; a lock beside the folder keeps a second run out.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

from .atomic import (
    _fsync_directory,
    _make_parents,
    _named,
    _remove_empty,
    _sibling,
    _termination_as_interrupt,
    write_text_atomic,
)

__all__ = ["RESULTS_MARKER", "results_directory"]

#: Name of the file :func:`results_directory` leaves in every folder it creates: a JSON record of the
#: size and SHA-256 of every file pyromoe wrote there. Only a folder whose files all still match it,
#: and that holds nothing else, may be replaced, with ``overwrite=True``.
RESULTS_MARKER = ".pyromoe-results"

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
    from .._version import __version__ as writer

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

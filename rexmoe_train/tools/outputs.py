"""Where a tool that writes may put its output: the one guard every writing CLI calls before it
does any work (rexmoe-convert, rexmoe-preprocess, rexmoe-eval --out, rexmoe-plot, rexmoe-plan).

Refused in one line (:class:`OutputError`, exit 2), whatever ``--overwrite`` says:

* an output that is, contains, or lies inside one of the tool's inputs (real paths: symlinks are
  resolved first, so a link to the input is the input);
* an output that lies inside a checkpoint (a directory holding ``latest_checkpointed_iteration.txt``
  or a manifest): a file planted there fails the manifest check or is pruned with the checkpoint;
* an existing, non-empty output directory that this tool did not write: a run dir (``rexmoe.lock``,
  ``checkpoints/``), a checkpoint, or anything else;
* a symlink loop, an existing directory where a file goes, a file where a directory goes.

How a tool knows what it wrote: every output directory it creates holds :data:`MARKER`, a small JSON
file naming the tool and verb and listing every file written; a JSON output file carries
``"written_by": "<tool>"`` (:func:`stamp`). ``--overwrite`` replaces an existing output only when it
carries the same tool's mark and (a directory) holds nothing the mark does not list: a directory a
trainer or a user has since written into is refused too.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Optional, Union

from rexmoe_train.checkpoint.layout import LOCK, META, TRACKER

MARKER = ".rexmoe-output.json"
WRITTEN_BY = "written_by"
PathLike = Union[str, os.PathLike]


class OutputError(Exception):
    """An output the tool must not write: one line, exit status 2 (``ExitCode.USAGE``)."""


def real(path: PathLike) -> Path:
    """The path with every symlink resolved (an absent tail kept as written); a loop is an error."""
    resolved = Path(os.path.realpath(path))
    try:
        os.stat(resolved)
    except OSError as err:
        if err.errno == errno.ELOOP:
            raise OutputError(f"{path}: a symlink loop (it never reaches a file or directory)") from None
    return resolved


def _inside(path: Path, root: Path) -> bool:
    return path != root and root in path.parents


def _what_is(directory: Path) -> Optional[str]:
    """Why ``directory`` is never replaced unless this tool's mark says it wrote it."""
    if (directory / LOCK).exists():
        return f"a run dir (holds {LOCK})"
    if (directory / "checkpoints").is_dir():
        return "a run dir (holds checkpoints/)"
    if (directory / TRACKER).exists():
        return f"a checkpoint directory (holds {TRACKER})"
    if (directory / META).exists():
        return f"a checkpoint (holds {META})"
    return None


def check_against_inputs(out: PathLike, inputs: Iterable[PathLike], flag: str = "output") -> Path:
    """Refuse an output that is, contains or lies inside an input, or lies inside a checkpoint.
    Returns the output's real path."""
    target = real(out)
    for given in inputs:
        if given is None:
            continue
        source = real(given)
        if target == source:
            raise OutputError(f"{flag} {out} is the input {given}: a tool never writes over its own input")
        if _inside(target, source):
            raise OutputError(f"{flag} {out} lies inside the input {given}: a tool never writes into its "
                              "own input")
        if _inside(source, target):
            raise OutputError(f"{flag} {out} contains the input {given}: replacing it would destroy the input")
    for parent in target.parents:
        if (parent / TRACKER).exists() or (parent / META).exists():
            raise OutputError(f"{flag} {out} lies inside the checkpoint {parent}: a file written there "
                              "breaks its manifest; choose a path outside it")
    return target


def _read_marker(directory: Path) -> Optional[dict]:
    try:
        mark = json.loads((directory / MARKER).read_text())
    except (OSError, ValueError):
        return None
    return mark if isinstance(mark, dict) and isinstance(mark.get("files"), list) else None


def _files_under(directory: Path) -> list[str]:
    out = []
    for dirpath, dirnames, files in os.walk(directory):
        for name in files + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            rel = os.path.relpath(os.path.join(dirpath, name), directory)
            if rel != MARKER:
                out.append(rel)
    return sorted(out)


def check_replaceable_dir(out: PathLike, owner: str, overwrite: bool, flag: str = "output") -> Path:
    """``out`` may become ``owner``'s output directory: absent, empty, or (with ``overwrite``) an
    earlier output of ``owner`` holding only what it wrote. Returns the real path."""
    target = real(out)
    if not target.exists():
        return target
    if not target.is_dir():
        raise OutputError(f"{flag} {out} exists and is not a directory: choose a directory path")
    if not any(target.iterdir()):
        return target
    mark = _read_marker(target)
    what = _what_is(target)
    if mark is None:
        kind = what or "a non-empty directory"
        raise OutputError(f"{flag} {out} is {kind} that {owner} did not write (no {MARKER}): never "
                          "replaced, even with --overwrite; choose another path")
    if mark.get("tool") != owner:
        raise OutputError(f"{flag} {out} was written by {mark.get('tool')!r}, not {owner}: never replaced, "
                          "even with --overwrite; choose another path")
    foreign = sorted(set(_files_under(target)) - set(mark["files"]))
    if foreign:
        raise OutputError(f"{flag} {out} holds {foreign[0]}, which {owner} did not write"
                          + (f" ({what})" if what else "") + ": never replaced, even with --overwrite")
    if not overwrite:
        raise OutputError(f"{flag} {out} exists (an earlier {owner} output): pass --overwrite to replace it")
    return target


def check_output_dir(out: PathLike, inputs: Iterable[PathLike], owner: str, overwrite: bool,
                     flag: str = "output") -> Path:
    """The whole guard for a tool that writes one directory: inputs, checkpoints, ownership, and a
    parent that exists or can be created. Returns the real path."""
    check_against_inputs(out, inputs, flag)
    target = check_replaceable_dir(out, owner, overwrite, flag)
    _check_parent(out, target, flag, create_ok=True)
    return target


def _check_parent(out: PathLike, target: Path, flag: str, create_ok: bool) -> None:
    parent = target.parent
    while not parent.exists():
        if not create_ok:
            raise OutputError(f"{flag} {out}: no such directory {parent}")
        parent = parent.parent
    if not parent.is_dir():
        raise OutputError(f"{flag} {out}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {out}: {parent} is not writable")


def is_stamped(path: Path, owner: str) -> bool:
    """A JSON file carrying ``"written_by": owner`` (see :func:`stamp`)."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read(64 << 20))
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get(WRITTEN_BY) == owner


def stamp(data: dict, owner: str) -> dict:
    """``data`` with the mark that lets ``owner`` replace this JSON file later."""
    return {WRITTEN_BY: owner, **data}


def check_output_file(out: PathLike, inputs: Iterable[PathLike], owner: str, overwrite: bool,
                      flag: str = "output", owned: Optional[Callable[[Path], bool]] = None,
                      create_parents: bool = False) -> Path:
    """The whole guard for one output file. An existing file is replaced only with ``overwrite`` and
    when ``owned(path)`` (default: :func:`is_stamped` by ``owner``) says this tool wrote it."""
    target = check_against_inputs(out, inputs, flag)
    if target.is_dir():
        raise OutputError(f"{flag} {out} is a directory: name a file")
    if target.exists():
        if not target.is_file():
            raise OutputError(f"{flag} {out} exists and is not a regular file")
        if not (owned or (lambda p: is_stamped(p, owner)))(target):
            raise OutputError(f"{flag} {out} exists and was not written by {owner}: never replaced, even "
                              "with --overwrite; choose another path")
        if not overwrite:
            raise OutputError(f"{flag} {out} exists (an earlier {owner} output): pass --overwrite to replace it")
    _check_parent(out, target, flag, create_ok=create_parents)
    return target


def write_marker(directory: Path, owner: str, files: Optional[Sequence[str]] = None) -> None:
    """Mark ``directory`` as ``owner``'s output, listing every file in it (call it last)."""
    listed = sorted(files) if files is not None else _files_under(directory)
    (directory / MARKER).write_text(json.dumps({"tool": owner, "files": listed}, indent=1) + "\n")


def marked_files(directory: Path, owner: str) -> list[str]:
    """The files ``owner``'s mark in ``directory`` lists (none when unmarked or marked by another)."""
    mark = _read_marker(directory)
    return list(mark["files"]) if mark is not None and mark.get("tool") == owner else []


def _default_dir_mode() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return 0o777 & ~umask


def write_dir(out: PathLike, owner: str, overwrite: bool, write: Callable[[Path], None]) -> Path:
    """Write ``owner``'s output directory ``out`` atomically: ``write(tmp)`` fills a fresh hidden
    sibling (a unique name: nothing that exists is ever removed), the mark is added, and it is
    renamed into place. An earlier output is moved aside first and removed only once the new one is
    in place; a failure leaves ``out`` as it was. Returns the real path."""
    target = check_replaceable_dir(out, owner, overwrite)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        os.chmod(tmp, _default_dir_mode())  # mkdtemp makes it 0700; an output gets the usual mode
        write(tmp)
        write_marker(tmp, owner)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    aside = None
    if target.exists():
        aside = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
        os.replace(target, aside)  # onto the empty dir mkdtemp made
    os.replace(tmp, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    return target

"""Files a command writes for its user: it replaces one only if it wrote it itself.

A command's output path may name anything: the study file, its database, a user's own table.
What a command wrote is known by how it begins (a CSV by its header, a report's page by its
title): any other file there is the user's, and is refused before any work is done.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reftsearch.errors import BadInputError

HEAD_BYTES = 4096  # how far into a file its mark is looked for


def refuse_foreign(path: Path, option: str, command: str, mark: str) -> None:
    """Refuse ``path`` (given as ``option``) when it exists and is not a file ``command``
    wrote: those hold ``mark`` in their first ``HEAD_BYTES`` bytes."""
    if is_stream(path):  # /dev/stdout, a named pipe: written to, never read or replaced
        return
    if path.exists() and not holds(path, mark):
        raise BadInputError(
            f"{option} {path}: exists and is not a file `reftsearch {command}` wrote; "
            "remove it or give another name"
        )


def holds(path: Path, mark: str) -> bool:
    """Whether the beginning of file ``path`` holds ``mark`` (False when it cannot be read)."""
    try:
        with path.open("rb") as file:
            return mark.encode() in file.read(HEAD_BYTES)
    except OSError:
        return False


def why_unwritable(folder: Path) -> str | None:
    """Why nothing can be made in ``folder``, or None when a folder could be (one is made
    and removed). Permission bits do not tell: ``os.access`` says yes to root for any
    folder, and some refuse root too (``/proc``, a FUSE mount), so a check by them passed
    where writing failed after minutes of training."""
    try:
        probe = tempfile.mkdtemp(prefix=".reftsearch-probe.", dir=folder)
    except OSError as err:
        return err.strerror or str(err)
    os.rmdir(probe)
    return None


def is_stream(path: Path) -> bool:
    """Whether ``path`` is there and neither a regular file nor a folder: ``/dev/stdout``, a
    named pipe. Reading one to judge it would wait for input (for ever, in a pipe)."""
    return path.exists() and not path.is_file() and not path.is_dir()


@contextmanager
def written_whole(path: Path, exclusive: bool = False) -> Iterator[Path]:
    """Where to write ``path``'s content: a file beside it, moved onto ``path`` once written
    whole, so that a failure (a full disk) leaves no part of a file there, and an earlier
    one as it was. ``exclusive``: refuse (FileExistsError) a ``path`` made meanwhile, never
    replacing it. A stream (``is_stream``) is written directly: nothing can be moved onto it."""
    if is_stream(path):
        yield path
        return
    path = path.resolve() if path.is_symlink() else path  # the file it names is replaced
    handle, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(handle)
    scratch = Path(name)
    try:
        yield scratch
        os.chmod(scratch, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        if exclusive:
            _link_new(scratch, path)
        else:
            os.replace(scratch, path)
    finally:
        scratch.unlink(missing_ok=True)


def _link_new(source: Path, path: Path) -> None:
    """Make ``source`` the new file ``path``; FileExistsError if ``path`` is there. A hard
    link fails on one that is; a file system without hard links gets a check, then a move."""
    try:
        os.link(source, path)
    except FileExistsError:
        raise
    except OSError:
        if os.path.lexists(path):
            raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
        os.replace(source, path)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask

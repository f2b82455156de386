"""The export's directory: written whole into a scratch sibling, then moved into place.

An export replaces only a previous export, and only the files that export wrote (listed in its
``reftsearch.json``: ``files`` names the top level, ``file_tree`` every path, ``base_model/``'s
files included); a directory holding anything else is refused, before any work, and again just
before the swap, as is one this process could not write: OUT_DIR, each folder of the previous
export (moved and deleted), and the folder the scratch sibling goes into.

A directory that is there is kept (its mode, and a shell inside it stays in it): the previous
export's entries are moved into a ``.old`` sibling, reftsearch.json first, then the new ones in,
reftsearch.json last. So OUT_DIR holds reftsearch.json exactly when it holds a whole export, and
an interrupted swap is undone from what is on disk: at once on an exception (Ctrl-C, SIGTERM, a
failed move), by the next export after a kill. A crash mid-export leaves the previous export.
Exports into one folder swap (and undo) one at a time (``_alone_in``): the last to finish is
the one in place.

Exports from before ``file_tree`` listed only the top level: inside their ``base_model/``, the
files ``save_pretrained`` writes are taken for theirs (OLDER_NESTED_FILES), anything else (a
subfolder too) is refused as a top-level file of the user's is.
"""

from __future__ import annotations

import errno
import fcntl
import fnmatch
import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from reftsearch.errors import BadInputError
from reftsearch.own_files import why_unwritable
from reftsearch.progress import Log

SIDECAR = "reftsearch.json"
PARTIAL, OLD = ".partial", ".old"  # suffixes of the scratch siblings: the new export, the old
# what exports made before reftsearch.json listed its files could have written
OLDER_EXPORT_FILES = ("config.json", "intkey_*.bin", "pytorch_model.bin", SIDECAR,
                      "reft_config.py", "reference_io.json", "base_model")  # fmt: skip
# ... and, before it listed nested files, inside its folders: save_pretrained's files
OLDER_NESTED_FILES = {
    "base_model": ("config.json", "generation_config.json", "model*.safetensors",
                   "model.safetensors.index.json", "tokenizer*.json", "special_tokens_map.json",
                   "added_tokens.json", "chat_template.jinja", "vocab.*", "merges.txt",
                   "tokenizer.model"),
}  # fmt: skip


def check_out_dir(out: Path) -> None:
    """Refuse ``out`` unless it is missing, empty, or holds only what an export wrote, and
    unless it (or the folder it is to be made in) can be written."""
    if out.is_symlink():
        raise BadInputError(
            f"OUT_DIR: {out} is a symbolic link; give the directory it points to, or a new one"
        )
    if out.exists() and not out.is_dir():
        raise BadInputError(f"OUT_DIR: {out} must be a directory, it is a file")
    nearest = _nearest_folder(out)
    why = "(the export is written next to OUT_DIR first)"
    _check_writable(nearest, why)
    _check_folders_can_be_made_in(nearest, why)
    if not out.is_dir():
        return
    with _out_dir_errors(out, "reading it"):
        paths = _tree(out)
    _check_written_by_export(out, paths)
    _check_writable(out, "(the export's files are moved into it)")
    for folder in (out / path for path in sorted(paths)):
        if folder.is_dir() and not folder.is_symlink():
            _check_writable(folder, "(the previous export's folders are moved aside and deleted)")


def _nearest_folder(out: Path) -> Path:
    """The folder the export's scratch sibling goes into, or the nearest one above it that is
    there (the folders between are made)."""
    folder = next(folder for folder in out.parents if os.path.lexists(folder))  # out is absolute
    if not folder.is_dir():
        raise BadInputError(
            f"OUT_DIR: {out} cannot be made: {folder} must be a directory, it is a file"
        )
    return folder


def _check_writable(folder: Path, why: str) -> None:
    if not os.access(folder, os.W_OK | os.X_OK):
        mode = stat.filemode(folder.stat().st_mode)
        raise BadInputError(f"OUT_DIR: {folder} must be writable {why}, it is {mode}")


def _check_folders_can_be_made_in(folder: Path, why: str) -> None:
    reason = why_unwritable(folder)
    if reason is not None:
        raise BadInputError(
            f"OUT_DIR: {folder} must be writable {why}; making a folder in it failed: {reason}"
        )


def _check_written_by_export(out: Path, paths: set[str]) -> None:
    if not paths:
        return
    if SIDECAR not in paths:
        raise BadInputError(
            f"OUT_DIR: {out} must be empty, missing, or an earlier reftsearch export "
            f"(it has files but no {SIDECAR})"
        )
    written = _written_by_export(out)
    others = {path for path in paths if not written(path)}
    # a folder of the user's is named, not every file in it
    named = sorted(path for path in others if path.rpartition("/")[0] not in others)
    if named:
        raise BadInputError(
            f"OUT_DIR: {out} holds files no reftsearch export wrote ({', '.join(named[:5])}); "
            "move them, or export to another directory"
        )


def _written_by_export(out: Path) -> Callable[[str], bool]:
    """Whether a path under ``out`` (as ``_tree`` gives it) is one the export there wrote."""
    sidecar = _sidecar(out)
    if isinstance(sidecar.get("file_tree"), list):
        return set(sidecar["file_tree"]).__contains__
    files = sidecar.get("files")

    def top(name: str) -> bool:
        return name in files if isinstance(files, list) else _matches(name, OLDER_EXPORT_FILES)

    def older(path: str) -> bool:
        folder, _, name = path.rpartition("/")
        if not folder:
            return top(name)
        return top(folder) and _matches(name, OLDER_NESTED_FILES.get(folder, ()))

    return older


def _sidecar(directory: Path) -> dict:
    try:
        sidecar = json.loads((directory / SIDECAR).read_text())
    except (OSError, ValueError):
        return {}
    return sidecar if isinstance(sidecar, dict) else {}


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def _tree(directory: Path) -> set[str]:
    """Every path under ``directory``, relative and '/'-separated; a link is not followed."""
    paths = set()
    for folder, folders, files in os.walk(directory, onerror=_raise):
        relative = Path(folder).relative_to(directory)
        paths.update((relative / name).as_posix() for name in folders + files)
    return paths


def _raise(err: OSError) -> None:
    raise err  # os.walk skips a folder it cannot read; then a file of the user's would be missed


@contextmanager
def replacing(out: Path, log: Log) -> Iterator[Path]:
    """A scratch directory next to ``out`` to write the export into; on success its files are
    moved into ``out`` (made if missing; a previous export there is removed), else it is
    removed. ``log`` says when the previous export's files could not be deleted."""
    check_out_dir(out)
    with _out_dir_errors(out, "making a scratch folder next to it"):
        out.parent.mkdir(parents=True, exist_ok=True)
        with _alone_in(out.parent):  # made and locked before another export's settle looks
            scratch = _new_scratch(out)
            owned = _lock(scratch, wait=False)
    try:
        yield scratch
        with _alone_in(out.parent):
            check_out_dir(out)  # again: the user may have added a file meanwhile
            with _out_dir_errors(out, "moving the export into it"):
                _swap(out, scratch, log)
    finally:
        if not _old_of(scratch).exists():  # else an undo failed: the next export needs scratch
            shutil.rmtree(scratch, ignore_errors=True)
        if owned is not None:
            os.close(owned)


def _new_scratch(out: Path) -> Path:
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=PARTIAL, dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    scratch.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename into a new OUT_DIR
    return scratch


def _swap(out: Path, scratch: Path, log: Log) -> None:
    """Make ``scratch``'s files the export at ``out``, keeping ``out`` itself if it is there."""
    if not out.is_dir():
        scratch.rename(out)
        return
    old = _old_of(scratch)
    old.mkdir()
    try:
        _move(out, old, _commit_order(out)[::-1])  # reftsearch.json first: out is no export now
        _move(scratch, out, _commit_order(scratch))  # reftsearch.json last: the commit
    finally:
        _settle(out, scratch, old)  # if this fails, old is kept for the next export to settle
        _discard(old, log)


def _old_of(scratch: Path) -> Path:
    return scratch.with_name(scratch.name.removesuffix(PARTIAL) + OLD)


def _commit_order(directory: Path) -> list[str]:
    """``directory``'s entries, reftsearch.json last."""
    return sorted((entry.name for entry in directory.iterdir()), key=lambda name: name == SIDECAR)


def _move(source: Path, target: Path, names: list[str]) -> None:
    for name in names:
        if os.path.lexists(target / name):  # rename would replace that file without a word
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(target / name))
        (source / name).rename(target / name)


def _settle(out: Path, scratch: Path, old: Path) -> None:
    """Undo a swap into ``out`` that did not commit (``out`` has no reftsearch.json): the new
    export's entries go back to ``scratch`` (those its reftsearch.json lists and it lacks: all
    the previous export's had left ``out`` before the first came in), the previous export's
    back from ``old``."""
    if os.path.lexists(out / SIDECAR):
        return  # the swap committed, or never began
    moved_in = set(_sidecar(scratch).get("files", [])) - {e.name for e in scratch.iterdir()}
    _move(out, scratch, sorted(name for name in moved_in if os.path.lexists(out / name)))
    _move(old, out, _commit_order(old))


def _discard(old: Path, log: Log) -> None:
    """Delete ``old``; the export in place does not depend on it, so a failure is only said."""
    try:
        shutil.rmtree(old)
    except OSError as err:
        log(f"warning: could not delete {old}, the previous export's files ({err}); delete it")


def settle_interrupted(out: Path, log: Log) -> None:
    """Finish what an export killed mid-swap into ``out`` left: the previous export is put
    back unless the new one was whole in place, then the swap's scratch siblings are deleted.
    Only siblings named as ``replacing`` names them: a ``.old`` one and its ``.partial`` (the
    swap began), and a ``.partial`` one alone whose export is gone (killed while writing it:
    its lock is free; one still writing holds it)."""
    if out.is_symlink() or not out.parent.is_dir():
        return
    scratch_name = rf"\.{re.escape(out.name)}\.[a-z0-9_]{{8}}"  # mkdtemp's
    olds, partials = re.compile(scratch_name + re.escape(OLD)), re.compile(scratch_name + PARTIAL)
    with _alone_in(out.parent), _out_dir_errors(out, "undoing an interrupted export"):
        for old in sorted(out.parent.iterdir()):
            if out.is_dir() and olds.fullmatch(old.name) and _is_folder(old):
                scratch = old.with_name(old.name.removesuffix(OLD) + PARTIAL)
                _settle(out, scratch, old)
                _discard(old, log)
                shutil.rmtree(scratch, ignore_errors=True)
        for scratch in sorted(out.parent.iterdir()):
            lone = partials.fullmatch(scratch.name) and not _old_of(scratch).exists()
            if lone and _is_folder(scratch) and _unowned(scratch):
                shutil.rmtree(scratch, ignore_errors=True)


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def _unowned(scratch: Path) -> bool:
    """Whether no export holds ``scratch``'s lock: the one that made it is gone."""
    descriptor = _lock(scratch, wait=False)
    if descriptor is None:
        return False
    os.close(descriptor)
    return True


def _lock(folder: Path, wait: bool) -> int | None:
    """An open descriptor of ``folder`` holding its exclusive ``flock`` (closing it lets go),
    or None where it is held elsewhere (``wait`` False) or the filesystem has no such locks."""
    try:
        descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except OSError:
        os.close(descriptor)
        return None
    return descriptor


@contextmanager
def _alone_in(folder: Path) -> Iterator[None]:
    """While no other export swaps into (or settles) ``folder``: an exclusive ``flock`` on the
    folder itself (no lock file to leave behind; a killed holder's lock ends with it). Without
    it, an export starting while another swapped took that one's ``.old`` sibling for a killed
    export's and undid its swap, and two swaps at once could leave one export's
    reftsearch.json beside the other's weights. Where the filesystem has no such locks, the
    exports go on without."""
    descriptor = _lock(folder, wait=True)
    try:
        yield
    finally:
        if descriptor is not None:
            os.close(descriptor)


@contextmanager
def _out_dir_errors(out: Path, doing: str) -> Iterator[None]:
    """An OSError (a permission, a folder gone) as one line of bad input naming the path; a
    full disk is no fault of the path, and ends the command as such (exit 1)."""
    try:
        yield
    except OSError as err:
        if err.errno == errno.ENOSPC:
            raise
        raise BadInputError(f"OUT_DIR: {out}: {doing} failed: {err}") from err


def listing(directory: Path) -> dict[str, list[str]]:
    """The entries of ``reftsearch.json`` that say what an export wrote into ``directory`` (its
    ``reftsearch.json`` included): ``files``, the top level, and ``file_tree``, every path."""
    paths = _tree(directory) | {SIDECAR}
    return {"files": sorted(path for path in paths if "/" not in path), "file_tree": sorted(paths)}

"""The export's directory: written whole into a scratch sibling, then renamed into place.

An export replaces only a previous export, and only the files that export wrote (listed in
its ``reftsearch.json``); a directory holding anything else is refused, before any work, and
again just before the swap. A crash mid-export leaves the previous export as it was.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from reftsearch.errors import BadInputError

SIDECAR = "reftsearch.json"
# what exports made before reftsearch.json listed its files could have written
OLDER_EXPORT_FILES = ("config.json", "intkey_*.bin", "pytorch_model.bin", SIDECAR,
                      "reft_config.py", "reference_io.json", "base_model")  # fmt: skip


def check_out_dir(out: Path) -> None:
    """Refuse ``out`` unless it is missing, empty, or holds only what an export wrote."""
    if out.is_symlink():
        raise BadInputError(
            f"OUT_DIR: {out} is a symbolic link; give the directory it points to, or a new one"
        )
    if out.exists() and not out.is_dir():
        raise BadInputError(f"OUT_DIR: {out} must be a directory, it is a file")
    if not out.is_dir():
        return
    names = {entry.name for entry in out.iterdir()}
    if not names:
        return
    if SIDECAR not in names:
        raise BadInputError(
            f"OUT_DIR: {out} must be empty, missing, or an earlier reftsearch export "
            f"(it has files but no {SIDECAR})"
        )
    others = sorted(names - _written_by_export(out, names))
    if others:
        raise BadInputError(
            f"OUT_DIR: {out} holds files no reftsearch export wrote ({', '.join(others[:5])}); "
            "move them, or export to another directory"
        )


def _written_by_export(out: Path, names: set[str]) -> set[str]:
    try:
        files = json.loads((out / SIDECAR).read_text()).get("files")
    except (OSError, ValueError, AttributeError):
        files = None
    if isinstance(files, list):
        return set(files)
    return {n for n in names if any(fnmatch.fnmatch(n, p) for p in OLDER_EXPORT_FILES)}


@contextmanager
def replacing(out: Path) -> Iterator[Path]:
    """A scratch directory next to ``out`` to write the export into; on success it becomes
    ``out`` (a previous export there is removed), else it is removed."""
    check_out_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    umask = os.umask(0)
    os.umask(umask)
    scratch.chmod(0o777 & ~umask)  # mkdtemp's 0700 would outlive the rename
    try:
        yield scratch
        check_out_dir(out)  # again: the user may have added a file meanwhile
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()
        if out.is_dir():  # a previous export, every file of it written by it (checked)
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            out.rename(old / out.name)
            scratch.rename(out)
            shutil.rmtree(old)
        else:
            scratch.rename(out)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def listing(directory: Path) -> list[str]:
    """The names an export wrote into ``directory`` (top level), its ``reftsearch.json``
    included, for the ``files`` entry of that file."""
    return sorted({entry.name for entry in directory.iterdir()} | {SIDECAR})

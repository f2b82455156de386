"""The export's directory (reftsearch.export.out_dir): what a re-export may replace, the swap
undone when interrupted or killed, path problems refused before any work, the folder kept."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from reftsearch.errors import BadInputError
from reftsearch.export.out_dir import (
    SIDECAR,
    check_out_dir,
    listing,
    replacing,
    settle_interrupted,
)

FIRST = {"config.json": "1", "intkey_a.bin": "1", "base_model/config.json": "1",
         "base_model/model.safetensors": "1"}  # fmt: skip
SECOND = {"config.json": "2", "intkey_b.bin": "2", "base_model/config.json": "2",
          "base_model/model.safetensors": "2"}  # fmt: skip
RENAMES = 8  # a swap of FIRST for SECOND: 4 entries aside, 4 in (reftsearch.json each)


def export_into(out: Path, files: dict[str, str], log=print) -> None:
    """An export as the exporters write one: ``files``, then reftsearch.json listing them."""
    with replacing(out, log) as scratch:
        write_export(scratch, files)


def write_export(scratch: Path, files: dict[str, str]) -> None:
    for path, text in files.items():
        (scratch / path).parent.mkdir(parents=True, exist_ok=True)
        (scratch / path).write_text(text)
    (scratch / SIDECAR).write_text(json.dumps({"trial": files["config.json"]} | listing(scratch)))


def in_child(function: str, *args: str) -> tuple[list[str], dict[str, str]]:
    """The command and environment that run this module's ``function(*args)`` in a new
    Python process (to be killed or paused there)."""
    call = f"{function}({', '.join(map(repr, args))})"
    code = f"from test_export_out_dir import {function}; {call}"
    tests = str(Path(__file__).parent)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([tests, os.environ.get("PYTHONPATH", "")])}
    return [sys.executable, "-c", code], env


def contents(directory: Path) -> dict[str, str]:
    """Every file under ``directory`` but reftsearch.json, with its text."""
    return {
        path.relative_to(directory).as_posix(): path.read_text()
        for path in directory.rglob("*")
        if path.is_file() and path.name != SIDECAR
    }


def siblings(out: Path) -> list[str]:
    return sorted(path.name for path in out.parent.iterdir() if path.name != out.name)


def test_an_export_lists_the_files_inside_its_folders(tmp_path):
    out = tmp_path / "out"
    export_into(out, FIRST)
    sidecar = json.loads((out / SIDECAR).read_text())
    assert sidecar["files"] == sorted(path.name for path in out.iterdir())
    assert sidecar["file_tree"] == sorted([*FIRST, "base_model", SIDECAR])
    assert contents(out) == FIRST and siblings(out) == []


def test_a_file_of_the_users_inside_base_model_is_refused(tmp_path):
    out = tmp_path / "out"
    export_into(out, FIRST)
    (out / "base_model" / "MY_NOTES.txt").write_text("mine")
    with pytest.raises(BadInputError, match=r"wrote \(base_model/MY_NOTES.txt\)"):
        export_into(out, SECOND)
    (out / "base_model" / "MY_NOTES.txt").unlink()
    (out / "base_model" / "mine").mkdir()  # a folder of the user's is named, not its files
    (out / "base_model" / "mine" / "a.txt").write_text("mine")
    with pytest.raises(BadInputError, match=r"wrote \(base_model/mine\);"):
        export_into(out, SECOND)
    assert contents(out) == {**FIRST, "base_model/mine/a.txt": "mine"} and siblings(out) == []


@pytest.mark.parametrize("listed", ["files", "nothing"])
def test_an_older_export_is_judged_by_what_save_pretrained_writes(tmp_path, listed):
    out = tmp_path / "out"
    export_into(out, FIRST)
    sidecar = json.loads((out / SIDECAR).read_text())
    del sidecar["file_tree"]  # as exports before it wrote reftsearch.json
    if listed == "nothing":
        del sidecar["files"]
    (out / SIDECAR).write_text(json.dumps(sidecar))
    (out / "base_model" / "tokenizer_config.json").write_text("1")
    check_out_dir(out)
    for foreign in ("MY_NOTES.txt", "sub/config.json"):
        (out / "base_model" / foreign).parent.mkdir(exist_ok=True)
        (out / "base_model" / foreign).write_text("mine")
        with pytest.raises(BadInputError, match=f"wrote \\(base_model/{foreign.split('/')[0]}\\)"):
            check_out_dir(out)
        shutil.rmtree(out / "base_model" / foreign.split("/")[0], ignore_errors=True)
        (out / "base_model" / foreign).unlink(missing_ok=True)
    export_into(out, SECOND)
    assert contents(out) == SECOND


@pytest.mark.parametrize("error", [KeyboardInterrupt, PermissionError])
@pytest.mark.parametrize("at", range(RENAMES))
def test_an_interrupted_swap_puts_the_previous_export_back(tmp_path, monkeypatch, at, error):
    out = tmp_path / "out"
    export_into(out, FIRST)
    rename, calls = os.rename, []

    def failing_rename(source, target):
        calls.append(source)
        if len(calls) == at + 1:
            raise error(13, "interrupted here", str(source))
        rename(source, target)

    monkeypatch.setattr(os, "rename", failing_rename)
    expected = BadInputError if error is PermissionError else KeyboardInterrupt
    match = "moving the export into it failed" if error is PermissionError else None
    with pytest.raises(expected, match=match):
        export_into(out, SECOND)
    monkeypatch.setattr(os, "rename", rename)
    assert contents(out) == FIRST and json.loads((out / SIDECAR).read_text())["trial"] == "1"
    assert siblings(out) == []
    export_into(out, SECOND)
    assert contents(out) == SECOND and siblings(out) == []


def swap_killed(out: str, at: str) -> None:
    """Export SECOND over ``out`` and die by SIGKILL at rename number ``at``, or ("discard")
    while deleting the previous export: no ``finally`` runs, as after ``kill -9``."""
    rename, rmtree, calls = os.rename, shutil.rmtree, []

    def rename_or_die(source, target):
        calls.append(source)
        if str(len(calls) - 1) == at:
            os.kill(os.getpid(), signal.SIGKILL)
        rename(source, target)

    def rmtree_or_die(path, *args, **kwargs):
        if at == "discard" and str(path).endswith(".old"):
            os.kill(os.getpid(), signal.SIGKILL)
        rmtree(path, *args, **kwargs)

    os.rename, shutil.rmtree = rename_or_die, rmtree_or_die
    export_into(Path(out), SECOND)


@pytest.mark.parametrize("at", [*map(str, range(RENAMES)), "discard"])
def test_a_killed_swap_is_settled_by_the_next_export(tmp_path, at):
    out = tmp_path / "out"
    export_into(out, FIRST)
    command, env = in_child("swap_killed", str(out), at)
    killed = subprocess.run(command, env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    assert siblings(out)  # what the kill left: a .old folder, and the new export's scratch
    logged: list[str] = []
    settle_interrupted(out, logged.append)
    assert contents(out) == (SECOND if at == "discard" else FIRST) and siblings(out) == []
    assert logged == []
    export_into(out, SECOND)
    assert contents(out) == SECOND and siblings(out) == []


def swap_paused(out: str, go: str) -> None:
    """Export SECOND into ``out``, pausing mid-swap (after 3 of its renames) until ``go``
    exists; ``go``.paused says it is there."""
    rename, renames = os.rename, []

    def rename_or_wait(*args, **kwargs):
        renames.append(args)
        if len(renames) == 3:
            Path(go + ".paused").touch()
            while not os.path.exists(go):
                time.sleep(0.01)
        rename(*args, **kwargs)

    os.rename = rename_or_wait
    export_into(Path(out), SECOND)


def test_exports_into_one_folder_swap_one_at_a_time(tmp_path):
    """An export that began while another was mid-swap took that one's .old sibling for a
    killed export's and undid its swap under it; two swaps at once could mix their files."""
    out, go = tmp_path / "out", tmp_path / "go"
    export_into(out, FIRST)
    command, env = in_child("swap_paused", str(out), str(go))
    paused = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    try:
        while not Path(str(go) + ".paused").exists():
            assert paused.poll() is None, paused.stderr.read().decode()
            time.sleep(0.01)
        third = {**SECOND, "config.json": "3", "intkey_b.bin": "3"}
        later = threading.Thread(
            target=lambda: (settle_interrupted(out, print), export_into(out, third))
        )
        later.start()
        later.join(timeout=1)
        assert later.is_alive()  # waits for the swap under way
    finally:
        go.touch()  # the paused export goes on (and ends) whatever happened here
    assert paused.wait(timeout=60) == 0, paused.stderr.read().decode()
    later.join(timeout=60)
    assert contents(out) == third and siblings(out) == ["go", "go.paused"]


def write_killed(out: str) -> None:
    """An export killed while it writes its files (kill -9, out of memory)."""
    with replacing(Path(out), print) as scratch:
        (scratch / "config.json").write_text("half")
        os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.parametrize("earlier", [True, False], ids=["over-an-export", "first-export"])
def test_a_scratch_folder_of_a_killed_export_is_removed_one_still_writing_is_not(tmp_path, earlier):
    """An export killed while writing left its .partial folder (with a --with-base-model
    export, a whole model) for good: no later export removed it."""
    out = tmp_path / "out"
    if earlier:
        export_into(out, FIRST)
    command, env = in_child("write_killed", str(out))
    killed = subprocess.run(command, env=env, capture_output=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr.decode()
    (left,) = siblings(out)
    assert left.endswith(".partial")
    with replacing(out, print) as live:  # an export still writing: its folder is its own
        settle_interrupted(out, print)
        assert siblings(out) == [live.name]
        write_export(live, SECOND)
    assert contents(out) == SECOND and siblings(out) == []


def test_a_previous_export_that_cannot_be_deleted_is_a_warning(tmp_path, monkeypatch):
    out = tmp_path / "out"
    export_into(out, FIRST)
    rmtree = shutil.rmtree

    def refusing_rmtree(path, *args, **kwargs):
        if str(path).endswith(".old"):
            raise PermissionError(13, "Permission denied", str(path))
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(shutil, "rmtree", refusing_rmtree)
    logged: list[str] = []
    export_into(out, SECOND, logged.append)
    assert contents(out) == SECOND
    (left,) = [name for name in siblings(out) if name.endswith(".old")]
    assert len(logged) == 1 and logged[0].startswith(f"warning: could not delete {tmp_path / left}")
    assert contents(tmp_path / left) == FIRST
    monkeypatch.setattr(shutil, "rmtree", rmtree)
    settle_interrupted(out, logged.append)  # the next export deletes it
    assert contents(out) == SECOND and siblings(out) == []


@pytest.mark.parametrize("ancestor", ["afile", "afile/x"])
def test_a_file_where_a_folder_must_be_is_refused_up_front(tmp_path, ancestor):
    (tmp_path / "afile").write_text("mine")
    out = tmp_path / ancestor / "y"
    message = f"{tmp_path / 'afile'} must be a directory, it is a file"
    with pytest.raises(BadInputError, match=re.escape(message)):
        export_into(out, FIRST)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["afile"]


@pytest.mark.parametrize("read_only", [".", "out", "out/base_model"])
def test_a_folder_that_cannot_be_written_is_refused_up_front(tmp_path, monkeypatch, read_only):
    """As root (the tests' user here) permission bits do not stop a write: os.access says
    what a user's process would be refused."""
    out = tmp_path / "out"
    export_into(out, FIRST)
    folder, access = tmp_path / read_only, os.access
    monkeypatch.setattr(
        os, "access", lambda path, *args, **kw: Path(path) != folder and access(path, *args, **kw)
    )
    with pytest.raises(BadInputError, match=re.escape(f"OUT_DIR: {folder} must be writable")):
        export_into(out if read_only != "." else tmp_path / "new" / "out", SECOND)
    assert contents(out) == FIRST and siblings(out) == []


def test_a_scratch_folder_that_cannot_be_made_is_one_line(tmp_path, monkeypatch):
    """A scratch folder that cannot be made after the up-front check could (a full disk)."""
    mkdtemp = tempfile.mkdtemp

    def refusing_mkdtemp(**kwargs):
        if "suffix" not in kwargs:  # the up-front check's folder, not the scratch one
            return mkdtemp(**kwargs)
        raise PermissionError(13, "Permission denied", str(kwargs["dir"]))

    monkeypatch.setattr(tempfile, "mkdtemp", refusing_mkdtemp)
    message = (
        f"making a scratch folder next to it failed: [Errno 13] Permission denied: '{tmp_path}'"
    )
    with pytest.raises(BadInputError, match=re.escape(message)):
        export_into(tmp_path / "out", FIRST)


def test_the_users_folder_is_kept(tmp_path):
    private = tmp_path / "private"
    private.mkdir()
    private.chmod(0o700)
    inode = private.stat().st_ino
    for files in (FIRST, SECOND):  # into the empty folder, then over the export in it
        export_into(private, files)
        assert contents(private) == files and siblings(private) == []
        assert private.stat().st_ino == inode and stat.S_IMODE(private.stat().st_mode) == 0o700


def test_a_real_export_refuses_a_file_in_base_model_before_any_work(
    tmp_path, write_study, easy_task_files, capsys, monkeypatch
):
    # imported here: the killed swaps' subprocesses import this module, quickly without torch
    from conftest import tiny_study

    from reftsearch.cli import main
    from reftsearch.export import pyreft

    study = write_study(tiny_study(easy_task_files, budget={"n_trials": 1, "max_epochs": 1}))
    out = tmp_path / "out"
    assert main(["run", str(study)]) == 0
    assert main(["export", str(study), str(out)]) == 0
    sidecar = json.loads((out / SIDECAR).read_text())
    assert "base_model/config.json" in sidecar["file_tree"]
    (out / "base_model" / "MY_NOTES.txt").write_text("mine")

    def no_work(*args, **kwargs):
        raise AssertionError("the output directory must be checked before any work")

    monkeypatch.setattr(pyreft, "prepare", no_work)
    capsys.readouterr()
    for out_dir, error in [
        (out, "holds files no reftsearch export wrote (base_model/MY_NOTES.txt)"),
        (study / "sub", f"{study} must be a directory, it is a file"),
        # root may write any folder by its bits, so os.access said yes: it trained, then failed
        (Path("/proc/reftsearch/out"), "OUT_DIR: /proc must be writable"),
    ]:
        assert main(["export", str(study), str(out_dir)]) == 2
        err = capsys.readouterr().err
        assert error in err and err.count("\n") == 1
    assert (out / "base_model" / "MY_NOTES.txt").read_text() == "mine"

import os

# before torch loads OpenMP, as the reftsearch command does (reftsearch.engine.threads): on a
# machine other jobs share, spinning waits make small kernels many times slower
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import fcntl  # noqa: E402
import hashlib  # noqa: E402
import signal  # noqa: E402
import sqlite3  # noqa: E402
import subprocess  # noqa: E402
from contextlib import closing  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

from reftsearch.testing import scratch_postgres_database  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# ``model.dtype: auto`` means float32 on every CPU in tests (subprocesses and Ray workers
# too), not bfloat16-mixed on the machines with native bfloat16: the same results anywhere;
# the tests of the CPU probe set it themselves
os.environ.setdefault("REFTSEARCH_NATIVE_BFLOAT16_CPU", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PYREFT_TOOLS = REPO.parent / "shared" / "tools" / "pyreft_ref"
PYREFT_VENV = Path(
    os.environ.get("REFTSEARCH_PYREFT_VENV", Path.home() / ".cache/reftsearch/pyreft-venv")
)

# the equivalence tests run on every device here: on a GPU machine they check the CUDA paths
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


@pytest.fixture(autouse=True)
def frozen_store(tmp_path_factory, monkeypatch):
    """Each test's own frozen store (its subprocesses and Ray actors inherit it): one test's
    frozen passes are never another's, nor a user's in ~/.cache."""
    folder = tmp_path_factory.mktemp("frozen")
    monkeypatch.setenv("REFTSEARCH_FROZEN_STORE", str(folder))
    return folder


@pytest.fixture
def write_study(tmp_path):
    """Write a study YAML (a dict) into tmp_path and return its path."""

    def write(raw: dict, name: str = "study.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(raw, sort_keys=False))
        return path

    return write


@pytest.fixture
def easy_task_files(tmp_path):
    """A classification task a tiny random model learns in one epoch: the first word decides."""
    import random

    rng = random.Random(0)
    words = ["red", "blue", "green", "gold", "grey", "pink"]

    def rows(n):
        out = ["text,label"]
        for _ in range(n):
            label = rng.randint(0, 1)
            lead = "yes" if label else "no"
            out.append(f"{lead} {' '.join(rng.choices(words, k=4))},{label}")
        return "\n".join(out) + "\n"

    (tmp_path / "train.csv").write_text(rows(96))
    (tmp_path / "dev.csv").write_text(rows(48))
    (tmp_path / "test.csv").write_text(rows(48))
    return {split: str(tmp_path / f"{split}.csv") for split in ("train", "dev", "test")}


def digest(path: Path) -> str:
    """The file's bytes, hashed; a SQLite database in WAL mode with its log folded in first.

    An in-process `run` leaves its study's connections open until the garbage collector
    frees the study (a reference cycle), and the last one's close copies the log into the
    file: its bytes then changed in the middle of a test that no command wrote to it in.
    After a checkpoint now the log is empty, so that close changes nothing, and anything a
    command did write is in the file the next time this reads it."""
    if Path(f"{path}-wal").exists():
        with closing(sqlite3.connect(path)) as db:
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tiny_study(data, **changes) -> dict:
    raw = {
        "name": "t",
        "model": "tiny:llama",
        "task": {"kind": "classification", "data": data, "text": "text", "max_length": 32},
        "seed": 3,
        "budget": {"n_trials": 3, "max_epochs": 2},
        "sampler": {"type": "random"},
        "pruner": "none",
        "space": {
            "rank": [1, 2],
            "lr": {"low": 1e-3, "high": 1e-2, "log": True},
            "prefix": 1,
            "suffix": {"low": 0, "high": 2},
            "batch_size": 16,
        },
        "resources": {"heartbeat_s": 5},
    }
    raw.update(changes)
    return raw


@pytest.hookimpl(tryfirst=True)  # before -m deselects
def pytest_collection_modifyitems(items):
    """A test that takes ``postgres_url`` is marked ``postgres``; ``ray`` and ``postgres``
    tests are ``slow`` too, so that ``pytest -m "not slow"`` stays a quick loop."""
    for item in items:
        if "postgres_url" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.postgres)
        if item.get_closest_marker("ray") or item.get_closest_marker("postgres"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture
def postgres_url():
    """A fresh database on the PostgreSQL at 127.0.0.1:5432 (trust auth), dropped afterwards."""
    with scratch_postgres_database("reftsearch_test") as url:
        if url is None:
            pytest.skip("no PostgreSQL server accepting user postgres or root on 127.0.0.1:5432")
        yield url


def sigint_as_in_a_terminal() -> None:
    """A ``preexec_fn`` for subprocesses a test stops with SIGINT: the signal as a terminal's
    foreground job gets it. A shell's background job (a CI step run with ``&``) inherits it
    ignored, and Python then never raises KeyboardInterrupt."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


RECIPE_STAMP = ".built-from"  # in a built venv: the digest of the recipe it was built from


def built_venv(venv: Path, install_sh: Path, freeze_file: str, env: dict | None = None) -> Path:
    """``venv``'s python: reused when built (``freeze_file``, its INSTALL.sh's last step, is
    there) from the recipe as it is now (``recipe_digest``: a cached venv outlives changes to
    its lock file), else built by ``install_sh`` under a lock: INSTALL.sh starts by removing
    the venv, so two test runs at once must not build it into each other. A failed build
    fails the test."""
    python = venv / "bin" / "python"
    stamp, digest = venv / RECIPE_STAMP, recipe_digest(install_sh)
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = python.exists() and (venv / freeze_file).exists()
        if not (built and stamp.exists() and stamp.read_text() == digest):
            run = subprocess.run(
                ["bash", str(install_sh), str(venv)],
                capture_output=True, text=True, timeout=900, env=env,
            )  # fmt: skip
            assert run.returncode == 0, f"building {venv}: {run.stderr[-2000:]}"
            stamp.write_text(digest)
    return python


def recipe_digest(install_sh: Path) -> str:
    """SHA-256 of ``install_sh`` and the lock files beside it (``*.lock.txt``)."""
    digest = hashlib.sha256()
    for path in [install_sh, *sorted(install_sh.parent.glob("*.lock.txt"))]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def pyreft_python() -> Path:
    """The isolated pyreft 0.1.0 venv's python, built once (~80 s). Skips only without the
    reference tools (../shared): the checks run check_export.py from them too, so a built
    venv alone is not enough."""
    if not (PYREFT_TOOLS / "INSTALL.sh").exists():
        pytest.skip(f"no pyreft reference tools at {PYREFT_TOOLS} (../shared is missing)")
    return built_venv(PYREFT_VENV, PYREFT_TOOLS / "INSTALL.sh", "pyreft-ref-freeze.txt")

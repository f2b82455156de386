"""Storage URL -> Optuna RDB storage, checked before anything is written.

SQLite (the default, one machine) runs in WAL mode with a busy timeout so that a dashboard
reading the file, or several local processes, do not hit "database is locked". Heartbeats
are on, so a trial whose process died is failed and retried once instead of staying RUNNING;
every trial names its process from the moment it runs (``OwnedTrialsStorage``).
Read-only commands (best, report, dashboard, export) open a storage that must exist already
and change nothing in it (``open_existing_storage``, ``load_named_study``). A storage that
fails mid-run ends the command with one line (``storage_errors``).
"""

from __future__ import annotations

import errno
import os
import sqlite3
import tempfile
import time
import warnings
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from datetime import datetime
from pathlib import Path

import optuna
import sqlalchemy
from optuna.storages._rdb import models
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.trial import FrozenTrial, TrialState
from sqlalchemy.engine import make_url

from reftsearch.errors import BadInputError, ReftSearchError
from reftsearch.processes import this_process
from reftsearch.search.record import TrialRecord, owner_died_here, owner_runs_here, store_by_id

SQLITE_BUSY_TIMEOUT_S = 60
CONNECT_TIMEOUT_S = 10
SQLITE_HEADER = b"SQLite format 3\x00"  # the first 16 bytes of every SQLite database file
# processes that create one new storage at once race on its tables ("table studies already
# exists", a duplicate version row): the loser tries again and finds them made
CREATE_ATTEMPTS = 5
CREATE_RACE = ("already exists", "UNIQUE constraint failed", "duplicate key value")
NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # disk full, quota met, file size limit
NO_ROOM_PROBE_BYTES = 64 * 1024  # what SQLite's shared-memory file takes at first (32 KiB), twice


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print), the one after the user
    name and any in its query (``?password=...``, which libpq takes too)."""
    try:
        parsed = make_url(url)
        masked = parsed.update_query_dict({key: "***" for key in _secret_keys(parsed)})
        return masked.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")
    except Exception:  # not a parseable URL: show no part that could be a secret
        return url.split("@")[-1] if "@" in url else url


def _secrets(url: str) -> list[str]:
    """The passwords written in ``url``: after its user name, and in its query."""
    try:
        parsed = make_url(url)
    except (sqlalchemy.exc.ArgumentError, ValueError):  # not a URL: nothing to mask in it
        return []
    secrets = [parsed.password]
    for key in _secret_keys(parsed):  # a key given twice holds a tuple of values
        value = parsed.query[key]
        secrets += [value] if isinstance(value, str) else list(value)
    return [secret for secret in secrets if secret]


def _secret_keys(parsed: sqlalchemy.engine.URL) -> list[str]:
    # libpq's password and sslpassword; a passfile names a file, no secret
    return [key for key in parsed.query if "password" in key.lower()]


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


def check_storage(url: str, writing: bool = False) -> None:
    """Raise BadInputError if ``url`` cannot hold a study (``writing``: one this process can
    write, as ``run`` and workers do); creates and changes nothing."""
    try:
        parsed = make_url(url)
        parsed.port  # noqa: B018 (a non-numeric port raises here)
    except (sqlalchemy.exc.ArgumentError, ValueError) as err:
        raise BadInputError(
            f"storage: not a valid SQLAlchemy URL: {mask_url(url)} ({_first_line(err, url)})"
        ) from None
    path = sqlite_path(url)
    if parsed.get_backend_name() == "sqlite" and path is None:
        raise BadInputError(
            f"storage: {mask_url(url)} is a database in memory, gone when the command ends; "
            "name a file: sqlite:///study.db"
        )
    if path is not None:
        if not path.parent.is_dir():
            raise BadInputError(
                f"storage: directory {path.parent} does not exist (for {mask_url(url)})"
            )
        if path.is_dir():
            raise BadInputError(f"storage: {path} is a directory, not a SQLite database file")
        # SQLite would fail on another file mid-command; nothing overwrites a file it did not write
        if path.is_file() and path.stat().st_size:
            if not _is_sqlite(path):
                raise BadInputError(f"storage: {path} exists and is not a SQLite database")
            _check_study_database(path)
        if writing:
            _check_writable(path)
        return
    try:
        engine = sqlalchemy.create_engine(url, connect_args=_connect_args(url))
    except Exception as err:  # unknown dialect, missing driver
        raise BadInputError(f"storage: cannot use {mask_url(url)}: {_first_line(err)}") from None
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT 1"))
    except Exception as err:
        host = parsed.host or "localhost"
        raise BadInputError(
            f"storage: cannot connect to {host} ({mask_url(url)}): {_first_line(err, url)}"
        ) from None
    finally:
        engine.dispose()


def open_storage(
    url: str, heartbeat_s: int | None = 60, read_only: bool = False
) -> optuna.storages.RDBStorage:
    """The Optuna storage for ``url``, creating tables on first use; ``read_only`` creates and
    changes nothing (the tables must be there)."""
    engine_kwargs: dict = {"connect_args": _connect_args(url)}
    if sqlite_path(url) is None:
        # a worker needs two connections (its trials, its heartbeat thread); small pools keep
        # dozens of workers under PostgreSQL's default max_connections of 100, and pre-ping
        # replaces connections the server or a proxy dropped while a long trial trained
        engine_kwargs.update(pool_pre_ping=True, pool_size=2, max_overflow=2)
    elif not read_only:
        _enable_wal(sqlite_path(url))
    heartbeat = {}
    if heartbeat_s:
        heartbeat = {
            "heartbeat_interval": heartbeat_s,
            "grace_period": 2 * heartbeat_s,
            "heartbeat_stale_trial_callback": optuna.storages.RetryHeartbeatStaleTrialCallback(
                max_retry=1
            ),
        }
    attempt = 1
    while True:
        try:
            with warnings.catch_warnings():  # heartbeats are experimental in Optuna, by design
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return OwnedTrialsStorage(
                    url, engine_kwargs=engine_kwargs, skip_table_creation=read_only, **heartbeat
                )
        except sqlalchemy.exc.DBAPIError as err:
            if read_only or attempt == CREATE_ATTEMPTS or not _lost_create_race(err):
                raise
        time.sleep(0.1 * attempt)  # the winner is still creating its tables
        attempt += 1


class OwnedTrialsStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage, with every trial naming its process (``worker``: ``host:pid``)
    from the moment it is RUNNING.

    Optuna's ``ask`` creates a trial RUNNING (or takes an enqueued one from the queue), and
    the trial's heartbeat starts only after; a process killed in between left a RUNNING trial
    that named no process and had no heartbeat: never stale, so every later run of the study
    waited for it, forever once it was all the budget had left (measured), and a Ray run's
    Ctrl-C could not tell whose it was. A new trial is created with its ``worker`` in the same
    transaction; an enqueued one gets it right as it leaves the queue."""

    def _create_new_trial(
        self, study_id: int, template_trial: FrozenTrial | None = None
    ) -> FrozenTrial:
        if template_trial is None:  # Optuna's ask: a RUNNING trial, nothing known yet
            template_trial = FrozenTrial(
                number=-1,
                state=TrialState.RUNNING,
                value=None,
                datetime_start=datetime.now(),
                datetime_complete=None,
                params={},
                distributions={},
                user_attrs=TrialRecord(**this_process()).to_user_attrs(),
                system_attrs={},
                intermediate_values={},
                trial_id=-1,
            )
        return super()._create_new_trial(study_id, template_trial)

    def set_trial_state_values(
        self, trial_id: int, state: TrialState, values: Sequence[float] | None = None
    ) -> bool:
        if state != TrialState.RUNNING or values is not None:
            return super().set_trial_state_values(trial_id, state, values)
        taken = self._take_waiting(trial_id)  # an enqueued trial leaves the queue
        if taken:
            store_by_id(self, trial_id, **this_process())
        return taken

    def _take_waiting(self, trial_id: int) -> bool:
        """Move a WAITING trial to RUNNING in one conditional UPDATE; False if it was no
        longer WAITING. Optuna reads the state, then writes it: on SQLite, whose reads lock
        nothing, two runs started at once both read WAITING and both took the study's first
        enqueued trial; the one that reported second died ("Trial#0 has already finished")."""
        with _create_scoped_session(self.scoped_session) as session:
            taken = (
                session.query(models.TrialModel)
                .filter(
                    models.TrialModel.trial_id == trial_id,
                    models.TrialModel.state == TrialState.WAITING,
                )
                .update(
                    {"state": TrialState.RUNNING, "datetime_start": datetime.now()},
                    synchronize_session=False,
                )
            )
        return taken == 1

    def record_heartbeat(self, trial_id: int) -> None:
        """One beat of a running trial. A beat the storage refuses (a server restarting, a
        connection gone, a lock held past the busy timeout) is skipped, not raised: Optuna's
        heartbeat thread ends at its first error, and the live trial, beating no more, was
        failed as stale by the other workers, and the run training it died when it reported
        ("has already finished"). A trial whose storage stays away still goes stale."""
        try:
            super().record_heartbeat(trial_id)
        except Exception as err:
            if storage_cause(err) is None:
                raise

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        """Optuna's stale trials (no heartbeat for twice ``heartbeat_s``), less those whose
        process runs on this host: it was suspended (Ctrl-Z, the machine asleep) or starved,
        not lost. Failed as stale, its retry ran beside it, and the process, resumed, died
        when it next reported (Optuna's "Cannot tell a FAIL trial"). Across hosts no process
        can be checked: ``Worker`` then gives the trial up to its retry.

        Plus those whose process was one of this host's and has ended (killed, or stopped
        by a full disk it could not record the failure on): their configs run again without
        waiting out the heartbeat (2 minutes by default). One that never beat is an orphan
        (``UnstartedTrials``)."""
        stale = super()._get_stale_trial_ids(study_id)
        running = {
            t._trial_id: t
            for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        }
        lost = [i for i in stale if i in running and not owner_runs_here(running[i])]
        unstarted = self.running_without_heartbeat(study_id)
        dead = [i for i, t in running.items() if i not in unstarted and owner_died_here(t)]
        return sorted({*lost, *dead})

    def running_without_heartbeat(self, study_id: int) -> set[int]:
        """The ids of the study's RUNNING trials that have never recorded a heartbeat."""
        with _create_scoped_session(self.scoped_session) as session:
            query = session.query(models.TrialModel.trial_id).filter(
                models.TrialModel.study_id == study_id,
                models.TrialModel.state == TrialState.RUNNING,
                ~models.TrialModel.heartbeats.any(),
            )
            return {trial_id for (trial_id,) in query}


def owned_trials_storage(study: optuna.Study) -> OwnedTrialsStorage | None:
    """The ``OwnedTrialsStorage`` behind ``study``, if any."""
    storage = backend_of(study._storage)
    return storage if isinstance(storage, OwnedTrialsStorage) else None


def backend_of(storage: optuna.storages.BaseStorage) -> optuna.storages.BaseStorage:
    """The storage behind ``storage``: Optuna wraps an RDB storage in a cache."""
    return getattr(storage, "_backend", storage)


def _lost_create_race(err: Exception) -> bool:
    return any(text in str(err) for text in CREATE_RACE)


def _check_writable(path: Path) -> None:
    """A SQLite study file, and its folder (its write-ahead log goes beside it), must be
    writable: SQLite says so only at the first write, after the model has loaded."""
    for target in (path.parent, path) if path.exists() else (path.parent,):
        if not os.access(target, os.W_OK):
            raise BadInputError(
                f"storage: {target} is not writable, and a study's database and its "
                "write-ahead log are written there; name another place (storage: URL)"
            )


def _refuse_if_no_room(path: Path) -> None:
    """SQLite's "disk I/O error" on opening a study can be a full disk: even a reader makes
    the database's shared-memory file beside it. Then say so (exit 1), not blame the file."""
    try:
        with tempfile.TemporaryFile(dir=path.parent) as probe:
            probe.write(bytes(NO_ROOM_PROBE_BYTES))
            probe.flush()
    except OSError as err:
        if err.errno in NO_ROOM:
            raise ReftSearchError(
                f"storage: no room beside {path} for SQLite's files ({err.strerror}); free "
                "some space, then run the same command again"
            ) from None


def _check_study_database(path: Path) -> None:
    """Refuse a SQLite file that cannot be read, or that holds tables and none of Optuna's: a
    database of the user's own, which a study's tables (and WAL mode) would change."""
    try:
        with closing(sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)) as db:
            rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
            tables = {name for (name,) in rows}
    except sqlite3.Error as err:
        # the extended code (SQLITE_IOERR_SHMOPEN, ...) says which file and call failed
        code = getattr(err, "sqlite_errorname", None) or type(err).__name__
        if code.startswith(("SQLITE_IOERR", "SQLITE_FULL")):
            _refuse_if_no_room(path)
        raise BadInputError(
            f"storage: {path} is not a readable SQLite database ({err}, {code})"
        ) from None
    if tables and "studies" not in tables:
        shown = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise BadInputError(
            f"storage: {path} is a SQLite database of other tables ({shown}), not a study "
            "store; name another file"
        )


def _is_sqlite(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(len(SQLITE_HEADER)) == SQLITE_HEADER


def _connect_args(url: str) -> dict:
    if sqlite_path(url) is not None:
        return {"timeout": SQLITE_BUSY_TIMEOUT_S}
    if make_url(url).get_backend_name() == "postgresql":
        return {"connect_timeout": CONNECT_TIMEOUT_S}
    return {}


def _enable_wal(path: Path) -> None:
    """Switch the file to write-ahead logging (once per file; a no-op after). The switch
    needs the file to itself, and SQLite answers "database is locked" at once, without its
    busy timeout, while another process holds it: eight processes opening one new study
    failed one in two tries beside a busy process. So the switch is retried, for as long as
    that timeout."""
    deadline = time.monotonic() + SQLITE_BUSY_TIMEOUT_S
    while True:
        try:
            with closing(sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S)) as connection:
                connection.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as err:
            if "locked" not in str(err) or time.monotonic() > deadline:
                raise
        time.sleep(0.05)


def _first_line(err: Exception, url: str | None = None) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    for secret in _secrets(url) if url else []:
        text = text.replace(str(secret), "***")
    return text


def open_existing_storage(url: str, name: str) -> optuna.storages.RDBStorage:
    """The storage at ``url`` for a command that only reads study ``name``: it must exist and
    hold Optuna's tables, and nothing in it is created or changed (a mistyped SQLite path
    is refused, not made into a new database)."""
    check_storage(url)
    path = sqlite_path(url)
    if path is not None and not path.exists():
        raise BadInputError(
            f"no study named {name!r}: {path} does not exist yet (run the study first)"
        )
    # looked up before Optuna opens it: its RDBStorage writes a version row where none is
    engine = sqlalchemy.create_engine(url, connect_args=_connect_args(url))
    try:
        has_studies = sqlalchemy.inspect(engine).has_table("studies")
    except sqlalchemy.exc.DBAPIError as err:
        raise BadInputError(f"storage {mask_url(url)}: {_first_line(err, url)}") from None
    finally:
        engine.dispose()
    if not has_studies:
        raise BadInputError(f"storage {mask_url(url)} holds no Optuna studies (no tables)")
    return open_storage(url, heartbeat_s=None, read_only=True)


def load_named_study(name: str, storage_url: str) -> optuna.Study:
    """The stored study called ``name``; it must exist."""
    storage = open_existing_storage(storage_url, name)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if name not in names:
        raise BadInputError(f"no study named {name!r} in this storage; it has {names}")
    return optuna.load_study(study_name=name, storage=storage)


@contextmanager
def storage_errors(url: str) -> Iterator[None]:
    """A storage that fails mid-command (server down, connections cut, database dropped, disk
    full) ends it with one line naming the storage, password masked, instead of a traceback
    (exit code 1). What it stored stays: the same command resumes once the storage is back.
    Other errors pass through."""
    try:
        yield
    except ReftSearchError:  # already one line (bad input says exit 2 itself)
        raise
    except Exception as err:
        cause = storage_cause(err)
        if cause is None:
            raise
        if isinstance(cause, OSError):
            raise ReftSearchError(
                f"no room to write: {cause}; free some space, then run the same command again "
                "to resume"
            ) from None
        raise ReftSearchError(
            f"storage {mask_url(url)} failed: {_first_line(cause, url)}; run the same command "
            "again to resume once it is back"
        ) from None


def storage_cause(err: BaseException) -> BaseException | None:
    """The storage error (or full disk) behind ``err``, following its causes: Optuna wraps a
    failed commit in StorageInternalError, and a failed ``tell`` surfaces as whatever its
    clean-up raised next."""
    found = None
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, sqlalchemy.exc.SQLAlchemyError | sqlite3.Error):
            return current
        if isinstance(current, OSError) and current.errno in NO_ROOM:
            return current
        if isinstance(current, optuna.exceptions.StorageInternalError) and found is None:
            found = current
        # ``raise ... from None`` hides the context: not the cause then
        current = current.__cause__ or (
            None if current.__suppress_context__ else current.__context__
        )
    return found

"""Storage URL -> Optuna RDB storage, checked before anything is written.

SQLite (the default, one machine) runs in WAL mode with a busy timeout so that a dashboard
reading the file, or several local processes, do not hit "database is locked". Heartbeats
are on, so a trial whose process died is failed and retried once instead of staying RUNNING.
Read-only commands load a study that must exist already (``load_named_study``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import optuna
import sqlalchemy
from sqlalchemy.engine import make_url

from reftsearch.errors import BadInputError

SQLITE_BUSY_TIMEOUT_S = 60
CONNECT_TIMEOUT_S = 10


def mask_url(url: str) -> str:
    """The URL with its password replaced by ``***`` (safe to print)."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a parseable URL: show no part that could be a secret
        return url.split("@")[-1] if "@" in url else url


def sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database:
        return None
    return Path(parsed.database)


def check_storage(url: str) -> None:
    """Raise BadInputError if ``url`` cannot hold a study; creates and changes nothing."""
    try:
        parsed = make_url(url)
    except sqlalchemy.exc.ArgumentError:
        raise BadInputError(f"storage: not a valid SQLAlchemy URL: {mask_url(url)}") from None
    path = sqlite_path(url)
    if path is not None:
        if not path.parent.is_dir():
            raise BadInputError(
                f"storage: directory {path.parent} does not exist (for {mask_url(url)})"
            )
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


def open_storage(url: str, heartbeat_s: int | None = 60) -> optuna.storages.RDBStorage:
    """The Optuna storage for ``url``, creating tables on first use."""
    engine_kwargs: dict = {"connect_args": _connect_args(url)}
    if sqlite_path(url) is None:
        # a worker needs two connections (its trials, its heartbeat thread); small pools keep
        # dozens of workers under PostgreSQL's default max_connections of 100, and pre-ping
        # replaces connections the server or a proxy dropped while a long trial trained
        engine_kwargs.update(pool_pre_ping=True, pool_size=2, max_overflow=2)
    else:
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
    with warnings.catch_warnings():  # heartbeats are experimental in Optuna, used by design
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs, **heartbeat)


def _connect_args(url: str) -> dict:
    if sqlite_path(url) is not None:
        return {"timeout": SQLITE_BUSY_TIMEOUT_S}
    if make_url(url).get_backend_name() == "postgresql":
        return {"connect_timeout": CONNECT_TIMEOUT_S}
    return {}


def _enable_wal(path: Path) -> None:
    import sqlite3

    with sqlite3.connect(path, timeout=SQLITE_BUSY_TIMEOUT_S) as connection:
        connection.execute("PRAGMA journal_mode=WAL")


def _first_line(err: Exception, url: str | None = None) -> str:
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    password = make_url(url).password if url else None
    return text.replace(str(password), "***") if password else text


def load_named_study(name: str, storage_url: str) -> optuna.Study:
    """The stored study called ``name``; it must exist."""
    check_storage(storage_url)
    path = sqlite_path(storage_url)
    if path is not None and not path.exists():
        raise BadInputError(
            f"no study named {name!r}: {path} does not exist yet (run the study first)"
        )
    storage = open_storage(storage_url, heartbeat_s=None)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if name not in names:
        raise BadInputError(f"no study named {name!r} in this storage; it has {names}")
    return optuna.load_study(study_name=name, storage=storage)

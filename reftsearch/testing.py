"""Helpers that tests and benchmarks share (not used by reftsearch itself)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

LOCAL_POSTGRES = "host=127.0.0.1 port=5432"


def postgres_admin():
    """A psycopg connection (autocommit) to the local PostgreSQL as user postgres or root,
    on database postgres or test; None when no server accepts either."""
    import psycopg

    for user in ("postgres", "root"):
        for database in ("postgres", "test"):
            try:
                return psycopg.connect(
                    f"{LOCAL_POSTGRES} user={user} dbname={database}", autocommit=True
                )
            except psycopg.OperationalError:
                continue
    return None


@contextmanager
def scratch_postgres_database(prefix: str = "reftsearch_scratch") -> Iterator[str | None]:
    """A fresh database on the local PostgreSQL (trust auth, user postgres or root), as a
    SQLAlchemy URL, dropped afterwards (if a test has not dropped it); None when no server
    accepts either user."""
    admin = postgres_admin()
    if admin is None:
        yield None
        return
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{admin.info.user}@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

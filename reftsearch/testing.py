"""Helpers that tests and benchmarks share (not used by reftsearch itself)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

LOCAL_POSTGRES = "host=127.0.0.1 port=5432"


@contextmanager
def scratch_postgres_database(prefix: str = "reftsearch_scratch") -> Iterator[str | None]:
    """A fresh database on the local PostgreSQL (trust auth, user postgres or root), as a
    SQLAlchemy URL, dropped afterwards; None when no server accepts either user."""
    import psycopg

    admin = None
    for user in ("postgres", "root"):
        for database in ("postgres", "test"):
            try:
                admin = psycopg.connect(
                    f"{LOCAL_POSTGRES} user={user} dbname={database}", autocommit=True
                )
                break
            except psycopg.OperationalError:
                continue
        if admin is not None:
            break
    if admin is None:
        yield None
        return
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://{admin.info.user}@127.0.0.1:5432/{name}"
    finally:
        admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.close()

"""Processes as trials name them (``host:pid``), and whether one of this host still runs."""

from __future__ import annotations

import os
import socket

import psutil


def worker_id() -> str:
    """This process as trials record it (their ``worker``): ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


def pid_here(worker: str) -> int | None:
    """The pid of ``worker`` (``host:pid``) if it names a process of this host, else None."""
    host, _, pid = worker.rpartition(":")
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


def running(pid: int) -> bool:
    """Whether process ``pid`` runs. A zombie (ended, not yet reaped by its parent) does not:
    whatever it was writing or computing is as orphaned as a vanished process's. Another
    user's process counts as running (it exists; this process cannot look further)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def runs_here(worker: str | None) -> bool:
    """Whether ``worker`` (``host:pid``) is a process of this host that still runs."""
    pid = pid_here(worker or "")
    return pid is not None and running(pid)

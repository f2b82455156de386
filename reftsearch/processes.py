"""Processes as trials name them (``host:pid`` and when it started), and whether one of this
host still runs."""

from __future__ import annotations

import os
import socket
from functools import cache

import psutil

# how far two reads of one process's start time may differ (psutil computes it from the boot
# time and the process's start in clock ticks); a pid reused within it is not a concern
SAME_START_S = 1.0


def worker_id() -> str:
    """This process as trials record it (their ``worker``): ``host:pid``."""
    return f"{socket.gethostname()}:{os.getpid()}"


@cache
def started_at() -> float:
    """When this process started (seconds since the epoch)."""
    return psutil.Process().create_time()


def this_process() -> dict[str, str | float]:
    """This process as a trial records it (``TrialRecord`` fields): ``worker`` and
    ``worker_started``; the start time tells it from a later process given the same pid."""
    return {"worker": worker_id(), "worker_started": started_at()}


def pid_here(worker: str) -> int | None:
    """The pid of ``worker`` (``host:pid``) if it names a process of this host, else None."""
    host, _, pid = worker.rpartition(":")
    return int(pid) if host == socket.gethostname() and pid.isdigit() else None


def running(pid: int, started: float | None = None) -> bool:
    """Whether process ``pid`` runs, and (given ``started``) is the one that started then, not
    a later one given its pid. A zombie (ended, not yet reaped by its parent) does not run:
    whatever it was writing or computing is as orphaned as a vanished process's. Another
    user's process counts as running (it exists; this process cannot look further)."""
    try:
        process = psutil.Process(pid)
        if started is not None and abs(process.create_time() - started) > SAME_START_S:
            return False
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def runs_here(worker: str | None, started: float | None = None) -> bool:
    """Whether ``worker`` (``host:pid``, which started at ``started`` where recorded) is a
    process of this host that still runs. A container restarted under its old host name
    hands out the same small pids again: the pid alone would keep a dead worker's trial
    running, waited for, forever."""
    pid = pid_here(worker or "")
    return pid is not None and running(pid, started)


def died_here(worker: str | None, started: float | None = None) -> bool:
    """Whether ``worker`` was a process of this host that no longer runs (``runs_here``)."""
    pid = pid_here(worker or "")
    return pid is not None and not running(pid, started)

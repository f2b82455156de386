"""Whether a process of this host still runs: the one test behind every "its owner died"."""

from __future__ import annotations

import psutil


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

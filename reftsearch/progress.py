"""Progress on long work, said in words: durations, and a reporter for passes that run for
minutes with nothing else to say meanwhile."""

from __future__ import annotations

import time
from collections.abc import Callable

# where a line of progress goes: print, a Ray worker's forwarder, a test's list.append
Log = Callable[[str], None]


def format_duration(seconds: float) -> str:
    """``42.0s``, ``3.5min``, ``2.1h``."""
    if seconds < 120:
        return f"{seconds:.1f}s"
    if seconds < 7200:
        return f"{seconds / 60:.1f}min"
    return f"{seconds / 3600:.1f}h"


class Progress:
    """Tells ``log`` how far a piece of work has come (a fraction of it done), at most once
    every ``every_s`` seconds and never at its end (the caller says how it ended):
    ``frozen pass over 512 train examples: 48% after 23.0s, ~25.0s left``."""

    def __init__(self, what: str, log: Log, every_s: float) -> None:
        self.what, self.log, self.every_s = what, log, every_s
        self.started = self.last = time.perf_counter()

    def __call__(self, done: float) -> None:
        now = time.perf_counter()
        if not 0 < done < 1 or now - self.last < self.every_s:
            return
        self.last = now
        elapsed = now - self.started
        left = elapsed * (1 - done) / done
        self.log(
            f"{self.what}: {100 * done:.0f}% after {format_duration(elapsed)}, "
            f"~{format_duration(left)} left"
        )

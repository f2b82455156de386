"""Errors that reach the user: each says what must hold and what was got."""

from __future__ import annotations


class ReftSearchError(Exception):
    """Base class of errors reported without a traceback."""

    exit_code = 1


class TrialFailed(ReftSearchError):
    """This trial cannot finish (diverged, out of memory, asked past the budget); the study
    continues."""


class BadInputError(ReftSearchError):
    """The user's input (spec, data, storage URL, model path) is unusable: exit code 2."""

    exit_code = 2


class SpecError(BadInputError):
    """A study spec value is invalid; ``path`` is its key path, e.g. ``space.rank[2]``."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}" if path else message)
        self.path = path

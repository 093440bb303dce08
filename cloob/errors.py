"""The one error type users see: a problem and its fix, printed as one message, exit code 2."""

from __future__ import annotations


class CloobError(Exception):
    """A user-facing error: what is wrong and how to fix it."""

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = problem
        self.fix = fix
        super().__init__(problem if fix is None else f"{problem}\n  fix: {fix}")

"""Errors a user can cause. The CLI prints them as one line and exits non-zero, never a traceback."""

from __future__ import annotations


class StrataError(Exception):
    """A problem the user can fix: a bad recipe, a missing file, a corrupt shard, a changed run.

    `exit_code` is what the command line returns: 2 for an invalid recipe or arguments,
    1 for everything else.
    """

    exit_code = 1


class RecipeError(StrataError):
    """An invalid recipe. Carries every problem found, each as `key.path: message`."""

    exit_code = 2

    def __init__(self, file: str, problems: list[str]):
        self.file = file
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{file}: {len(problems)} problem(s) in the recipe:\n{lines}")


class DataError(StrataError):
    """Input data that cannot be read: a malformed file (with on_error: fail), a corrupt shard."""


class ResumeError(StrataError):
    """A run folder that cannot be continued as asked: changed data or a changed finished stage."""

"""Errors a user can cause. The CLI prints them as one line and exits non-zero, never a traceback."""

from __future__ import annotations


class StrataError(Exception):
    """A problem the user can fix: a bad recipe, a missing file, a corrupt shard, a changed run.

    `exit_code` is what the command line returns: 2 for an invalid recipe or arguments,
    1 for everything else. `every_rank`: raised identically by every rank under torchrun (a
    check of the recipe or the run folder that each rank makes), so rank 0 alone prints it; any
    other error is printed by the rank that raised it (a corrupt shard only one rank reads).
    """

    exit_code = 1
    every_rank = False

    def on_every_rank(self) -> StrataError:
        """Mark an error that every rank raises the same way (printed once, by rank 0)."""
        self.every_rank = True
        return self


class RecipeError(StrataError):
    """An invalid recipe. Carries every problem found, each as `key.path: message`."""

    exit_code = 2
    every_rank = True  # every rank loads and validates the same recipe

    def __init__(self, file: str, problems: list[str]):
        self.file = file
        self.problems = problems
        lines = "\n".join(f"  {p}" for p in problems)
        super().__init__(f"{file}: {len(problems)} problem(s) in the recipe:\n{lines}")


class DataError(StrataError):
    """Input data that cannot be read: a malformed file (with on_error: fail), a corrupt shard."""


class ResumeError(StrataError):
    """A run folder that cannot be continued as asked: changed data or a changed finished stage."""

    every_rank = True  # every rank checks the run folder before any collective

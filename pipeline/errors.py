"""User-facing errors: each names what is wrong and where, in one line that ``medseg`` prints.

No heavy imports here: every layer of the package (and the CLI's fast paths) can raise them.
"""

from __future__ import annotations

import os


class DataError(ValueError):
    """A problem with one input (a file, a folder, a setting's source): ``<path>: <problem>``."""

    def __init__(self, path: str | os.PathLike, problem: str) -> None:
        self.path = str(path)
        self.problem = problem
        super().__init__(f"{path}: {problem}")

    def __reduce__(self) -> tuple:
        # rebuilt from (path, problem) when it crosses a process boundary (worker pools)
        return (type(self), (self.path, self.problem))


class CheckpointError(DataError):
    """A checkpoint that is missing, unreadable, corrupt, or would run code when loaded."""


class TrainingDiverged(RuntimeError):
    """Training stopped because a loss or gradient became NaN or infinite."""

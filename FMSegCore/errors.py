"""Errors that reach users as one line naming the file and the problem."""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Union


class FMSegError(Exception):
    """Base class of every error FMSeg reports to a user (the CLI prints it as one line, exits non-zero)."""


class InputError(FMSegError):
    """Bad input: a file that is missing, unreadable or inconsistent, or a request that cannot be met."""

    def __init__(self, path: Optional[Union[str, Path]], problem: str) -> None:
        self.path = None if path is None else str(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)


class ModelError(FMSegError):
    """A model or checkpoint that cannot be found, downloaded, verified or loaded."""

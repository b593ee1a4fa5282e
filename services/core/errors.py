"""Errors that a person can act on: which field, what was wrong, what is allowed.

Every layer (CLI, gRPC, REST) maps these two kinds onto its own vocabulary: a bad value is
`InvalidInput` (exit 2 / INVALID_ARGUMENT / 400), a name that does not exist is `NotFound`
(exit 2 / NOT_FOUND / 404).
"""

from __future__ import annotations


class OneSeekError(Exception):
    """Base of the project's own errors; `str(error)` is the sentence shown to people."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidInput(OneSeekError, ValueError):
    """A value is malformed or out of range (the field names which one)."""


class NotFound(OneSeekError, LookupError):
    """A model, dataset or run that was named does not exist."""


class ArtifactError(OneSeekError):
    """A run folder could not be written (disk full, permissions, ...)."""

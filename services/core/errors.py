"""Errors that a person can act on: which field, what was wrong, what is allowed.

Each kind carries its answer on every interface, so no layer keeps a table of its own: the gRPC
status (by name, so this module needs no grpc) and the HTTP status. The CLI answers any of them
with exit status 2.
"""

from __future__ import annotations


class OneSeekError(Exception):
    """Base of the project's own errors; `str(error)` is the sentence shown to people."""

    grpc_status = "INTERNAL"
    """The `grpc.StatusCode` name a service answers with."""
    http_status = 500
    """The HTTP status the gateway answers with."""

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def __str__(self) -> str:
        return self.message


class InvalidInput(OneSeekError, ValueError):
    """A value is malformed or out of range (the field names which one)."""

    grpc_status, http_status = "INVALID_ARGUMENT", 400


class NotFound(OneSeekError, LookupError):
    """A model, dataset or run that was named does not exist."""

    grpc_status, http_status = "NOT_FOUND", 404


class Conflict(OneSeekError):
    """The request is valid but the state of the run or service forbids it now."""

    grpc_status, http_status = "FAILED_PRECONDITION", 409


class AlreadyExists(Conflict):
    """What the request would create exists already, with other values."""

    grpc_status = "ALREADY_EXISTS"


class TooSlow(OneSeekError):
    """A subscriber fell behind its bounded queue and was dropped; it resumes from its last seq."""

    grpc_status, http_status = "RESOURCE_EXHAUSTED", 429


class Unavailable(OneSeekError):
    """Something the service needs is out of reach (a Ray cluster); trying again later may work."""

    grpc_status, http_status = "UNAVAILABLE", 503


class ArtifactError(OneSeekError):
    """A run folder could not be written (disk full, permissions, ...)."""


DOMAIN_ERRORS = (InvalidInput, NotFound, Conflict, AlreadyExists, TooSlow, Unavailable)
"""The kinds a caller can act on: a client maps their gRPC status back to their HTTP status."""

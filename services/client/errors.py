"""A failed call as the project's own error: a caller catches `NotFound`, `InvalidInput`,
`Conflict`, ... (services.core.errors) whichever door the refusal came through, with the
service's sentence and the field it named (trailing metadata `oneseek-field`).

The kinds come from `DOMAIN_ERRORS`, each carrying its gRPC status, so this module keeps no
table of its own for them. What no domain kind carries: UNAVAILABLE, DEADLINE_EXCEEDED and a
call cancelled by the other side are `Unavailable` (trying again later may work);
UNAUTHENTICATED and PERMISSION_DENIED are `NotAuthorized`; anything else is `ServiceError`.
"""

from __future__ import annotations

from typing import Any

import grpc

from services.api.runtime import FIELD_METADATA_KEY
from services.core.errors import DOMAIN_ERRORS, OneSeekError, Unavailable


class NotAuthorized(OneSeekError):
    """The service wants a token this client did not send (or sent a wrong one)."""

    grpc_status, http_status = "UNAUTHENTICATED", 401


class ServiceError(OneSeekError):
    """The service failed in a way the caller cannot fix (INTERNAL, UNKNOWN, UNIMPLEMENTED...)."""

    grpc_status, http_status = "INTERNAL", 502


_KINDS: dict[grpc.StatusCode, type[OneSeekError]] = {
    grpc.StatusCode[kind.grpc_status]: kind for kind in DOMAIN_ERRORS
}
_KINDS[grpc.StatusCode.UNAUTHENTICATED] = NotAuthorized
_KINDS[grpc.StatusCode.PERMISSION_DENIED] = NotAuthorized
UNREACHABLE = frozenset(
    {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED, grpc.StatusCode.CANCELLED}
)
"""The call never got an answer: the service is down, restarting, or too slow to answer."""


def _field(error: grpc.RpcError) -> str | None:
    try:
        metadata: Any = error.trailing_metadata() or ()
    except AttributeError:  # an RpcError that is not a call (raised by an interceptor)
        return None
    for key, value in metadata:
        if key == FIELD_METADATA_KEY and isinstance(value, str):
            return value
    return None


def status_of(error: grpc.RpcError) -> grpc.StatusCode:
    try:
        return error.code()
    except AttributeError:
        return grpc.StatusCode.UNKNOWN


def from_rpc_error(error: grpc.RpcError, service: str, addr: str) -> OneSeekError:
    """The project's error for a failed call to `service` (e.g. "training service") at `addr`."""
    code = status_of(error)
    try:
        details = error.details() or code.name
    except AttributeError:
        details = str(error) or code.name
    if code in UNREACHABLE:
        return Unavailable(
            f"The {service} at {addr} did not answer ({code.name}: {details}). Check that it "
            "is running and that this is its address, then try again."
        )
    kind = _KINDS.get(code)
    if kind is NotAuthorized:
        return NotAuthorized(
            f"The {service} at {addr} refused this client's token ({details}). Pass the "
            "suite's admin token (or, for reports, its report token), or set "
            "ONESEEK_ADMIN_TOKEN / ONESEEK_REPORT_TOKEN.",
        )
    if kind is None:
        return ServiceError(f"The {service} at {addr} failed ({code.name}): {details}")
    return kind(details, field=_field(error))

"""Every error the gateway answers, as one JSON envelope: `{"error", "message", "field"}`.

`ApiError` is raised by handlers; `STATUS_OF_GRPC` is the one table from a service's gRPC status
to an HTTP status and error code; `error_middleware` turns anything a handler raises (including
aiohttp's own 404/405/413) into the envelope, so no HTML error page and no 500 for bad input.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from services.api.runtime import FIELD_METADATA_KEY
from services.core.errors import DOMAIN_ERRORS, OneSeekError

log = logging.getLogger("oneseek.gateway")

ERROR_CODES: dict[int, str] = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    429: "too_many_requests",
    500: "internal_error",
    501: "not_implemented",
    502: "service_error",
    503: "service_unavailable",
}
"""HTTP status -> the `error` code clients switch on."""

STATUS_OF_GRPC: dict[grpc.StatusCode, int] = {
    # what the services' own errors answer, as each kind carries it
    **{grpc.StatusCode[kind.grpc_status]: kind.http_status for kind in DOMAIN_ERRORS},
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 503,
    # the channel is closing (gateway shutdown) or the server went away mid-call
    grpc.StatusCode.CANCELLED: 503,
}
"""gRPC status -> HTTP status. Anything else (INTERNAL, UNKNOWN, DATA_LOSS) is the service's
fault, not the caller's: 502."""


class ApiError(Exception):
    """An HTTP error answered as the JSON envelope."""

    def __init__(self, status: int, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = ERROR_CODES.get(status, "error")
        self.message = message
        self.field = field

    def envelope(self) -> dict[str, Any]:
        return {"error": self.code, "message": self.message, "field": self.field}

    @classmethod
    def bad_request(cls, message: str, *, field: str | None = None) -> ApiError:
        return cls(400, message, field=field)

    @classmethod
    def from_domain(cls, error: OneSeekError) -> ApiError:
        """The project's own errors, with the HTTP status each kind carries."""
        return cls(error.http_status, error.message, field=error.field)


def _metadata_field(error: grpc.aio.AioRpcError) -> str | None:
    metadata: Any = error.trailing_metadata() or ()
    for key, value in metadata:
        if key == FIELD_METADATA_KEY and isinstance(value, str):
            return value
    return None


def from_rpc(
    error: grpc.aio.AioRpcError,
    service: str,
    addr: str,
) -> ApiError:
    """The HTTP answer to a failed call to `service` (e.g. "training service") at `addr`; the
    field comes from the service's trailing metadata (FIELD_METADATA_KEY)."""
    return from_status(error.code(), error.details(), _metadata_field(error), service, addr)


def from_status(
    code: grpc.StatusCode, details: str | None, field: str | None, service: str, addr: str
) -> ApiError:
    """The HTTP answer to a gRPC status `code` with its `details` and `field`."""
    status = STATUS_OF_GRPC.get(code, 502)
    details = details or code.name
    if status == 503:
        message = (
            f"The {service} at {addr} is unavailable ({code.name}). The gateway reconnects by "
            "itself: try again in a moment, and check that the service is running."
        )
        return ApiError(503, message)
    if status == 401:
        details = (
            f"The {service} refused the gateway's credentials ({details}). Give the gateway and "
            "the services the same ONESEEK_ADMIN_TOKEN."
        )
    elif status == 502:
        details = f"The {service} failed: {details}"
    return ApiError(status, details, field=field)


def _from_http(error: web.HTTPException, request: web.Request, max_body: int) -> ApiError:
    status = error.status
    if status == 404:
        message = f"No route {request.method} {request.path}; GET /api/openapi.json lists them."
    elif status == 405:
        allowed = ", ".join(sorted(getattr(error, "allowed_methods", ()) or ()))
        message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}."
    elif status == 413:
        message = (
            f"The request body is larger than {max_body} bytes; send less (a start or "
            "report body is a few hundred bytes)."
        )
    else:
        message = error.text or error.reason
    return ApiError(status, message)


def error_middleware(max_body: int) -> Callable[..., Awaitable[web.StreamResponse]]:
    @web.middleware
    async def errors(
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        headers: dict[str, str] = {}
        try:
            return await handler(request)
        except ApiError as error:
            problem = error
        except OneSeekError as error:
            problem = ApiError.from_domain(error)
        except web.HTTPException as error:
            if error.status < 400:
                raise  # redirects and the like are answers, not errors
            problem = _from_http(error, request, max_body)
            if "Allow" in error.headers:
                headers["Allow"] = error.headers["Allow"]
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            problem = ApiError(
                500, "The gateway failed unexpectedly; the error is in its log. Try again."
            )
        body = json.dumps(problem.envelope()).encode()
        return web.Response(
            body=body, status=problem.status, content_type="application/json", headers=headers
        )

    return errors

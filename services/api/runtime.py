"""What both gRPC servers and every client share: options, auth, health, reflection, addresses.

Keepalive and message sizes are set deliberately: streams are long-lived (a run lasts hours),
so both ends ping an idle connection and a dead peer is noticed within about a minute; events
are small, so 16 MiB is generous for a full metrics history and refuses absurd messages.
"""

from __future__ import annotations

import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

DEFAULT_TRAINING_ADDR = "127.0.0.1:50051"
DEFAULT_METRICS_ADDR = "127.0.0.1:50052"
MAX_MESSAGE_BYTES = 16 * 1024 * 1024

_KEEPALIVE = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
]
SERVER_OPTIONS: list[tuple[str, Any]] = [
    *_KEEPALIVE,
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.so_reuseport", 0),  # a second server on a busy port must fail, not share it
]
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    *_KEEPALIVE,
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.enable_retries", 1),
]


def training_addr() -> str:
    return os.environ.get("ONESEEK_TRAINING_ADDR") or DEFAULT_TRAINING_ADDR


def metrics_addr() -> str:
    return os.environ.get("ONESEEK_METRICS_ADDR") or DEFAULT_METRICS_ADDR


def admin_token() -> str | None:
    return os.environ.get("ONESEEK_ADMIN_TOKEN") or None


def report_token() -> str | None:
    return os.environ.get("ONESEEK_REPORT_TOKEN") or None


def insecure_channel(addr: str) -> aio.Channel:
    return aio.insecure_channel(addr, options=CHANNEL_OPTIONS)


def bearer(token: str | None) -> tuple[tuple[str, str], ...]:
    """Call metadata carrying `token`, or none."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def token_matches(header: str | None, tokens: Iterable[str | None]) -> bool:
    """Constant-time comparison of a `Bearer <token>` header against every allowed token."""
    if not header or not header.startswith("Bearer "):
        return False
    offered = header[len("Bearer ") :].encode()
    matched = False
    for token in tokens:
        if token:
            matched |= hmac.compare_digest(offered, token.encode())
    return matched


if TYPE_CHECKING:
    Handler = grpc.RpcMethodHandler[Any, Any]
else:
    Handler = grpc.RpcMethodHandler


class TokenAuthInterceptor(aio.ServerInterceptor):  # type: ignore[type-arg]
    """Mutating RPCs need `authorization: Bearer <token>` when a token is configured.

    `protected` maps a full method name (`/pkg.Service/Method`) to a callable returning the
    tokens that may call it (read at call time, so tests and operators can rotate them).
    A method whose tokens are all unset is open: the loopback-only default of `oneseek up`.
    """

    def __init__(self, protected: dict[str, Callable[[], list[str | None]]]) -> None:
        self._protected = protected

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> Handler:
        allowed = self._protected.get(details.method)
        if allowed is None:
            return await continuation(details)
        tokens = [t for t in allowed() if t]
        if not tokens:
            return await continuation(details)
        metadata = dict(details.invocation_metadata or ())
        header = metadata.get("authorization")
        if token_matches(header if isinstance(header, str) else None, tokens):
            return await continuation(details)
        message = (
            "Missing bearer token: send metadata 'authorization: Bearer <token>'."
            if header is None
            else "The bearer token is not valid for this call."
        )

        async def deny(request: Any, context: aio.ServicerContext[Any, Any]) -> None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.unary_unary_rpc_method_handler(deny)


async def add_health_and_reflection(server: aio.Server, service_names: list[str]) -> HealthServicer:
    """Registers the standard health service (every name SERVING) and server reflection."""
    servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for name in ["", *service_names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection([*service_names, reflection.SERVICE_NAME], server)
    return servicer


async def set_not_serving(servicer: HealthServicer, service_names: list[str]) -> None:
    for name in ["", *service_names]:
        await servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)


class _KeyValueFormatter(logging.Formatter):
    """`time level logger message run_id=...`: greppable, with the run id when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        run_id = getattr(record, "run_id", None)
        return f"{line} run_id={run_id}" if run_id else line


def configure_logging(service: str, level: str | None = None) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(
        _KeyValueFormatter(f"%(asctime)s %(levelname)s {service} %(name)s: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level or os.environ.get("ONESEEK_LOG_LEVEL") or "INFO")

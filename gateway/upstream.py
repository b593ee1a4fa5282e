"""The gateway's gRPC side: one channel to each service, opened and closed with the app, a
deadline on every unary call, and every failure turned into an `ApiError` by one table.

A channel reconnects by itself when its service comes back, within a second (the reconnect
backoff of services.api.runtime.CHANNEL_OPTIONS), so the gateway recovers promptly.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any, Protocol, TypeVar

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from gateway.errors import from_rpc
from gateway.settings import GatewaySettings
from services.api import metrics_pb2_grpc, training_pb2_grpc
from services.api.runtime import bearer, client_channel, client_tls_ca
from services.api.telemetry import ClientTimers

Reply = TypeVar("Reply")
Reply_co = TypeVar("Reply_co", covariant=True)


class _UnaryCall(Protocol[Reply_co]):
    def __call__(
        self, request: Any, *, timeout: float | None = ..., metadata: Any = ...
    ) -> Awaitable[Reply_co]: ...


class Service:
    """One service's channel, and calls on it that fail as ApiError."""

    def __init__(
        self,
        name: str,
        addr: str,
        timeout: float,
        root_certificates: bytes | None = None,
        timers: ClientTimers | None = None,
    ) -> None:
        self.name = name
        self.addr = addr
        self.timeout = timeout
        interceptors = [timers.for_service(name)] if timers is not None else None
        self.channel = client_channel(addr, root_certificates, interceptors=interceptors)
        self._health = health_pb2_grpc.HealthStub(self.channel)

    async def call(
        self,
        method: _UnaryCall[Reply],
        request: Any,
        *,
        token: str | None = None,
        timeout: float | None = None,
    ) -> Reply:
        """`method(request)` with a deadline and, when given, `token` as bearer metadata."""
        try:
            return await method(request, timeout=timeout or self.timeout, metadata=bearer(token))
        except aio.AioRpcError as error:
            raise from_rpc(error, self.name, self.addr) from None

    async def healthy(self, timeout: float) -> bool:
        """Whether the service's standard health check says SERVING right now."""
        try:
            reply = await self._health.Check(health_pb2.HealthCheckRequest(), timeout=timeout)
        except aio.AioRpcError:
            return False
        return bool(reply.status == health_pb2.HealthCheckResponse.SERVING)

    async def close(self) -> None:
        await self.channel.close(None)


class Upstream:
    """Both services, as the gateway's handlers and feeds use them. Channels belong to an event
    loop, so they are made by `open()` when the app starts, not when it is built."""

    training_stub: training_pb2_grpc.TrainingServiceAsyncStub
    metrics_stub: metrics_pb2_grpc.MetricsServiceAsyncStub

    def __init__(
        self,
        settings: GatewaySettings,
        *,
        tls_ca: bytes | None = None,
        timers: ClientTimers | None = None,
    ) -> None:
        self.settings = settings
        self.timers = timers
        """Times every unary call to both services (GET /metrics), when given."""
        # the services' CA (TLS) from ONESEEK_TLS_CA unless given; None: plaintext
        self.tls_ca = tls_ca if tls_ca is not None else client_tls_ca()
        self._training: Service | None = None
        self._metrics: Service | None = None

    def open(self) -> None:
        settings = self.settings
        self._training = Service(
            "training service",
            settings.training_addr,
            settings.rpc_timeout,
            self.tls_ca,
            self.timers,
        )
        self._metrics = Service(
            "metrics service", settings.metrics_addr, settings.rpc_timeout, self.tls_ca, self.timers
        )
        self.training_stub = training_pb2_grpc.TrainingServiceStub(self._training.channel)
        self.metrics_stub = metrics_pb2_grpc.MetricsServiceStub(self._metrics.channel)

    @property
    def training(self) -> Service:
        assert self._training is not None, "Upstream.open() first"
        return self._training

    @property
    def metrics(self) -> Service:
        assert self._metrics is not None, "Upstream.open() first"
        return self._metrics

    async def close(self) -> None:
        for service in (self._training, self._metrics):
            if service is not None:
                await service.close()
        self._training = self._metrics = None

"""Prometheus metrics of the gRPC side, with prometheus-client's own collectors and exposition:
a server interceptor that times every RPC a service answers (and counts the streams it holds
open), a client interceptor that times every unary call a process makes, and the HTTP
endpoint a service serves them on (`--metrics-port`).

Each process keeps its metrics in a registry of its own (never the library's global one), so
tests may build several servers in one process.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import grpc
from grpc import aio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    gc_collector,
    platform_collector,
    process_collector,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
"""Seconds: from half a millisecond (a read on loopback) to the slow end of a StartRun."""


def process_registry() -> CollectorRegistry:
    """A registry with the standard process, platform and garbage-collector collectors."""
    registry = CollectorRegistry(auto_describe=True)
    process_collector.ProcessCollector(registry=registry)
    platform_collector.PlatformCollector(registry=registry)
    gc_collector.GCCollector(registry=registry)
    return registry


class Readings(Collector):
    """Values a service already keeps (an event cursor, its active runs), read when scraped:
    nothing is counted twice and the hot paths are not touched."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._counters: list[tuple[str, str, Callable[[], float]]] = []
        self._gauges: list[tuple[str, str, Callable[[], float]]] = []
        registry.register(self)

    def counter(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._counters.append((name, documentation, read))

    def gauge(self, name: str, documentation: str, read: Callable[[], float]) -> None:
        self._gauges.append((name, documentation, read))

    def collect(self) -> Iterator[Metric]:
        for name, documentation, read in self._counters:
            yield CounterMetricFamily(name, documentation, value=read())
        for name, documentation, read in self._gauges:
            yield GaugeMetricFamily(name, documentation, value=read())


def _method(full: str) -> tuple[str, str]:
    """'/oneseek.training.v1.TrainingService/StartRun' -> ('oneseek.training.v1.TrainingService',
    'StartRun')."""
    service, _, method = full.lstrip("/").partition("/")
    return service, method


_CODES = {code.value[0]: code.name for code in grpc.StatusCode}


def _code_name(context: Any, failed: BaseException | None) -> str:
    """The status the call ended with: the one set on its context, else OK or how it failed."""
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    if isinstance(code, int) and code in _CODES:
        return _CODES[code]
    if failed is None:
        return "OK"
    return "CANCELLED" if isinstance(failed, asyncio.CancelledError) else "UNKNOWN"


class ServerMetrics(aio.ServerInterceptor):  # type: ignore[type-arg, misc]
    """Per method: calls answered by status code, their duration, and streams open now."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.handled = Counter(
            "oneseek_grpc_server_handled",
            "RPCs answered, by method and status code.",
            ["service", "method", "code"],
            registry=registry,
        )
        self.duration = Histogram(
            "oneseek_grpc_server_handling_seconds",
            "How long an RPC took to answer (a stream: until it ended).",
            ["service", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.open_streams = Gauge(
            "oneseek_grpc_server_open_streams",
            "Server streams open now (subscribers, watchers, generations).",
            ["service", "method"],
            registry=registry,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Any]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Any:
        handler: Any = await continuation(handler_call_details)
        if handler is None:
            return handler
        service, method = _method(handler_call_details.method)
        if handler.unary_unary is not None:
            return handler._replace(unary_unary=self._unary(handler.unary_unary, service, method))
        if handler.unary_stream is not None:
            behavior = handler.unary_stream
            if inspect.isasyncgenfunction(behavior):
                return handler._replace(unary_stream=self._stream(behavior, service, method))
        return handler

    def _unary(self, behavior: Any, service: str, method: str) -> Any:
        async def timed(request: Any, context: Any) -> Any:
            started, failed = time.perf_counter(), None
            try:
                return await behavior(request, context)
            except BaseException as error:
                failed = error
                raise
            finally:
                self.duration.labels(service, method).observe(time.perf_counter() - started)
                self.handled.labels(service, method, _code_name(context, failed)).inc()

        return timed

    def _stream(self, behavior: Any, service: str, method: str) -> Any:
        async def timed(request: Any, context: Any) -> AsyncIterator[Any]:
            started, failed = time.perf_counter(), None
            gauge = self.open_streams.labels(service, method)
            gauge.inc()
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as error:
                failed = error
                raise
            finally:
                gauge.dec()
                self.duration.labels(service, method).observe(time.perf_counter() - started)
                self.handled.labels(service, method, _code_name(context, failed)).inc()

        return timed


class ClientTimers:
    """The latency of every unary call this process makes, by service, method and outcome;
    `for_service` gives the interceptor of one service's channel."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.duration = Histogram(
            "oneseek_grpc_client_call_seconds",
            "How long a unary gRPC call to a service took, from this process.",
            ["service", "method", "outcome"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )

    def for_service(self, service: str) -> ClientTimer:
        return ClientTimer(service, self.duration)


class ClientTimer(aio.UnaryUnaryClientInterceptor):  # type: ignore[type-arg, misc]
    def __init__(self, service: str, duration: Histogram) -> None:
        self.service = service
        self.duration = duration

    async def intercept_unary_unary(
        self, continuation: Callable[..., Any], client_call_details: Any, request: Any
    ) -> Any:
        started = time.perf_counter()
        method = _method(_text(client_call_details.method))[1]
        call = await continuation(client_call_details, request)

        def observe(done: Any) -> None:
            outcome = "cancelled" if done.cancelled() else "done"
            self.duration.labels(self.service, method, outcome).observe(
                time.perf_counter() - started
            )

        call.add_done_callback(observe)
        return call


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


def serve_metrics(
    port: int, registry: CollectorRegistry, host: str = "127.0.0.1"
) -> Callable[[], None]:
    """Serves `registry` at http://host:port/metrics in a thread; returns what stops it."""
    server, thread = start_http_server(port, addr=host, registry=registry)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop

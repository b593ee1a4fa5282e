"""`GET /metrics`: the gateway in the Prometheus text format, from prometheus-client's own
collectors and exposition.

- HTTP requests by route template, method and status, and their latency;
- websocket sessions: opened, connected now, and how long they lasted;
- run events received from the metrics service (one per event, however many clients watch);
- the gRPC client latency of each unary call to both services;
- active runs, and each one's current epoch and population loss, asked of the metrics service
  when scraped (a few calls per scrape, never on a request's path).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest

from gateway.errors import ApiError
from services.api import metrics_pb2, training_pb2
from services.api.telemetry import LATENCY_BUCKETS, ClientTimers, process_registry

if TYPE_CHECKING:
    from gateway.upstream import Upstream

RUNNING = training_pb2.RUN_STATUS_RUNNING
SESSION_BUCKETS = (1, 5, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)


class GatewayMetrics:
    """Every metric of one gateway app, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = registry = process_registry()
        self.requests = Counter(
            "oneseek_gateway_http_requests",
            "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.latency = Histogram(
            "oneseek_gateway_http_request_seconds",
            "How long an HTTP request took to answer (a streamed answer: until it ended).",
            ["route", "method"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.websockets_opened = Counter(
            "oneseek_gateway_websocket_sessions",
            "Websocket sessions opened (upgrades accepted or refused).",
            registry=registry,
        )
        self.websockets_connected = Gauge(
            "oneseek_gateway_websocket_clients",
            "Websocket clients connected now.",
            registry=registry,
        )
        self.websocket_seconds = Histogram(
            "oneseek_gateway_websocket_session_seconds",
            "How long websocket sessions lasted.",
            buckets=SESSION_BUCKETS,
            registry=registry,
        )
        self.events = Counter(
            "oneseek_gateway_events",
            "Run events received from the metrics service (once each, whatever the clients).",
            registry=registry,
        )
        self.active_runs = Gauge(
            "oneseek_active_runs",
            "Runs training now (the metrics service's view).",
            registry=registry,
        )
        self.run_epoch = Gauge(
            "oneseek_run_current_epoch",
            "Current epoch of an active run.",
            ["run_id"],
            registry=registry,
        )
        self.run_loss = Gauge(
            "oneseek_run_population_loss",
            "Population loss of an active run's last epoch.",
            ["run_id"],
            registry=registry,
        )
        self.client_timers = ClientTimers(registry)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Times every request, labelled by its route's template (never the raw path: one run
        id per label would grow without end)."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        websocket = request.headers.get("Upgrade", "").lower() == "websocket"
        started = time.perf_counter()
        status = 500
        if websocket:
            self.websockets_opened.inc()
            self.websockets_connected.inc()
        try:
            response = await handler(request)
            status = response.status
            return response
        except web.HTTPException as error:
            status = error.status
            raise
        finally:
            seconds = time.perf_counter() - started
            if websocket:
                self.websockets_connected.dec()
                self.websocket_seconds.observe(seconds)
            else:
                self.latency.labels(route, request.method).observe(seconds)
            self.requests.labels(route, request.method, str(status)).inc()

    async def refresh_runs(self, upstream: Upstream, timeout: float) -> None:
        """The active runs' gauges, from the metrics service; left as they were when it does not
        answer (the scrape still succeeds)."""
        try:
            reply = await upstream.metrics.call(
                upstream.metrics_stub.ListRuns,
                metrics_pb2.ListRunsRequest(status=RUNNING),
                timeout=timeout,
            )
            runs = {}
            for run in reply.runs:
                metrics = await upstream.metrics.call(
                    upstream.metrics_stub.GetMetrics,
                    metrics_pb2.GetMetricsRequest(run_id=run.run_id),
                    timeout=timeout,
                )
                runs[run.run_id] = metrics
        except ApiError:
            return
        self.active_runs.set(len(runs))
        self.run_epoch.clear()
        self.run_loss.clear()
        for run_id, metrics in runs.items():
            self.run_epoch.labels(run_id).set(metrics.current_epoch)
            if metrics.HasField("total_loss"):
                self.run_loss.labels(run_id).set(metrics.total_loss)

    def exposition(self) -> web.Response:
        return web.Response(
            body=generate_latest(self.registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
        )

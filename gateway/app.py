"""The gateway application: `create_app(settings)` wires `gateway.routes.ROUTES`, page, error
envelope and security headers, and owns the gRPC channels and the feeds for the app's life.

Startup opens one channel per service and starts the feeds' heartbeat; shutdown first closes
every websocket with 1001 and cancels and awaits every feed task, then closes the channels.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from aiohttp.web_request import BaseRequest

from gateway.bodies import encode
from gateway.errors import error_middleware
from gateway.feeds import RunFeeds
from gateway.openapi import build_document
from gateway.page import security_headers, static_routes
from gateway.reports import ReportBatcher
from gateway.routes import Routes
from gateway.settings import GatewaySettings
from gateway.telemetry import GatewayMetrics
from gateway.upstream import Upstream
from services.api import metrics_pb2

FEEDS = web.AppKey("feeds", RunFeeds)
UPSTREAM = web.AppKey("upstream", Upstream)
SETTINGS = web.AppKey("settings", GatewaySettings)


class AccessLog(AbstractAccessLogger):
    """One line per request, without the query string: a websocket's `?token=` stays out of
    the log."""

    def log(self, request: BaseRequest, response: web.StreamResponse, time: float) -> None:
        self.logger.info(
            "%s %s %s %.1fms", request.method, request.path, response.status, time * 1000
        )


def create_app(settings: GatewaySettings, *, tls_ca: bytes | None = None) -> web.Application:
    """`tls_ca`: the CA bundle the services' TLS certificates chain to (default
    $ONESEEK_TLS_CA; neither: plaintext gRPC)."""
    telemetry = GatewayMetrics()
    app = web.Application(
        client_max_size=settings.max_body_bytes,
        # the timer outermost: it sees the status the error envelope was answered with
        middlewares=[telemetry.middleware, error_middleware(settings.max_body_bytes)],
    )
    upstream = Upstream(settings, tls_ca=tls_ca, timers=telemetry.client_timers)
    feeds = RunFeeds(upstream, settings, on_event=telemetry.events.inc)

    async def send_reports(
        reports: Sequence[metrics_pb2.ReportMetricsRequest],
    ) -> Sequence[metrics_pb2.ReportResult]:
        reply = await upstream.metrics.call(
            upstream.metrics_stub.ReportMetricsBatch,
            metrics_pb2.ReportMetricsBatchRequest(reports=reports),
            token=settings.admin_token or settings.report_token,
        )
        return list(reply.results)

    reports = ReportBatcher(send_reports)
    app[SETTINGS] = settings
    app[UPSTREAM] = upstream
    app[FEEDS] = feeds

    async def services(app: web.Application) -> AsyncIterator[None]:
        upstream.open()
        feeds.start()
        try:
            yield
        finally:
            await reports.close()
            await feeds.close()
            await upstream.close()

    async def close_feeds(app: web.Application) -> None:
        # before aiohttp waits for open handlers: websockets end now, with 1001
        await feeds.close()

    app.cleanup_ctx.append(services)
    app.on_shutdown.append(close_feeds)
    app.on_response_prepare.append(security_headers)

    document = encode(build_document())
    app.add_routes(Routes(settings, upstream, feeds, reports, document, telemetry).table())
    app.add_routes(static_routes(settings.static_dir))
    return app

"""The REST routes of DESIGN.md section 4: each checks access, then its input (a `runId` before
anything reaches a service), then makes one gRPC call and answers its documented JSON.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from aiohttp import web

from gateway.auth import Access, authorize
from gateway.bodies import JSON_TYPE, json_response, read_object
from gateway.errors import ApiError, from_status
from gateway.feeds import RunFeeds
from gateway.forms import report_request, start_request
from gateway.reports import ReportBatcher
from gateway.settings import GatewaySettings
from gateway.upstream import Upstream
from services.api import metrics_pb2, training_pb2
from services.api.codec import message_to_dict, run_status_name
from services.api.run_config import public_config
from services.core.layout import ARTIFACTS
from services.core.training_config import validate_run_id

log = logging.getLogger("oneseek.gateway")
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

RUNNING = training_pb2.RUN_STATUS_RUNNING


def run_id_of(request: web.Request) -> str:
    """The path's runId, validated before any service sees it (400 naming `runId`)."""
    return validate_run_id(request.match_info["runId"])


class Routes:
    """The handlers, bound to the settings and the gRPC channels of one app."""

    def __init__(
        self,
        settings: GatewaySettings,
        upstream: Upstream,
        feeds: RunFeeds,
        reports: ReportBatcher,
    ) -> None:
        self.settings = settings
        self.upstream = upstream
        self.feeds = feeds
        self.reports = reports

    def table(self) -> list[web.RouteDef]:
        guard = self._guard
        return [
            web.get("/api/config", guard(Access.READ, self.config)),
            web.get("/api/admin/models", guard(Access.ADMIN, self.models)),
            web.get("/api/admin/datasets", guard(Access.ADMIN, self.datasets)),
            web.post("/api/admin/training/start-dna-v2", guard(Access.ADMIN, self.start)),
            web.get("/api/admin/training/status", guard(Access.ADMIN, self.status)),
            web.post("/api/admin/training/{runId}/stop", guard(Access.ADMIN, self.stop)),
            web.post("/api/admin/training/{runId}/resume", guard(Access.ADMIN, self.resume)),
            web.get("/api/training/runs", guard(Access.READ, self.runs)),
            web.get("/api/training/active", guard(Access.READ, self.active)),
            web.get("/api/training/{runId}/metrics", guard(Access.READ, self.metrics)),
            web.post("/api/training/{runId}/metrics", guard(Access.REPORT, self.report)),
            web.get("/api/training/{runId}/leaderboard", guard(Access.READ, self.leaderboard)),
            web.get("/api/training/{runId}/artifacts/{name}", guard(Access.READ, self.artifact)),
            web.get("/healthz", self.health),
        ]

    def _guard(self, access: Access, handler: Handler) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            authorize(request, access, self.settings)
            return await handler(request)

        return guarded

    # ---- configuration, models, datasets ------------------------------------------------------

    async def config(self, request: web.Request) -> web.StreamResponse:
        return json_response(public_config())

    async def models(self, request: web.Request) -> web.StreamResponse:
        up = self.upstream
        reply = await up.training.call(
            up.training_stub.ListModels, training_pb2.ListModelsRequest()
        )
        return json_response({"models": [message_to_dict(m) for m in reply.models]})

    async def datasets(self, request: web.Request) -> web.StreamResponse:
        up = self.upstream
        reply = await up.training.call(
            up.training_stub.ListDatasets, training_pb2.ListDatasetsRequest()
        )
        return json_response({"datasets": [message_to_dict(d) for d in reply.datasets]})

    # ---- controlling runs ---------------------------------------------------------------------

    async def start(self, request: web.Request) -> web.StreamResponse:
        message = start_request(await read_object(request))
        up = self.upstream
        reply = await up.training.call(
            up.training_stub.StartRun,
            message,
            token=self.settings.admin_token,
            timeout=self.settings.start_timeout,
        )
        await self._announce(reply.run_id)
        return json_response(
            {"success": True, "runId": reply.run_id, "status": run_status_name(reply.status)},
            status=202,
        )

    async def _announce(self, run_id: str) -> None:
        """Makes the metrics service register a run the moment it starts: it otherwise learns of
        a run from its first event, which comes only once the worker has loaded every model
        (minutes for real checkpoints), and the run would be missing from the run lists."""
        up = self.upstream
        try:
            await up.metrics.call(
                up.metrics_stub.GetMetrics,
                metrics_pb2.GetMetricsRequest(run_id=run_id),
                timeout=self.settings.health_timeout,
            )
        except ApiError as error:  # the run started; its first event will register it anyway
            log.warning("metrics service not told of the new run run_id=%s: %s", run_id, error)

    async def stop(self, request: web.Request) -> web.StreamResponse:
        run_id = run_id_of(request)
        up = self.upstream
        reply = await up.training.call(
            up.training_stub.StopRun,
            training_pb2.StopRunRequest(run_id=run_id),
            token=self.settings.admin_token,
        )
        status = run_status_name(reply.run.status)
        return json_response({"success": True, "runId": run_id, "status": status})

    async def resume(self, request: web.Request) -> web.StreamResponse:
        run_id = run_id_of(request)
        up = self.upstream
        reply = await up.training.call(
            up.training_stub.ResumeRun,
            training_pb2.ResumeRunRequest(run_id=run_id),
            token=self.settings.admin_token,
            timeout=self.settings.start_timeout,
        )
        return json_response(
            {"success": True, "runId": reply.run_id, "status": run_status_name(reply.status)},
            status=202,
        )

    async def status(self, request: web.Request) -> web.StreamResponse:
        up = self.upstream
        reply = await up.training.call(
            up.training_stub.ListRuns, training_pb2.ListRunsRequest(status=RUNNING)
        )
        return json_response(
            {
                "active": [message_to_dict(run) for run in reply.runs],
                "max_active_runs": reply.max_active_runs,
            }
        )

    # ---- reading runs -------------------------------------------------------------------------

    async def _summaries(self, status: int) -> web.StreamResponse:
        up = self.upstream
        reply = await up.metrics.call(
            up.metrics_stub.ListRuns,
            metrics_pb2.ListRunsRequest(status=status),  # type: ignore[arg-type]
        )
        return json_response({"runs": [message_to_dict(run) for run in reply.runs]})

    async def runs(self, request: web.Request) -> web.StreamResponse:
        return await self._summaries(training_pb2.RUN_STATUS_UNSPECIFIED)

    async def active(self, request: web.Request) -> web.StreamResponse:
        return await self._summaries(RUNNING)

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        run_id = run_id_of(request)
        up = self.upstream
        reply = await up.metrics.call(
            up.metrics_stub.GetMetrics, metrics_pb2.GetMetricsRequest(run_id=run_id)
        )
        return json_response(message_to_dict(reply))

    async def leaderboard(self, request: web.Request) -> web.StreamResponse:
        run_id = run_id_of(request)
        # answered from the run's live feed when it can be: no gRPC call per GET (bench/README)
        body = await self.feeds.leaderboard(run_id)
        if body is not None:
            return web.Response(body=body, content_type=JSON_TYPE)
        up = self.upstream
        reply = await up.metrics.call(
            up.metrics_stub.GetLeaderboard, metrics_pb2.GetLeaderboardRequest(run_id=run_id)
        )
        return json_response(message_to_dict(reply))

    async def artifact(self, request: web.Request) -> web.StreamResponse:
        run_id = run_id_of(request)
        name = request.match_info["name"]
        if name not in ARTIFACTS:
            raise ApiError.bad_request(
                f"Artifact {name!r} is not available; ask for one of {', '.join(ARTIFACTS)}.",
                field="name",
            )
        up = self.upstream
        reply = await up.training.call(
            up.training_stub.GetArtifact,
            training_pb2.GetArtifactRequest(run_id=run_id, name=name),
        )
        return web.Response(
            body=reply.content.encode(),
            content_type="application/json",
            headers={"ETag": f'"{reply.sha256}"'} if reply.sha256 else None,
        )

    async def report(self, request: web.Request) -> web.StreamResponse:
        run_id = run_id_of(request)
        message = report_request(run_id, await read_object(request))
        result = await self.reports.submit(message)  # concurrent reports share one call
        if result.code != grpc.StatusCode.OK.value[0]:
            service = self.upstream.metrics
            code = _GRPC_CODES.get(result.code, grpc.StatusCode.UNKNOWN)
            field = result.field or None
            raise from_status(code, result.message, field, service.name, service.addr)
        self.feeds.written(run_id, result.seq)
        return json_response({"success": True, "seq": result.seq})

    # ---- liveness -----------------------------------------------------------------------------

    async def health(self, request: web.Request) -> web.StreamResponse:
        timeout = self.settings.health_timeout
        training, metrics = await asyncio.gather(
            self.upstream.training.healthy(timeout), self.upstream.metrics.healthy(timeout)
        )
        ok = training and metrics
        body: dict[str, Any] = {
            "status": "ok" if ok else "degraded",
            "training": training,
            "metrics": metrics,
        }
        return json_response(body, status=200 if ok else 503)

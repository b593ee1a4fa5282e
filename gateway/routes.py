"""Every route of the gateway, declared once in `ROUTES` (served, and described by
gateway/openapi.py); each checks access, then its input, then makes one gRPC call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.auth import Access, authorize
from gateway.bodies import JSON_TYPE, json_response, read_object
from gateway.errors import ApiError, from_status
from gateway.feeds import RunFeeds
from gateway.forms import report_request, start_request
from gateway.generate import SSE_TYPE, TAR_TYPE, ClientSlots, relay_export, relay_generation
from gateway.page import index_page
from gateway.reports import ReportBatcher
from gateway.settings import GatewaySettings
from gateway.telemetry import GatewayMetrics
from gateway.upstream import Upstream
from gateway.websocket import training_feed
from services.api import metrics_pb2, training_pb2
from services.api.codec import message_to_dict, run_status_name
from services.api.generate_request import check_generate, generate_body, to_generate_request
from services.core.layout import ARTIFACTS
from services.core.training_config import (
    TRAINING_CONFIG,
    public_config,
    validate_model_name,
    validate_run_id,
)

log = logging.getLogger("oneseek.gateway")
_GRPC_CODES = {code.value[0]: code for code in grpc.StatusCode}

Endpoint = Callable[["Routes", web.Request], Awaitable[web.StreamResponse]]

RUNNING = training_pb2.RUN_STATUS_RUNNING


@dataclass(frozen=True)
class Answer:
    """A documented answer that is not the error envelope."""

    schema: str | None
    """Its components/schemas name; None: any JSON object, or no schema for another media."""
    description: str
    status: int = 200
    media: str = JSON_TYPE


@dataclass(frozen=True)
class Route:
    """One route: what serves it, who may call it, and what /api/openapi.json says of it (its
    path parameters are documented from the path)."""

    method: str
    path: str
    handler: Endpoint
    access: Access
    summary: str
    answers: tuple[Answer, ...]
    errors: tuple[int, ...] = ()
    """The statuses it may answer with the error envelope."""
    body: str | None = None
    """The components/schemas name of its JSON request body."""
    query: tuple[str, ...] = ()
    websocket: bool = False
    """The access check also takes `?token=` (browsers cannot set a websocket's headers)."""
    download: bool = False
    """A download the page links to: the access check also takes `?token=`, as a link cannot
    send headers (a same-site check applies as for a websocket)."""


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
        document: bytes,
        telemetry: GatewayMetrics,
    ) -> None:
        self.settings = settings
        self.telemetry = telemetry
        self.upstream = upstream
        self.feeds = feeds
        self.reports = reports
        self.document = document  # /api/openapi.json, encoded once: `ROUTES` never change
        self._feed = training_feed(settings, feeds)
        self.generations = ClientSlots(int(TRAINING_CONFIG["generation"]["max_per_client"]))

    def table(self) -> list[web.RouteDef]:
        return [web.route(r.method, r.path, self._guard(r, r.handler)) for r in ROUTES]

    def _guard(self, route: Route, endpoint: Endpoint) -> Handler:
        async def guarded(request: web.Request) -> web.StreamResponse:
            # before any answer: a websocket is refused before the upgrade
            query_token = route.websocket or route.download
            authorize(request, route.access, self.settings, websocket=query_token)
            return await endpoint(self, request)

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

    # ---- using what a run trained --------------------------------------------------------------

    async def generate(self, request: web.Request) -> web.StreamResponse:
        run_id = run_id_of(request)
        spec = check_generate(generate_body(await read_object(request)))
        up = self.upstream
        with self.generations.hold(request.remote or ""):
            return await relay_generation(
                request,
                up.training,
                up.training_stub.Generate,
                to_generate_request(run_id, spec),
                self.settings.admin_token,
            )

    async def export(self, request: web.Request) -> web.StreamResponse:
        run_id = run_id_of(request)
        query = request.query
        if "model" not in query:
            raise ApiError.bad_request(
                "model is required: the run's model to export (?model=NAME).", field="model"
            )
        model = validate_model_name(query["model"], "model")
        merge = query.get("merge", "false")
        if merge not in ("true", "false"):
            raise ApiError.bad_request(
                f"merge must be true or false, got {merge!r}.", field="merge"
            )
        up = self.upstream
        return await relay_export(
            request,
            up.training,
            up.training_stub.ExportModel,
            training_pb2.ExportModelRequest(run_id=run_id, model=model, merge=merge == "true"),
            self.settings.admin_token,
        )

    # ---- liveness, this API's description, the websocket feed ---------------------------------

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

    async def page(self, request: web.Request) -> web.StreamResponse:
        return await index_page(request, self.settings.static_dir)

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        await self.telemetry.refresh_runs(self.upstream, self.settings.health_timeout)
        return self.telemetry.exposition()

    async def openapi(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=self.document, content_type=JSON_TYPE)

    async def training_feed(self, request: web.Request) -> web.StreamResponse:
        return await self._feed(request)


_ANY = (401, 403, 502, 503)
_RUN = (400, 401, 403, 404, 502, 503)

# fmt: off
ROUTES = (
    Route("GET", "/api/config", Routes.config, Access.READ,
          "The effective training configuration (every default the page uses).",
          (Answer("Config", "TRAINING_CONFIG"),), errors=(401, 403)),
    Route("GET", "/api/admin/models", Routes.models, Access.ADMIN,
          "Base models found in MODELS_DIR.", (Answer("Models", "Models"),), errors=_ANY),
    Route("GET", "/api/admin/datasets", Routes.datasets, Access.ADMIN,
          "Datasets found in DATASETS_DIR.", (Answer("Datasets", "Datasets"),), errors=_ANY),
    Route("POST", "/api/admin/training/start-dna-v2", Routes.start, Access.ADMIN,
          "Start a run: every selected base model fine-tuned on the dataset side by side.",
          (Answer("RunAccepted", "The run was created and is starting.", 202),),
          errors=(400, 401, 403, 404, 409, 413, 502, 503), body="StartRequest"),
    Route("GET", "/api/admin/training/status", Routes.status, Access.ADMIN,
          "Active runs and their status.", (Answer("TrainingStatus", "Active runs"),),
          errors=_ANY),
    Route("POST", "/api/admin/training/{runId}/stop", Routes.stop, Access.ADMIN,
          "Stop a run cleanly: the current step ends, artifacts are written, status `stopped` "
          "(shown on the websocket shortly after).",
          (Answer("RunAccepted", "The stop was accepted; status is the run's then."),),
          errors=(400, 401, 403, 404, 409, 502, 503)),
    Route("POST", "/api/admin/training/{runId}/resume", Routes.resume, Access.ADMIN,
          "Resume an interrupted or failed run from its last completed epoch.",
          (Answer("RunAccepted", "The run is resuming.", 202),),
          errors=(400, 401, 403, 404, 409, 502, 503)),
    Route("GET", "/api/training/runs", Routes.runs, Access.READ,
          "Every run, newest first.", (Answer("Runs", "Runs"),), errors=_ANY),
    Route("GET", "/api/training/active", Routes.active, Access.READ,
          "Runs now running.", (Answer("Runs", "Running runs"),), errors=_ANY),
    Route("GET", "/api/training/{runId}/metrics", Routes.metrics, Access.READ,
          "A run's metrics and its full epoch history, from the moment it starts.",
          (Answer("RunMetrics", "RunMetrics"),), errors=_RUN),
    Route("POST", "/api/training/{runId}/metrics", Routes.report, Access.REPORT,
          "An outside training process reports one epoch (admin or report token).",
          (Answer("ReportAccepted", "Stored under `seq`."),),
          errors=(400, 401, 403, 404, 409, 413, 429, 502, 503), body="ReportRequest"),
    Route("GET", "/api/training/{runId}/leaderboard", Routes.leaderboard, Access.READ,
          "The models ranked by validation loss, rank 1 first.",
          (Answer("Leaderboard", "Leaderboard"),), errors=_RUN),
    Route("GET", "/api/training/{runId}/artifacts/{name}", Routes.artifact, Access.READ,
          "One JSON file of the run folder.", (Answer("Artifact", "The file, byte for byte."),),
          errors=_RUN),
    Route("POST", "/api/training/{runId}/generate", Routes.generate, Access.ADMIN,
          "Try a finished run's models: each answers the prompt (default: the run's best model), "
          "streamed as Server-Sent Events: per model `started`, `token`..., `done` (figures: "
          "time to first token, tokens/s); `end` last, or `error` then `end` if the stream "
          "fails after it began. Events: GenerateStreamEvent. Temperature 0 is greedy, the "
          "same answer every time. 429: this client has ONESEEK generation.max_per_client "
          "generations open, or the service its limit.",
          (Answer(None, "The answers, as they are generated.", media=SSE_TYPE),),
          errors=(400, 401, 403, 404, 409, 413, 429, 502, 503), body="GenerateRequest"),
    Route("GET", "/api/admin/training/{runId}/export", Routes.export, Access.ADMIN,
          "Download one model of a finished run as a tar of a folder `from_pretrained` loads: "
          "merge=true folds the LoRA adapter into the base weights, else the adapter alone; "
          "with its model card (README.md) and signed manifest (`oneseek verify` checks it). "
          "The page links here with `?token=` (a link cannot send headers).",
          (Answer(None, "An uncompressed tar archive.", media=TAR_TYPE),),
          errors=(400, 401, 403, 404, 409, 502, 503), query=("model", "merge", "token"),
          download=True),
    Route("GET", "/ws/training", Routes.training_feed, Access.READ,
          "Websocket feed of a run (upgrade). Messages: WebSocketMessage. initial_state first, "
          "then every later event in seq order; with since, exactly the events after since. "
          "Heartbeat every 30 s. Close 1008: no, invalid or unknown runId (the last two after "
          "one error message); 1013: too slow or metrics service unavailable (reconnect with "
          "since); 1001: gateway shutdown. 429 before the upgrade: this address holds "
          "ONESEEK_WS_MAX_PER_IP websockets.",
          (Answer("WebSocketMessage", "Switching to the websocket protocol.", 101),),
          errors=(400, 401, 403, 429), query=("runId", "since", "token"), websocket=True),
    Route("GET", "/healthz", Routes.health, Access.OPEN,
          "Gateway liveness, and whether both services answer.",
          (Answer("Health", "Both services answer."),
           Answer("Health", "A service does not answer.", 503))),
    Route("GET", "/metrics", Routes.prometheus, Access.READ,
          "Prometheus metrics of the gateway: HTTP and websocket counts and latencies, events "
          "received, gRPC call latencies to both services, active runs and each one's current "
          "epoch and population loss.",
          (Answer(None, "The Prometheus text format.", media="text/plain"),), errors=(401, 403)),
    Route("GET", "/api/openapi.json", Routes.openapi, Access.OPEN, "This document.",
          (Answer(None, "OpenAPI 3.1"),)),
    Route("GET", "/", Routes.page, Access.OPEN, "The admin page.",
          (Answer(None, "HTML", media="text/html"),)),
)
# fmt: on

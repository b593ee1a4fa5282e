"""The metrics service's gRPC server (`oneseek metrics-service`): the MetricsService servicer,
its start and graceful stop, and the command line.

Shutdown (SIGTERM or SIGINT): health turns NOT_SERVING, the follower is cancelled, open
Subscribe streams end cleanly (clients resume with after_seq elsewhere or later), in-flight
calls get 5 s to finish, then the MLflow mirror (when on) stops, its position kept in the store,
and the store is closed.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from services.api import metrics_pb2, metrics_pb2_grpc, training_pb2
from services.api.codec import now_timestamp, run_status_name
from services.api.run_state import RunState
from services.api.runtime import (
    SERVER_OPTIONS,
    Context,
    ServerTls,
    TokenAuthInterceptor,
    abort,
    add_health_and_reflection,
    add_listening_port,
    admin_token,
    client_tls_ca,
    configure_logging,
    metrics_addr,
    report_token,
    rpc,
    server_tls,
    status_code,
    stop_signals,
    training_addr,
)
from services.api.telemetry import Readings, ServerMetrics, process_registry, serve_metrics
from services.core.errors import InvalidInput, NotFound, OneSeekError, TooSlow
from services.core.training_config import validate_run_id
from services.metrics.catalog import PAGE_SIZE, RunCatalog
from services.metrics.fanout import DEFAULT_QUEUE_SIZE, EventFanout, SubscriberTooSlow
from services.metrics.follower import TrainingFollower
from services.metrics.mlflow_mirror import MirrorConfig, MlflowMirror, mirror_config
from services.metrics.store import MetricsStore, default_db_url, open_store

log = logging.getLogger("oneseek.metrics")

SERVICE_NAME = metrics_pb2.DESCRIPTOR.services_by_name["MetricsService"].full_name
REPORT_METHOD = f"/{SERVICE_NAME}/ReportMetrics"
REPORT_BATCH_METHOD = f"/{SERVICE_NAME}/ReportMetricsBatch"
MAX_BATCH = 1024
SHUTDOWN_GRACE_SECONDS = 5.0


_CODES = {code.value[0]: code for code in grpc.StatusCode}


class MetricsServicer(metrics_pb2_grpc.MetricsServiceServicer):
    """Answers from the catalog's in-memory run states; writes go through the catalog."""

    def __init__(self, catalog: RunCatalog) -> None:
        self.catalog = catalog

    async def _run_state(self, run_id: str) -> RunState:
        state = await self.catalog.state(validate_run_id(run_id))
        if state is None:
            raise NotFound(
                f"Run {run_id!r} is not known to the metrics service; list runs with "
                "ListRuns (GET /api/training/runs).",
                field="runId",
            )
        return state

    @rpc
    async def GetMetrics(
        self, request: metrics_pb2.GetMetricsRequest, context: Context
    ) -> training_pb2.RunMetrics:
        return (await self._run_state(request.run_id)).metrics()

    @rpc
    async def GetLeaderboard(
        self, request: metrics_pb2.GetLeaderboardRequest, context: Context
    ) -> metrics_pb2.Leaderboard:
        return (await self._run_state(request.run_id)).leaderboard()

    @rpc
    async def ListRuns(
        self, request: metrics_pb2.ListRunsRequest, context: Context
    ) -> metrics_pb2.ListRunsResponse:
        if request.limit < 0:
            raise InvalidInput(
                f"limit must be 0 (all runs) or more, got {request.limit}.", field="limit"
            )
        status = run_status_name(request.status) if request.status else None
        if request.status and status is None:
            raise InvalidInput(
                f"status {request.status} is not a RunStatus; use RUN_STATUS_UNSPECIFIED (0) "
                "for all runs.",
                field="status",
            )
        records = await self.catalog.list_runs(status, request.limit)
        return metrics_pb2.ListRunsResponse(runs=[record.summary() for record in records])

    async def ReportMetrics(
        self, request: metrics_pb2.ReportMetricsRequest, context: Context
    ) -> metrics_pb2.ReportMetricsResponse:
        result = await self._report(request)
        if result.code != grpc.StatusCode.OK.value[0]:
            code = _CODES[result.code]
            await abort(context, code, result.message, result.field or None)
        return metrics_pb2.ReportMetricsResponse(success=True, seq=result.seq)

    @rpc
    async def ReportMetricsBatch(
        self, request: metrics_pb2.ReportMetricsBatchRequest, context: Context
    ) -> metrics_pb2.ReportMetricsBatchResponse:
        if len(request.reports) > MAX_BATCH:
            raise InvalidInput(
                f"A batch holds at most {MAX_BATCH} reports, got {len(request.reports)}.",
                field="reports",
            )
        # started in order: reports of one run take its lock first come, first served
        results = await asyncio.gather(*(self._report(report) for report in request.reports))
        return metrics_pb2.ReportMetricsBatchResponse(results=results)

    async def _report(self, request: metrics_pb2.ReportMetricsRequest) -> metrics_pb2.ReportResult:
        try:
            seq = await self.catalog.report(request)
        except OneSeekError as error:
            log.info(
                "report refused run_id=%s epoch=%d reason=%s",
                request.run_id[:64],
                request.epoch,
                error.message,
            )
            return metrics_pb2.ReportResult(
                code=status_code(error).value[0], message=error.message, field=error.field or ""
            )
        return metrics_pb2.ReportResult(seq=seq)

    @rpc
    async def Subscribe(
        self, request: metrics_pb2.SubscribeRequest, context: Context
    ) -> AsyncIterator[training_pb2.TrainingEvent]:
        run_id, last = request.run_id, request.after_seq
        if last < 0:
            raise InvalidInput(
                f"after_seq must be 0 (from the start) or the last seq received, got {last}.",
                field="after_seq",
            )
        state = await self._run_state(run_id)
        # registered before anything is read, and the snapshot taken with no await in between:
        # every event after the snapshot's seq is either in the store or in the queue
        with self.catalog.fanout.subscribe(run_id) as live:
            yield state.initial_state(now_timestamp())
            while not live.dropped and not live.closed:
                page = await self.catalog.events_after(run_id, last)
                for event in page:
                    yield event
                    last = live.sent = event.seq
                if len(page) < PAGE_SIZE:
                    break
            try:
                while (update := await live.next()) is not None:
                    if update.seq > last:  # an older one was already sent from the store
                        yield update
                        last = update.seq
            except SubscriberTooSlow:
                raise TooSlow(
                    f"Client too slow: more than {self.catalog.fanout.queue_size} events were "
                    f"waiting. Reconnect with after_seq={last} (the last seq received).",
                ) from None


class MetricsServer:
    """The server and everything it owns: store, catalog, fan-out, follower task, health."""

    def __init__(
        self,
        addr: str,
        training_addr: str,
        db_url: str,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        follow: bool = True,
        tls: ServerTls | None = None,
        training_ca: bytes | None = None,
        mirror: MirrorConfig | None = None,
    ) -> None:
        self.addr = addr
        self.tls = tls
        self.training_ca = training_ca
        """CA bundle to trust for the training service (None: plaintext to it)."""
        self.training_addr = training_addr
        self.db_url = db_url
        self.queue_size = queue_size
        self.follow = follow
        self.registry = process_registry()
        self.port = 0
        self.store: MetricsStore | None = None
        self.catalog: RunCatalog | None = None
        self.follower: TrainingFollower | None = None
        self._server: aio.Server | None = None
        self._health: Any = None
        self._follow_task: asyncio.Task[None] | None = None
        self.mirror_config = mirror
        """Where to mirror runs in MLflow (None: not mirrored)."""
        self.mirror: MlflowMirror | None = None

    async def start(self) -> int:
        """Opens the store, binds, starts serving and following; returns the bound port."""
        self.store = await open_store(self.db_url)
        try:
            fanout = EventFanout(self.queue_size)
            self.catalog = RunCatalog(self.store, fanout)
            self.follower = TrainingFollower(
                self.training_addr, self.catalog, root_certificates=self.training_ca
            )
            # unknown run ids are looked up on the training service through the same channel
            self.catalog.lookup = self.follower.lookup_run
            await self.catalog.load()
            interceptor = TokenAuthInterceptor(
                {
                    method: lambda: [admin_token(), report_token()]
                    for method in (REPORT_METHOD, REPORT_BATCH_METHOD)
                }
            )
            self._server = aio.server(
                interceptors=[ServerMetrics(self.registry), interceptor], options=SERVER_OPTIONS
            )
            readings = Readings(self.registry)
            follower = self.follower
            readings.counter(
                "oneseek_metrics_followed_events",
                "Training events followed and stored (the committed cursor).",
                lambda: follower.cursor,
            )
            metrics_pb2_grpc.add_MetricsServiceServicer_to_server(
                MetricsServicer(self.catalog), self._server
            )
            self._health = await add_health_and_reflection(self._server, [SERVICE_NAME])
            self.port = add_listening_port(self._server, self.addr, self.tls)
            await self._server.start()
        except BaseException:
            await self.stop()
            raise
        if self.mirror_config is not None:
            self.mirror = MlflowMirror(self.store, self.mirror_config)
            self.catalog.listeners.append(self.mirror.notify)
            self.mirror.start()
        if self.follow:
            self._follow_task = asyncio.create_task(self.follower.run(), name="metrics-follower")
        log.info(
            "metrics service listening addr=%s port=%d tls=%s training_addr=%s training_tls=%s",
            self.addr,
            self.port,
            self.tls is not None,
            self.training_addr,
            self.training_ca is not None,
        )
        return self.port

    async def stop(self, grace: float = SHUTDOWN_GRACE_SECONDS) -> None:
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
        if self._follow_task is not None:
            self._follow_task.cancel()
            await asyncio.gather(self._follow_task, return_exceptions=True)
            self._follow_task = None
        if self.catalog is not None:
            self.catalog.fanout.close()
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self.follower is not None:
            await self.follower.close()
            self.follower = None
        if self.mirror is not None:
            await self.mirror.stop()
            self.mirror = None
        if self.store is not None:
            await self.store.close()
            self.store = None
        log.info("metrics service stopped addr=%s", self.addr)


async def serve(
    addr: str,
    training_addr: str,
    db_url: str,
    *,
    tls: ServerTls | None = None,
    training_ca: bytes | None = None,
    metrics_port: int | None = None,
    mirror: MirrorConfig | None = None,
) -> None:
    """Runs the metrics service until SIGTERM or SIGINT, then stops it gracefully; with
    `metrics_port`, serves its Prometheus metrics there."""
    server = MetricsServer(
        addr, training_addr, db_url, tls=tls, training_ca=training_ca, mirror=mirror
    )
    stop_metrics = None
    async with stop_signals() as stop:
        try:
            await server.start()
            if metrics_port is not None:
                stop_metrics = serve_metrics(metrics_port, server.registry)
            await stop.wait()
            log.info("shutting down on signal")
        finally:
            await server.stop()
            if stop_metrics is not None:
                stop_metrics()


# ---- command line ---------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    """`oneseek metrics-service` (its flags: services/cli.py)."""
    configure_logging("metrics-service")
    try:
        tls = server_tls(getattr(args, "tls_cert", None), getattr(args, "tls_key", None))
        training_ca = client_tls_ca(getattr(args, "tls_ca", None))
        asyncio.run(
            serve(
                args.addr or metrics_addr(),
                args.training_addr or training_addr(),
                args.db_url or default_db_url(),
                tls=tls,
                training_ca=training_ca,
                metrics_port=getattr(args, "metrics_port", None),
                mirror=mirror_config(
                    getattr(args, "mlflow_tracking_uri", None),
                    getattr(args, "mlflow_experiment", None),
                ),
            )
        )
    except InvalidInput as error:
        print(f"error: {error.message}", file=sys.stderr)
        return 2
    except RuntimeError as error:  # grpc reports a port it cannot bind this way
        print(f"error: the metrics service could not start: {error}", file=sys.stderr)
        return 1
    return 0

"""The training service over gRPC: `oneseek training-service --addr 127.0.0.1:50051`.

Maps TrainingService RPCs onto `TrainingService` (service.py) and its errors onto status codes.
SIGTERM: health goes NOT_SERVING, new calls are refused, active runs are stopped cleanly
(see `TrainingService.shutdown`), open streams end, then the server stops.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path

from grpc import aio
from prometheus_client import CollectorRegistry

from services.api import training_pb2, training_pb2_grpc
from services.api.generate_request import read_generate_request
from services.api.run_config import read_request
from services.api.runtime import (
    SERVER_OPTIONS,
    Context,
    ServerTls,
    TokenAuthInterceptor,
    add_health_and_reflection,
    add_listening_port,
    admin_token,
    configure_logging,
    rpc,
    server_tls,
    stop_signals,
    training_addr,
)
from services.api.telemetry import Readings, ServerMetrics, process_registry, serve_metrics
from services.core.layout import datasets_dir, models_dir, state_dir
from services.training.data import list_datasets
from services.training.executors import ExecutorSettings
from services.training.models import discover_models
from services.training.service import TrainingService

log = logging.getLogger("oneseek.training.server")

SERVICE_NAME = training_pb2.DESCRIPTOR.services_by_name["TrainingService"].full_name
# Generate and ExportModel spend compute (and hand out weights): admin, like starting a run
_ADMIN = ("StartRun", "StopRun", "ResumeRun", "Generate", "ExportModel")


class TrainingServicer(training_pb2_grpc.TrainingServiceServicer):
    def __init__(self, service: TrainingService) -> None:
        self.service = service

    @rpc
    async def StartRun(
        self, request: training_pb2.StartRunRequest, context: Context
    ) -> training_pb2.StartRunResponse:
        record = await self.service.start(read_request(request))
        return training_pb2.StartRunResponse(run_id=record.run_id, status=record.status)  # type: ignore[arg-type]

    @rpc
    async def GetRun(
        self, request: training_pb2.GetRunRequest, context: Context
    ) -> training_pb2.Run:
        return self.service.get(request.run_id).to_proto()

    @rpc
    async def ListRuns(
        self, request: training_pb2.ListRunsRequest, context: Context
    ) -> training_pb2.ListRunsResponse:
        records = self.service.runs_newest_first(request.status, request.limit)
        return training_pb2.ListRunsResponse(
            runs=[r.to_proto() for r in records], max_active_runs=self.service.max_active_runs
        )

    @rpc
    async def StopRun(
        self, request: training_pb2.StopRunRequest, context: Context
    ) -> training_pb2.StopRunResponse:
        record = await self.service.stop(request.run_id)
        return training_pb2.StopRunResponse(run=record.to_proto())

    @rpc
    async def ResumeRun(
        self, request: training_pb2.ResumeRunRequest, context: Context
    ) -> training_pb2.StartRunResponse:
        record = await self.service.resume(request.run_id)
        return training_pb2.StartRunResponse(run_id=record.run_id, status=record.status)  # type: ignore[arg-type]

    @rpc
    async def GetArtifact(
        self, request: training_pb2.GetArtifactRequest, context: Context
    ) -> training_pb2.Artifact:
        content, digest = await self.service.artifact(request.run_id, request.name)
        return training_pb2.Artifact(
            run_id=request.run_id, name=request.name, content=content, sha256=digest
        )

    async def ListModels(
        self, request: training_pb2.ListModelsRequest, context: Context
    ) -> training_pb2.ListModelsResponse:
        infos = await asyncio.to_thread(discover_models, self.service.models_root)
        return training_pb2.ListModelsResponse(
            models=[training_pb2.ModelInfo(**info.to_dict()) for info in infos]
        )

    async def ListDatasets(
        self, request: training_pb2.ListDatasetsRequest, context: Context
    ) -> training_pb2.ListDatasetsResponse:
        infos = await asyncio.to_thread(list_datasets, self.service.datasets_root)
        return training_pb2.ListDatasetsResponse(
            datasets=[training_pb2.DatasetInfo(id=d.id, records=d.records) for d in infos]
        )

    @rpc
    async def WatchRun(
        self, request: training_pb2.WatchRunRequest, context: Context
    ) -> AsyncIterator[training_pb2.TrainingEvent]:
        async for event in self.service.watch(request.run_id, request.after_seq):
            yield event

    @rpc
    async def Generate(
        self, request: training_pb2.GenerateRequest, context: Context
    ) -> AsyncIterator[training_pb2.GenerateEvent]:
        spec = read_generate_request(request)
        # a client that goes away cancels this generator; the generation ends at its next token
        async for event in self.service.generate(request.run_id, spec):
            yield event

    @rpc
    async def ExportModel(
        self, request: training_pb2.ExportModelRequest, context: Context
    ) -> AsyncIterator[training_pb2.ExportChunk]:
        async for chunk in self.service.export(request.run_id, request.model, request.merge):
            yield chunk

    @rpc
    async def StreamEvents(
        self, request: training_pb2.StreamEventsRequest, context: Context
    ) -> AsyncIterator[training_pb2.TrainingEvent]:
        async for event in self.service.hub.stream(request.after_cursor):
            yield event


async def serve(
    addr: str,
    *,
    models_root: Path,
    datasets_root: Path,
    state_dir: Path,
    max_active_runs: int | None = None,
    shutdown_grace: float = 30.0,
    ready: Callable[[int], None] | None = None,
    tls: ServerTls | None = None,
    executor: ExecutorSettings | None = None,
    generate_cache_bytes: int | None = None,
    metrics_port: int | None = None,
) -> None:
    service = TrainingService(
        models_root=models_root,
        datasets_root=datasets_root,
        state_dir=state_dir,
        max_active_runs=max_active_runs,
        executor=executor,
        generate_cache_bytes=generate_cache_bytes,
    )
    service.load()
    prefix = f"/{SERVICE_NAME}/"
    registry = process_registry()
    _readings(service, registry)
    server = aio.server(
        options=SERVER_OPTIONS,
        interceptors=[
            ServerMetrics(registry),  # first: it times the token check's refusals too
            TokenAuthInterceptor({prefix + m: lambda: [admin_token()] for m in _ADMIN}),
        ],
    )
    training_pb2_grpc.add_TrainingServiceServicer_to_server(TrainingServicer(service), server)
    health = await add_health_and_reflection(server, [SERVICE_NAME])
    port = add_listening_port(server, addr, tls)
    if port == 0:
        raise OSError(f"cannot listen on {addr}")
    await server.start()
    log.info(
        "training service listening on %s (port %s, %s)", addr, port, "TLS" if tls else "plaintext"
    )
    if ready is not None:
        ready(port)
    stop_metrics = serve_metrics(metrics_port, registry) if metrics_port is not None else None

    async with stop_signals() as stop:
        try:
            await stop.wait()
        finally:
            log.info("shutting down: stopping active runs (grace %ss)", shutdown_grace)
            await health.enter_graceful_shutdown()
            await service.shutdown(grace=shutdown_grace)
            await server.stop(grace=5)
            if stop_metrics is not None:
                stop_metrics()
            log.info("training service stopped")


def run(args: argparse.Namespace) -> int:
    configure_logging("training-service")
    tls = server_tls(getattr(args, "tls_cert", None), getattr(args, "tls_key", None))
    asyncio.run(
        serve(
            args.addr or training_addr(),
            models_root=models_dir(args.models_dir),
            datasets_root=datasets_dir(args.datasets_dir),
            state_dir=state_dir(),
            max_active_runs=args.max_active_runs,
            shutdown_grace=args.shutdown_grace,
            tls=tls,
            executor=ExecutorSettings(
                kind=args.executor,
                ray_address=args.ray_address,
                max_member_restarts=args.max_member_restarts,
            ),
            generate_cache_bytes=_gib(args.generate_cache_gib),
            metrics_port=args.metrics_port,
        )
    )
    return 0


def _readings(service: TrainingService, registry: CollectorRegistry) -> None:
    readings = Readings(registry)
    readings.gauge(
        "oneseek_training_active_runs", "Runs training now.", lambda: len(service.active())
    )
    readings.counter(
        "oneseek_training_events",
        "Run events this service has journaled (its global cursor; kept across restarts).",
        lambda: len(service.hub.journal.entries),
    )
    readings.gauge(
        "oneseek_training_generations",
        "Generations answering now.",
        lambda: service.generator.active,
    )
    readings.gauge(
        "oneseek_training_generate_cache_bytes",
        "Bytes of models loaded for Generate.",
        lambda: service.generator.cache.held,
    )


def _gib(value: float | None) -> int | None:
    return None if not value else int(value * 1024**3)

"""`AsyncOneSeekClient`: the same calls as `OneSeekClient`, as coroutines over grpc.aio.

Same requests, answers, errors and watch semantics (see services.client.sync); `watch` and
`generate` are async iterators. Channels are opened on first use, inside the running loop, and
closed by `await client.close()` or `async with`.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc
from grpc import aio

from services.api import metrics_pb2, metrics_pb2_grpc, training_pb2, training_pb2_grpc
from services.api.runtime import client_channel
from services.client import messages
from services.client.errors import from_rpc_error, status_of
from services.client.settings import Backoff, ClientSettings
from services.client.sync import METRICS, RESUMABLE, TRAINING, status_filter

log = logging.getLogger("oneseek.client")

Request = TypeVar("Request")
Response = TypeVar("Response")


class AsyncOneSeekClient:
    """Asyncio client of the training and metrics services; an async context manager that
    closes its channels. Arguments left out come from the environment."""

    def __init__(
        self,
        training_addr: str | None = None,
        metrics_addr: str | None = None,
        *,
        admin_token: str | None = None,
        report_token: str | None = None,
        tls_ca: str | None = None,
        timeout: float = 30.0,
        retries: int = 8,
        backoff: Backoff | None = None,
        settings: ClientSettings | None = None,
    ) -> None:
        self.settings = settings or ClientSettings.from_env(
            training_addr,
            metrics_addr,
            admin_token=admin_token,
            report_token=report_token,
            tls_ca=tls_ca,
            timeout=timeout,
            retries=retries,
            backoff=backoff,
        )
        self._channels: dict[str, aio.Channel] = {}
        self._training_stub: training_pb2_grpc.TrainingServiceAsyncStub | None = None
        self._metrics_stub: metrics_pb2_grpc.MetricsServiceAsyncStub | None = None

    # ---- life -------------------------------------------------------------------------------

    async def close(self) -> None:
        """Closes both channels; a later call opens them again."""
        channels, self._channels = self._channels, {}
        self._training_stub = self._metrics_stub = None
        for channel in channels.values():
            await channel.close(None)

    async def __aenter__(self) -> AsyncOneSeekClient:
        return self

    async def __aexit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        await self.close()

    def _channel(self, addr: str) -> aio.Channel:
        if addr not in self._channels:
            self._channels[addr] = client_channel(addr, self.settings.root_certificates)
        return self._channels[addr]

    def _training(self) -> training_pb2_grpc.TrainingServiceAsyncStub:
        if self._training_stub is None:
            channel = self._channel(self.settings.training_addr)
            self._training_stub = training_pb2_grpc.TrainingServiceStub(channel)
        return self._training_stub

    def _metrics(self) -> metrics_pb2_grpc.MetricsServiceAsyncStub:
        if self._metrics_stub is None:
            channel = self._channel(self.settings.metrics_addr)
            self._metrics_stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        return self._metrics_stub

    async def _call(
        self,
        method: aio.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        service: str = TRAINING,
    ) -> Response:
        if service == TRAINING:
            addr, metadata = self.settings.training_addr, self.settings.training_metadata()
        elif isinstance(request, metrics_pb2.ReportMetricsRequest):
            addr, metadata = self.settings.metrics_addr, self.settings.report_metadata()
        else:
            addr, metadata = self.settings.metrics_addr, self.settings.training_metadata()
        try:
            return await method(request, timeout=self.settings.timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error, service, addr) from error

    # ---- the training service ---------------------------------------------------------------

    async def start_run(
        self, dataset_id: str, models: Sequence[str] | str, **options: Any
    ) -> training_pb2.StartRunResponse:
        """See OneSeekClient.start_run."""
        request = messages.start_request(dataset_id, models, options)
        return await self._call(self._training().StartRun, request)

    async def get_run(self, run_id: str) -> training_pb2.Run:
        request = training_pb2.GetRunRequest(run_id=messages.run_id(run_id))
        return await self._call(self._training().GetRun, request)

    async def list_runs(self, status: str | None = None, limit: int = 0) -> list[training_pb2.Run]:
        request = training_pb2.ListRunsRequest(status=status_filter(status), limit=limit)
        return list((await self._call(self._training().ListRuns, request)).runs)

    async def stop_run(self, run_id: str) -> training_pb2.Run:
        request = training_pb2.StopRunRequest(run_id=messages.run_id(run_id))
        return (await self._call(self._training().StopRun, request)).run

    async def resume_run(self, run_id: str) -> training_pb2.StartRunResponse:
        request = training_pb2.ResumeRunRequest(run_id=messages.run_id(run_id))
        return await self._call(self._training().ResumeRun, request)

    async def list_models(self) -> list[training_pb2.ModelInfo]:
        request = training_pb2.ListModelsRequest()
        return list((await self._call(self._training().ListModels, request)).models)

    async def list_datasets(self) -> list[training_pb2.DatasetInfo]:
        request = training_pb2.ListDatasetsRequest()
        return list((await self._call(self._training().ListDatasets, request)).datasets)

    async def get_artifact(self, run_id: str, name: str) -> training_pb2.Artifact:
        request = training_pb2.GetArtifactRequest(run_id=messages.run_id(run_id), name=name)
        return await self._call(self._training().GetArtifact, request)

    def watch(self, run_id: str, after_seq: int = 0) -> AsyncIterator[training_pb2.TrainingEvent]:
        """See OneSeekClient.watch: `async for event in client.watch(run_id)`."""
        return self._watch(messages.run_id(run_id), messages.after_seq(after_seq))

    async def _watch(self, run_id: str, last: int) -> AsyncIterator[training_pb2.TrainingEvent]:
        failures = 0
        while True:
            request = training_pb2.WatchRunRequest(run_id=run_id, after_seq=last)
            stream = self._training().WatchRun(request, metadata=self.settings.training_metadata())
            try:
                async for event in stream:
                    if event.seq <= last:
                        continue
                    last, failures = event.seq, 0
                    yield event
                return
            except grpc.RpcError as error:
                code = status_of(error)
                if code not in RESUMABLE or failures >= self.settings.retries:
                    raise from_rpc_error(error, TRAINING, self.settings.training_addr) from error
                failures += 1
                delay = self.settings.backoff.delay(failures)
                log.info(
                    "watch of %s broke (%s); reopening after seq %d in %.1f s (retry %d of %d)",
                    run_id,
                    code.name,
                    last,
                    delay,
                    failures,
                    self.settings.retries,
                )
                await asyncio.sleep(delay)
            finally:
                stream.cancel()

    def generate(
        self, run_id: str, prompt: str = "", **options: Any
    ) -> AsyncIterator[training_pb2.GenerateEvent]:
        """See OneSeekClient.generate."""
        return self._generate(messages.generate_request(run_id, prompt, options))

    async def _generate(
        self, request: training_pb2.GenerateRequest
    ) -> AsyncIterator[training_pb2.GenerateEvent]:
        stream = self._training().Generate(request, metadata=self.settings.training_metadata())
        try:
            async for event in stream:
                yield event
        except grpc.RpcError as error:
            raise from_rpc_error(error, TRAINING, self.settings.training_addr) from error
        finally:
            stream.cancel()

    # ---- the metrics service ----------------------------------------------------------------

    async def metrics(self, run_id: str) -> training_pb2.RunMetrics:
        request = metrics_pb2.GetMetricsRequest(run_id=messages.run_id(run_id))
        return await self._call(self._metrics().GetMetrics, request, METRICS)

    async def leaderboard(self, run_id: str) -> metrics_pb2.Leaderboard:
        request = metrics_pb2.GetLeaderboardRequest(run_id=messages.run_id(run_id))
        return await self._call(self._metrics().GetLeaderboard, request, METRICS)

    async def run_summaries(
        self, status: str | None = None, limit: int = 0
    ) -> list[metrics_pb2.RunSummary]:
        request = metrics_pb2.ListRunsRequest(status=status_filter(status), limit=limit)
        return list((await self._call(self._metrics().ListRuns, request, METRICS)).runs)

    async def report_epoch(
        self,
        run_id: str,
        epoch: int,
        val_losses: Mapping[str, float],
        *,
        total_epochs: int | None = None,
        train_losses: Mapping[str, float] | None = None,
        weights: Mapping[str, float] | None = None,
        lr_multipliers: Mapping[str, float] | None = None,
        total_loss: float | None = None,
        progress_percent: float | None = None,
        auto_stop_info: training_pb2.AutoStopInfo | None = None,
    ) -> int:
        """See OneSeekClient.report_epoch."""
        request = messages.report_request(
            run_id,
            epoch,
            val_losses,
            total_epochs=total_epochs,
            train_losses=train_losses,
            weights=weights,
            lr_multipliers=lr_multipliers,
            total_loss=total_loss,
            progress_percent=progress_percent,
            auto_stop_info=auto_stop_info,
        )
        return await self.send_report(request)

    async def send_report(self, request: metrics_pb2.ReportMetricsRequest) -> int:
        return (await self._call(self._metrics().ReportMetrics, request, METRICS)).seq

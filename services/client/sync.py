"""`OneSeekClient`: the suite's gRPC API as blocking Python calls (grpc's own channels).

Each method sends one checked request (services.client.messages) and returns the message the
service answers, unwrapped where the answer only wraps one thing: `list_runs` is a list of
`Run`, `stop_run` the `Run`, `report_epoch` the seq the report was stored under. A refusal is
raised as the project's own error (services.client.errors). `watch` is the one call that
retries by itself: a stream that breaks is opened again after the last seq it yielded.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from types import TracebackType
from typing import Any, TypeVar

import grpc

from services.api import metrics_pb2, metrics_pb2_grpc, training_pb2, training_pb2_grpc
from services.api.codec import run_status_value
from services.api.runtime import blocking_channel
from services.client import messages
from services.client.errors import from_rpc_error, status_of
from services.client.settings import Backoff, ClientSettings
from services.core.errors import InvalidInput

log = logging.getLogger("oneseek.client")

Request = TypeVar("Request")
Response = TypeVar("Response")

TRAINING, METRICS = "training service", "metrics service"
RESUMABLE = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,  # the service went away or is restarting
        grpc.StatusCode.CANCELLED,  # the service ended the stream as it shut down
        grpc.StatusCode.INTERNAL,  # the connection was reset mid-stream
        grpc.StatusCode.RESOURCE_EXHAUSTED,  # this client fell behind and was dropped
    }
)
"""A watch that ends with one of these is opened again after the last seq it yielded."""


def status_filter(status: str | None) -> training_pb2.RunStatus.ValueType:
    """RunStatus of a status name ("completed", ...); 0 (every status) for None."""
    if status is None:
        return training_pb2.RUN_STATUS_UNSPECIFIED
    try:
        return training_pb2.RunStatus.ValueType(run_status_value(status))
    except ValueError as error:
        raise InvalidInput(str(error), field="status") from None


class OneSeekClient:
    """Blocking client of the training and metrics services; a context manager that closes its
    channels. Arguments left out come from the environment (ClientSettings.from_env)."""

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
        self._channels: dict[str, grpc.Channel] = {}
        self._training_stub: training_pb2_grpc.TrainingServiceStub | None = None
        self._metrics_stub: metrics_pb2_grpc.MetricsServiceStub | None = None

    # ---- life -------------------------------------------------------------------------------

    def close(self) -> None:
        """Closes both channels; a later call opens them again."""
        channels, self._channels = self._channels, {}
        self._training_stub = self._metrics_stub = None
        for channel in channels.values():
            channel.close()

    def __enter__(self) -> OneSeekClient:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        trace: TracebackType | None,
    ) -> None:
        self.close()

    def _channel(self, addr: str) -> grpc.Channel:
        if addr not in self._channels:
            self._channels[addr] = blocking_channel(addr, self.settings.root_certificates)
        return self._channels[addr]

    def _training(self) -> training_pb2_grpc.TrainingServiceStub:
        if self._training_stub is None:
            channel = self._channel(self.settings.training_addr)
            self._training_stub = training_pb2_grpc.TrainingServiceStub(channel)
        return self._training_stub

    def _metrics(self) -> metrics_pb2_grpc.MetricsServiceStub:
        if self._metrics_stub is None:
            channel = self._channel(self.settings.metrics_addr)
            self._metrics_stub = metrics_pb2_grpc.MetricsServiceStub(channel)
        return self._metrics_stub

    def _call(
        self,
        method: grpc.UnaryUnaryMultiCallable[Request, Response],
        request: Request,
        service: str = TRAINING,
    ) -> Response:
        addr, metadata = self._where(service, request)
        try:
            return method(request, timeout=self.settings.timeout, metadata=metadata)
        except grpc.RpcError as error:
            raise from_rpc_error(error, service, addr) from error

    def _where(self, service: str, request: object) -> tuple[str, tuple[tuple[str, str], ...]]:
        if service == TRAINING:
            return self.settings.training_addr, self.settings.training_metadata()
        if isinstance(request, metrics_pb2.ReportMetricsRequest):
            return self.settings.metrics_addr, self.settings.report_metadata()
        return self.settings.metrics_addr, self.settings.training_metadata()

    # ---- the training service ---------------------------------------------------------------

    def start_run(
        self, dataset_id: str, models: Sequence[str] | str, **options: Any
    ) -> training_pb2.StartRunResponse:
        """Starts a run of `models` on `dataset_id`; `options` are the start options by their
        snake_case names (epochs=2, learning_rate=1e-4, method="full", ...), checked here by
        the service's own rules. Needs the admin token when the suite has one."""
        request = messages.start_request(dataset_id, models, options)
        return self._call(self._training().StartRun, request)

    def get_run(self, run_id: str) -> training_pb2.Run:
        request = training_pb2.GetRunRequest(run_id=messages.run_id(run_id))
        return self._call(self._training().GetRun, request)

    def list_runs(self, status: str | None = None, limit: int = 0) -> list[training_pb2.Run]:
        """The training service's runs, newest first; only those in `status` when given."""
        request = training_pb2.ListRunsRequest(status=status_filter(status), limit=limit)
        return list(self._call(self._training().ListRuns, request).runs)

    def stop_run(self, run_id: str) -> training_pb2.Run:
        """Asks the run to stop after its current step (status `stopped`, folder written)."""
        request = training_pb2.StopRunRequest(run_id=messages.run_id(run_id))
        return self._call(self._training().StopRun, request).run

    def resume_run(self, run_id: str) -> training_pb2.StartRunResponse:
        """Resumes an interrupted or failed run from its last completed epoch."""
        request = training_pb2.ResumeRunRequest(run_id=messages.run_id(run_id))
        return self._call(self._training().ResumeRun, request)

    def list_models(self) -> list[training_pb2.ModelInfo]:
        request = training_pb2.ListModelsRequest()
        return list(self._call(self._training().ListModels, request).models)

    def list_datasets(self) -> list[training_pb2.DatasetInfo]:
        request = training_pb2.ListDatasetsRequest()
        return list(self._call(self._training().ListDatasets, request).datasets)

    def get_artifact(self, run_id: str, name: str) -> training_pb2.Artifact:
        """One JSON file of the run folder (training_results.json, oneseek_dna.json, ...)."""
        request = training_pb2.GetArtifactRequest(run_id=messages.run_id(run_id), name=name)
        return self._call(self._training().GetArtifact, request)

    def watch(self, run_id: str, after_seq: int = 0) -> Iterator[training_pb2.TrainingEvent]:
        """The run's events with seq > after_seq, replayed then live, until its last one
        (training_complete or training_error). A stream that breaks (the service restarts, the
        connection drops, this client falls behind) is opened again after the last seq
        yielded, so no event is lost or repeated; after `retries` breaks in a row without an
        event in between, the error is raised. Closing the iterator ends the call."""
        return self._watch(messages.run_id(run_id), messages.after_seq(after_seq))

    def _watch(self, run_id: str, last: int) -> Iterator[training_pb2.TrainingEvent]:
        failures = 0
        while True:
            request = training_pb2.WatchRunRequest(run_id=run_id, after_seq=last)
            stream = self._training().WatchRun(request, metadata=self.settings.training_metadata())
            try:
                for event in stream:
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
                time.sleep(delay)
            finally:
                stream.cancel()  # type: ignore[no-untyped-call]

    def generate(
        self, run_id: str, prompt: str = "", **options: Any
    ) -> Iterator[training_pb2.GenerateEvent]:
        """A finished run's models answering `prompt` (or messages=[...]), streamed piece by
        piece: options are models, messages, max_new_tokens, temperature, top_p, seed, stop.
        Needs the admin token when the suite has one. Not retried: an answer cannot resume."""
        request = messages.generate_request(run_id, prompt, options)
        return self._generate(request)

    def _generate(
        self, request: training_pb2.GenerateRequest
    ) -> Iterator[training_pb2.GenerateEvent]:
        stream = self._training().Generate(request, metadata=self.settings.training_metadata())
        try:
            yield from stream
        except grpc.RpcError as error:
            raise from_rpc_error(error, TRAINING, self.settings.training_addr) from error
        finally:
            stream.cancel()  # type: ignore[no-untyped-call]

    # ---- the metrics service ----------------------------------------------------------------

    def metrics(self, run_id: str) -> training_pb2.RunMetrics:
        """What GET /api/training/{runId}/metrics answers, for any run the suite knows
        (its own or an outside one)."""
        request = metrics_pb2.GetMetricsRequest(run_id=messages.run_id(run_id))
        return self._call(self._metrics().GetMetrics, request, METRICS)

    def leaderboard(self, run_id: str) -> metrics_pb2.Leaderboard:
        request = metrics_pb2.GetLeaderboardRequest(run_id=messages.run_id(run_id))
        return self._call(self._metrics().GetLeaderboard, request, METRICS)

    def run_summaries(
        self, status: str | None = None, limit: int = 0
    ) -> list[metrics_pb2.RunSummary]:
        """Every run the metrics service knows, outside runs included, newest first."""
        request = metrics_pb2.ListRunsRequest(status=status_filter(status), limit=limit)
        return list(self._call(self._metrics().ListRuns, request, METRICS).runs)

    def report_epoch(
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
        """Reports one epoch of an outside run (its first report creates it) and returns the
        seq it was stored under. Sending the same report again is safe: it is answered with
        the same seq and stores nothing. The report of epoch == total_epochs ends the run.
        Sent with the report token, else the admin token."""
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
        return self.send_report(request)

    def send_report(self, request: metrics_pb2.ReportMetricsRequest) -> int:
        """Sends a report built (and checked) already; returns its seq."""
        return self._call(self._metrics().ReportMetrics, request, METRICS).seq

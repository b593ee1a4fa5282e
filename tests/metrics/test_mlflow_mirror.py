"""The MLflow mirror: what a run's events become in MLflow (pure planning, and the pace), then
against a real `mlflow server` on loopback, read back through MLflow's own client: a training
run's params, metrics per epoch, tags (DNA, run folder) and status, a failed and a resumed run;
restarts of the metrics service (only what is new is sent; a lost position sends all again and
nothing is kept twice); refusals skipped; an outside run reported to the real metrics service
process with MLflow killed mid-run (the service keeps answering, then the mirror catches up with
exactly the missed epochs); and a run trained for real by the whole suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.api import metrics_pb2, metrics_pb2_grpc, training_pb2, training_pb2_grpc
from services.metrics.mlflow_mirror import MirrorConfig, mirror_config, public_uri
from services.metrics.mlflow_plan import (
    MAX_ENTITIES_PER_CALL,
    Pace,
    config_params,
    epoch_points,
    opening,
    plan_steps,
)
from services.metrics.records import record_from_run
from services.metrics.server import MetricsServer
from tests.metrics.sample_run import (
    RUN_ID,
    interrupted_then_resumed,
    run_config,
    run_events,
    run_message,
    three_epochs,
    with_cursors,
)
from tests.processes import ServiceProcess, free_port, start_when_idle, workspace_env

MLFLOW = str(Path(sys.executable).parent / "mlflow")
DEAD_TRAINING_ADDR = "127.0.0.1:1"
OUTSIDE = "run-20260201-090000"
T = TypeVar("T")


# ---- planning (pure) ------------------------------------------------------------------------


def test_a_completed_run_is_its_epochs_metrics_then_finished_with_its_dna() -> None:
    events = run_events(three_epochs())
    steps = plan_steps(events, "RUNNING")
    assert [s.seq for s in steps][-1] == events[-1].seq
    points = [p for s in steps for p in s.metrics]
    assert {p.step for p in points} == {1, 2, 3}
    epoch_one = sorted(p.key for p in points if p.step == 1)
    models = sorted(three_epochs()[0])
    assert epoch_one == sorted(
        [f"{metric}/{m}" for metric in ("val_loss", "train_loss", "weight", "lr") for m in models]
        + ["total_loss"]
    )
    loss = {(p.key, p.step): p.value for p in points}
    assert loss[("val_loss/tiny-qwen", 1)] == 3.0 and loss[("val_loss/tiny-llama", 3)] == 2.3
    ends = [e for e in events if e.WhichOneof("payload") == "epoch_end"]
    assert {p.timestamp_ms for p in points if p.step == 2} == {ends[1].timestamp.ToMilliseconds()}
    last = steps[-1]
    assert last.status == "FINISHED"
    assert last.end_time_ms == events[-1].timestamp.ToMilliseconds()
    assert dict(last.tags) == {
        "oneseek.status": "completed",
        "oneseek.dna": "dna-v2:abc123",
        "oneseek.run_dir": f"/models/oneseek-certified/{RUN_ID}",
        "oneseek.best_model": "tiny-llama",
    }
    # planned again from any point (a restart), the rest is the same calls
    middle = len(events) // 2
    again = plan_steps(events[middle:], "RUNNING")
    later = [e for e in events[middle:] if e.WhichOneof("payload") == "epoch_end"]
    assert [p for s in again for p in s.metrics] == [
        p for p in points if p.step in {e.epoch_end.epoch for e in later}
    ]
    assert (again[-1].seq, again[-1].tags, again[-1].status) == (last.seq, last.tags, "FINISHED")


def test_endings_set_the_mlflow_status_and_a_resumed_run_runs_again() -> None:
    failed = plan_steps(run_events(three_epochs()[:2], ending="failed"), "RUNNING")
    assert failed[-1].status == "FAILED"
    assert failed[-1].tags["oneseek.error"].startswith("Model 'tiny-gpt2' diverged")
    resumed = plan_steps(interrupted_then_resumed(), "RUNNING")
    assert [s.status for s in resumed if s.status] == ["KILLED", "RUNNING", "FINISHED"]
    assert [s.tags.get("oneseek.status") for s in resumed if s.status] == [
        "interrupted",
        "running",
        "completed",
    ]
    # a run mirrored up to its interruption, resumed later: RUNNING again first
    events = interrupted_then_resumed()
    cut = next(i for i, e in enumerate(events) if e.WhichOneof("payload") == "training_error")
    rest = plan_steps(events[cut + 1 :], "KILLED")
    assert rest[0].status == "RUNNING"
    # nothing to send (progress only) still moves the position
    progress = [e for e in events if e.WhichOneof("payload") == "progress"][:2]
    only = plan_steps(progress, "RUNNING")
    assert len(only) == 1 and not only[0].calls and only[0].seq == progress[-1].seq


def test_a_long_backlog_is_cut_to_mlflows_batch_limit() -> None:
    models = [f"m{i:02d}" for i in range(30)]  # 121 metrics an epoch
    config = run_config(models, epochs=40, learning_rate=1e-4)
    config.auto_stop.enabled = False
    config.auto_stop.patience = 1000
    losses = [{m: 3.0 - 0.01 * e - 0.001 * i for i, m in enumerate(models)} for e in range(40)]
    events = run_events(losses, config=config)
    steps = plan_steps(events, "RUNNING")
    assert all(len(s.metrics) + len(s.tags) <= MAX_ENTITIES_PER_CALL for s in steps)
    assert len(steps) >= 5
    sent = [p for s in steps for p in s.metrics]
    expected = [
        p
        for e in events
        if e.WhichOneof("payload") == "epoch_end"
        for p in epoch_points(e.epoch_end, e.timestamp.ToMilliseconds())
    ]
    assert sent == expected
    seqs = [s.seq for s in steps]
    assert seqs == sorted(seqs) and seqs[-1] == events[-1].seq
    by_seq = {e.seq: e for e in events}
    for step in steps[:-1]:
        # every epoch up to the step's seq is entirely in it or before it
        done = {
            by_seq[s].epoch_end.epoch
            for s in by_seq
            if s <= step.seq and by_seq[s].WhichOneof("payload") == "epoch_end"
        }
        upto = steps[: steps.index(step) + 1]
        logged = [p for s in upto for p in s.metrics]
        for epoch in done:
            assert sum(1 for p in logged if p.step == epoch) == 4 * len(models) + 1


def test_params_are_the_config_flattened_and_tags_name_the_run() -> None:
    record = record_from_run(run_message())
    params = config_params(record.config)
    assert params["dataset_id"] == "sample"
    assert params["base_models"] == "tiny-llama,tiny-gpt2,tiny-qwen"
    assert params["epochs"] == "3" and params["learning_rate"] == "0.0001"
    assert params["method"] == "lora"
    assert params["adaptive_weights.top_model_boost"] == "0.3"
    assert params["auto_stop.enabled"] == "true"
    start = opening(record)
    assert start.tags["oneseek.run_id"] == RUN_ID and start.tags["oneseek.source"] == "training"
    assert start.start_time_ms == 1769869500000  # 2026-01-31T14:25:00Z
    assert config_params(None) == {}


def test_the_mirror_is_off_without_a_tracking_uri(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    assert mirror_config() is None
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://u:secret@127.0.0.1:5000")
    config = mirror_config()
    assert config is not None and config.experiment == "oneseek"
    assert "secret" not in config.target and "127.0.0.1:5000" in config.target
    assert mirror_config("http://127.0.0.1:1", "mine") == MirrorConfig("http://127.0.0.1:1", "mine")
    assert public_uri("http://127.0.0.1:5000") == "http://127.0.0.1:5000"
    # the service and its command line import neither mlflow nor anything of it while it is off
    code = (
        "import sys; import services.cli, services.metrics.server as s; "
        "s.mirror_config(); services.cli.build_parser().parse_args(['metrics-service']); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'mlflow'))"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]"


@given(
    share=st.floats(0.01, 1.0),
    burst=st.floats(0.0, 5.0),
    calls=st.lists(st.tuples(st.floats(0.0, 3.0), st.floats(0.0, 10.0)), min_size=1, max_size=50),
)
def test_the_pace_keeps_mlflow_time_within_its_share(
    share: float, burst: float, calls: list[tuple[float, float]]
) -> None:
    """Whatever the calls take and however long the gaps between them, a mirror that rests as
    told spends at most burst + share * (time since the start) + the last call waiting on
    MLflow."""
    now, spent = 0.0, 0.0
    pace = Pace(share, burst, now)
    for duration, gap in calls:
        now += gap + pace.rest(now + gap)
        pace.spend(duration, now + duration)
        now += duration
        spent += duration
        assert spent <= burst + share * now + duration + 1e-6


# ---- a real MLflow server ---------------------------------------------------------------------


class MlflowServer:
    """`mlflow server` on a loopback port, its backend a SQLite file; killed and restarted on the
    same port and backend."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> MlflowServer:
        args = [
            MLFLOW,
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.root / 'mlflow.db'}",
            "--default-artifact-root",
            str(self.root / "artifacts"),
            "--workers",
            "1",
        ]
        env = {
            **os.environ,
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
            "MLFLOW_DISABLE_TELEMETRY": "true",
        }
        with open(self.root / "mlflow.log", "ab") as log:
            # a session of its own: uvicorn's worker is a child, killed with it
            self.process = subprocess.Popen(
                args, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlflow server exited:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=1) as reply:
                    if reply.status == 200:
                        return self
            except OSError:
                pass
            time.sleep(0.2)
        self.kill()
        raise TimeoutError(f"mlflow server did not answer /health within {timeout} s")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

    def output(self) -> str:
        return (self.root / "mlflow.log").read_text(errors="replace")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path_factory.mktemp("mlflow")).start()
    yield server
    server.kill()


@pytest.fixture
def client_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's client in this process: no retries of its own, so a test never waits minutes;
    no usage telemetry."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    monkeypatch.setenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def mlflow_client(uri: str) -> Any:
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def eventually(check: Callable[[], T | None], timeout: float = 90.0, what: str = "") -> T:
    """`check()`'s first answer that is not None (MLflow errors while it restarts are retried)."""
    from mlflow.exceptions import MlflowException

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            found = check()
            if found is not None:
                return found
        except MlflowException as error:
            last = error
        time.sleep(0.25)
    raise TimeoutError(f"not within {timeout} s: {what} (last error: {last})")


def mirrored_run(client: Any, experiment: str, run_id: str) -> Any:
    """The one MLflow run of `run_id` in `experiment` (None while there is none)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    runs = client.search_runs(
        [found.experiment_id], f"tags.`oneseek.run_id` = '{run_id}'", max_results=10
    )
    assert len(runs) <= 1, f"{len(runs)} MLflow runs for {run_id}"
    return runs[0] if runs else None


def history(client: Any, run: Any, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))


# ---- in process: a training run's events, as the follower hands them over --------------------


async def start_server(tmp_path: Path, uri: str, experiment: str) -> MetricsServer:
    config = MirrorConfig(uri, experiment, linger=0.05, burst=60.0)
    server = MetricsServer(
        "127.0.0.1:0",
        DEAD_TRAINING_ADDR,
        f"sqlite:///{tmp_path / 'metrics.db'}",
        follow=False,
        mirror=config,
    )
    await server.start()
    return server


@pytest.fixture
async def no_tokens(monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[None]:
    monkeypatch.delenv("ONESEEK_ADMIN_TOKEN", raising=False)
    monkeypatch.delenv("ONESEEK_REPORT_TOKEN", raising=False)
    yield


async def test_a_training_run_reads_back_through_mlflows_client(
    tmp_path: Path, mlflow_server: MlflowServer, client_env: None, no_tokens: None
) -> None:
    experiment = "in-process"
    server = await start_server(tmp_path, mlflow_server.uri, experiment)
    try:
        assert server.catalog is not None and server.mirror is not None
        events = run_events(three_epochs())
        await server.catalog.commit(with_cursors(events), new_runs=[record_from_run(run_message())])
        failed_id = "run-20260131-150000"
        failed = run_events(three_epochs()[:2], run_id=failed_id, ending="failed")
        await server.catalog.commit(
            with_cursors(failed, start=100), new_runs=[record_from_run(run_message(failed_id))]
        )
        client = mlflow_client(mlflow_server.uri)

        def finished(run_id: str) -> Any:
            run = mirrored_run(client, experiment, run_id)
            return run if run is not None and run.info.status != "RUNNING" else None

        run = await asyncio.to_thread(eventually, lambda: finished(RUN_ID), what="run finished")
        assert run.info.run_name == RUN_ID and run.info.status == "FINISHED"
        assert run.info.start_time == 1769869500000
        assert run.info.end_time == events[-1].timestamp.ToMilliseconds()
        params = run.data.params
        assert params["base_models"] == "tiny-llama,tiny-gpt2,tiny-qwen"
        assert params["epochs"] == "3" and params["learning_rate"] == "0.0001"
        assert params["auto_stop.patience"] == "3"
        tags = run.data.tags
        assert tags["oneseek.run_id"] == RUN_ID and tags["oneseek.status"] == "completed"
        assert tags["oneseek.dna"] == "dna-v2:abc123"
        assert tags["oneseek.run_dir"] == f"/models/oneseek-certified/{RUN_ID}"
        for model in ("tiny-llama", "tiny-gpt2", "tiny-qwen"):
            expected = [(e + 1, losses[model]) for e, losses in enumerate(three_epochs())]
            assert history(client, run, f"val_loss/{model}") == expected
        assert [s for s, _ in history(client, run, "total_loss")] == [1, 2, 3]
        assert run.data.metrics["weight/tiny-llama"] > run.data.metrics["weight/tiny-gpt2"]

        bad = await asyncio.to_thread(eventually, lambda: finished(failed_id), what="failed")
        assert bad.info.status == "FAILED"
        assert bad.data.tags["oneseek.status"] == "failed"
        assert "diverged" in bad.data.tags["oneseek.error"]
        assert server.mirror.mirrored_events == len(events) + len(failed)
    finally:
        await server.stop(grace=1)

    # a restart: the positions were kept, so the second server sends only what is new
    server = await start_server(tmp_path, mlflow_server.uri, experiment)
    try:
        assert server.catalog is not None and server.mirror is not None
        resumed = [replace_seq(e, len(failed) + i + 1) for i, e in enumerate(resume(failed_id))]
        await server.catalog.commit(with_cursors(resumed, start=200))

        def done_again() -> Any:
            run = mirrored_run(client, experiment, failed_id)
            return run if run is not None and run.info.status == "FINISHED" else None

        run = await asyncio.to_thread(eventually, done_again, what="resumed run finished")
        assert server.mirror.mirrored_events == len(resumed)
        assert [s for s, _ in history(client, run, "val_loss/tiny-qwen")] == [1, 2, 3]
        assert run.data.tags["oneseek.status"] == "completed"
    finally:
        await server.stop(grace=1)

    # a position lost (the service killed between a call and saving it): everything of the run
    # is sent again, and MLflow keeps each value once (same key, step, timestamp and value)
    with contextlib.closing(sqlite3.connect(tmp_path / "metrics.db")) as db, db:
        db.execute("UPDATE mirror_positions SET seq = 0 WHERE run_id = ?", (RUN_ID,))
    server = await start_server(tmp_path, mlflow_server.uri, experiment)
    try:
        assert server.mirror is not None

        def resent() -> bool | None:
            seqs = {p.run_id: p.seq for p in positions_of(tmp_path)}
            return True if seqs[RUN_ID] == len(events) else None

        await asyncio.to_thread(eventually, resent, what="the run sent again")
        assert server.mirror.mirrored_events == len(events)
        run = mirrored_run(client, experiment, RUN_ID)
        for model in ("tiny-llama", "tiny-gpt2", "tiny-qwen"):
            expected = [(e + 1, losses[model]) for e, losses in enumerate(three_epochs())]
            assert history(client, run, f"val_loss/{model}") == expected
        assert run.info.status == "FINISHED"
    finally:
        await server.stop(grace=1)


async def test_what_mlflow_refuses_is_skipped_and_said_once_the_rest_goes_on(
    tmp_path: Path,
    mlflow_server: MlflowServer,
    client_env: None,
    no_tokens: None,
    caplog: pytest.LogCaptureFixture,
) -> None:
    experiment = "refusals"
    client = mlflow_client(mlflow_server.uri)
    # a run already in MLflow under this run id, with a param of other value (an id reused)
    experiment_id = client.create_experiment(experiment)
    taken = client.create_run(experiment_id, tags={"oneseek.run_id": RUN_ID})
    client.log_param(taken.info.run_id, "epochs", "99")
    server = await start_server(tmp_path, mlflow_server.uri, experiment)
    other = "run-20260131-150000"
    try:
        assert server.catalog is not None and server.mirror is not None
        half = run_events(three_epochs(), ending="running")[:8]
        await server.catalog.commit(with_cursors(half), new_runs=[record_from_run(run_message())])
        rest = run_events(three_epochs(), run_id=other)
        await server.catalog.commit(
            with_cursors(rest[:5], start=100), new_runs=[record_from_run(run_message(other))]
        )
        await asyncio.to_thread(
            eventually, lambda: mirrored_run(client, experiment, other), what="other run"
        )

        def with_metrics() -> Any:
            found = mirrored_run(client, experiment, RUN_ID)
            return found if found is not None and found.data.metrics else None

        # the metrics went to the run that was there, under its params
        found = await asyncio.to_thread(eventually, with_metrics, what="the run found by tag")
        assert found.info.run_id == taken.info.run_id and found.data.params["epochs"] == "99"
        assert "MLflow kept the params run" in caplog.text

        # the other run deleted in MLflow: its next events are refused, said once, skipped
        client.delete_run(mirrored_run(client, experiment, other).info.run_id)
        await server.catalog.commit(with_cursors(rest[5:9], start=105))
        await server.catalog.commit(with_cursors(rest[9:], start=109))
        full = run_events(three_epochs())
        await server.catalog.commit(with_cursors(full[8:], start=8))

        def finished() -> Any:
            found = mirrored_run(client, experiment, RUN_ID)
            return found if found is not None and found.info.status == "FINISHED" else None

        await asyncio.to_thread(eventually, finished, what="the first run finished")

        def skipped() -> bool | None:
            positions = {p.run_id: p.seq for p in positions_of(tmp_path)}
            return True if positions.get(other) == len(rest) else None

        await asyncio.to_thread(eventually, skipped, what="the refused events skipped")
        refusals = [r for r in caplog.records if "MLflow refused part of run" in r.getMessage()]
        assert [r.levelname for r in refusals if r.levelname == "ERROR"] == ["ERROR"]
        assert other in refusals[0].getMessage()
    finally:
        await server.stop(grace=1)


def positions_of(tmp_path: Path) -> list[Any]:
    from services.metrics.records import MirrorPosition

    with sqlite3.connect(tmp_path / "metrics.db") as db:
        rows = db.execute("SELECT run_id, external_id, seq, status FROM mirror_positions")
        return [MirrorPosition(*row) for row in rows.fetchall()]


def test_asking_for_a_mirror_without_mlflow_installed_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from services.core.errors import InvalidInput

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(InvalidInput) as refused:
        mirror_config("http://127.0.0.1:5000")
    assert "pip install 'oneseek[mlflow]'" in refused.value.message


def resume(run_id: str) -> list[training_pb2.TrainingEvent]:
    """Epoch 3 and a good ending of `run_id`, as the training service emits a resumed run's."""
    full = run_events(three_epochs(), run_id=run_id)
    start = next(
        i
        for i, e in enumerate(full)
        if e.WhichOneof("payload") == "epoch_start" and e.epoch_start.epoch == 3
    )
    return full[start:]


def replace_seq(event: training_pb2.TrainingEvent, seq: int) -> training_pb2.TrainingEvent:
    copy = training_pb2.TrainingEvent()
    copy.CopyFrom(event)
    copy.seq = seq
    return copy


# ---- the real metrics service process -----------------------------------------------------------


def metrics_service(tmp_path: Path, uri: str, experiment: str, name: str) -> ServiceProcess:
    env = {
        "ONESEEK_DB_URL": f"sqlite:///{tmp_path / 'metrics.db'}",
        "ONESEEK_STATE_DIR": str(tmp_path / "var"),
        "ONESEEK_ADMIN_TOKEN": "",
        "ONESEEK_REPORT_TOKEN": "",
        "MLFLOW_TRACKING_URI": uri,
        "MLFLOW_EXPERIMENT_NAME": experiment,
    }
    return ServiceProcess(
        "metrics-service",
        "--training-addr",
        DEAD_TRAINING_ADDR,
        env=env,
        log=tmp_path / f"{name}.log",
    ).start()


def report(stub: Any, epoch: int, total: int = 8) -> int:
    request = metrics_pb2.ReportMetricsRequest(
        run_id=OUTSIDE,
        epoch=epoch,
        total_epochs=total,
        val_losses={"mine-a": 2.0 - 0.1 * epoch, "mine-b": 2.5 - 0.1 * epoch},
        train_losses={"mine-a": 2.1 - 0.1 * epoch, "mine-b": 2.6 - 0.1 * epoch},
    )
    return int(stub.ReportMetrics(request, timeout=5).seq)


def test_mlflow_down_harms_nothing_and_the_mirror_catches_up_exactly_once(
    tmp_path: Path, mlflow_server: MlflowServer, client_env: None
) -> None:
    experiment = "outage"
    client = mlflow_client(mlflow_server.uri)
    service = metrics_service(tmp_path, mlflow_server.uri, experiment, "metrics-1")
    try:
        with grpc.insecure_channel(service.addr) as channel:
            stub = metrics_pb2_grpc.MetricsServiceStub(channel)
            assert [report(stub, e) for e in (1, 2)] == [1, 2]

            def steps_logged(count: int) -> Any:
                run = mirrored_run(client, experiment, OUTSIDE)
                if run is None:
                    return None
                logged = history(client, run, "val_loss/mine-a")
                return logged if len(logged) >= count else None

            eventually(lambda: steps_logged(2), what="epochs 1-2 mirrored")

            mlflow_server.kill()
            # the service goes on as if nothing happened: reports stored, reads answered
            for epoch in (3, 4):
                assert report(stub, epoch) == epoch
                request = metrics_pb2.GetMetricsRequest(run_id=OUTSIDE)
                assert stub.GetMetrics(request, timeout=5).current_epoch == epoch
                board = stub.GetLeaderboard(
                    metrics_pb2.GetLeaderboardRequest(run_id=OUTSIDE), timeout=5
                )
                assert [e.model_name for e in board.leaderboard] == ["mine-a", "mine-b"]
            time.sleep(1.5)  # the mirror has tried, and failed, by now
        assert service.stop() == 0
        first_log = service.output()
        assert first_log.count("MLflow is unavailable") == 1, first_log

        # started while MLflow is down: it serves all the same
        service = metrics_service(tmp_path, mlflow_server.uri, experiment, "metrics-2")
        with grpc.insecure_channel(service.addr) as channel:
            stub = metrics_pb2_grpc.MetricsServiceStub(channel)
            assert [report(stub, e) for e in (5, 6)] == [5, 6]
            mlflow_server.start()
            logged = eventually(lambda: steps_logged(6), what="epochs 3-6 caught up")
            assert logged == [(e, pytest.approx(2.0 - 0.1 * e)) for e in range(1, 7)]
            assert [report(stub, e) for e in (7, 8)] == [7, 8]  # 8 of 8: the run completes

            def completed() -> Any:
                run = mirrored_run(client, experiment, OUTSIDE)
                return run if run is not None and run.info.status == "FINISHED" else None

            run = eventually(completed, what="the outside run finished")
        assert service.stop() == 0
        assert "MLflow answers again" in service.output()
        for key in ("val_loss/mine-b", "train_loss/mine-a", "total_loss"):
            assert [s for s, _ in history(client, run, key)] == list(range(1, 9)), key
        tags = run.data.tags
        assert tags["oneseek.source"] == "external" and tags["oneseek.status"] == "completed"
        assert tags["oneseek.best_model"] == "mine-a"
        assert run.data.params == {}
        assert "weight/mine-a" not in run.data.metrics  # never reported, so never invented
        # the store says how far MLflow has taken the run: all of it (8 epochs + the ending)
        with sqlite3.connect(tmp_path / "metrics.db") as db:
            rows = db.execute("SELECT run_id, seq, status FROM mirror_positions").fetchall()
        assert rows == [(OUTSIDE, 9, "FINISHED")]
    finally:
        if service.process is not None and service.process.poll() is None:
            service.kill()
        if mlflow_server.process is None:
            mlflow_server.start()


# ---- the whole suite: a run trained for real ----------------------------------------------------


@pytest.mark.slow
def test_a_trained_run_is_mirrored_with_its_config_dna_and_run_folder(
    tmp_path: Path, demo_models_dir: Path, mlflow_server: MlflowServer, client_env: None
) -> None:
    experiment = "trained"
    env = workspace_env(
        tmp_path / "suite",
        demo_models_dir,
        MLFLOW_TRACKING_URI=mlflow_server.uri,
        MLFLOW_EXPERIMENT_NAME=experiment,
    )
    training = ServiceProcess("training-service", env=env, log=tmp_path / "training.log").start()
    metrics = ServiceProcess(
        "metrics-service", "--training-addr", training.addr, env=env, log=tmp_path / "metrics.log"
    ).start()
    try:
        with grpc.insecure_channel(training.addr) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            request = training_pb2.StartRunRequest(
                dataset_id="small",
                base_models=["tiny-llama", "tiny-gpt2"],
                epochs=2,
                refresh_interval=0.05,
                auto_stop_threshold=0.0,
            )
            run_id = start_when_idle(stub, request)
            watched = list(stub.WatchRun(training_pb2.WatchRunRequest(run_id=run_id), timeout=300))
            run_dir = stub.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=5).run_dir
        assert watched[-1].WhichOneof("payload") == "training_complete"
        dna = json.loads((Path(run_dir) / "oneseek_dna.json").read_text())["dna"]
        client = mlflow_client(mlflow_server.uri)

        def finished() -> Any:
            run = mirrored_run(client, experiment, run_id)
            return run if run is not None and run.info.status == "FINISHED" else None

        run = eventually(finished, what="the trained run finished in MLflow")
        tags, params = run.data.tags, run.data.params
        assert tags["oneseek.dna"] == dna and tags["oneseek.run_dir"] == run_dir
        assert tags["oneseek.status"] == "completed" and tags["oneseek.source"] == "training"
        assert params["dataset_id"] == "small" and params["epochs"] == "2"
        assert params["base_models"] == "tiny-llama,tiny-gpt2"
        ends = [e.epoch_end for e in watched if e.WhichOneof("payload") == "epoch_end"]
        for model in ("tiny-llama", "tiny-gpt2"):
            expected = [(end.epoch, end.val_losses[model]) for end in ends]
            assert history(client, run, f"val_loss/{model}") == expected
            assert [s for s, _ in history(client, run, f"lr/{model}")] == [1, 2]
    finally:
        assert metrics.stop() == 0, metrics.output()
        assert training.stop() == 0, training.output()

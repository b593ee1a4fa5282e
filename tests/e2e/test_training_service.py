"""The real training service process over gRPC, training real tiny models."""

from __future__ import annotations

import json
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from services.api import training_pb2, training_pb2_grpc
from services.api.codec import event_to_dict
from services.core.verify import verify_run_folder
from tests.processes import ServiceProcess, start_when_idle, workspace_env

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
ORDER = ["epoch_start", "epoch_end", "weight_adjustment"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> dict[str, str]:
    return workspace_env(tmp_path_factory.mktemp("training-service"), demo_models_dir)


@pytest.fixture(scope="module")
def service(
    workspace: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServiceProcess]:
    log = tmp_path_factory.mktemp("logs") / "training.log"
    proc = ServiceProcess("training-service", env=workspace, log=log).start()
    yield proc
    assert proc.stop() == 0, proc.output()


@pytest.fixture
def stub(service: ServiceProcess) -> Iterator[training_pb2_grpc.TrainingServiceStub]:
    with grpc.insecure_channel(service.addr) as channel:
        yield training_pb2_grpc.TrainingServiceStub(channel)


def start(stub: training_pb2_grpc.TrainingServiceStub, **fields: Any) -> str:
    request = training_pb2.StartRunRequest(
        dataset_id="small",
        base_models=fields.pop("models", ["tiny-llama", "tiny-gpt2"]),
        refresh_interval=0.05,
        **fields,
    )
    return start_when_idle(stub, request)


def watch(
    stub: training_pb2_grpc.TrainingServiceStub, run_id: str, after: int = 0
) -> list[dict[str, Any]]:
    return [
        event_to_dict(e)
        for e in stub.WatchRun(
            training_pb2.WatchRunRequest(run_id=run_id, after_seq=after), timeout=180
        )
    ]


def test_health_and_reflection(service: ServiceProcess) -> None:
    with grpc.insecure_channel(service.addr) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", "oneseek.training.v1.TrainingService"):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        # a client with no generated code: everything comes from reflection
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "oneseek.training.v1.TrainingService" in database.get_services()
        pool = descriptor_pool.DescriptorPool(database)
        method = pool.FindServiceByName("oneseek.training.v1.TrainingService").methods_by_name[
            "ListRuns"
        ]
        request_cls = message_factory.GetMessageClass(method.input_type)
        response_cls = message_factory.GetMessageClass(method.output_type)
        call = channel.unary_unary(
            "/oneseek.training.v1.TrainingService/ListRuns",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=response_cls.FromString,
        )
        reply = call(request_cls(), timeout=5)
        assert hasattr(reply, "runs")


def test_lists_models_and_datasets(stub: training_pb2_grpc.TrainingServiceStub) -> None:
    models = stub.ListModels(training_pb2.ListModelsRequest(), timeout=10).models
    assert {m.name for m in models} >= {"tiny-llama", "tiny-qwen2", "tiny-gpt2"}
    assert all(m.parameter_count > 0 and m.architecture for m in models)
    datasets = stub.ListDatasets(training_pb2.ListDatasetsRequest(), timeout=10).datasets
    assert [(d.id, d.records) for d in datasets] == [("small", 60)]


def test_a_run_streams_every_event_in_order_to_two_watchers(
    stub: training_pb2_grpc.TrainingServiceStub,
) -> None:
    run_id = start(stub, epochs=3)
    results: list[list[dict[str, Any]]] = [[], []]

    def follow(slot: int) -> None:
        results[slot] = watch(stub, run_id)

    watchers = [threading.Thread(target=follow, args=(i,)) for i in range(2)]
    for thread in watchers:
        thread.start()
    for thread in watchers:
        thread.join(180)
    first, second = results
    assert first == second and first
    assert [e["seq"] for e in first] == list(range(1, len(first) + 1))
    kinds = [e["type"] for e in first if e["type"] != "progress"]
    assert kinds == ORDER * 3 + ["training_complete"]
    assert any(e["type"] == "progress" for e in first)
    done = first[-1]
    assert done["status"] == "completed" and done["epochs_run"] == 3

    run = stub.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert run.status == training_pb2.RUN_STATUS_COMPLETED
    assert run.last_seq == len(first) and run.dna == done["dna"]
    assert [m.name for m in run.models] == ["tiny-llama", "tiny-gpt2"]
    assert verify_run_folder(Path(run.run_dir)).ok
    # the log on disk is the stream
    lines = (Path(run.run_dir) / "events.jsonl").read_text().splitlines()
    logged = [json.loads(line) for line in lines]
    assert logged == first

    # artifacts come over gRPC byte for byte, and only the run folder's JSON files do
    dna = stub.GetArtifact(training_pb2.GetArtifactRequest(run_id=run_id, name="oneseek_dna.json"))
    assert dna.content == (Path(run.run_dir) / "oneseek_dna.json").read_text()
    assert json.loads(dna.content)["dna"] == done["dna"]
    for name in ("../run.json", "events.jsonl", "/etc/passwd", ""):
        with pytest.raises(grpc.RpcError) as refused:
            stub.GetArtifact(training_pb2.GetArtifactRequest(run_id=run_id, name=name), timeout=5)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT

    # reconnecting after any seq yields exactly the rest
    for after in (0, 1, len(first) // 2, len(first) - 1, len(first)):
        rest = watch(stub, run_id, after)
        assert [e["seq"] for e in rest] == list(range(after + 1, len(first) + 1))
        assert rest == first[after:]

    # the global stream carries the same events with increasing cursors
    stream = stub.StreamEvents(training_pb2.StreamEventsRequest(after_cursor=0), timeout=30)
    mine: list[dict[str, Any]] = []
    cursors: list[int] = []
    for event in stream:
        cursors.append(event.cursor)
        if event.run_id == run_id:
            mine.append(event_to_dict(event))
        if len(mine) == len(first):
            stream.cancel()
            break
    assert mine == first
    assert cursors == list(range(1, len(cursors) + 1))


def test_one_active_run_at_a_time_and_stop(stub: training_pb2_grpc.TrainingServiceStub) -> None:
    run_id = start(stub, epochs=50)
    with pytest.raises(grpc.RpcError) as busy:
        stub.StartRun(
            training_pb2.StartRunRequest(dataset_id="small", base_models=["tiny-llama"]), timeout=30
        )
    assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert run_id in busy.value.details()
    events = stub.WatchRun(training_pb2.WatchRunRequest(run_id=run_id), timeout=180)
    seen = []
    for event in events:
        seen.append(event_to_dict(event))
        if seen[-1]["type"] == "epoch_end":
            stub.StopRun(training_pb2.StopRunRequest(run_id=run_id), timeout=10)
    assert seen[-1]["type"] == "training_complete" and seen[-1]["status"] == "stopped"
    run = stub.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert run.status == training_pb2.RUN_STATUS_STOPPED
    assert verify_run_folder(Path(run.run_dir)).ok
    with pytest.raises(grpc.RpcError) as again:
        stub.StopRun(training_pb2.StopRunRequest(run_id=run_id), timeout=10)
    assert again.value.code() == grpc.StatusCode.FAILED_PRECONDITION


def test_killed_worker_fails_the_run_and_the_service_keeps_answering(
    stub: training_pb2_grpc.TrainingServiceStub,
) -> None:
    run_id = start(stub, epochs=50)
    events = stub.WatchRun(training_pb2.WatchRunRequest(run_id=run_id), timeout=180)
    seen = []
    for event in events:
        seen.append(event_to_dict(event))
        if seen[-1]["type"] == "epoch_start":
            pid = _worker_pid(run_id)
            os.kill(pid, signal.SIGKILL)
    error = seen[-1]
    assert error["type"] == "training_error" and error["status"] == "failed"
    assert "killed by signal 9" in error["message"]
    assert [e["seq"] for e in seen] == list(range(1, len(seen) + 1))
    run = stub.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert run.status == training_pb2.RUN_STATUS_FAILED
    assert stub.ListRuns(training_pb2.ListRunsRequest(), timeout=5).runs[0].run_id == run_id


def _worker_pid(run_id: str) -> int:
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            comm = (entry / "comm").read_text()
        except OSError:
            continue
        if b"multiprocessing.spawn" in cmdline and b"spawn_main" in cmdline:
            environ = (entry / "environ").read_bytes()
            if b"MODELS_DIR" in environ and "python" in comm:
                return int(entry.name)
    raise LookupError(f"no worker process for {run_id}")


@pytest.mark.parametrize(
    ("request_fields", "code", "words"),
    [
        ({"base_models": []}, grpc.StatusCode.INVALID_ARGUMENT, "No base models selected"),
        ({"base_models": ["nope"]}, grpc.StatusCode.NOT_FOUND, "tiny-llama"),
        (
            {"base_models": ["tiny-llama", "tiny-llama"]},
            grpc.StatusCode.INVALID_ARGUMENT,
            "tiny-llama",
        ),
        ({"base_models": ["../x"]}, grpc.StatusCode.INVALID_ARGUMENT, "not valid"),
        ({"dataset_id": "missing"}, grpc.StatusCode.NOT_FOUND, "missing"),
        ({"dataset_id": "../etc/passwd"}, grpc.StatusCode.INVALID_ARGUMENT, "not valid"),
        ({"epochs": 0}, grpc.StatusCode.INVALID_ARGUMENT, "epochs"),
        ({"epochs": 2**40}, grpc.StatusCode.INVALID_ARGUMENT, "epochs"),
        ({"learning_rate": -1.0}, grpc.StatusCode.INVALID_ARGUMENT, "learningRate"),
        ({"learning_rate": float("nan")}, grpc.StatusCode.INVALID_ARGUMENT, "learningRate"),
        ({"auto_stop_patience": 0}, grpc.StatusCode.INVALID_ARGUMENT, "autoStopPatience"),
    ],
)
def test_bad_start_requests(
    stub: training_pb2_grpc.TrainingServiceStub,
    request_fields: dict[str, Any],
    code: grpc.StatusCode,
    words: str,
) -> None:
    fields = {"dataset_id": "small", "base_models": ["tiny-llama"], **request_fields}
    with pytest.raises(grpc.RpcError) as error:
        stub.StartRun(training_pb2.StartRunRequest(**fields), timeout=30)
    assert error.value.code() == code
    assert words in error.value.details()


@pytest.mark.parametrize(
    ("call", "code"),
    [
        (
            lambda s: s.GetRun(training_pb2.GetRunRequest(run_id="run-1:2"), timeout=5),
            "INVALID_ARGUMENT",
        ),
        (
            lambda s: s.GetRun(training_pb2.GetRunRequest(run_id="../../etc"), timeout=5),
            "INVALID_ARGUMENT",
        ),
        (
            lambda s: s.GetRun(training_pb2.GetRunRequest(run_id="run-20000101-000000"), timeout=5),
            "NOT_FOUND",
        ),
        (
            lambda s: s.StopRun(
                training_pb2.StopRunRequest(run_id="run-20000101-000000"), timeout=5
            ),
            "NOT_FOUND",
        ),
        (
            lambda s: list(s.WatchRun(training_pb2.WatchRunRequest(run_id="x"), timeout=5)),
            "INVALID_ARGUMENT",
        ),
        (
            lambda s: list(
                s.WatchRun(training_pb2.WatchRunRequest(run_id="run-20000101-000000"), timeout=5)
            ),
            "NOT_FOUND",
        ),
        (
            lambda s: s.ListRuns(training_pb2.ListRunsRequest(limit=-1), timeout=5),
            "INVALID_ARGUMENT",
        ),
        (
            lambda s: list(
                s.StreamEvents(training_pb2.StreamEventsRequest(after_cursor=-5), timeout=5)
            ),
            "INVALID_ARGUMENT",
        ),
    ],
)
def test_bad_lookups(stub: training_pb2_grpc.TrainingServiceStub, call: Any, code: str) -> None:
    with pytest.raises(grpc.RpcError) as error:
        call(stub)
    assert error.value.code().name == code
    assert error.value.details()


def test_restart_marks_an_active_run_interrupted_and_keeps_cursors(
    workspace: dict[str, str], tmp_path: Path
) -> None:
    """A separate service on the same folders: killed mid-run, then started again."""
    first = ServiceProcess("training-service", env=workspace, log=tmp_path / "a.log").start()
    try:
        with grpc.insecure_channel(first.addr) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            run_id = start(stub, epochs=50)
            for event in stub.WatchRun(training_pb2.WatchRunRequest(run_id=run_id), timeout=120):
                if event.WhichOneof("payload") == "epoch_end":
                    break
            before = stub.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=5)
            cursor_count = sum(
                1 for _ in _drain(stub.StreamEvents(training_pb2.StreamEventsRequest(), timeout=3))
            )
    finally:
        first.kill()  # SIGKILL: no shutdown, the worker sees its pipe close and exits
    second = ServiceProcess("training-service", env=workspace, log=tmp_path / "b.log").start()
    try:
        with grpc.insecure_channel(second.addr) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            run = stub.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=5)
            assert run.status == training_pb2.RUN_STATUS_INTERRUPTED
            assert run.last_seq >= before.last_seq + 1
            events = watch(stub, run_id)
            assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
            assert events[-1]["type"] == "training_error"
            assert events[-1]["status"] == "interrupted"
            restreamed = list(
                _drain(stub.StreamEvents(training_pb2.StreamEventsRequest(), timeout=3))
            )
            cursors = [e.cursor for e in restreamed]
            assert cursors == list(range(1, len(cursors) + 1)) and len(cursors) > cursor_count
    finally:
        assert second.stop() == 0


def _drain(stream: Any) -> Iterator[Any]:
    try:
        yield from stream
    except grpc.RpcError as error:
        if error.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
            raise


def test_auth_on_mutating_calls(workspace: dict[str, str], tmp_path: Path) -> None:
    env = {**workspace, "ONESEEK_ADMIN_TOKEN": "s3cret-token"}
    proc = ServiceProcess("training-service", env=env, log=tmp_path / "auth.log").start()
    try:
        with grpc.insecure_channel(proc.addr) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            empty = training_pb2.StartRunRequest(dataset_id="small")
            for metadata in (
                (),
                (("authorization", "Bearer wrong"),),
                (("authorization", "s3cret-token"),),
            ):
                with pytest.raises(grpc.RpcError) as denied:
                    stub.StartRun(empty, metadata=metadata, timeout=5)
                assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(grpc.RpcError) as passed:
                stub.StartRun(
                    empty, metadata=(("authorization", "Bearer s3cret-token"),), timeout=5
                )
            assert passed.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # past auth
            stub.ListRuns(training_pb2.ListRunsRequest(), timeout=5)  # reads stay open
        assert "s3cret-token" not in proc.output()
    finally:
        proc.stop()


def test_the_active_run_limit_is_the_services_flag(
    workspace: dict[str, str], tmp_path: Path
) -> None:
    env = {**workspace, "ONESEEK_STATE_DIR": str(tmp_path / "var")}
    service = ServiceProcess(
        "training-service", "--max-active-runs", "2", env=env, log=tmp_path / "training.log"
    ).start()
    try:
        with grpc.insecure_channel(service.addr) as channel:
            stub = training_pb2_grpc.TrainingServiceStub(channel)
            assert stub.ListRuns(training_pb2.ListRunsRequest(), timeout=5).max_active_runs == 2
            one = {"epochs": 50, "models": ["tiny-gpt2"]}
            first, second = start(stub, **one), start(stub, **one)
            third = training_pb2.StartRunRequest(dataset_id="small", base_models=["tiny-gpt2"])
            with pytest.raises(grpc.RpcError) as busy:
                stub.StartRun(third, timeout=30)
            assert busy.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert first in busy.value.details() and second in busy.value.details()
            running = training_pb2.ListRunsRequest(status=training_pb2.RUN_STATUS_RUNNING)
            assert {r.run_id for r in stub.ListRuns(running, timeout=5).runs} == {first, second}
            for run_id in (first, second):
                stub.StopRun(training_pb2.StopRunRequest(run_id=run_id), timeout=10)
            for run_id in (first, second):
                last = watch(stub, run_id)[-1]
                assert last["status"] == "stopped", last
    finally:
        assert service.stop() == 0, service.output()

"""The training service with `--executor ray`, as deployed: a Ray head started with `ray start`
on this machine (loopback only), the service a driver of it; a run over gRPC trains its
members as actors and streams the same events as local; a run the cluster cannot host is
refused at once."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from services.api import training_pb2, training_pb2_grpc
from services.core.errors import Unavailable
from services.core.verify import verify_run_folder
from tests.processes import ServiceProcess, free_port, start_when_idle, workspace_env

pytest.importorskip("ray")
from services.training.ray_executor import cluster_resources

pytestmark = pytest.mark.slow

RAY = str(Path(sys.executable).parent / "ray")
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`ray start --head --block` with 2 CPUs on 127.0.0.1, in its own temp folder; stopping
    that one process stops its cluster (not any other Ray on the machine)."""
    port = free_port()
    env = {**os.environ, **RAY_ENV}
    head = [RAY, "start", "--head", "--block", "--port", str(port), "--num-cpus", "2"]
    head += ["--node-ip-address", "127.0.0.1", "--include-dashboard", "false"]
    head += ["--disable-usage-stats", "--temp-dir", str(tmp_path_factory.mktemp("ray"))]
    log = tmp_path_factory.mktemp("ray-log") / "head.log"
    with open(log, "wb") as output:
        process = subprocess.Popen(head, env=env, stdout=output, stderr=subprocess.STDOUT)
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:  # up once the GCS answers (the service asks it the same way)
            try:
                cluster_resources(address)
                break
            except Unavailable:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Ray head did not start:\n{log.read_text()}") from None
        yield address
    finally:
        process.terminate()
        process.wait(timeout=120)


@pytest.fixture
def service(tmp_path: Path, demo_models_dir: Path, ray_head: str) -> Iterator[ServiceProcess]:
    env = workspace_env(tmp_path, demo_models_dir, records=80)
    env.update(RAY_ENV, ONESEEK_EXECUTOR="ray", ONESEEK_RAY_ADDRESS=ray_head)
    process = ServiceProcess("training-service", env=env, log=tmp_path / "training.log").start()
    try:
        yield process
    finally:
        assert process.stop() == 0, process.output()


def test_a_run_trains_its_members_as_actors(service: ServiceProcess) -> None:
    request = training_pb2.StartRunRequest(
        dataset_id="small", base_models=["tiny-llama", "tiny-gpt2"], epochs=2, max_seq_length=32
    )
    with grpc.insecure_channel(service.addr) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        run_id = start_when_idle(stub, request)
        kinds = []
        for event in stub.WatchRun(training_pb2.WatchRunRequest(run_id=run_id), timeout=240):
            kind = event.WhichOneof("payload")
            if kind != "progress":
                kinds.append(
                    (kind, getattr(event, kind).epoch if kind != "training_complete" else 0)
                )
            if kind in ("training_complete", "training_error"):
                break
        run = stub.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=30)
    assert run.status == training_pb2.RUN_STATUS_COMPLETED, (run.error, service.output()[-3000:])
    per_epoch = [("epoch_start", 1), ("epoch_end", 1), ("weight_adjustment", 1)]
    per_epoch += [("epoch_start", 2), ("epoch_end", 2), ("weight_adjustment", 2)]
    assert kinds == [*per_epoch, ("training_complete", 0)]
    assert verify_run_folder(Path(run.run_dir)).ok
    for _ in range(100):  # the run's actors are gone once its worker is
        if "MemberActor" not in subprocess.run(["ps", "ax"], capture_output=True, text=True).stdout:
            break
        time.sleep(0.1)
    else:
        raise AssertionError("the run's member actors outlived it")


def test_a_run_the_cluster_cannot_host_is_refused(service: ServiceProcess) -> None:
    request = training_pb2.StartRunRequest(
        dataset_id="small", base_models=["tiny-llama", "tiny-gpt2", "tiny-qwen2"]
    )
    with grpc.insecure_channel(service.addr) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.StartRun(request, timeout=60)
        listed = stub.ListRuns(training_pb2.ListRunsRequest(), timeout=30)
    error: grpc.Call = refused.value  # type: ignore[assignment]
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "3 CPU(s), and it has 2" in (error.details() or "")
    assert list(listed.runs) == []

"""Resuming runs through the real training service: a worker killed with SIGKILL mid-epoch
fails the run, ResumeRun continues it from its last checkpoint to a verified folder with
every event once; and the runs resuming cannot help are refused with a reason."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from safetensors.torch import load_file, save_file

from services.api import training_pb2, training_pb2_grpc
from services.api.codec import event_to_dict
from services.core.verify import verify_run_folder
from services.training.run_folder import LOCK_FILE
from tests.processes import ServiceProcess, start_when_idle, workspace_env

pytestmark = pytest.mark.slow
MODELS = ["tiny-llama", "tiny-gpt2"]
WATCH_TIMEOUT = 240


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path) -> dict[str, str]:
    env = workspace_env(tmp_path_factory.mktemp("resume"), demo_models_dir, records=24)
    nan_model(Path(env["MODELS_DIR"]), "tiny-gpt2", "tiny-nan")
    return env


def nan_model(models: Path, source_name: str, name: str) -> None:
    """A copy of a demo model with one norm weight set to NaN: its loss is NaN at once."""
    source, broken = models / source_name, models / name
    broken.mkdir()
    for item in source.iterdir():
        if item.name != "model.safetensors":
            (broken / item.name).write_bytes(item.read_bytes())
    tensors = load_file(source / "model.safetensors")
    key = next(k for k in tensors if "ln_f" in k or "norm" in k)
    tensors[key] = tensors[key] * float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})


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
        base_models=fields.pop("models", MODELS),
        max_seq_length=32,
        batch_size=4,
        refresh_interval=0.05,
        auto_stop_threshold=0.0,
        **fields,
    )
    return start_when_idle(stub, request)


def resume(
    stub: training_pb2_grpc.TrainingServiceStub, run_id: str
) -> training_pb2.StartRunResponse:
    """ResumeRun, waiting while the run's old worker is still on its way out."""
    for _ in range(300):
        try:
            reply: training_pb2.StartRunResponse = stub.ResumeRun(
                training_pb2.ResumeRunRequest(run_id=run_id), timeout=60
            )
            return reply
        except grpc.RpcError as error:
            if "shutting down" not in (error.details() or ""):
                raise
            time.sleep(0.1)
    raise TimeoutError(f"the old worker of {run_id} never exited")


def refusal(stub: training_pb2_grpc.TrainingServiceStub, run_id: str) -> tuple[str, str]:
    """(status code name, message) of a ResumeRun that must fail."""
    with pytest.raises(grpc.RpcError) as refused:
        stub.ResumeRun(training_pb2.ResumeRunRequest(run_id=run_id), timeout=30)
    return refused.value.code().name, str(refused.value.details())


def run_dir(stub: training_pb2_grpc.TrainingServiceStub, run_id: str) -> Path:
    return Path(stub.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=5).run_dir)


def assert_checkpoints_removed(folder: Path, timeout: float = 30.0) -> None:
    """The worker removes its checkpoints right after it sends training_complete."""
    deadline = time.monotonic() + timeout
    while (folder / "checkpoints").exists():
        assert time.monotonic() < deadline, f"{folder / 'checkpoints'} is still there"
        time.sleep(0.05)


def worker_pid(folder: Path, timeout: float = 120.0) -> int:
    """The pid the run's worker wrote into its lock file (read without taking the lock)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            pid = int((folder / LOCK_FILE).read_text().strip())
            if Path(f"/proc/{pid}").exists():
                return pid
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    raise TimeoutError(f"no worker wrote its pid into {folder / LOCK_FILE}")


def watch(
    stub: training_pb2_grpc.TrainingServiceStub, run_id: str, after: int = 0
) -> Iterator[dict[str, Any]]:
    request = training_pb2.WatchRunRequest(run_id=run_id, after_seq=after)
    for event in stub.WatchRun(request, timeout=WATCH_TIMEOUT):
        yield event_to_dict(event)


def assert_whole_sequence(events: list[dict[str, Any]]) -> None:
    seqs = [e["seq"] for e in events]
    assert seqs == list(range(1, len(events) + 1)), f"gaps or duplicates in {seqs}"


def test_a_killed_worker_is_resumed_to_a_complete_verified_run(
    stub: training_pb2_grpc.TrainingServiceStub,
) -> None:
    run_id = start(stub, epochs=3)
    folder = run_dir(stub, run_id)
    pid = worker_pid(folder)
    live: list[dict[str, Any]] = []
    for event in watch(stub, run_id):
        live.append(event)
        if event["type"] == "progress" and event["epoch"] == 2 and pid:
            os.kill(pid, signal.SIGKILL)  # mid-epoch 2: epoch 1's checkpoint is on disk
            pid = 0
    ending = live[-1]
    assert ending["type"] == "training_error" and ending["status"] == "failed"
    assert "killed by signal 9" in ending["message"]
    failed = stub.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert failed.status == training_pb2.RUN_STATUS_FAILED
    assert (folder / "checkpoints" / "epoch-0001" / "state.json").is_file()

    # while it runs again, a second resume is refused as running
    reply = resume(stub, run_id)
    assert reply.run_id == run_id and reply.status == training_pb2.RUN_STATUS_RUNNING
    busy = refusal(stub, run_id)
    assert busy[0] == "FAILED_PRECONDITION" and "running" in busy[1]

    rest = list(watch(stub, run_id, after=ending["seq"]))
    everything = live + rest
    assert_whole_sequence(everything)
    done = everything[-1]
    assert done["type"] == "training_complete" and done["status"] == "completed"
    assert done["epochs_run"] == 3
    # the run picked up after epoch 1: epoch 2 started twice (once cut off), every epoch
    # ended once, and the stream holds exactly one ending before the last
    starts = [e["epoch"] for e in everything if e["type"] == "epoch_start"]
    assert starts == [1, 2, 2, 3]
    assert [e["epoch"] for e in everything if e["type"] == "epoch_end"] == [1, 2, 3]
    assert [e["type"] for e in everything].count("training_error") == 1

    # the journal on disk is the stream, and a fresh watcher gets the same
    logged = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert logged == everything
    assert list(watch(stub, run_id)) == everything

    results = json.loads((folder / "training_results.json").read_text())
    assert results["status"] == "completed" and results["epochs_run"] == 3
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]
    ended = {e["epoch"]: e for e in everything if e["type"] == "epoch_end"}
    assert [h["seq"] for h in results["history"]] == [ended[n]["seq"] for n in (1, 2, 3)]
    report = verify_run_folder(folder)
    assert report.ok, report.problems
    assert_checkpoints_removed(folder)
    run = stub.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=5)
    assert run.status == training_pb2.RUN_STATUS_COMPLETED and run.last_seq == len(everything)
    assert run.dna == done["dna"] and not run.HasField("error")

    finished = refusal(stub, run_id)
    assert finished[0] == "FAILED_PRECONDITION"
    assert "completed" in finished[1] and "start a new run" in finished[1]


def test_resume_waits_its_turn_behind_the_active_run(
    stub: training_pb2_grpc.TrainingServiceStub,
) -> None:
    """Two killed runs: while one is resumed (active), resuming the other is refused like a
    start would be, naming the active run."""
    first = start(stub, epochs=2, models=["tiny-gpt2"])
    os.kill(worker_pid(run_dir(stub, first)), signal.SIGKILL)
    assert list(watch(stub, first))[-1]["status"] == "failed"
    second = start(stub, epochs=2, models=["tiny-gpt2"])
    os.kill(worker_pid(run_dir(stub, second)), signal.SIGKILL)
    assert list(watch(stub, second))[-1]["status"] == "failed"

    resume(stub, first)  # no checkpoint yet: it starts again from epoch 1
    limited = refusal(stub, second)
    assert limited[0] == "FAILED_PRECONDITION"
    assert first in limited[1] and "limit" in limited[1]
    stub.StopRun(training_pb2.StopRunRequest(run_id=first), timeout=10)
    assert list(watch(stub, first))[-1]["status"] == "stopped"


def test_a_diverged_run_and_unknown_runs_are_refused(
    stub: training_pb2_grpc.TrainingServiceStub,
) -> None:
    run_id = start(stub, epochs=1, models=["tiny-nan"])
    ending = list(watch(stub, run_id))[-1]
    assert ending["type"] == "training_error" and "tiny-nan" in ending["message"]
    diverged = refusal(stub, run_id)
    assert diverged[0] == "FAILED_PRECONDITION"
    assert "would repeat" in diverged[1] and "tiny-nan" in diverged[1]

    unknown = refusal(stub, "run-20000101-000000")
    assert unknown[0] == "NOT_FOUND"
    malformed = refusal(stub, "run-1:2")
    assert malformed[0] == "INVALID_ARGUMENT"

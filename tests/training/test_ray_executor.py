"""The ray executor on a one-machine Ray cluster started here (loopback only): the same losses,
weights and events as local; a member actor killed mid-epoch costs nothing but time; a stop
stops every member; a run the cluster cannot host is refused, never left waiting."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from services.api import training_pb2
from services.api.codec import event_to_dict
from services.api.run_config import config_from_body
from services.core.errors import InvalidInput, Unavailable
from services.core.verify import verify_run_folder
from services.training.data import load_dataset
from services.training.events import EVENTS_FILE, EventLog, read_events
from services.training.executors import Executor, LocalExecutor
from services.training.member import StepInfo
from services.training.memory_plan import placements_of, planned_models
from services.training.models import resolve_models
from services.training.population import TrainingRun
from services.training.run_folder import RunFolder, RunSummary
from tests.conftest import REPO
from tests.processes import free_port

ray = pytest.importorskip("ray")
from services.training.ray_executor import (  # noqa: E402
    RAY_ENV,
    RayExecutor,
    cluster_check,
    cluster_resources,
)

pytestmark = pytest.mark.slow
MODELS = ["tiny-llama", "tiny-gpt2"]
REQUEST = {
    "datasetId": "sample",
    "baseModels": MODELS,
    "epochs": 2,
    "maxSeqLength": 32,
    "autoStopThreshold": 0.0,
    "refreshInterval": 0.01,
}


@pytest.fixture(scope="module")
def cluster() -> Iterator[str]:
    """A Ray cluster of this machine's 2 CPUs, every process of it on 127.0.0.1."""
    for key, value in RAY_ENV.items():
        os.environ[key] = value
    ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": dict(RAY_ENV)},
    )
    try:
        yield str(ray.get_runtime_context().gcs_address)
    finally:
        ray.shutdown()


@pytest.fixture
def models(tmp_path: Path, demo_models_dir: Path) -> Path:
    root = tmp_path / "models"
    root.mkdir()
    for name in MODELS:
        (root / name).symlink_to(demo_models_dir / name)
    return root


def train(
    models: Path,
    executor: Executor,
    run_id: str,
    on_step: Any = None,
    stop: threading.Event | None = None,
    on_event: Any = None,
    **request: Any,
) -> tuple[RunSummary, list[dict[str, Any]]]:
    config = config_from_body({**REQUEST, **request})
    folder = RunFolder.create(models, run_id)
    folder.write_manifest(config, [])
    seen: list[dict[str, Any]] = []

    def record(event: training_pb2.TrainingEvent) -> None:
        seen.append(event_to_dict(event))
        if on_event is not None:
            on_event(seen[-1])

    events = EventLog(run_id, path=folder.path / EVENTS_FILE, sinks=(record,))
    run = TrainingRun(
        config,
        run_id=run_id,
        models=resolve_models(MODELS, models),
        dataset=load_dataset("sample", REPO / "datasets"),
        folder=folder,
        events=events,
        stop=stop,
        on_step=on_step,
        executor=executor,
    )
    return run.run(), seen


def announced(seen: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    return [(e["type"], e.get("epoch")) for e in seen if e["type"] != "progress"]


def test_ray_trains_as_local_does(cluster: str, models: Path) -> None:
    local, local_events = train(models, LocalExecutor(), "run-20260301-000001")
    remote, remote_events = train(models, RayExecutor(cluster), "run-20260301-000002")
    assert local.status == remote.status == training_pb2.RUN_STATUS_COMPLETED, remote.error
    for mine, theirs in zip(remote.progress.history, local.progress.history, strict=True):
        for name in MODELS:
            assert mine["val_losses"][name] == pytest.approx(theirs["val_losses"][name], abs=1e-6)
            assert mine["weights"][name] == pytest.approx(theirs["weights"][name], abs=1e-6)
    assert announced(remote_events) == announced(local_events)
    assert [e["seq"] for e in remote_events] == list(range(1, len(remote_events) + 1))
    assert verify_run_folder(remote.run_dir).ok
    # the one visible difference: where each member ran, said by each epoch_start
    assert all(p["node"] == "" for p in local.placements)
    assert all("/" in p["node"] for p in remote.placements), remote.placements
    starts = [e for e in remote_events if e["type"] == "epoch_start"]
    assert all(sorted(p["model"] for p in e["placement"]) == sorted(MODELS) for e in starts), starts
    assert all(e["placement"] == [] for e in local_events if e["type"] == "epoch_start")


def kill(executor: RayExecutor, name: str) -> int:
    member = next(m for m in executor.members if m.name == name)
    pid: int = ray.get(member.actor.pid.remote())
    os.kill(pid, signal.SIGKILL)
    return pid


@pytest.mark.parametrize("when", ["mid-epoch", "after-epoch-end"])
def test_a_killed_member_actor_costs_only_time(cluster: str, models: Path, when: str) -> None:
    """kill -9 of a member's process while epoch 2 trains, or once epoch 1 is announced (its
    adapter not yet saved): every member goes back to epoch 1's checkpoint and the run ends
    as if nothing happened."""
    executor = RayExecutor(cluster)
    killed: list[int] = []

    def mid_epoch(step: StepInfo) -> None:
        if when == "mid-epoch" and step.epoch == 2 and step.step == 2 and not killed:
            killed.append(kill(executor, step.model))

    def after_epoch_end(event: dict[str, Any]) -> None:
        if when == "after-epoch-end" and event["type"] == "weight_adjustment" and not killed:
            killed.append(kill(executor, MODELS[0]))

    run_id = "run-20260301-00000" + ("3" if when == "mid-epoch" else "6")
    summary, seen = train(models, executor, run_id, on_step=mid_epoch, on_event=after_epoch_end)
    assert killed, "no member was killed"
    assert summary.status == training_pb2.RUN_STATUS_COMPLETED, summary.error
    run_dir = summary.run_dir
    logged = [event_to_dict(e) for e in read_events(run_dir / EVENTS_FILE)]
    assert [e["epoch"] for e in logged if e["type"] == "epoch_end"] == [1, 2]  # each once
    starts = [e["epoch"] for e in logged if e["type"] == "epoch_start"]
    assert starts == ([1, 2, 2] if when == "mid-epoch" else [1, 2])
    assert logged == seen
    assert verify_run_folder(run_dir).ok


def test_a_member_that_keeps_dying_fails_the_run_resumable(cluster: str, models: Path) -> None:
    config = config_from_body(REQUEST)
    folder = RunFolder.create(models, "run-20260301-000007")
    folder.write_manifest(config, [])
    executor = RayExecutor(cluster)

    def kill_every_time(step: StepInfo) -> None:
        if step.step == 1:
            kill(executor, step.model)

    run = TrainingRun(
        config,
        run_id=folder.run_id,
        models=resolve_models(MODELS, models),
        dataset=load_dataset("sample", REPO / "datasets"),
        folder=folder,
        events=EventLog(folder.run_id, path=folder.path / EVENTS_FILE),
        on_step=kill_every_time,
        executor=executor,
        max_member_restarts=1,
    )
    summary = run.run()
    assert summary.status == training_pb2.RUN_STATUS_FAILED and summary.resumable
    assert summary.error is not None and "more than the 1 restart(s) allowed" in summary.error
    assert run.restarts == 2


def test_a_stop_stops_every_member(cluster: str, models: Path) -> None:
    stop = threading.Event()

    def stop_soon(step: StepInfo) -> None:
        if step.step == 2:
            stop.set()

    summary, seen = train(
        models, RayExecutor(cluster), "run-20260301-000004", on_step=stop_soon, stop=stop
    )
    assert summary.status == training_pb2.RUN_STATUS_STOPPED
    assert seen[-1]["type"] == "training_complete" and seen[-1]["status"] == "stopped"
    assert verify_run_folder(summary.run_dir).ok


def test_a_run_the_cluster_cannot_host_is_refused(cluster: str) -> None:
    resources = cluster_resources(cluster)  # asked as the service asks: from a child process
    assert resources["CPU"] == 2 and resources.get("GPU", 0) == 0
    on_cpu = [training_pb2.Placement(model=f"m{i}", device="cpu") for i in range(3)]
    with pytest.raises(InvalidInput) as refused:
        cluster_check(resources, on_cpu)
    assert refused.value.field == "baseModels"
    assert "3 CPU(s), and it has 2" in str(refused.value)
    on_gpu = [training_pb2.Placement(model="m0", device="cuda:0")]
    with pytest.raises(InvalidInput) as no_gpu:
        cluster_check(resources, on_gpu)
    assert "1 GPU(s), and it has 0" in str(no_gpu.value)
    cluster_check(resources, on_cpu[:2])  # two fit
    cluster_check({"CPU": 1.0, "GPU": 2.0}, [*on_gpu, on_gpu[0], on_cpu[0]])


def test_an_unreachable_cluster_is_unavailable() -> None:
    with pytest.raises(Unavailable) as unreachable:
        cluster_resources(f"127.0.0.1:{free_port()}")
    assert "out of reach" in str(unreachable.value)


def test_on_a_cluster_with_gpus_each_member_asks_for_one(demo_models_dir: Path) -> None:
    config = config_from_body({**REQUEST, "precision": "auto"})
    infos = resolve_models(MODELS, demo_models_dir)
    records = load_dataset("sample", REPO / "datasets").records
    planned = planned_models(config, infos, records, cluster_gpus=4)
    placements = placements_of(planned) or []
    assert [(p.model, p.device) for p in placements] == [(m, "cuda:0") for m in MODELS]
    assert all(p.precision == training_pb2.PRECISION_AUTO for p in placements)
    assert all(p.estimated_bytes > 0 and p.overhead_bytes == 0 for p in placements)
    with pytest.raises(InvalidInput):
        cluster_check({"CPU": 8.0, "GPU": 1.0}, placements)


RAY_PROCESSES = ('(("ray::', '(("raylet"', '(("gcs_server"')
LOOPBACK = ("127.0.0.1:", "[::1]:", "[::ffff:127.0.0.1]:")


def test_the_cluster_talks_over_loopback_only(cluster: str, models: Path) -> None:
    """Every TCP connection of a Ray process, or of this driver, stays on 127.0.0.1."""
    assert cluster.startswith("127.0.0.1:")
    executor = RayExecutor(cluster)
    train(models, executor, "run-20260301-000005", epochs=1)
    sockets = subprocess.run(["ss", "-tnp"], capture_output=True, text=True, check=True).stdout
    mine = f"pid={os.getpid()},"
    checked = 0
    for line in sockets.splitlines()[1:]:
        if not any(name in line for name in RAY_PROCESSES) and mine not in line:
            continue
        local, peer = line.split()[3:5]
        assert local.startswith(LOOPBACK) and peer.startswith(LOOPBACK), line
        checked += 1
    assert checked > 0  # the cluster's own connections were seen

"""Training-side faults with the whole suite running: the training service killed with SIGKILL
mid-run (the metrics service and gateway keep answering; after a restart and a resume a
websocket client that reconnects with `since` ends with every event exactly once), and disk
trouble in the run folder (a `training_error` that names it, never a hang; then a resume)."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import grpc
import pytest

from services.api import training_pb2, training_pb2_grpc
from services.api.codec import event_to_dict
from services.core.verify import verify_run_folder
from tests.faults.suite import ADMIN, Suite, running_suite
from tests.faults.test_resume import resume, worker_pid
from tests.processes import ServiceProcess, workspace_env

pytestmark = pytest.mark.slow
MODELS = ["tiny-llama", "tiny-gpt2"]
START = "/api/admin/training/start-dna-v2"
RUN = "/api/admin/training"
QUICK_RUN = {
    "datasetId": "small",
    "baseModels": MODELS,
    "epochs": 3,
    "maxSeqLength": 32,
    "batchSize": 8,
    "autoStopThreshold": 0.0,
}
ADMIN_HEADERS = {"Authorization": f"Bearer {ADMIN}"}
EVENT_TIMEOUT = 120.0


async def next_event(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    """The next run event (initial_state and heartbeats skipped)."""
    while True:
        message: dict[str, Any] = await asyncio.wait_for(ws.receive_json(), EVENT_TIMEOUT)
        if message["type"] not in ("initial_state", "heartbeat"):
            return message


async def get_json(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url, headers=ADMIN_HEADERS) as reply:
        return reply.status, await reply.json()


async def start_quick_run(http: aiohttp.ClientSession, suite: Suite, **options: Any) -> str:
    """Starts a 3-epoch run of both models on 24 records through the gateway; its run id."""
    small = Path(suite.env["DATASETS_DIR"]) / "small.jsonl"
    small.write_text("\n".join(small.read_text().splitlines()[:24]) + "\n")
    body = {**QUICK_RUN, **options}
    async with http.post(suite.gateway.url + START, json=body, headers=ADMIN_HEADERS) as reply:
        assert reply.status == 202, await reply.text()
        run_id: str = (await reply.json())["runId"]
        return run_id


async def resume_over_rest(http: aiohttp.ClientSession, base: str, run_id: str) -> Any:
    """POST …/resume; asked again while the gateway has not found the restarted service yet
    (503, its channel reconnects within a second) or the run's old worker is still on its way
    out. The answer, which must be 202."""
    deadline = time.monotonic() + 15
    while True:
        async with http.post(f"{base}{RUN}/{run_id}/resume", headers=ADMIN_HEADERS) as reply:
            answer = await reply.json()
        waiting = reply.status == 503 or "shutting down" in answer.get("message", "")
        if not waiting or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert reply.status == 202, answer
    return answer


async def test_training_service_killed_mid_run_then_resumed_loses_no_event(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    with running_suite(tmp_path, demo_models_dir) as suite:
        base = suite.gateway.url
        async with aiohttp.ClientSession() as http:
            run_id = await start_quick_run(http, suite, refreshInterval=0.05)

            got: list[dict[str, Any]] = []
            feed = f"{base}/ws/training?runId={run_id}"
            async with http.ws_connect(feed + "&since=0") as ws:
                while not (got and got[-1]["type"] == "progress" and got[-1]["epoch"] == 2):
                    got.append(await next_event(ws))
                suite.training.kill()  # SIGKILL mid-epoch 2; its worker follows on its own
                # the page stays connected through the outage: the metrics service feeds it
                status, metrics = await get_json(http, f"{base}/api/training/{run_id}/metrics")
                assert status == 200 and metrics["current_epoch"] == 1
            status, runs = await get_json(http, f"{base}/api/training/runs")
            assert status == 200 and run_id in [r["run_id"] for r in runs["runs"]]
            async with http.get(f"{base}/healthz") as reply:
                health = await reply.json()
            assert health["training"] is False and health["metrics"] is True

            suite.training.start()  # same address: the metrics service follows it again
            deadline = time.monotonic() + EVENT_TIMEOUT
            while metrics["status"] != "interrupted":
                assert time.monotonic() < deadline, metrics
                await asyncio.sleep(0.2)
                status, metrics = await get_json(http, f"{base}/api/training/{run_id}/metrics")
            answer = await resume_over_rest(http, base, run_id)
            assert answer == {"success": True, "runId": run_id, "status": "running"}

            # a reloaded page: reconnect after the last event it had
            rest: list[dict[str, Any]] = []
            async with http.ws_connect(f"{feed}&since={got[-1]['seq']}") as ws:
                while not rest or rest[-1]["type"] != "training_complete":
                    rest.append(await next_event(ws))

            status, metrics = await get_json(http, f"{base}/api/training/{run_id}/metrics")

    everything = got + rest
    seqs = [e["seq"] for e in everything]
    assert seqs == list(range(1, len(everything) + 1)), f"lost or repeated: {seqs}"
    folder = suite.models_dir / "oneseek-certified" / run_id
    logged = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert everything == logged
    endings = [e for e in everything if e["type"] == "training_error"]
    assert [e["status"] for e in endings] == ["interrupted"]
    assert "resumed" in endings[0]["message"]
    assert everything[-1]["status"] == "completed"
    assert [e["epoch"] for e in everything if e["type"] == "epoch_end"] == [1, 2, 3]
    assert metrics["status"] == "completed" and metrics["current_epoch"] == 3
    assert [h["epoch"] for h in metrics["training_history"]] == [1, 2, 3]
    results = json.loads((folder / "training_results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]
    report = verify_run_folder(folder)
    assert report.ok, report.problems


# ---- disk trouble ------------------------------------------------------------------------------

FILE_SIZE_LIMIT = 24_000
"""Bytes: above the LoRA weights of tiny-gpt2 (~17 kB) and an epoch's events, below its
optimizer state (~35 kB), so the first checkpoint is what the 'disk' refuses."""


@pytest.fixture
def lone_service(tmp_path: Path, demo_models_dir: Path) -> Iterator[ServiceProcess]:
    env = workspace_env(tmp_path / "work", demo_models_dir, records=24)
    proc = ServiceProcess("training-service", env=env, log=tmp_path / "training.log").start()
    yield proc
    assert proc.stop() == 0, proc.output()


def test_a_full_disk_fails_the_run_saying_so_and_resume_finishes_it(
    lone_service: ServiceProcess,
) -> None:
    """RLIMIT_FSIZE on the worker stands in for a full disk (portable, no root, no tmpfs):
    its writes past the limit fail with EFBIG, as writes to a full disk fail with ENOSPC."""
    with grpc.insecure_channel(lone_service.addr) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        request = training_pb2.StartRunRequest(
            dataset_id="small", base_models=["tiny-gpt2"], epochs=2, max_seq_length=32
        )
        run_id = stub.StartRun(request, timeout=30).run_id
        folder = Path(stub.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=5).run_dir)
        resource.prlimit(worker_pid(folder), resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT,) * 2)
        watch = training_pb2.WatchRunRequest(run_id=run_id)
        first = [event_to_dict(e) for e in stub.WatchRun(watch, timeout=240)]
        error = first[-1]
        assert error["type"] == "training_error" and error["status"] == "failed"
        assert "File too large" in error["message"] and "epoch 1" in error["message"]
        assert str(folder / "checkpoints") in error["message"]
        run = stub.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=5)
        assert run.status == training_pb2.RUN_STATUS_FAILED and "File too large" in run.error

        # the disk has room again (a new worker, no limit): the run goes on and completes
        assert resume(stub, run_id).status == training_pb2.RUN_STATUS_RUNNING
        watch = training_pb2.WatchRunRequest(run_id=run_id, after_seq=error["seq"])
        rest = [event_to_dict(e) for e in stub.WatchRun(watch, timeout=240)]
    everything = first + rest
    assert [e["seq"] for e in everything] == list(range(1, len(everything) + 1))
    assert everything[-1]["type"] == "training_complete"
    assert everything[-1]["status"] == "completed"
    assert verify_run_folder(folder).ok


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through any file mode")
def test_an_unwritable_run_folder_fails_the_run_saying_so(
    lone_service: ServiceProcess,
) -> None:
    with grpc.insecure_channel(lone_service.addr) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        request = training_pb2.StartRunRequest(
            dataset_id="small", base_models=["tiny-gpt2"], epochs=2, max_seq_length=32
        )
        run_id = stub.StartRun(request, timeout=30).run_id
        folder = Path(stub.GetRun(training_pb2.GetRunRequest(run_id=run_id), timeout=5).run_dir)
        worker_pid(folder)
        folder.chmod(0o555)
        try:
            watch = training_pb2.WatchRunRequest(run_id=run_id)
            events = [event_to_dict(e) for e in stub.WatchRun(watch, timeout=240)]
        finally:
            folder.chmod(0o755)
    error = events[-1]
    assert error["type"] == "training_error" and error["status"] == "failed"
    assert "Permission denied" in error["message"] and str(folder) in error["message"]

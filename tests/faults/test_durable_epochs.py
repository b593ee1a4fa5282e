"""The training service killed (SIGKILL) right after an epoch_end left it: the epoch was made
durable before it was announced, so after a restart and a resume a replay from the start holds
each epoch_end exactly once; and the run reads `interrupted` within 2 s of the service's
return, because every channel's reconnect backoff is bounded."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from grpc import aio

from services.api import training_pb2, training_pb2_grpc
from services.core.verify import verify_run_folder
from tests.faults.suite import running_suite
from tests.faults.test_training_faults import (
    EVENT_TIMEOUT,
    get_json,
    resume_over_rest,
    start_quick_run,
)

pytestmark = pytest.mark.slow
INTERRUPTED_WITHIN = 2.0
OUTAGE = 30.0  # long enough for gRPC's own reconnect backoff to grow (it gave 8.8 s here)


async def kill_at_first_epoch_end(addr: str, run_id: str, kill: Any) -> None:
    """Follows the run on the training service itself (the client nearest the worker) and
    kills the service the moment the first epoch_end arrives."""
    async with aio.insecure_channel(addr) as channel:
        stub = training_pb2_grpc.TrainingServiceStub(channel)
        call = stub.WatchRun(training_pb2.WatchRunRequest(run_id=run_id), timeout=EVENT_TIMEOUT)
        async for event in call:
            if event.WhichOneof("payload") == "epoch_end":
                kill()
                return
    raise AssertionError("the run ended without an epoch_end")


async def test_an_announced_epoch_survives_a_kill_and_interrupted_shows_at_once(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    with running_suite(tmp_path, demo_models_dir) as suite:
        base = suite.gateway.url
        async with aiohttp.ClientSession() as http:
            run_id = await start_quick_run(http, suite)
            await kill_at_first_epoch_end(suite.training.addr, run_id, suite.training.kill)
            await asyncio.sleep(OUTAGE)

            suite.training.start()  # serving again on the same address
            returned = time.monotonic()
            while True:
                status, metrics = await get_json(http, f"{base}/api/training/{run_id}/metrics")
                if status == 200 and metrics["status"] == "interrupted":
                    break
                assert time.monotonic() - returned < EVENT_TIMEOUT, metrics
                await asyncio.sleep(0.02)
            took = time.monotonic() - returned
            print(f"interrupted shown {took:.2f} s after the training service's return")
            assert took < INTERRUPTED_WITHIN, f"{took:.2f} s"

            await resume_over_rest(http, base, run_id)

            replay: list[dict[str, Any]] = []
            async with http.ws_connect(f"{base}/ws/training?runId={run_id}&since=0") as ws:
                while not replay or replay[-1]["type"] != "training_complete":
                    message = await asyncio.wait_for(ws.receive_json(), EVENT_TIMEOUT)
                    if message["type"] != "heartbeat":
                        replay.append(message)

    assert [e["seq"] for e in replay] == list(range(1, len(replay) + 1))
    assert [e["epoch"] for e in replay if e["type"] == "epoch_end"] == [1, 2, 3]
    assert [e["epoch"] for e in replay if e["type"] == "weight_adjustment"] == [1, 2, 3]
    assert [e["status"] for e in replay if e["type"] == "training_error"] == ["interrupted"]
    folder = suite.models_dir / "oneseek-certified" / run_id
    logged = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines()]
    assert logged == replay
    results = json.loads((folder / "training_results.json").read_text())
    assert [h["epoch"] for h in results["history"]] == [1, 2, 3]
    report = verify_run_folder(folder)
    assert report.ok, report.problems

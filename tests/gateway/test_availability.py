"""A service that is down is a 503 with a clear message, and the gateway recovers by itself
when the service comes back (no restart of the gateway)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.gateway.conftest import ADMIN_HEADERS, GatewayFactory, Suite, answer, wait_until
from tests.processes import ServiceProcess

pytestmark = pytest.mark.slow


async def test_training_service_down_then_back(
    make_gateway: GatewayFactory, suite: Suite, tmp_path: Path
) -> None:
    late = ServiceProcess("training-service", env=suite.env, log=tmp_path / "late.log")
    gateway = await make_gateway(training_addr=late.addr)

    error = await answer(await gateway.get("/api/admin/models", headers=ADMIN_HEADERS), 503)
    assert error["error"] == "service_unavailable"
    assert "training service" in error["message"] and late.addr in error["message"]
    start = await gateway.post(
        "/api/admin/training/start-dna-v2",
        json={"datasetId": "small", "baseModels": ["tiny-llama"]},
        headers=ADMIN_HEADERS,
    )
    assert (await answer(start, 503))["error"] == "service_unavailable"
    health = await answer(await gateway.get("/healthz"), 503)
    assert health == {"status": "degraded", "training": False, "metrics": True}
    # the metrics side keeps answering meanwhile
    assert (await gateway.get("/api/training/runs")).status == 200

    await asyncio.to_thread(late.start)
    try:

        async def back() -> bool:
            response = await gateway.get("/api/admin/models", headers=ADMIN_HEADERS)
            return response.status == 200

        await wait_until(back, timeout=20)
        health = await answer(await gateway.get("/healthz"), 200)
        assert health["status"] == "ok"
    finally:
        assert await asyncio.to_thread(late.stop) == 0
    error = await answer(await gateway.get("/api/admin/datasets", headers=ADMIN_HEADERS), 503)
    assert error["error"] == "service_unavailable"
